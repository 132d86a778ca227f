"""Schedules: a number that follows the update count, as a named, serialisable object.

A schedule maps the number of optimiser updates made so far, ``step`` (0, 1, 2, ...), to a
float.  Two uses:

- **loss weights** such as the KL weight of an ELBO (KL annealing): put the object in
  ``TrainConfig.objective_kwargs`` (``{"kl_weight": LinearWarmup(0.0, 1.0, 10_000)}``); the
  trainer passes ``schedule(step)`` to the model's loss at every update;
- **learning rates**: a multiplier of the base learning rate, ``lr(step) = lr * schedule(step)``
  for the update with index ``step`` (the trainer builds one from ``TrainConfig.schedule``).

Every schedule is a frozen dataclass: equal when its parameters are equal, written by
:meth:`Schedule.to_dict` as ``{"schedule": name, **parameters}`` and rebuilt by
:meth:`Schedule.from_dict` through a registry of names, so a config holding one round-trips
through JSON.  A new schedule is a frozen dataclass subclass with a ``name`` and a
``__call__``; defining it registers it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["Constant", "CosineDecay", "Cyclical", "LinearDecay", "LinearWarmup", "Schedule", "Warmup"]

_REGISTRY: dict[str, type[Schedule]] = {}


class Schedule:
    """Base class: ``schedule(step) -> float`` for ``step >= 0`` updates made."""

    #: the registry name written by :meth:`to_dict`
    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # a shared base of named schedules, not a schedule itself
            return
        if cls.name in _REGISTRY:
            raise ValueError(f"a schedule named {cls.name!r} exists already: {_REGISTRY[cls.name]}")
        _REGISTRY[cls.name] = cls

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """``{"schedule": name, **parameters}``, JSON-ready."""
        return {"schedule": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Schedule:
        """The schedule :meth:`to_dict` wrote; a ``ValueError`` names an unknown schedule."""
        params = dict(data)
        name = params.pop("schedule", None)
        if name not in _REGISTRY:
            raise ValueError(f"unknown schedule {name!r}; known: {sorted(_REGISTRY)}")
        return _REGISTRY[name](**params)

    @staticmethod
    def is_serialised(value: Any) -> bool:
        """Whether ``value`` is what :meth:`to_dict` writes (a mapping naming a known schedule)."""
        return isinstance(value, Mapping) and value.get("schedule") in _REGISTRY


def _check_steps(name: str, steps: int) -> None:
    if steps < 1:
        raise ValueError(f"{name} must be >= 1, got {steps}")


# ---- loss weights --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constant(Schedule):
    """``value`` at every step."""

    name: ClassVar[str] = "constant"
    value: float = 1.0

    def __call__(self, step: int) -> float:
        return float(self.value)


@dataclass(frozen=True)
class LinearWarmup(Schedule):
    """Linear from ``start`` to ``end`` over ``steps`` updates, then ``end``:

    ``w(t) = start + (end - start) * min(1, t / steps)``

    The KL annealing of Bowman et al. (2016), *Generating sentences from a continuous space*:
    ``LinearWarmup(0.0, 1.0, N)`` raises the KL weight from 0 to 1 over the first N updates.
    """

    name: ClassVar[str] = "linear_warmup"
    start: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        _check_steps("steps", self.steps)

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * min(1.0, step / self.steps)


@dataclass(frozen=True)
class Cyclical(Schedule):
    """Cyclical annealing (Fu et al. 2019, *Cyclical annealing schedule*): ``period``-update cycles,
    each rising linearly from ``start`` to ``end`` over its first ``ratio`` of updates, then
    holding ``end``; after ``cycles`` cycles (None: never) it stays at ``end``.  With
    ``tau = (t mod period) / period``:

    ``w(t) = start + (end - start) * min(1, tau / ratio)``    (``w(t) = end`` once ``t >= cycles * period``)

    Fu et al. use ``period = total updates / M`` for ``M = 4`` cycles and ``ratio = 0.5``.
    """

    name: ClassVar[str] = "cyclical"
    period: int
    ratio: float = 0.5
    start: float = 0.0
    end: float = 1.0
    cycles: int | None = None

    def __post_init__(self) -> None:
        _check_steps("period", self.period)
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.cycles is not None:
            _check_steps("cycles", self.cycles)

    def __call__(self, step: int) -> float:
        if self.cycles is not None and step >= self.cycles * self.period:
            return float(self.end)
        tau = (step % self.period) / self.period
        return self.start + (self.end - self.start) * min(1.0, tau / self.ratio)


# ---- learning-rate multipliers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Warmup(Schedule):
    """Learning-rate multiplier ramping up over the first ``steps`` updates, then 1:

    ``f(t) = min(1, (t + 1) / steps)``   (update ``t = 0`` already uses ``1 / steps``)

    Unlike :class:`LinearWarmup` (a KL weight, which starts at exactly ``start`` as in Bowman et
    al.), a learning-rate multiplier is never 0: an update with learning rate 0 would be wasted.
    """

    name: ClassVar[str] = "warmup"
    steps: int

    def __post_init__(self) -> None:
        _check_steps("steps", self.steps)

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)


@dataclass(frozen=True)
class _WarmupThenDecay(Schedule):
    """Learning-rate multiplier: warm up over ``warmup`` updates (as :class:`Warmup`), then fall from 1
    to ``floor`` at update ``total``:

    ``f(t) = (t + 1) / warmup`` for ``t < warmup``, else ``f(t) = floor + (1 - floor) * r(p)`` with
    ``p = min(1, (t - warmup) / max(1, total - warmup))`` and ``r`` the subclass's :meth:`remaining`.
    """

    total: int
    warmup: int = 0
    floor: float = 0.0

    def __post_init__(self) -> None:
        _check_steps("total", self.total)
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1] (a fraction of the learning rate), got {self.floor}")

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * self.remaining(progress)

    def remaining(self, progress: float) -> float:
        """``r(p)``: the fraction of the decay still ahead at progress ``p`` in ``[0, 1]`` (1 -> 0)."""
        raise NotImplementedError


@dataclass(frozen=True)
class LinearDecay(_WarmupThenDecay):
    """:class:`_WarmupThenDecay` falling linearly: ``r(p) = 1 - p``."""

    name: ClassVar[str] = "linear_decay"

    def remaining(self, progress: float) -> float:
        return 1.0 - progress


@dataclass(frozen=True)
class CosineDecay(_WarmupThenDecay):
    """:class:`_WarmupThenDecay` along half a cosine: ``r(p) = (1 + cos(pi p)) / 2``."""

    name: ClassVar[str] = "cosine_decay"

    def remaining(self, progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * progress))
