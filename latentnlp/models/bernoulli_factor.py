r"""A document model with ``k`` binary latent factors and a neural decoder.

The discrete-latent tutorial's example (Schulz & Aziz, *Variational inference and deep generative
models*; Kim, Wiseman & Rush 2018, section 5): a document switches ``k`` independent factors on or
off and its words are drawn given them,

.. math::

    z_j \sim \mathrm{Bern}(\phi_j),\ j = 1..k, \qquad x_1, \dots, x_N \mid z \sim \mathrm{Cat}(g(z)),
    \qquad
    \log p(x \mid z) = \sum_{v} n_v \log \mathrm{softmax}(g(z))_v

with ``phi = sigmoid(prior_logits)``, ``g`` a one-hidden-layer network ``{0, 1}^k -> R^V`` and
``n_v`` the count of word ``v`` (the probability of the tokens in their order, as for
:class:`~latentnlp.models.MixtureOfCategoricals`).  The posterior is mean-field,
``q(z | x) = prod_j Bern(sigmoid(enc(x))_j)``
(:class:`~latentnlp.families.MeanFieldBernoulli`), ``enc`` a network on the word frequencies.

For small ``k`` the ``2^k`` configurations are enumerated: the exact
``log p(x) = logsumexp_z [log p(z) + log p(x | z)]`` (``marginal``), the exact ELBO and its
gradient, against which the score-function estimators are measured; for any ``k``, ``iwae``
samples ``q``.

Batches: ``{"counts": [B, V]}``, floating-point word counts (``>= 0``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical, kl_divergence

from latentnlp import objectives
from latentnlp.families import MeanFieldBernoulli
from latentnlp.models.bag_of_words import (
    BagOfWordsModel,
    check_elbo_options,
    frequencies,
    score_function_with_baseline,
    taylor_control_variate,
)
from latentnlp.models.base import ELBO, Batch, IntractableError

__all__ = ["ESTIMATORS", "BernoulliFactorModel", "MAX_ENUMERATED_FACTORS"]

#: the largest ``k`` whose ``2^k`` configurations :class:`BernoulliFactorModel` enumerates
MAX_ENUMERATED_FACTORS = 16
ESTIMATORS = ("exact", "score_function")


class BernoulliFactorModel(BagOfWordsModel):
    r"""``k`` Bernoulli factors, words ``| z ~ Cat(softmax(g(z)))`` (the module's equations).

    Args:
        vocab_size: ``V``.
        num_factors: ``k``.
        hidden_size: width of ``g``, of the inference network and of the learned baseline.
        baseline_decay: the running-mean baseline's decay (as for
            :class:`~latentnlp.models.MixtureOfCategoricals`).
        learned_baseline: build the network of ``baseline="learned"``.
        chunk_size: configurations decoded at a time when enumerating (memory ``chunk_size x V``).

    Objectives: ``marginal`` and the exact ELBO for ``k <= MAX_ENUMERATED_FACTORS``
    (:class:`~latentnlp.models.IntractableError` beyond), ``elbo`` by the score function for any
    ``k``, ``iwae``.
    """

    objectives = ("marginal", "elbo", "iwae")

    def __init__(
        self,
        vocab_size: int,
        num_factors: int,
        hidden_size: int = 64,
        baseline_decay: float = 0.9,
        learned_baseline: bool = False,
        chunk_size: int = 256,
    ) -> None:
        if min(vocab_size, num_factors, hidden_size, chunk_size) < 1:
            raise ValueError(
                f"vocab_size, num_factors, hidden_size and chunk_size must be >= 1, got {vocab_size}, "
                f"{num_factors}, {hidden_size}, {chunk_size}"
            )
        super().__init__(vocab_size, baseline_decay)
        self.num_factors, self.chunk_size = num_factors, chunk_size
        self.prior_logits = nn.Parameter(torch.zeros(num_factors))
        self.decoder = nn.Sequential(nn.Linear(num_factors, hidden_size), nn.Tanh(), nn.Linear(hidden_size, vocab_size))
        self.encoder = nn.Sequential(nn.Linear(vocab_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, num_factors))
        self.build_baseline(hidden_size, learned_baseline)

    # ---- the model ----------------------------------------------------------------------------
    def prior(self) -> MeanFieldBernoulli:
        """``p(z) = prod_j Bern(sigmoid(prior_logits_j))``, batch shape ``[]``."""
        return MeanFieldBernoulli(self.prior_logits)

    def q(self, batch: Batch) -> MeanFieldBernoulli:
        """The amortised ``q(z | x)``, batch shape ``[B]``, event ``[k]``."""
        return MeanFieldBernoulli(self.encoder(frequencies(self._counts(batch))))

    def posterior(self, batch: Batch) -> Categorical:
        """The exact ``p(z | x)`` as a ``Categorical`` over the ``2^k`` configurations (configuration ``i``
        has the bits of ``i``, the most significant first: ``z_1`` is its top bit), batch shape ``[B]``.

        Raises :class:`~latentnlp.models.IntractableError` for ``k > MAX_ENUMERATED_FACTORS``, as
        :class:`~latentnlp.models.FactorialHMM` does beyond its exact size; :meth:`q` is the
        amortised approximation at any ``k``."""
        if self.num_factors > MAX_ENUMERATED_FACTORS:
            raise IntractableError(
                f"the exact posterior enumerates 2^k configurations for k <= {MAX_ENUMERATED_FACTORS}; "
                f"k = {self.num_factors} (q() is the amortised q(z | x))"
            )
        counts = self._counts(batch)
        prior = self.prior()
        logits = torch.cat([table + prior.log_prob(z) for z, table in self._enumerate(counts)], -1)
        return Categorical(logits=logits)

    def log_likelihood(self, counts: Tensor, z: Tensor) -> Tensor:
        """``log p(x | z) = sum_v n_v log softmax(g(z))_v`` for ``z [..., B, k]`` (bits, or points of
        ``[0, 1]^k``): ``[..., B]``."""
        return (counts * F.log_softmax(self.decoder(z), -1)).sum(-1)

    def _enumerate(self, counts: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """``(configurations [C, k], log p(x | z) [B, C])`` over all ``2^k`` configurations, in chunks."""
        k = self.num_factors
        if k > MAX_ENUMERATED_FACTORS:
            raise IntractableError(
                f"{type(self).__name__} enumerates 2^k configurations for k <= {MAX_ENUMERATED_FACTORS}; k = {k}"
            )
        bits = 2 ** torch.arange(k - 1, -1, -1, device=counts.device)
        for start in range(0, 2**k, self.chunk_size):
            index = torch.arange(start, min(start + self.chunk_size, 2**k), device=counts.device)
            configs = (index.unsqueeze(-1) // bits % 2).to(counts.dtype)  # [C, k]
            yield configs, counts @ F.log_softmax(self.decoder(configs), -1).t()

    def log_marginal(self, batch: Batch) -> Tensor:
        """``log p(x) = logsumexp_z [log p(z) + log p(x | z)]`` over the ``2^k`` configurations, ``[B]``."""
        counts = self._counts(batch)
        prior = self.prior()
        parts = [torch.logsumexp(table + prior.log_prob(z), -1) for z, table in self._enumerate(counts)]
        return torch.logsumexp(torch.stack(parts, -1), -1)

    # ---- bounds -------------------------------------------------------------------------------
    def elbo(
        self,
        batch: Batch,
        *,
        estimator: str | None = None,
        num_samples: int = 1,
        kl_weight: float = 1.0,
        baseline: str | None = None,
        control_variate: bool = False,
        generator: torch.Generator | None = None,
    ) -> ELBO:
        r"""``E_q[log p(x | z)] - KL(q || p)``, ``[B]``, the KL in closed form (mean-field Bernoulli).

        ``estimator``: ``"exact"`` (default; ``sum_z q(z) log p(x | z)`` over the ``2^k``
        configurations) or ``"score_function"`` with ``baseline`` one of
        :data:`~latentnlp.models.bag_of_words.BASELINES` and ``control_variate``
        (the Taylor term of :meth:`log_likelihood` around ``q``'s mean,
        :func:`~latentnlp.models.bag_of_words.taylor_control_variate`), as for
        :meth:`MixtureOfCategoricals.elbo <latentnlp.models.MixtureOfCategoricals.elbo>`.
        """
        estimator = check_elbo_options(estimator, baseline, control_variate, ESTIMATORS)
        counts = self._counts(batch)
        q = self.q(batch)
        kl = kl_divergence(q, self.prior())
        if estimator == "exact":
            reconstruction = sum(
                (q.log_prob(z.unsqueeze(1)).exp() * table.t()).sum(0) for z, table in self._enumerate(counts)
            )
            surrogate_reconstruction, reconstruction = reconstruction, reconstruction.detach()
        else:
            cv = None
            if control_variate:
                cv = taylor_control_variate(lambda y: self.log_likelihood(counts, y), q.probs, lambda z: z)
            estimate = score_function_with_baseline(
                self,
                lambda z: self.log_likelihood(counts, z),
                q,
                frequencies(counts),
                counts.sum(-1),
                baseline,
                cv,
                num_samples,
                generator,
            )
            surrogate_reconstruction, reconstruction = estimate.objective, estimate.value
        return ELBO(
            value=reconstruction - kl.detach(),
            reconstruction=reconstruction,
            kl=kl.detach(),
            surrogate=surrogate_reconstruction - kl_weight * kl,
        )

    def iwae(
        self,
        batch: Batch,
        num_samples: int,
        *,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``log 1/S sum_s p(x, z_s) / q(z_s | x)`` with ``z_s ~ q`` (:func:`latentnlp.objectives.iwae`,
        ``chunk_size`` samples at a time, drawn with ``generator``), ``[B]``."""
        counts = self._counts(batch)
        q = self.q(batch)
        return objectives.iwae(
            lambda z: self.log_likelihood(counts, z),
            q,
            self.prior().expand(q.batch_shape),
            num_samples,
            chunk_size=chunk_size,
            generator=generator,
        )
