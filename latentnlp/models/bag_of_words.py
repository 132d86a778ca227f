r"""Bag-of-words latent models and the score-function baselines they share.

A document is a bag of words, ``counts [B, V]`` (floating-point, ``>= 0``, batch key
``"counts"``); its ``N = sum_v n_v`` tokens are the loss's denominator.  The models here
(:class:`~latentnlp.models.MixtureOfCategoricals`, :class:`~latentnlp.models.BernoulliFactorModel`)
estimate ``E_q[log p(x | z)]`` by the score function with one of :data:`BASELINES`; a
:class:`BagOfWordsModel` holds what those baselines need -- the running mean of the per-token
signal (buffers ``running_sum``, ``running_updates``) and the optional learned network
``baseline`` ``h(n / N)`` -- and :func:`score_function_with_baseline` uses them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from latentnlp import estimators
from latentnlp.models.base import Batch, LatentModel
from latentnlp.validation import describe, is_validating

__all__ = [
    "BASELINES",
    "BagOfWordsModel",
    "bag_counts",
    "check_elbo_options",
    "frequencies",
    "score_function_with_baseline",
    "taylor_control_variate",
]

#: the score function's baselines (``None``: none)
BASELINES = (None, "running-mean", "learned", "leave-one-out")


def check_elbo_options(
    estimator: str | None, baseline: str | None, control_variate: bool, estimators: tuple[str, ...]
) -> str:
    """The ELBO estimator a bag-of-words model uses (``None``: ``"exact"``), after checking that it is
    one of ``estimators``, that ``baseline`` is one of :data:`BASELINES`, and that a baseline or a
    control variate is asked for only with the score function."""
    estimator = "exact" if estimator is None else estimator
    if estimator not in estimators:
        raise ValueError(f"estimator must be one of {estimators}, got {estimator!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if (baseline is not None or control_variate) and estimator != "score_function":
        raise ValueError(
            f"baseline and control_variate belong to estimator='score_function', got estimator={estimator!r}"
        )
    return estimator


def bag_counts(batch: Batch, vocab_size: int, dtype: torch.dtype) -> Tensor:
    """The batch's ``counts [B, V]`` in ``dtype``, checked (shape always; values when validating)."""
    counts = batch.get("counts") if hasattr(batch, "get") else None
    if not isinstance(counts, Tensor) or counts.dim() != 2 or counts.shape[1] != vocab_size:
        raise ValueError(f"batch['counts'] must be a tensor [B, V] = [B, {vocab_size}], got {describe(counts)}")
    if not counts.is_floating_point():
        raise ValueError(f"batch['counts'] must be floating point (word counts), got dtype {counts.dtype}")
    if is_validating() and not bool(((counts >= 0) & torch.isfinite(counts)).all()):
        raise ValueError(f"batch['counts'] must be finite and >= 0, got values from {float(counts.min())}")
    return counts.to(dtype)


def frequencies(counts: Tensor) -> Tensor:
    """``n / N`` per row (zeros for an empty document), the inference networks' input."""
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)


def taylor_control_variate(
    relaxed_log_likelihood: Callable[[Tensor], Tensor], mean: Tensor, one_hot: Callable[[Tensor], Tensor]
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    r"""The first-order Taylor term of a relaxed log-likelihood around ``q``'s mean (MuProp, Gu et al. 2016).

    With ``mu`` the mean of ``q`` (``mean [B, D]``, differentiable in ``q``'s parameters),
    ``mu^ = stop(mu)`` and ``g = grad f~(mu^)`` (``relaxed_log_likelihood`` maps ``[B, D]`` points to
    ``[B]``; its parameters are held fixed),

    .. math:: c(z) = g \cdot (e(z) - \hat\mu), \qquad \mathbb{E}_q[c] = g \cdot (\mu - \hat\mu)

    whose value is 0 and whose gradient is ``g . grad mu``: ``e(z)`` is ``z`` as a point of
    ``[B, D]`` (``one_hot``: ``[S, B] -> [S, B, D]`` for a categorical, the bits for Bernoulli
    factors).  A baseline predicts the rest of the signal.  Returns ``(c, mean_c)`` for
    :func:`latentnlp.estimators.score_function`.
    """
    point = mean.detach().requires_grad_()
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(relaxed_log_likelihood(point).sum(), point)
    centre = (grad * point.detach()).sum(-1)

    def c(z: Tensor) -> Tensor:
        return (grad * one_hot(z)).sum(-1) - centre

    return c, (grad * (mean - mean.detach())).sum(-1)


class BagOfWordsModel(LatentModel):
    """A :class:`~latentnlp.models.LatentModel` over bags of words whose score-function estimators
    use the baselines of :func:`score_function_with_baseline`.

    Args:
        vocab_size: ``V``.
        baseline_decay: ``d`` of the running-mean baseline ``m <- d m + (1 - d) mean(signal)``
            (bias-corrected, as Adam's moments), in ``[0, 1)``.

    Subclasses define ``prior_logits`` (whose dtype the counts take) and call
    :meth:`build_baseline` once their own layers are built (so a seed gives them the same
    initial values with or without the learned baseline).
    """

    def __init__(self, vocab_size: int, baseline_decay: float) -> None:
        super().__init__()
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must lie in [0, 1), got {baseline_decay}")
        self.vocab_size, self.baseline_decay = vocab_size, baseline_decay
        self.register_buffer("running_sum", torch.zeros(()))
        self.register_buffer("running_updates", torch.zeros((), dtype=torch.long))

    def build_baseline(self, hidden_size: int, learned: bool) -> None:
        """Set ``baseline``: the network ``h: [B, V] -> [B, 1]`` (one tanh layer of ``hidden_size``)
        of ``baseline="learned"`` when ``learned``, else None (that baseline is then refused, and no
        parameter goes unused under the other estimators)."""
        self.baseline = (
            nn.Sequential(nn.Linear(self.vocab_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1))
            if learned
            else None
        )

    def _counts(self, batch: Batch) -> Tensor:
        return bag_counts(batch, self.vocab_size, self.prior_logits.dtype)

    def num_tokens(self, batch: Batch) -> Tensor:
        """``N`` of each document, ``[B]``."""
        return self._counts(batch).sum(-1)

    def running_mean(self) -> Tensor:
        """The running-mean baseline's current value per token (bias-corrected; 0 before any update)."""
        n = int(self.running_updates)
        if n == 0:
            return self.running_sum
        return self.running_sum / (1.0 - self.baseline_decay**n)


def score_function_with_baseline(
    model: BagOfWordsModel,
    f: Callable[[Tensor], Tensor],
    q: torch.distributions.Distribution,
    features: Tensor,
    tokens: Tensor,
    baseline: str | None,
    control_variate: tuple[Callable[[Tensor], Tensor], Tensor] | None,
    num_samples: int,
    generator: torch.Generator | None,
) -> estimators.Estimate:
    """:func:`latentnlp.estimators.score_function` with one of :data:`BASELINES` taken from ``model``.

    The signal of a document grows with its length ``N`` (``tokens [B]``), so both baselines
    predict it per token: ``"running-mean"`` is ``N m`` with ``m`` a running mean of the per-token
    signal ``(f - c) / N`` (:meth:`BagOfWordsModel.running_mean`), moved toward this call's batch mean in
    training mode; ``"learned"`` is ``N (m + h(features))`` with ``h`` the network
    ``model.baseline`` (``[B, F] -> [B, 1]``) fitted to what the running mean leaves (Mnih & Gregor
    2014's centring and input-dependent baseline, NVIL), the running mean moving as for
    ``"running-mean"``.
    """
    seen: dict[str, Tensor] = {}

    def signal(z: Tensor) -> Tensor:
        seen["z"] = z
        seen["f"] = f(z)
        return seen["f"]

    if baseline == "learned":
        if model.baseline is None:
            raise ValueError(f"baseline='learned' needs a {type(model).__name__} built with learned_baseline=True")
        b: Tensor | str | None = tokens * (model.running_mean() + model.baseline(features).squeeze(-1))
    elif baseline == "running-mean":
        b = tokens * model.running_mean()
    else:
        b = baseline
    estimate = estimators.score_function(
        signal, q, baseline=b, control_variate=control_variate, num_samples=num_samples, generator=generator
    )
    if baseline in ("running-mean", "learned") and model.training:
        with torch.no_grad():
            residual = seen["f"].detach()
            if control_variate is not None:
                residual = residual - control_variate[0](seen["z"])
            per_token = (residual / tokens.clamp_min(1.0)).mean()
            model.running_sum.mul_(model.baseline_decay).add_((1 - model.baseline_decay) * per_token)
            model.running_updates.add_(1)
    return estimate
