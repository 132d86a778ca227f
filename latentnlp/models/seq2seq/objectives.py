"""Training objectives of the attentional decoder: the exact marginal, or an ELBO over alignments.

:class:`Marginal` trains ``log p(y | x)`` as the head computes it.  :class:`AlignmentELBO`
(Deng et al.'s "variational attention") adds an inference network ``q(z_t | x, y)`` and bounds

    sum_t E_{q(z_t)}[log p(y_t | h_t, s_{z_t})] - KL(q(z_t) || alpha_t)  <=  log p(y | x),

with equality when ``q`` is the exact posterior ``q(z_t = m) ∝ alpha_tm p(y_t | h_t, s_m)``.
The KL is exact; the expectation is estimated by one of (chosen at construction):

- :func:`enumerate_alignments`: ``sum_m q(z_t = m) log p(y_t | h_t, s_m)`` (exact),
- :func:`sample_alignments`: REINFORCE with a learned input-dependent baseline,
- :func:`relax_alignments`: straight-through Gumbel-softmax, ``log p(y_t | h_t, z_t^T s)``.

Each takes ``(head, run, targets, q, *, num_samples, baseline)`` and returns an
:class:`~latentnlp.estimators.Estimate` of ``E_q[log p(y_t | h_t, s_{z_t})]`` ``[B, T]``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.distributions import kl_divergence

from latentnlp import estimators
from latentnlp.families import MaskedCategorical
from latentnlp.layers.encoders import encode_packed
from latentnlp.masks import lengths_to_mask
from latentnlp.models.base import ELBO, Batch, UnsupportedObjectiveError
from latentnlp.models.seq2seq.core import AttentionalEncoderDecoder, DecoderOutput, masked_sum
from latentnlp.models.seq2seq.heads import LatentAttentionHead, Seq2SeqHead

__all__ = [
    "AlignmentELBO",
    "InferenceNetwork",
    "Marginal",
    "enumerate_alignments",
    "relax_alignments",
    "sample_alignments",
]

AlignmentEstimator = Callable[..., estimators.Estimate]


def enumerate_alignments(
    head: LatentAttentionHead,
    run: DecoderOutput,
    targets: Tensor,
    q: MaskedCategorical,
    *,
    num_samples: int = 1,
    baseline: Tensor | None = None,
) -> estimators.Estimate:
    """``sum_m q(z_t = m) log p(y_t | h_t, s_m)``: :func:`latentnlp.estimators.exact` over the ``S`` positions."""
    emission = head.emission_log_probs(run.hidden, targets, run.memory, run.memory_mask)
    return estimators.exact(emission, q)


def sample_alignments(
    head: LatentAttentionHead,
    run: DecoderOutput,
    targets: Tensor,
    q: MaskedCategorical,
    *,
    num_samples: int = 1,
    baseline: Tensor | None = None,
) -> estimators.Estimate:
    """:func:`latentnlp.estimators.score_function` with ``f(z) = log p(y_t | h_t, s_{z_t})``, ``baseline [B, T]``."""
    return estimators.score_function(
        lambda z: head.attention.log_prob_at(run.hidden, run.memory, z, targets),
        q,
        baseline=baseline,
        num_samples=num_samples,
    )


def relax_alignments(
    head: LatentAttentionHead,
    run: DecoderOutput,
    targets: Tensor,
    q: MaskedCategorical,
    *,
    num_samples: int = 1,
    baseline: Tensor | None = None,
    tau: float = 1.0,
) -> estimators.Estimate:
    """:func:`latentnlp.estimators.relaxed` (straight-through) with ``f(z) = log p(y_t | h_t, z_t^T s)``."""
    return estimators.relaxed(
        lambda z: head.attention.log_prob_given_context(run.hidden, torch.matmul(z, run.memory), targets),
        q.logits,
        tau,
        hard=True,
        num_samples=num_samples,
    )


class Marginal(nn.Module):
    """Train the exact marginal ``log p(y | x)``; no variational posterior."""

    objectives: ClassVar[tuple[str, ...]] = ("marginal",)

    def elbo(
        self,
        core: AttentionalEncoderDecoder,
        head: Seq2SeqHead,
        batch: Batch,
        run: DecoderOutput,
        targets: Tensor,
        scored: Tensor,
        **kwargs,
    ) -> ELBO:
        raise UnsupportedObjectiveError("this model has no variational posterior (its objective is the marginal)")

    def approximate_posterior(
        self, core: AttentionalEncoderDecoder, batch: Batch, scored: Tensor
    ) -> tuple[MaskedCategorical, Tensor]:
        raise NotImplementedError("this model has no inference network (its objective is the marginal)")


class InferenceNetwork(nn.Module):
    """``q(z_t = m | x, y) = softmax_m(g_t^T W s'_m)`` over the unmasked source positions.

    ``s'`` and ``g`` are bidirectional LSTMs (each direction ``H / 2``) over the source and the
    whole target ``y`` (``tgt_out``), on the core's embeddings.  Only the scored target positions
    are observed: an unscored one (``ignore_index``) inside a row reads a zero vector, and the
    target LSTM stops at each row's last scored position, so trailing ignored targets change
    nothing, as if the row were that much shorter.
    """

    def __init__(self, embedding_size: int, hidden_size: int) -> None:
        super().__init__()
        self.src_encoder = nn.LSTM(embedding_size, hidden_size // 2, batch_first=True, bidirectional=True)
        self.tgt_encoder = nn.LSTM(embedding_size, hidden_size // 2, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(
        self, core: AttentionalEncoderDecoder, batch: Batch, scored: Tensor
    ) -> tuple[MaskedCategorical, Tensor]:
        """``q`` with batch shape ``[B, T]`` and the target-side states ``g [B, T, H]`` it was computed from.

        ``scored [B, T]`` bool: the target positions observed (within ``tgt_lengths``, not ignored).
        """
        src_states, _ = encode_packed(
            self.src_encoder, core.embed_source(batch["src"]), batch["src_lengths"], always_pack=True
        )
        embedded = core.embed_target(batch["tgt_out"].masked_fill(~scored, 0)).masked_fill(~scored[..., None], 0.0)
        positions = torch.arange(1, scored.shape[1] + 1, device=scored.device)
        observed_lengths = torch.where(scored, positions, 0).amax(-1).clamp_min(1)
        tgt_states, _ = encode_packed(self.tgt_encoder, embedded, observed_lengths, always_pack=True)
        scores = torch.bmm(self.score(tgt_states), src_states.transpose(1, 2))
        mask = lengths_to_mask(batch["src_lengths"], batch["src"].shape[1])
        return MaskedCategorical(scores, mask[:, None, :], validate_args=False), tgt_states


class AlignmentELBO(nn.Module):
    """The ELBO over alignments with an inference network (see the module docstring).

    Args:
        embedding_size, hidden_size: the core's sizes.
        estimator: ``"exact"`` (:func:`enumerate_alignments`), ``"score_function"``
            (:func:`sample_alignments`, with a learned baseline ``b(h_t, g_t)``) or
            ``"gumbel_softmax"`` (:func:`relax_alignments` at temperature ``tau``).
    """

    objectives: ClassVar[tuple[str, ...]] = ("elbo", "marginal")
    #: what :meth:`elbo` may be asked for by name (e.g. the exact bound for evaluation)
    ESTIMATORS: ClassVar[tuple[str, ...]] = ("exact", "score_function", "gumbel_softmax")

    def __init__(self, embedding_size: int, hidden_size: int, estimator: str = "exact", *, tau: float = 1.0) -> None:
        super().__init__()
        if estimator not in self.ESTIMATORS:
            raise ValueError(f"estimator must be one of {self.ESTIMATORS}, got {estimator!r}")
        self.tau = tau
        self.inference = InferenceNetwork(embedding_size, hidden_size)
        self.baseline = None
        if estimator == "score_function":
            self.baseline = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1))
        self._estimators: dict[str, AlignmentEstimator] = {
            "exact": enumerate_alignments,
            "score_function": sample_alignments,
            "gumbel_softmax": partial(relax_alignments, tau=tau),
        }
        self.estimator = self._estimators[estimator]

    def approximate_posterior(
        self, core: AttentionalEncoderDecoder, batch: Batch, scored: Tensor
    ) -> tuple[MaskedCategorical, Tensor]:
        return self.inference(core, batch, scored)

    def elbo(
        self,
        core: AttentionalEncoderDecoder,
        head: LatentAttentionHead,
        batch: Batch,
        run: DecoderOutput,
        targets: Tensor,
        scored: Tensor,
        *,
        estimator: str | None = None,
        num_samples: int = 1,
        kl_weight: float = 1.0,
        q: MaskedCategorical | None = None,
    ) -> ELBO:
        """Per-example ELBO, summed over the ``scored [B, T]`` positions of ``run`` (the core's pass
        over ``batch``) with ``targets [B, T]`` (ids in range everywhere).  ``estimator`` names
        another of :attr:`ESTIMATORS` for this call, ``q`` replaces the inference network (then no
        baseline).  ``surrogate = estimate - kl_weight * KL``."""
        if estimator is None:
            estimate_fn = self.estimator
        elif estimator in self._estimators:
            estimate_fn = self._estimators[estimator]
        else:
            raise ValueError(f"estimator must be one of {self.ESTIMATORS}, got {estimator!r}")
        states = None
        if q is None:
            q, states = self.inference(core, batch, scored)
        prior = MaskedCategorical(run.log_alpha, run.memory_mask[:, None, :], validate_args=False)
        kl = masked_sum(kl_divergence(q, prior), scored)
        baseline = None
        if self.baseline is not None and states is not None:
            baseline = self.baseline(torch.cat([run.hidden.detach(), states.detach()], -1)).squeeze(-1)
        estimate = estimate_fn(head, run, targets, q, num_samples=num_samples, baseline=baseline)
        reconstruction = masked_sum(estimate.surrogate, scored)
        surrogate = masked_sum(estimate.objective, scored)
        return ELBO(
            value=reconstruction - kl, reconstruction=reconstruction, kl=kl, surrogate=surrogate - kl_weight * kl
        )
