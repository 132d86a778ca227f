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
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical, kl_divergence

from latentnlp import estimators
from latentnlp.families import MaskedCategorical
from latentnlp.models.bag_of_words import (
    BagOfWordsModel,
    check_elbo_options,
    frequencies,
    score_function_with_baseline,
    taylor_control_variate,
)
from latentnlp.models.base import ELBO, Batch
from latentnlp.validation import describe

__all__ = ["ESTIMATORS", "MixtureCounts", "MixtureOfCategoricals"]

#: the estimators of ``E_q[log p(x | z)]`` that :meth:`MixtureOfCategoricals.elbo` offers
ESTIMATORS = ("exact", "score_function", "gumbel_softmax")


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


class MixtureOfCategoricals(BagOfWordsModel):
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
        if vocab_size < 1 or num_components < 1 or hidden_size < 1:
            raise ValueError(
                f"vocab_size, num_components and hidden_size must be >= 1, got {vocab_size}, "
                f"{num_components}, {hidden_size}"
            )
        super().__init__(vocab_size, baseline_decay)
        self.num_components = num_components
        self.prior_logits = nn.Parameter(torch.zeros(num_components))
        self.emission_logits = nn.Parameter(0.1 * torch.randn(num_components, vocab_size))
        self.encoder = nn.Sequential(
            nn.Linear(vocab_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, num_components)
        )
        self.build_baseline(hidden_size, learned_baseline)

    # ---- the model ----------------------------------------------------------------------------
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
          :data:`~latentnlp.models.bag_of_words.BASELINES`: ``"running-mean"`` (``N m``, ``m``
          a running mean of the per-token signal, updated in training mode), ``"learned"``
          (``b(x) = N (m + h(n / N))``, ``h`` a network trained by regression in the same
          backward pass), ``"leave-one-out"`` (``num_samples >= 2``); see
          :func:`~latentnlp.models.bag_of_words.score_function_with_baseline`; and
          ``control_variate=True`` (:func:`~latentnlp.models.bag_of_words.taylor_control_variate`
          of :meth:`relaxed_log_likelihood`).
        - ``"gumbel_softmax"``: :func:`latentnlp.estimators.relaxed` on
          :meth:`relaxed_log_likelihood`, temperature ``tau``; ``hard=False`` is biased in value
          and gradient (the relaxed points), ``hard=True`` (straight-through) has an unbiased
          value and a biased gradient.

        Every estimator's ``surrogate`` has the estimator's gradient for ``reconstruction -
        kl_weight * kl``; ``value`` is the estimated bound.
        """
        estimator = check_elbo_options(estimator, baseline, control_variate, ESTIMATORS)
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
