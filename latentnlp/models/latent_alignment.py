"""Sequence-to-sequence with attention as a latent alignment (Deng et al. 2018).

A :class:`LatentAlignmentSeq2Seq` is an encoder-decoder core
(:class:`~latentnlp.models.seq2seq.AttentionalEncoderDecoder`: BiLSTM encoder, input-feeding
LSTM decoder giving ``h_t`` and the prior alignments ``alpha_t``), an output head
(:mod:`latentnlp.models.seq2seq.heads`) and an objective
(:mod:`latentnlp.models.seq2seq.objectives`).  The joint factorises as
``p(y, z | x) = prod_t alpha_t(z_t) p(y_t | h_t, s_{z_t})``; the published modes are
combinations (:meth:`LatentAlignmentSeq2Seq.from_mode`, :data:`MODES`):

================  ==========================================================  =====================
mode              head + objective                                            objectives
================  ==========================================================  =====================
``soft``          soft attention ``log p(y_t | h_t, c_t)`` + marginal         marginal
``exact``         latent attention ``log sum_m alpha_tm p(y_t | h_t, s_m)``   marginal
``elbo-enum``     latent attention + ELBO, ``E_q`` enumerated over ``S``      elbo, marginal
``elbo-sample``   latent attention + ELBO, REINFORCE with a learned baseline  elbo, marginal
``elbo-gumbel``   latent attention + ELBO, straight-through Gumbel-softmax    elbo, marginal
``copy``          soft attention + exactly marginalised copy switch           marginal
``exact-topK``    latent attention pruned to the ``K`` positions of highest   elbo, marginal
                  prior (``K`` = 3, 5, 10) + :class:`PrunedMarginal`: trains
                  ``log sum_{m in top K} alpha_tm p(y_t | h_t, s_m)``
================  ==========================================================  =====================

``log_marginal`` is always the head's exact ``log p(y | x)`` (for the latent-attention head the
alignment summed out under the prior over every source position, pruned or not, so evaluation
compares every mode on the same quantity; the soft and copy heads have no alignment latent
besides the copy choice and give their own likelihood).  A pruned mode trains its lower bound
as ``objective="elbo"`` (:class:`PrunedMarginal`: the pruned sum is the ELBO whose ``q`` is the
exact posterior restricted to the ``K`` kept positions), which reads out ``B T K`` instead of
``B T S`` rows, and decodes with the pruned scores.

Batch keys: ``src [B, S]``, ``src_lengths [B]``, ``tgt_in [B, T]`` (``<bos> y``),
``tgt_out [B, T]`` (``y <eos>``), ``tgt_lengths [B]``; for the copy head also
``src_ext [B, S]`` (source tokens as extended target ids, required unless the
source and target vocabularies have the same size, i.e. are shared) and,
optionally, ``tgt_out_ext [B, T]`` (targets in the extended vocabulary).
Length ranges are checked (a read from the device) only when validation is on
(:mod:`latentnlp.validation`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.distributions import kl_divergence

from latentnlp import decoding
from latentnlp.families import MaskedCategorical
from latentnlp.layers.checks import IGNORE_INDEX
from latentnlp.layers.copy_generator import CopyGenerator
from latentnlp.layers.latent_attention import DEFAULT_MAX_CHUNK_ELEMENTS
from latentnlp.masks import lengths_to_mask
from latentnlp.models.base import ELBO, Batch, LatentModel, records_construction
from latentnlp.models.seq2seq import (
    AlignmentELBO,
    AttentionalEncoderDecoder,
    CopyHead,
    DecoderOutput,
    DecoderState,
    LatentAttentionHead,
    Marginal,
    Seq2SeqHead,
    SoftAttentionHead,
)
from latentnlp.models.seq2seq.core import masked_sum
from latentnlp.validation import is_validating

__all__ = ["LatentAlignmentSeq2Seq", "MODES", "PrunedMarginal", "TOP_K"]

#: mode -> (head, ELBO estimator or None for the marginal objective)
MODES: dict[str, tuple[str, str | None]] = {
    "soft": ("soft", None),
    "exact": ("latent", None),
    "elbo-enum": ("latent", "exact"),
    "elbo-sample": ("latent", "score_function"),
    "elbo-gumbel": ("latent", "gumbel_softmax"),
    "copy": ("copy", None),
    "exact-top3": ("latent", None),
    "exact-top5": ("latent", None),
    "exact-top10": ("latent", None),
}

#: mode -> the latent-attention head's ``top_k`` (modes not listed sum over every source position);
#: these modes train :class:`PrunedMarginal`
TOP_K: dict[str, int] = {"exact-top3": 3, "exact-top5": 5, "exact-top10": 10}


class PrunedMarginal(Marginal):
    """Train the pruned marginal of a ``top_k`` latent-attention head, as the ELBO it is.

    With ``K_t`` the ``k`` source positions of highest prior at target position ``t``::

        log sum_{m in K_t} alpha_tm p(y_t | h_t, s_m)  =  E_q[log p(y_t | h_t, s_z)] - KL(q || alpha_t)
                                                      <=  log p(y_t | x, y_<t),

    where ``q(z_t = m) ∝ alpha_tm p(y_t | h_t, s_m)`` on ``K_t`` (the exact posterior restricted to
    the kept positions, 0 elsewhere), with equality when ``k >= S``.  So ``objective="elbo"`` trains
    the pruned bound (metric ``neg_elbo``, perplexity ``ppl_bound``) and ``"marginal"`` stays the
    exact likelihood (``nll``).  The expectation is enumerated over ``K_t``; no inference network.
    """

    objectives: ClassVar[tuple[str, ...]] = ("elbo", "marginal")

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
        """Per-example bound ``[B]`` summed over the ``scored [B, T]`` positions of ``run`` (the
        core's pass over ``batch``) with ``targets [B, T]``; ``estimator`` may only be ``None`` or
        ``"exact"`` (enumerated), ``num_samples`` is unused.  ``q`` (batch ``[B, T]`` over ``S``)
        replaces the restricted posterior: then the ELBO of that ``q`` over every position.
        ``surrogate = reconstruction - kl_weight * KL``.
        """
        if estimator not in (None, "exact"):
            raise ValueError(
                f"the pruned marginal enumerates its expectation: estimator must be 'exact', got {estimator!r}"
            )
        if q is None:
            emission = head.kept_emission_log_probs(run.hidden, targets, run.memory, run.memory_mask, run.log_alpha)
            joint = run.log_alpha + emission
            bound = joint.logsumexp(-1)  # [B, T]
            q_probs = (joint - bound[..., None]).exp()  # 0 outside the kept positions
            reconstruction_t = (q_probs * emission.masked_fill(~torch.isfinite(joint), 0.0)).sum(-1)
            kl_t = reconstruction_t - bound
        else:
            emission = head.emission_log_probs(run.hidden, targets, run.memory, run.memory_mask)
            prior = MaskedCategorical(run.log_alpha, run.memory_mask[:, None, :], validate_args=False)
            kl_t = kl_divergence(q, prior)
            reconstruction_t = (q.probs * emission.masked_fill(~run.memory_mask[:, None, :], 0.0)).sum(-1)
        reconstruction = masked_sum(reconstruction_t, scored)
        kl = masked_sum(kl_t, scored)
        return ELBO(
            value=reconstruction - kl, reconstruction=reconstruction, kl=kl, surrogate=reconstruction - kl_weight * kl
        )


class LatentAlignmentSeq2Seq(LatentModel):
    """An attentional encoder-decoder ``core`` + an output ``head`` + an ``objective``.

    Args:
        core: the encoder-decoder (:class:`~latentnlp.models.seq2seq.AttentionalEncoderDecoder`).
        head: a :class:`~latentnlp.models.seq2seq.Seq2SeqHead` on the core's states, e.g.
            ``LatentAttentionHead(core.attention)``.
        objective: :class:`~latentnlp.models.seq2seq.Marginal` (default) or
            :class:`~latentnlp.models.seq2seq.AlignmentELBO` (needs a head whose alignment is latent).
        bos_id, eos_id: needed by :meth:`generate`.
        ignore_index: a target id (``tgt_out``, or ``tgt_out_ext`` with the copy head) that marks
            a position as unobserved, as in ``torch.nn.functional.cross_entropy`` (default
            ``-100``): it is not scored, adds nothing to any bound or KL and is not counted in
            :meth:`num_tokens`; with an ELBO the inference network does not read it either.
            Every other target id within ``tgt_lengths`` must lie in the head's range
            (``0..V-1``; non-negative extended ids with the copy head), a ``ValueError`` otherwise
            when validating.  Targets past ``tgt_lengths`` are never read.

    :attr:`objectives` are the objective's.  :meth:`from_mode` builds the published combinations.
    """

    def __init__(
        self,
        core: AttentionalEncoderDecoder,
        head: Seq2SeqHead,
        objective: nn.Module | None = None,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        objective = Marginal() if objective is None else objective
        if isinstance(objective, AlignmentELBO) and not head.latent_alignment:
            raise ValueError(
                f"an ELBO over alignments needs a head whose alignment is latent, got {type(head).__name__}"
            )
        self.core, self.head, self.objective = core, head, objective
        self.bos_id, self.eos_id = bos_id, eos_id
        self.ignore_index = ignore_index

    @records_construction
    def from_mode(
        cls,
        mode: str,
        src_vocab_size: int,
        tgt_vocab_size: int,
        *,
        embedding_size: int = 256,
        hidden_size: int = 256,
        num_layers: int = 1,
        attention: str = "mlp",
        dropout: float = 0.0,
        tau: float = 1.0,
        bos_id: int | None = None,
        eos_id: int | None = None,
        unk_id: int | None = None,
        max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
        ignore_index: int = IGNORE_INDEX,
    ) -> LatentAlignmentSeq2Seq:
        """The model of one of :data:`MODES` (see the module docstring).

        Sizes and ``attention``, ``dropout``, ``max_chunk_elements`` go to the core; ``tau`` is the
        Gumbel-softmax temperature (``elbo-gumbel``); ``unk_id`` is the decoder input for copied
        source-only words (``copy``); ``ignore_index`` as in the constructor.  The ``exact-topK``
        modes give the latent-attention head ``top_k = K`` (:data:`TOP_K`).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
        head_name, estimator = MODES[mode]
        core = AttentionalEncoderDecoder(
            src_vocab_size,
            tgt_vocab_size,
            embedding_size=embedding_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            attention=attention,
            dropout=dropout,
            max_chunk_elements=max_chunk_elements,
        )
        heads = {
            "soft": lambda: SoftAttentionHead(core.attention),
            "latent": lambda: LatentAttentionHead(core.attention, top_k=TOP_K.get(mode)),
            "copy": lambda: CopyHead(
                CopyGenerator(hidden_size, tgt_vocab_size, output_projection=core.attention.output_projection),
                shared_vocabulary=src_vocab_size == tgt_vocab_size,
                unk_id=unk_id,
            ),
        }
        head = heads[head_name]()
        if mode in TOP_K:
            objective = PrunedMarginal()
        elif estimator is not None:
            objective = AlignmentELBO(embedding_size, hidden_size, estimator, tau=tau)
        else:
            objective = None
        return cls(core, head, objective, bos_id=bos_id, eos_id=eos_id, ignore_index=ignore_index)

    @property
    def objectives(self) -> tuple[str, ...]:  # type: ignore[override]
        """The composed objective's: ``("marginal",)`` or ``("elbo", "marginal")``."""
        return self.objective.objectives

    # ---- LatentModel ---------------------------------------------------------------------------
    def num_tokens(self, batch: Batch) -> Tensor:
        """Scored target tokens of each row ``[B]``: within ``tgt_lengths`` and not ``ignore_index``."""
        targets = self.head.batch_targets(batch)
        mask = lengths_to_mask(batch["tgt_lengths"].to(targets.device), targets.shape[1])
        return (mask & (targets != self.ignore_index)).sum(-1)

    def scored_targets(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(targets, scored)``: the ids the head scores ``[B, T]`` with every unscored one set to 0,
        and the bool ``[B, T]`` mask of the scored positions (within ``tgt_lengths``, not
        ``ignore_index``).  When validating, ``ValueError`` naming the batch key for a scored id
        outside the head's range."""
        key = self.head.target_key(batch)
        targets = batch[key]
        if not isinstance(targets, Tensor) or targets.dim() != 2 or targets.dtype != torch.long:
            raise ValueError(
                f"batch[{key!r}] must be a LongTensor [B, T], got "
                + (f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, Tensor) else type(targets).__name__)
            )
        scored = lengths_to_mask(batch["tgt_lengths"].to(targets.device), targets.shape[1])
        scored = scored & (targets != self.ignore_index)
        if is_validating() and bool(scored.any()):
            low, high = torch.stack([targets[scored].min(), targets[scored].max()]).tolist()
            size = self.head.target_vocab_size
            if low < 0 or (size is not None and high >= size):
                expected = f"0..{size - 1}" if size is not None else "0 or more (extended ids)"
                raise ValueError(
                    f"batch[{key!r}] must hold target ids in {expected} or ignore_index = {self.ignore_index} "
                    f"within tgt_lengths, got ids {low}..{high}"
                )
        return targets.masked_fill(~scored, 0), scored

    def decode(self, batch: Batch) -> DecoderOutput:
        """The core's teacher-forced pass over ``batch``."""
        return self.core(batch["src"], batch["src_lengths"], batch["tgt_in"], batch["tgt_lengths"])

    def log_marginal(self, batch: Batch) -> Tensor:
        """Exact ``log p(y | x)`` per example ``[B]`` (the head's latent variables summed out).

        Exact for a pruned head too (every source position summed over): what evaluation
        reports, so pruned and exact modes compare on the same quantity.
        """
        targets, scored = self.scored_targets(batch)
        run = self.decode(batch)
        context = {**run.context, **self.head.batch_context(batch)}
        per_token = self.head.exact_log_prob(run.hidden, targets, **context)
        return masked_sum(per_token, scored)

    def elbo(
        self,
        batch: Batch,
        *,
        estimator: str | None = None,
        num_samples: int = 1,
        kl_weight: float = 1.0,
        q: MaskedCategorical | None = None,
    ) -> ELBO:
        """``sum_t E_q[log p(y_t | h_t, s_{z_t})] - KL(q(z_t) || alpha_t)`` per example (an ELBO objective).

        ``estimator`` names another estimator for this call (``"exact"``, ``"score_function"``,
        ``"gumbel_softmax"``); default: the objective's.  ``q`` replaces the inference network
        (e.g. ``q = posterior(batch)`` makes the bound tight).  The KL is exact.  Sums run over the
        scored positions (:meth:`scored_targets`).
        """
        targets, scored = self.scored_targets(batch)
        run = self.decode(batch)
        return self.objective.elbo(
            self.core,
            self.head,
            batch,
            run,
            targets,
            scored,
            estimator=estimator,
            num_samples=num_samples,
            kl_weight=kl_weight,
            q=q,
        )

    def prior(self, batch: Batch) -> MaskedCategorical:
        """The attention prior ``alpha_t = p(z_t | x, y_<t)`` of the teacher-forced decoder, batch ``[B, T]``."""
        self._latent_head()
        run = self.decode(batch)
        return MaskedCategorical(run.log_alpha, run.memory_mask[:, None, :])

    def posterior(self, batch: Batch) -> MaskedCategorical:
        """Exact alignment posterior ``p(z_t = m | x, y) ∝ alpha_tm p(y_t | h_t, s_m)``, batch ``[B, T]``.

        The prior ``alpha_t`` at the positions not scored (past ``tgt_lengths`` or ``ignore_index``:
        nothing observed there).
        """
        head = self._latent_head()
        targets, scored = self.scored_targets(batch)
        run = self.decode(batch)
        emission = head.emission_log_probs(run.hidden, targets, run.memory, run.memory_mask)
        emission = emission.masked_fill(~scored[..., None], 0.0)
        return MaskedCategorical(run.log_alpha + emission, run.memory_mask[:, None, :])

    def approximate_posterior(self, batch: Batch) -> MaskedCategorical:
        """The inference network's ``q(z_t | x, y)``, batch shape ``[B, T]`` (ELBO objectives)."""
        return self.objective.approximate_posterior(self.core, batch, self.scored_targets(batch)[1])[0]

    def generate(
        self,
        batch: Batch,
        *,
        method: str = "beam",
        beam_size: int = 5,
        max_length: int | None = None,
        length_penalty: float = 0.0,
    ) -> decoding.Hypotheses:
        """Greedy or beam-search translations of ``batch["src"]`` under the head's distribution.

        A pruned head (``exact-topK``) decodes with its pruned scores (the ``K`` positions of
        highest prior at each step), which is faster, not with the exact marginal.

        ``max_length`` (tokens) defaults to ``2 * longest source + 10``.  Output ids are target ids
        (extended ids for source-only words with the copy head).
        """
        if self.bos_id is None or self.eos_id is None:
            raise ValueError("generate needs bos_id and eos_id (give them to the constructor)")
        if max_length is None:
            max_length = 2 * int(batch["src_lengths"].max()) + 10
        common = dict(bos_id=self.bos_id, eos_id=self.eos_id, max_length=max_length)
        if method == "greedy":
            return decoding.greedy(self, batch, **common)
        if method == "beam":
            return decoding.beam_search(self, batch, beam_size=beam_size, length_penalty=length_penalty, **common)
        raise ValueError(f"method must be 'greedy' or 'beam', got {method!r}")

    # ---- step-wise decoding (decoding.StepDecoder) -----------------------------------------------
    def decoder_start(self, batch: Batch) -> tuple[DecoderState, int]:
        memory, mask, state = self.core.encode(batch["src"], batch["src_lengths"])
        state.context.update(self.head.decoding_context(batch, mask))
        return state, memory.shape[0]

    def decoder_step(self, state: DecoderState, tokens: Tensor) -> tuple[Tensor, DecoderState]:
        """Log-probabilities ``[N, V]`` (``[N, V_ext]`` with the copy head) of the next token."""
        top, log_alpha, o, next_state = self.core.step(state, self.head.decoder_input(tokens))
        log_probs = self.head.log_probs(
            top, memory=state.memory, memory_mask=state.memory_mask, log_alpha=log_alpha, attentional=o, **state.context
        )
        return log_probs[:, 0], next_state

    def reorder_state(self, state: DecoderState, index: Tensor) -> DecoderState:
        return state.index_select(index)

    # ---- internals ------------------------------------------------------------------------------
    def _latent_head(self) -> LatentAttentionHead:
        if not self.head.latent_alignment:
            raise NotImplementedError(f"the {type(self.head).__name__} has no alignment latent variable")
        return self.head
