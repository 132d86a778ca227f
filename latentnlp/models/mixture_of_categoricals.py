r"""A mixture of categoricals over bags of words (the "naive Bayes" document model).

The tutorial's Model 1 (Kim, Wiseman & Rush 2018, *A tutorial on deep latent variable models of
natural language*, section 3): each document has one latent class ``z`` and its words are drawn
independently given it,

.. math::

    z \sim \mathrm{Cat}(\pi), \qquad x_1, \dots, x_N \mid z \sim \mathrm{Cat}(\beta_z)
    \quad\Rightarrow\quad
    \log p(x) = \log \sum_{k=1}^{K} \pi_k \prod_{v=1}^{V} \beta_{kv}^{n_v}

with ``n_v`` the count of word ``v`` in the document: the probability of the document's tokens
in their order (no multinomial coefficient), so ``exp(-log p(x) / N)`` is its per-token
perplexity.  ``pi = softmax(prior_logits)``, ``beta_k = softmax(emission_logits[k])``.

The amortised posterior is ``q(z | x) = Cat(softmax(enc(x)))``, ``enc`` a one-hidden-layer
network on the document's word frequencies ``n / N``.  Since ``K`` is small everything is
measurable against the truth: the exact marginal, the exact posterior, the exact ELBO and its
gradient, beside each estimator of :meth:`MixtureOfCategoricals.elbo`; and the model has
closed-form EM (:meth:`MixtureOfCategoricals.em_step`).

Batches: ``{"counts": [B, V]}``, floating-point word counts (``>= 0``; rows may be any length).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical, kl_divergence

from latentnlp import estimators
from latentnlp.families import MaskedCategorical
from latentnlp.models.base import ELBO, Batch, LatentModel
from latentnlp.validation import describe, is_validating

__all__ = [
    "BASELINES",
    "ESTIMATORS",
    "MixtureCounts",
    "MixtureOfCategoricals",
    "bag_counts",
    "frequencies",
    "score_function_with_baseline",
    "taylor_control_variate",
]

#: the estimators of ``E_q[log p(x | z)]`` that :meth:`MixtureOfCategoricals.elbo` offers
ESTIMATORS = ("exact", "score_function", "gumbel_softmax")
#: the score function's baselines (``None``: none)
BASELINES = (None, "running-mean", "learned", "leave-one-out")


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


class MixtureCounts(NamedTuple):
    """Expected sufficient statistics of a batch under the current parameters.

    Attributes:
        components: ``[K]``, ``sum_d p(z_d = k | x_d)``.
        words: ``[K, V]``, ``sum_d p(z_d = k | x_d) n_dv``.
        log_likelihood: ``[]``, ``sum_d log p(x_d)`` under the parameters the counts came from.

    Counts of disjoint batches under the same parameters add (``a + b``).
    """

    components: Tensor
    words: Tensor
    log_likelihood: Tensor

    def __add__(self, other: object) -> MixtureCounts:  # type: ignore[override]
        if not isinstance(other, MixtureCounts):
            return NotImplemented
        return MixtureCounts(*(a + b for a, b in zip(self, other)))


class MixtureOfCategoricals(LatentModel):
    r"""Document mixture ``z ~ Cat(pi)``, words ``| z ~ Cat(beta_z)`` (the module's equations).

    Args:
        vocab_size: ``V``.
        num_components: ``K``.
        hidden_size: width of the inference network ``enc`` and of the learned baseline.
        baseline_decay: ``d`` of the running-mean baseline ``m <- d m + (1 - d) mean(signal)``
            (bias-corrected, as Adam's moments).
        learned_baseline: build the network ``h`` of ``baseline="learned"`` (:meth:`elbo`); without
            it that baseline is refused, and no parameter goes unused under the other estimators.

    Objectives: ``marginal`` (exact ``log p(x)``) and ``elbo`` (:meth:`elbo`, its expectation by
    one of :data:`ESTIMATORS`).  EM: :meth:`expected_counts`, :meth:`m_step`, :meth:`em_step`.
    """

    objectives = ("marginal", "elbo")

    def __init__(
        self,
        vocab_size: int,
        num_components: int,
        hidden_size: int = 64,
        baseline_decay: float = 0.9,
        learned_baseline: bool = False,
    ) -> None:
        super().__init__()
        if vocab_size < 1 or num_components < 1 or hidden_size < 1:
            raise ValueError(
                f"vocab_size, num_components and hidden_size must be >= 1, got {vocab_size}, "
                f"{num_components}, {hidden_size}"
            )
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must lie in [0, 1), got {baseline_decay}")
        self.vocab_size, self.num_components, self.baseline_decay = vocab_size, num_components, baseline_decay
        self.prior_logits = nn.Parameter(torch.zeros(num_components))
        self.emission_logits = nn.Parameter(0.1 * torch.randn(num_components, vocab_size))
        self.encoder = nn.Sequential(
            nn.Linear(vocab_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, num_components)
        )
        self.baseline = (
            nn.Sequential(nn.Linear(vocab_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1))
            if learned_baseline
            else None
        )
        self.register_buffer("running_sum", torch.zeros(()))
        self.register_buffer("running_updates", torch.zeros((), dtype=torch.long))

    # ---- the model ----------------------------------------------------------------------------
    def _counts(self, batch: Batch) -> Tensor:
        return bag_counts(batch, self.vocab_size, self.emission_logits.dtype)

    def num_tokens(self, batch: Batch) -> Tensor:
        """``N`` of each document, ``[B]``."""
        return self._counts(batch).sum(-1)

    def log_prior(self) -> Tensor:
        """``log pi``, ``[K]``."""
        return F.log_softmax(self.prior_logits, -1)

    def log_likelihoods(self, counts: Tensor) -> Tensor:
        """``log p(x | z = k) = sum_v n_v log beta_kv`` for every ``k``: ``[B, K]``."""
        return counts @ F.log_softmax(self.emission_logits, -1).t()

    def relaxed_log_likelihood(self, counts: Tensor, y: Tensor) -> Tensor:
        """``sum_v n_v log softmax(y W)_v`` at points ``y [..., B, K]`` of the simplex: ``[..., B]``.

        ``W = emission_logits``; at a one-hot ``y = e_k`` it is ``log p(x | z = k)``.  The
        Gumbel-softmax estimators and the control variate evaluate the likelihood here, as a
        decoder reads a relaxed class through its embedding.
        """
        return (counts * F.log_softmax(y @ self.emission_logits, -1)).sum(-1)

    def log_marginal(self, batch: Batch) -> Tensor:
        """``log p(x) = logsumexp_k [log pi_k + log p(x | z = k)]``, ``[B]``."""
        return torch.logsumexp(self.log_prior() + self.log_likelihoods(self._counts(batch)), -1)

    def posterior(self, batch: Batch) -> Categorical:
        """The exact ``p(z | x) = softmax(log pi + log p(x | z))``, batch shape ``[B]``."""
        return Categorical(logits=self.log_prior() + self.log_likelihoods(self._counts(batch)))

    def q(self, batch: Batch) -> MaskedCategorical:
        """The amortised ``q(z | x) = Cat(softmax(enc(n / N)))``, batch shape ``[B]``."""
        return MaskedCategorical(self.encoder(frequencies(self._counts(batch))))

    # ---- the ELBO -----------------------------------------------------------------------------
    def running_mean(self) -> Tensor:
        """The running-mean baseline's current value (bias-corrected; 0 before any update)."""
        n = int(self.running_updates)
        if n == 0:
            return self.running_sum
        return self.running_sum / (1.0 - self.baseline_decay**n)

    def elbo(
        self,
        batch: Batch,
        *,
        estimator: str | None = None,
        num_samples: int = 1,
        kl_weight: float = 1.0,
        baseline: str | None = None,
        control_variate: bool = False,
        tau: float = 1.0,
        hard: bool = False,
        generator: torch.Generator | None = None,
    ) -> ELBO:
        r"""``E_q[log p(x | z)] - KL(q(z | x) || Cat(pi))``, ``[B]``; the KL in closed form.

        ``estimator`` (default ``"exact"``) estimates the reconstruction and its gradient:

        - ``"exact"``: ``sum_k q_k log p(x | k)`` (:func:`latentnlp.estimators.exact`).
        - ``"score_function"``: ``num_samples`` draws ``z ~ q`` and the REINFORCE surrogate
          (:func:`latentnlp.estimators.score_function`) with ``baseline`` one of
          :data:`BASELINES`: ``"running-mean"`` (``N m``, ``m`` a running mean of the per-token
          signal, updated in training mode), ``"learned"`` (``b(x) = N (m + h(n / N))``, ``h`` a
          network trained by regression in the same backward pass), ``"leave-one-out"``
          (``num_samples >= 2``); see :func:`score_function_with_baseline`; and
          ``control_variate=True`` (:func:`taylor_control_variate` of
          :meth:`relaxed_log_likelihood`).
        - ``"gumbel_softmax"``: :func:`latentnlp.estimators.relaxed` on
          :meth:`relaxed_log_likelihood`, temperature ``tau``; ``hard=False`` is biased in value
          and gradient (the relaxed points), ``hard=True`` (straight-through) has an unbiased
          value and a biased gradient.

        Every estimator's ``surrogate`` has the estimator's gradient for ``reconstruction -
        kl_weight * kl``; ``value`` is the estimated bound.
        """
        estimator = "exact" if estimator is None else estimator
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if (baseline is not None or control_variate) and estimator != "score_function":
            raise ValueError(
                f"baseline and control_variate belong to estimator='score_function', got estimator={estimator!r}"
            )
        counts = self._counts(batch)
        q = self.q(batch)
        kl = kl_divergence(q, Categorical(logits=self.prior_logits))
        log_lik = self.log_likelihoods(counts)  # [B, K]
        if estimator == "exact":
            estimate = estimators.exact(log_lik, q)
        elif estimator == "gumbel_softmax":
            estimate = estimators.relaxed(
                lambda y: self.relaxed_log_likelihood(counts, y),
                q.logits,
                tau,
                hard=hard,
                num_samples=num_samples,
                generator=generator,
            )
        else:

            def f(z: Tensor) -> Tensor:  # [S, B] classes -> [S, B] log p(x | z)
                return log_lik.expand(z.shape[0], *log_lik.shape).gather(-1, z.unsqueeze(-1)).squeeze(-1)

            cv = None
            if control_variate:
                cv = taylor_control_variate(
                    lambda y: self.relaxed_log_likelihood(counts, y),
                    q.probs,
                    lambda z: F.one_hot(z, self.num_components).to(q.probs.dtype),
                )
            estimate = score_function_with_baseline(
                self, f, q, frequencies(counts), counts.sum(-1), baseline, cv, num_samples, generator
            )
        reconstruction = estimate.value
        return ELBO(
            value=reconstruction - kl.detach(),
            reconstruction=reconstruction,
            kl=kl.detach(),
            surrogate=estimate.objective - kl_weight * kl,
        )

    # ---- EM -----------------------------------------------------------------------------------
    @torch.no_grad()
    def expected_counts(self, batch: Batch) -> MixtureCounts:
        r"""E-step: responsibilities ``r_dk = p(z_d = k | x_d)`` summed into
        ``components_k = sum_d r_dk`` and ``words_kv = sum_d r_dk n_dv``."""
        counts = self._counts(batch)
        joint = self.log_prior() + self.log_likelihoods(counts)
        log_px = torch.logsumexp(joint, -1)
        r = torch.exp(joint - log_px.unsqueeze(-1))
        return MixtureCounts(r.sum(0), r.t() @ counts, log_px.sum())

    @torch.no_grad()
    def m_step(self, counts: MixtureCounts, smoothing: float = 0.0) -> None:
        r"""M-step in closed form: ``pi_k prop. components_k + c``, ``beta_kv prop. words_kv + c``.

        ``c = smoothing >= 0`` pseudo-counts (MAP under a symmetric Dirichlet of concentration
        ``1 + c``).  A row with nothing to normalise becomes uniform.  Sets ``prior_logits`` and
        ``emission_logits`` to the logs (``-inf`` where a probability is 0).
        """
        if not (isinstance(smoothing, (int, float)) and math.isfinite(smoothing) and smoothing >= 0):
            raise ValueError(f"smoothing must be a finite number >= 0, got {smoothing!r}")
        k, v = self.num_components, self.vocab_size
        if counts.components.shape != (k,) or counts.words.shape != (k, v):
            raise ValueError(
                f"counts must have components [K] = [{k}] and words [K, V] = [{k}, {v}], got "
                f"{describe(counts.components)} and {describe(counts.words)}"
            )
        for table, param in ((counts.components, self.prior_logits), (counts.words, self.emission_logits)):
            total = table + smoothing
            norm = total.sum(-1, keepdim=True)
            probs = torch.where(norm > 0, total / norm.clamp_min(torch.finfo(total.dtype).tiny), 1.0 / total.shape[-1])
            param.copy_(probs.log())

    def em_step(self, batch: Batch, smoothing: float = 0.0) -> Tensor:
        """One EM iteration on ``batch``: :meth:`expected_counts` then :meth:`m_step`.

        Returns ``sum_d log p(x_d)`` under the parameters *before* the update (EM never lowers it).
        For a corpus, sum :meth:`expected_counts` over its batches and call :meth:`m_step` once.
        """
        counts = self.expected_counts(batch)
        self.m_step(counts, smoothing)
        return counts.log_likelihood


def score_function_with_baseline(
    model: nn.Module,
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
    signal ``(f - c) / N`` (``model.running_mean()``, from the buffers ``running_sum`` and
    ``running_updates`` and ``model.baseline_decay``), moved toward this call's batch mean in
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
