r"""Aggressive inference-network training (He et al. 2019, *Lagging inference networks and
posterior collapse*): the option :class:`AggressiveInference` of
:class:`~latentnlp.training.TrainConfig`, its inner-loop stopping rule and the mutual
information that switches it off.

While the option is on, each update of the trainer is preceded by inner updates of the
inference network ``phi`` only (the parameters the model's
:meth:`~latentnlp.models.base.LatentModel.inference_parameters` names), each on a batch drawn
at random from the training data, with an optimiser of its own::

    repeat k = 1..max_inner_steps:   phi <- phi - lr * grad_phi L(x_k)      (x_k a fresh batch)
        every `window` steps: stop when mean_{last window} L  >=  mean_{window before}

then one update of the generative parameters ``theta`` (every other parameter) on the
trainer's batch, the inference network's gradient discarded.  ``L`` is the training loss per
target token (the negative ELBO surrogate).  After each epoch the mutual information
``I_q(x; z)`` of the validation set (:func:`validation_posterior`) is compared with
that of the epoch before: once it does not climb (``I_e < I_{e-1}``), the option is switched
off for the rest of the run and training continues with ordinary joint updates.

He et al.'s code compares windows of 15 inner steps (``window``) and takes ``max_inner_steps``
= 100; their MI is the average of per-batch estimates, capped at ``log(batch size)``; here it
is the estimate under the aggregate posterior of the whole validation set
(:func:`latentnlp.metrics.posterior_collapse.posterior_mutual_information`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from latentnlp.metrics.posterior_collapse import active_units, concatenate_posteriors, posterior_mutual_information
from latentnlp.models.base import LatentModel
from latentnlp.training.distributed import DataSource, to_device

__all__ = ["AggressiveInference", "StallRule", "mutual_information_climbs", "validation_posterior"]


@dataclass(frozen=True)
class AggressiveInference:
    """The aggressive schedule's settings (serialised into ``config.json`` by :meth:`to_dict`).

    ``max_inner_steps``: inner inference-network updates before each model update at most;
    ``window``: inner steps whose mean loss is compared with the window before (:class:`StallRule`);
    ``mi_samples``: samples ``z ~ q(z | x)`` per validation example in the MI estimate.
    """

    max_inner_steps: int = 100
    window: int = 10
    mi_samples: int = 1

    def __post_init__(self) -> None:
        for name in ("max_inner_steps", "window", "mi_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AggressiveInference: {name} must be an int >= 1, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AggressiveInference:
        return cls(**data)


class StallRule:
    """He et al.'s stopping rule of the inner loop: the loss summed over windows of ``window`` steps.

    :meth:`update` takes one inner step's summed loss and token count and returns True at the
    end of a window whose mean loss per token is not below that of the window before (the first
    window is compared with ``+inf`` and so never stops the loop).
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"StallRule: window must be >= 1, got {window}")
        self.window = window
        self.previous = math.inf
        self._loss, self._tokens, self._steps = 0.0, 0.0, 0

    def update(self, loss_sum: float, tokens: float) -> bool:
        self._loss, self._tokens, self._steps = self._loss + loss_sum, self._tokens + tokens, self._steps + 1
        if self._steps < self.window:
            return False
        current = self._loss / max(self._tokens, 1e-12)
        stalled = current >= self.previous
        self.previous = current
        self._loss, self._tokens, self._steps = 0.0, 0.0, 0
        return stalled


def mutual_information_climbs(previous: float, current: float) -> bool:
    """The rule that keeps the schedule on after an epoch: ``I_e >= I_{e-1}`` (He et al.: off once it falls)."""
    return current >= previous


@torch.no_grad()
def validation_posterior(
    model: LatentModel, data: DataSource, device: torch.device, *, num_samples: int = 1, seed: int = 0
) -> dict[str, float]:
    """Posterior-collapse diagnostics of ``data`` in evaluation mode: ``mi``, ``I_q(x; z)`` under
    the aggregate posterior of every example, and ``active_units`` (``Var_x E_q[z_d] > 0.01``).

    ``model.posterior(batch)`` must be a family that
    :func:`~latentnlp.metrics.posterior_collapse.concatenate_posteriors` joins (a diagonal
    Gaussian or a von Mises-Fisher, batch shape ``[B]``); the samples come from a generator
    seeded with ``seed``, so the training RNG is not touched.  The model's mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        posteriors = [model.posterior(to_device(batch, device)) for batch in data.iterate(0)]
    finally:
        model.train(was_training)
    try:
        q = concatenate_posteriors(posteriors)
    except ValueError as exc:
        raise ValueError(f"the posterior diagnostics cannot read {type(model).__name__}.posterior: {exc}") from None
    generator = torch.Generator().manual_seed(seed)
    mean = q.mean
    return {
        "mi": posterior_mutual_information(q, num_samples=num_samples, generator=generator),
        "active_units": active_units(mean) if mean.shape[0] > 1 else 0,
    }
