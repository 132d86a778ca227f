"""``TrainConfig``: everything that decides a training run, its JSON form and its command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from latentnlp.models.base import OBJECTIVES
from latentnlp.schedules import Schedule
from latentnlp.training.aggressive import AggressiveInference

__all__ = ["OPTIMIZERS", "SCHEDULES", "SELECTION_METRICS", "TrainConfig"]

OPTIMIZERS = ("adam", "adamw", "sgd")
#: learning-rate schedules by name (``TrainConfig.schedule`` may also be a Schedule object)
SCHEDULES = ("none", "plateau", "linear", "cosine")
#: what the best checkpoint may be selected on (None: the evaluation objective's own quantity)
SELECTION_METRICS = ("nll", "neg_elbo")


@dataclass
class TrainConfig:
    """Everything that decides a training run (written to ``config.json``).

    Optimisation: ``optimizer`` (``adam``, ``adamw``, ``sgd``), ``lr``, ``weight_decay``,
    ``betas`` (Adam), ``momentum`` (SGD), ``grad_clip`` (max global gradient norm, or None).

    Schedule (``schedule``): ``none`` (constant); ``plateau`` (multiply the lr by
    ``decay_factor`` when the validation metric has not improved for more than
    ``decay_patience`` evaluations, down to ``min_lr``); ``linear`` and ``cosine`` (decay from
    ``lr`` to ``min_lr`` over all updates: :class:`~latentnlp.schedules.LinearDecay`,
    :class:`~latentnlp.schedules.CosineDecay`).  ``warmup_steps`` ramps the lr linearly up over
    the first updates (``none``: :class:`~latentnlp.schedules.Warmup`; ``linear``, ``cosine``).
    A :class:`~latentnlp.schedules.Schedule` object is used as it is: the lr of update ``t`` is
    ``lr * schedule(t)`` (``warmup_steps`` and ``min_lr`` then do not apply).

    Length: ``max_epochs``; ``max_steps`` (optimiser updates; skipped batches do not count).

    Objective: ``objective`` and ``objective_kwargs`` for ``model(batch, objective, **kwargs)``;
    a :class:`~latentnlp.schedules.Schedule` value is evaluated at the number of updates made
    so far (KL annealing: ``{"kl_weight": LinearWarmup(0.0, 1.0, 10000)}``); any other callable
    is refused, since it could not be written to ``config.json``.  Evaluation uses
    ``eval_objective`` / ``eval_kwargs`` (default: the training ones).

    Evaluation: on ``valid_data`` at every epoch end and every ``eval_every`` updates.  The
    validation metric ``select_on`` selects ``best.pt``: ``nll`` (exact or importance-weighted
    negative log-likelihood per token), ``neg_elbo`` (the negative ELBO per token, a bound), or
    None for the evaluation objective's own quantity (``neg_elbo`` under ``elbo``, else
    ``nll``); the metric used is recorded in ``config.json``, every validation event and the
    summary.  Training stops early after ``patience`` evaluations without improvement.
    ``restore_best`` loads the best parameters back at the end (before the test evaluation).

    Bookkeeping: ``seed`` (RNG seeding at the start of a fresh run; rank r uses seed + r),
    ``output_dir`` (None: no files), ``overwrite``, ``checkpoint_every`` (updates; ``last.pt``
    is also written at each epoch end), ``log_every`` (updates per training log line),
    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``...), ``progress`` (rank 0 reports
    progress: tqdm bars when stderr is a terminal, else a log line per log event through the
    ``latentnlp.training`` logger), ``find_unused_parameters`` (DDP; on by default because many
    models leave some parameters out of some objectives, e.g. the inference network under
    ``marginal``; set it False for speed when every step reaches every parameter).

    Aggressive inference-network training (He et al. 2019): ``aggressive_inference``, an
    :class:`~latentnlp.training.aggressive.AggressiveInference` (None: off), runs inner updates
    of the model's :meth:`~latentnlp.models.base.LatentModel.inference_parameters` before each
    update until the training objective (``elbo`` or ``iwae``) stalls, and switches itself off
    after the first epoch whose validation ``I(x; z)`` falls (:mod:`~latentnlp.training.aggressive`).
    ``posterior_diagnostics`` logs the validation ``I(x; z)`` and active units after every epoch
    (a ``posterior`` event; the aggressive schedule logs them while it is on); both need a model
    whose posterior is a diagonal Gaussian or a von Mises-Fisher
    (:func:`~latentnlp.metrics.posterior_collapse.concatenate_posteriors`).

    ``TrainConfig.from_dict(config.to_dict()) == config``: the JSON form round-trips.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0
    grad_clip: float | None = None

    schedule: str | Schedule = "none"
    warmup_steps: int = 0
    min_lr: float = 0.0
    decay_factor: float = 0.5
    decay_patience: int = 0

    max_epochs: int = 10
    max_steps: int | None = None

    objective: str = "marginal"
    objective_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_objective: str | None = None
    eval_kwargs: dict[str, Any] | None = None

    eval_every: int | None = None
    select_on: str | None = None
    patience: int | None = None
    restore_best: bool = True

    seed: int = 0
    output_dir: str | None = None
    overwrite: bool = False
    checkpoint_every: int | None = None
    log_every: int = 100
    device: str = "auto"
    progress: bool = True
    find_unused_parameters: bool = True

    aggressive_inference: AggressiveInference | None = None
    posterior_diagnostics: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not isinstance(self.schedule, Schedule) and self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {SCHEDULES} or a latentnlp.schedules.Schedule, got {self.schedule!r}"
            )
        for name in ("objective", "eval_objective"):
            value = getattr(self, name)
            if value is not None and value not in OBJECTIVES:
                raise ValueError(f"{name} must be one of {OBJECTIVES}, got {value!r}")
        if self.select_on is not None and self.select_on not in SELECTION_METRICS:
            raise ValueError(f"select_on must be None or one of {SELECTION_METRICS}, got {self.select_on!r}")
        evaluated = self.eval_objective or self.objective
        if (self.select_on == "nll" and evaluated == "elbo") or (
            self.select_on == "neg_elbo" and evaluated in ("marginal", "iwae")
        ):
            raise ValueError(
                f"select_on={self.select_on!r}, but the validation objective {evaluated!r} gives "
                f"{'neg_elbo' if evaluated == 'elbo' else 'nll'}"
            )
        for name in ("objective_kwargs", "eval_kwargs"):
            for key, value in (getattr(self, name) or {}).items():
                if callable(value) and not isinstance(value, Schedule):
                    raise ValueError(
                        f"{name}[{key!r}] is a callable ({value!r}), which config.json cannot record; "
                        f"use a schedule object from latentnlp.schedules, e.g. LinearWarmup(0.0, 1.0, 10000)"
                    )
        if isinstance(self.schedule, Schedule) and (self.warmup_steps or self.min_lr):
            raise ValueError(
                "warmup_steps and min_lr apply to the named schedules; a Schedule object "
                "holds its own warmup and floor (e.g. LinearDecay(total, warmup, floor))"
            )
        if self.schedule == "plateau" and self.warmup_steps:
            raise ValueError("warmup_steps is not supported with schedule='plateau'")
        for name in ("max_steps", "eval_every", "checkpoint_every", "patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")
        if self.max_epochs < 1 or self.log_every < 1 or self.warmup_steps < 0:
            raise ValueError("max_epochs and log_every must be >= 1, warmup_steps >= 0")
        if not 0 < self.decay_factor < 1:
            raise ValueError(f"decay_factor must be in (0, 1), got {self.decay_factor}")
        if self.aggressive_inference is not None:
            if not isinstance(self.aggressive_inference, AggressiveInference):
                raise ValueError(
                    f"aggressive_inference must be None or an AggressiveInference, got {self.aggressive_inference!r}"
                )
            if self.objective not in ("elbo", "iwae"):
                raise ValueError(
                    f"aggressive_inference trains an inference network on a variational bound: objective "
                    f"must be 'elbo' or 'iwae', got {self.objective!r}"
                )

    @property
    def selection_metric(self) -> str:
        """The validation metric that selects ``best.pt`` (``select_on`` resolved): ``neg_elbo``
        where validation reports a bound that is not a likelihood estimate (``elbo``, and
        ``wake-sleep`` with one wake sample, whose bound is a one-sample ELBO), else ``nll``."""
        if self.select_on is not None:
            return self.select_on
        evaluated = self.eval_objective or self.objective
        kwargs = self.objective_kwargs if self.eval_kwargs is None else self.eval_kwargs
        if evaluated == "elbo" or (evaluated == "wake-sleep" and kwargs.get("num_samples", 1) < 2):
            return "neg_elbo"
        return "nll"

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; schedules are written as :meth:`Schedule.to_dict` gives them."""
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """The config :meth:`to_dict` wrote (e.g. ``config.json``'s ``trainer`` entry)."""
        values = {k: _from_json(v) for k, v in data.items()}
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        if values.get("aggressive_inference") is not None:
            values["aggressive_inference"] = AggressiveInference.from_dict(values["aggressive_inference"])
        return cls(**values)

    # ---- command line -------------------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add the run-control flags recipes share (``--overwrite``, ``--device``, ...)."""
        group = parser.add_argument_group("training")
        group.add_argument(
            "--overwrite", action="store_true", help="start afresh in an output dir that holds a finished run"
        )
        group.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
        group.add_argument("--seed", type=int, default=None)
        group.add_argument("--max-epochs", type=int, default=None)
        group.add_argument("--max-steps", type=int, default=None)
        group.add_argument("--no-progress", action="store_true", help="no progress bars")

    def with_arguments(self, args: argparse.Namespace) -> TrainConfig:
        """A copy with the flags of :meth:`add_arguments` that were given applied."""
        changes: dict[str, Any] = {}
        for name in ("device", "seed", "max_epochs", "max_steps"):
            value = getattr(args, name, None)
            if value is not None:
                changes[name] = value
        if getattr(args, "overwrite", False):
            changes["overwrite"] = True
        if getattr(args, "no_progress", False):
            changes["progress"] = False
        return dataclasses.replace(self, **changes)


def _to_json(value: Any) -> Any:
    if isinstance(value, (Schedule, AggressiveInference)):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if Schedule.is_serialised(value):
        return Schedule.from_dict(value)
    if isinstance(value, Mapping):
        return {k: _from_json(v) for k, v in value.items()}
    return value
