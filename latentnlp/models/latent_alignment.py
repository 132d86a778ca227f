"""Sequence-to-sequence with attention as a latent alignment (Deng et al. 2018).

Encoder: a bidirectional LSTM over the source gives ``s_1..s_S`` (``[B, S, H]``,
each direction ``H / 2``).  Decoder: an LSTM with input feeding,

    h_t = LSTM([emb(y_{t-1}); o_{t-1}], h_{t-1}),
    alpha_t = softmax_m score(h_t, s_m),   o_t = tanh(W_h h_t + W_c sum_m alpha_tm s_m + b),

so ``h_t`` depends on ``y_{<t}`` but not on the alignments ``z_{<t}`` (the fed
vector uses the soft context, as in Deng et al.), and the joint factorises as
``p(y, z | x) = prod_t alpha_t(z_t) p(y_t | h_t, s_{z_t})``.  The modes differ
in how ``p(y_t | ...)`` uses the alignment (:class:`LatentAttention`):

================  ==========================================================  =====================
mode              training                                                    objectives
================  ==========================================================  =====================
``soft``          ``log p(y_t | h_t, c_t)``, ``c_t = sum_m alpha_tm s_m``     marginal
``exact``         ``log sum_m alpha_tm p(y_t | h_t, s_m)`` (exact marginal)   marginal
``elbo-enum``     ELBO, ``E_q`` by enumeration over the ``S`` positions       elbo, marginal
``elbo-sample``   ELBO, REINFORCE with a learned baseline (one sample)        elbo, marginal
``elbo-gumbel``   ELBO, straight-through Gumbel-softmax relaxation            elbo, marginal
``copy``          soft attention + exactly marginalised copy switch           marginal
================  ==========================================================  =====================

The variational modes (Deng et al.'s "variational attention") use an
inference network ``q(z_t | x, y)``: bidirectional LSTMs over the source and
the whole target, ``q(z_t = m) = softmax_m(g_t^T W s'_m)`` (a
:class:`~latentnlp.families.MaskedCategorical`); the ELBO is

    sum_t E_{q(z_t)}[log p(y_t | h_t, s_{z_t})] - KL(q(z_t) || alpha_t)  <=  log p(y | x),

with equality when ``q`` is the exact posterior ``q(z_t = m) ∝ alpha_tm p(y_t | h_t, s_m)``.
``log_marginal`` is always the exact marginal under the prior (so evaluation
compares every mode on the same quantity); the ``soft`` and ``copy`` models
have no alignment latent besides the copy choice and give their own likelihood.

Batch keys: ``src [B, S]``, ``src_lengths [B]``, ``tgt_in [B, T]`` (``<bos> y``),
``tgt_out [B, T]`` (``y <eos>``), ``tgt_lengths [B]``; for ``copy`` also
``src_ext [B, S]`` (source tokens as extended target ids, required unless the
source and target vocabularies have the same size, i.e. are shared) and,
optionally, ``tgt_out_ext [B, T]`` (targets in the extended vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.distributions import kl_divergence
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from latentnlp import decoding, estimators
from latentnlp.families import MaskedCategorical, lengths_to_mask
from latentnlp.layers.copy_generator import CopyGenerator
from latentnlp.layers.latent_attention import DEFAULT_MAX_CHUNK_ELEMENTS, LatentAttention
from latentnlp.models.base import ELBO, Batch, LatentModel, UnsupportedObjectiveError

__all__ = ["LatentAlignmentSeq2Seq", "DecoderState"]

MODES = ("soft", "exact", "elbo-enum", "elbo-sample", "elbo-gumbel", "copy")
ESTIMATORS = {"elbo-enum": "exact", "elbo-sample": "score_function", "elbo-gumbel": "gumbel_softmax"}


@dataclass
class DecoderState:
    """What one decoding step needs; every field is batch-first (reordered by :meth:`index_select`)."""

    h: tuple[Tensor, ...]
    c: tuple[Tensor, ...]
    feed: Tensor
    memory: Tensor
    memory_mask: Tensor
    src_ext: Tensor | None = None
    extended_size: int | None = None

    def index_select(self, index: Tensor) -> "DecoderState":
        def pick(x: Tensor) -> Tensor:
            return x.index_select(0, index)

        return replace(self, h=tuple(map(pick, self.h)), c=tuple(map(pick, self.c)), feed=pick(self.feed),
                       memory=pick(self.memory), memory_mask=pick(self.memory_mask),
                       src_ext=None if self.src_ext is None else pick(self.src_ext))


@dataclass
class _Run:
    """Teacher-forced decoder outputs for a batch."""

    memory: Tensor        # [B, S, H]
    memory_mask: Tensor   # [B, S]
    hidden: Tensor        # [B, T, H]   decoder states h_t
    log_alpha: Tensor     # [B, T, S]   prior alignments
    attentional: Tensor   # [B, T, H]   o_t (soft context)
    target_mask: Tensor   # [B, T]


class LatentAlignmentSeq2Seq(LatentModel):
    """BiLSTM encoder, input-feeding LSTM decoder, attention as a latent alignment.

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
        mode: one of ``soft``, ``exact``, ``elbo-enum``, ``elbo-sample``, ``elbo-gumbel``, ``copy``.
        embedding_dim, hidden_size: sizes (``hidden_size`` even: each encoder direction has half).
        num_layers: LSTM layers of the encoder and of the decoder.
        attention: alignment score, ``"mlp"``, ``"bilinear"`` or ``"dot"``.
        dropout: on embeddings, between LSTM layers and on the attentional vector.
        tau: Gumbel-softmax temperature (``elbo-gumbel``).
        bos_id, eos_id: needed by :meth:`generate`; ``unk_id``: the decoder input for copied
            source-only words when generating in ``copy`` mode.
        max_chunk_elements: see :class:`LatentAttention`.
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, *, mode: str = "soft",
                 embedding_dim: int = 256, hidden_size: int = 256, num_layers: int = 1,
                 attention: str = "mlp", dropout: float = 0.0, tau: float = 1.0,
                 bos_id: int | None = None, eos_id: int | None = None, unk_id: int | None = None,
                 max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if hidden_size % 2:
            raise ValueError(f"hidden_size must be even (two encoder directions), got {hidden_size}")
        self.mode, self.tau = mode, tau
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.objectives = ("elbo", "marginal") if mode in ESTIMATORS else ("marginal",)
        self.dropout = nn.Dropout(dropout)
        self.src_embedding = nn.Embedding(src_vocab_size, embedding_dim)
        self.tgt_embedding = nn.Embedding(tgt_vocab_size, embedding_dim)
        self.encoder = nn.LSTM(embedding_dim, hidden_size // 2, num_layers=num_layers, batch_first=True,
                               bidirectional=True, dropout=dropout if num_layers > 1 else 0.0)
        self.decoder = nn.ModuleList(
            nn.LSTMCell(embedding_dim + hidden_size if i == 0 else hidden_size, hidden_size)
            for i in range(num_layers))
        self.attention = LatentAttention(
            hidden_size, hidden_size, tgt_vocab_size, mode="soft" if mode in ("soft", "copy") else "exact",
            score=attention, dropout=dropout, max_chunk_elements=max_chunk_elements)
        if mode == "copy":
            self.copy = CopyGenerator(hidden_size, tgt_vocab_size, readout=self.attention.readout)
        if mode in ESTIMATORS:
            self.q_src_encoder = nn.LSTM(embedding_dim, hidden_size // 2, batch_first=True, bidirectional=True)
            self.q_tgt_encoder = nn.LSTM(embedding_dim, hidden_size // 2, batch_first=True, bidirectional=True)
            self.q_score = nn.Linear(hidden_size, hidden_size, bias=False)
        if mode == "elbo-sample":
            self.baseline = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.Tanh(),
                                          nn.Linear(hidden_size, 1))

    # ---- LatentModel ---------------------------------------------------------------------------
    def num_tokens(self, batch: Batch) -> Tensor:
        return batch["tgt_lengths"]

    def log_marginal(self, batch: Batch) -> Tensor:
        """Exact ``log p(y | x)`` per example ``[B]`` (the alignment summed out under the prior)."""
        run = self._run(batch)
        if self.mode == "copy":
            src_ext, targets = self._extended(batch)
            per_token = self.copy(run.attentional, run.log_alpha, src_ext, targets).log_prob
        else:
            out = self.attention(run.hidden, run.memory, run.memory_mask, batch["tgt_out"],
                                 log_alpha=run.log_alpha)
            per_token = out.log_prob
        return _masked_sum(per_token, run.target_mask)

    def elbo(self, batch: Batch, *, estimator: str | None = None, num_samples: int = 1,
             kl_weight: float = 1.0, q: MaskedCategorical | None = None) -> ELBO:
        """``sum_t E_q[log p(y_t | h_t, s_{z_t})] - KL(q(z_t) || alpha_t)`` per example.

        ``estimator``: ``"exact"`` (enumerate the source positions), ``"score_function"``
        (REINFORCE with the learned baseline) or ``"gumbel_softmax"`` (straight-through,
        temperature ``tau``); default: the mode's.  ``q`` replaces the inference network
        (e.g. ``q = posterior(batch)`` makes the bound tight).  The KL is exact.
        """
        if self.mode not in ESTIMATORS:
            raise UnsupportedObjectiveError(f"mode {self.mode!r} has no variational posterior")
        estimator = estimator or ESTIMATORS[self.mode]
        if estimator not in ESTIMATORS.values():
            raise ValueError(f"estimator must be one of {tuple(ESTIMATORS.values())}, got {estimator!r}")
        run = self._run(batch)
        targets = batch["tgt_out"]
        if q is None:
            q, inference_states = self._inference(batch)
        else:
            inference_states = None
        prior = MaskedCategorical(run.log_alpha, run.memory_mask[:, None, :], validate_args=False)
        kl = _masked_sum(kl_divergence(q, prior), run.target_mask)
        if estimator == "exact":
            emission = self.attention.emission_log_probs(run.hidden, run.memory, targets, run.memory_mask)
            estimate = estimators.exact(emission, q)
        elif estimator == "score_function":
            baseline = None
            if self.mode == "elbo-sample" and inference_states is not None:
                features = torch.cat([run.hidden.detach(), inference_states.detach()], -1)
                baseline = self.baseline(features).squeeze(-1)
            estimate = estimators.score_function(
                lambda z: self.attention.log_prob_at(run.hidden, run.memory, z, targets), q,
                baseline=baseline, num_samples=num_samples)
        else:  # gumbel_softmax
            logits = q.logits.expand(num_samples, *q.logits.shape)
            z = estimators.gumbel_softmax(logits, self.tau, hard=True)  # [N, B, T, S], one-hot values
            context = torch.matmul(z, run.memory)
            per_sample = self.attention.log_prob_given_context(run.hidden, context, targets)
            estimate = estimators.Estimate(per_sample.mean(0))
        reconstruction = _masked_sum(estimate.surrogate, run.target_mask)
        surrogate = _masked_sum(estimate.objective, run.target_mask)
        return ELBO(value=reconstruction - kl, reconstruction=reconstruction, kl=kl,
                    surrogate=surrogate - kl_weight * kl)

    def prior(self, batch: Batch) -> MaskedCategorical:
        """The attention prior ``alpha_t = p(z_t | x, y_<t)`` of the teacher-forced decoder, batch ``[B, T]``."""
        if self.mode in ("soft", "copy"):
            raise NotImplementedError(f"mode {self.mode!r} has no alignment latent variable")
        run = self._run(batch)
        return MaskedCategorical(run.log_alpha, run.memory_mask[:, None, :])

    def posterior(self, batch: Batch) -> MaskedCategorical:
        """Exact alignment posterior ``p(z_t = m | x, y) ∝ alpha_tm p(y_t | h_t, s_m)``, batch ``[B, T]``."""
        if self.mode in ("soft", "copy"):
            raise NotImplementedError(f"mode {self.mode!r} has no alignment latent variable")
        run = self._run(batch)
        emission = self.attention.emission_log_probs(run.hidden, run.memory, batch["tgt_out"],
                                                     run.memory_mask)
        return MaskedCategorical(run.log_alpha + emission, run.memory_mask[:, None, :])

    def approximate_posterior(self, batch: Batch) -> MaskedCategorical:
        """The inference network's ``q(z_t | x, y)``, batch shape ``[B, T]`` (variational modes)."""
        if self.mode not in ESTIMATORS:
            raise NotImplementedError(f"mode {self.mode!r} has no inference network")
        return self._inference(batch)[0]

    def generate(self, batch: Batch, *, method: str = "beam", beam_size: int = 5,
                 max_len: int | None = None, length_penalty: float = 0.0) -> decoding.Hypotheses:
        """Greedy or beam-search translations of ``batch["src"]`` under the exact marginal.

        ``max_len`` defaults to ``2 * longest source + 10``.  Output ids are target ids
        (extended ids for source-only words in ``copy`` mode).
        """
        if self.bos_id is None or self.eos_id is None:
            raise ValueError("generate needs bos_id and eos_id (give them to the constructor)")
        if max_len is None:
            max_len = 2 * int(batch["src_lengths"].max()) + 10
        common = dict(bos_id=self.bos_id, eos_id=self.eos_id, max_len=max_len)
        if method == "greedy":
            return decoding.greedy(self, batch, **common)
        if method == "beam":
            return decoding.beam_search(self, batch, beam_size=beam_size, length_penalty=length_penalty,
                                        **common)
        raise ValueError(f"method must be 'greedy' or 'beam', got {method!r}")

    # ---- step-wise decoding (decoding.StepDecoder) -----------------------------------------------
    def decoder_start(self, batch: Batch) -> tuple[DecoderState, int]:
        memory, mask, (h, c) = self._encode(batch)
        src_ext = size = None
        if self.mode == "copy":  # one extended vocabulary for the whole batch
            src_ext = self._extended(batch)[0]
            size = max(self.tgt_vocab_size, int(src_ext[mask].max()) + 1)
        feed = memory.new_zeros(memory.shape[0], self.attention.query_dim)
        return DecoderState(h, c, feed, memory, mask, src_ext, size), memory.shape[0]

    def decoder_step(self, state: DecoderState, tokens: Tensor) -> tuple[Tensor, DecoderState]:
        """Log-probabilities ``[N, V]`` (``[N, V_ext]`` in copy mode) of the next token."""
        if self.mode == "copy" and bool((tokens >= self.tgt_vocab_size).any()):
            if self.unk_id is None:
                raise ValueError("copy mode needs unk_id to feed back copied source-only words")
            tokens = tokens.masked_fill(tokens >= self.tgt_vocab_size, self.unk_id)
        emb = self.dropout(self.tgt_embedding(tokens))
        top, h, c, log_alpha, o = self._step(emb, state.h, state.c, state.feed, state.memory,
                                             state.memory_mask)
        if self.mode == "copy":
            log_probs = self.copy(o, log_alpha, state.src_ext, full=True,
                                  extended_size=state.extended_size).log_probs
        else:
            log_probs = self.attention(top, state.memory, state.memory_mask, full=True,
                                       log_alpha=log_alpha).log_probs
        return log_probs[:, 0], replace(state, h=h, c=c, feed=o[:, 0])

    def reorder_state(self, state: DecoderState, index: Tensor) -> DecoderState:
        return state.index_select(index)

    # ---- internals ------------------------------------------------------------------------------
    def _encode(self, batch: Batch) -> tuple[Tensor, Tensor, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]:
        src, lengths = batch["src"], batch["src_lengths"]
        if src.dim() != 2 or lengths.shape != src.shape[:1]:
            raise ValueError(f"src must be [B, S] with src_lengths [B], got {tuple(src.shape)} and "
                             f"{tuple(lengths.shape)}")
        if bool((lengths < 1).any()) or bool((lengths > src.shape[1]).any()):
            raise ValueError(f"src_lengths must lie in 1..{src.shape[1]}, got {lengths.tolist()}")
        out, (h, c) = self._bilstm(self.encoder, self.dropout(self.src_embedding(src)), lengths)
        layers = len(self.decoder)

        def merge(x: Tensor) -> tuple[Tensor, ...]:  # [layers * 2, B, H/2] -> layers x [B, H]
            x = x.view(layers, 2, x.shape[1], x.shape[2]).transpose(1, 2)
            return tuple(x.reshape(layers, x.shape[1], -1).unbind(0))

        return out, lengths_to_mask(lengths, src.shape[1]), (merge(h), merge(c))

    @staticmethod
    def _bilstm(lstm: nn.LSTM, x: Tensor, lengths: Tensor):
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out, state

    def _step(self, emb: Tensor, h: tuple[Tensor, ...], c: tuple[Tensor, ...], feed: Tensor,
              memory: Tensor, mask: Tensor):
        """One decoder step: returns ``h_t [N, 1, H]``, new states, ``log alpha [N, 1, S]``, ``o_t [N, 1, H]``."""
        x = torch.cat([emb, feed], -1)
        new_h, new_c = [], []
        for i, cell in enumerate(self.decoder):
            hi, ci = cell(x, (h[i], c[i]))
            new_h.append(hi)
            new_c.append(ci)
            x = self.dropout(hi)
        top = new_h[-1][:, None, :]
        log_alpha = self.attention.alignment(top, memory, mask).logits
        o = self.attention.attentional_hidden(top, torch.bmm(log_alpha.exp(), memory))
        return top, tuple(new_h), tuple(new_c), log_alpha, o

    def _run(self, batch: Batch) -> _Run:
        tgt_in, tgt_out, tgt_lengths = batch["tgt_in"], batch["tgt_out"], batch["tgt_lengths"]
        if tgt_in.dim() != 2 or tgt_out.shape != tgt_in.shape or tgt_lengths.shape != tgt_in.shape[:1]:
            raise ValueError(f"tgt_in and tgt_out must be [B, T] with tgt_lengths [B], got "
                             f"{tuple(tgt_in.shape)}, {tuple(tgt_out.shape)} and {tuple(tgt_lengths.shape)}")
        if bool((tgt_lengths < 1).any()) or bool((tgt_lengths > tgt_in.shape[1]).any()):
            raise ValueError(f"tgt_lengths must lie in 1..{tgt_in.shape[1]}, got {tgt_lengths.tolist()}")
        memory, mask, (h, c) = self._encode(batch)
        emb = self.dropout(self.tgt_embedding(tgt_in))
        feed = memory.new_zeros(memory.shape[0], self.attention.query_dim)
        hidden, log_alpha, attentional = [], [], []
        for t in range(tgt_in.shape[1]):
            top, h, c, la, o = self._step(emb[:, t], h, c, feed, memory, mask)
            feed = o[:, 0]
            hidden.append(top)
            log_alpha.append(la)
            attentional.append(o)
        return _Run(memory, mask, torch.cat(hidden, 1), torch.cat(log_alpha, 1), torch.cat(attentional, 1),
                    lengths_to_mask(tgt_lengths, tgt_in.shape[1]))

    def _inference(self, batch: Batch) -> tuple[MaskedCategorical, Tensor]:
        """``q(z_t | x, y)`` and the target-side states ``g_t [B, T, H]`` it was computed from."""
        src_states, _ = self._bilstm(self.q_src_encoder, self.dropout(self.src_embedding(batch["src"])),
                                     batch["src_lengths"])
        tgt_states, _ = self._bilstm(self.q_tgt_encoder, self.dropout(self.tgt_embedding(batch["tgt_out"])),
                                     batch["tgt_lengths"])
        scores = torch.bmm(self.q_score(tgt_states), src_states.transpose(1, 2))
        mask = lengths_to_mask(batch["src_lengths"], batch["src"].shape[1])
        return MaskedCategorical(scores, mask[:, None, :], validate_args=False), tgt_states

    def _extended(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Copy mode: source and target in the extended vocabulary."""
        if "src_ext" in batch:
            src_ext = batch["src_ext"]
        elif self.src_vocab_size == self.tgt_vocab_size:
            src_ext = batch["src"]
        else:
            raise ValueError("copy mode needs batch['src_ext'] (source tokens as target ids) when the "
                             "source and target vocabularies differ")
        return src_ext, batch.get("tgt_out_ext", batch["tgt_out"])


def _masked_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    """``sum_t mask_t x_t`` over the last dimension (padding may hold anything, even -inf/NaN)."""
    return torch.where(mask, per_token, 0.0).sum(-1)
