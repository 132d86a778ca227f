"""Attention as a latent alignment (Deng et al. 2018, "Latent Alignment and Variational Attention").

For decoder states ``h_t`` (``hidden [B, T, H]``) and source states ``s_m``
(``memory [B, S, H_s]``, ``memory_mask [B, S]``: True at real positions, False at
padding), the alignment
``z_t in {1..S}`` has the prior

    alpha_tm = p(z_t = m | h_t, s) = softmax_m score(h_t, s_m)   over unmasked m,

    score = v^T tanh(W_q h + W_k s)  ("mlp", Bahdanau) | h^T W s ("bilinear") | h^T s ("dot"),

and the word given an aligned context ``c`` is read out by

    o(h, c) = tanh(W_h h + W_c c + b),      log p(y | h, c) = log_softmax(W_o o + b_o)[y].

Mode ``"exact"`` (latent attention, the alignment summed out exactly)::

    log p(y_t | h_t, s) = logsumexp_m (log alpha_tm + log p(y_t | h_t, s_m))

Mode ``"soft"`` (the standard soft-attention baseline, the same parameters)::

    log p(y_t | h_t, s) = log p(y_t | h_t, c_t),      c_t = sum_m alpha_tm s_m

In exact mode the ``[B, T, S, V]`` tensor of per-position vocabulary scores is
never built whole.  With targets, the ``B T S`` rows of attentional hiddens
``o(h_t, s_m)`` are scored ``max_chunk_elements // V`` rows at a time by
:func:`~latentnlp.layers.chunked_softmax.log_softmax_linear`, which keeps one
normaliser per row and recomputes each chunk in backward, forming its gradient in
place; memory is ``O(B T S D)`` plus one chunk, and on a CPU this is faster than
building the whole block (it is never written to memory and read back), although it
makes one more matmul (the recomputation).  The full
marginal over the vocabulary is mixed over chunks of source positions, each
recomputed in backward (activation checkpointing), in ``O(B T V + B T S)`` plus one
chunk.
The per-position terms an ELBO needs (``log alpha [B, T, S]`` and
``log p(y_t | h_t, s_m) [B, T, S]``) are returned alongside.  The layer is an
:class:`~latentnlp.layers.output_head.OutputHead` (context ``memory``, ``memory_mask``,
``log_alpha``); its mode is the soft or the exact head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from latentnlp.families import MaskedCategorical
from latentnlp.layers.checks import (
    IGNORE_INDEX,
    check_finite,
    check_log_alpha,
    check_memory_mask,
    check_target_range,
    ignored_targets,
    resolve_memory_mask,
)
from latentnlp.layers.chunked_softmax import log_softmax_linear
from latentnlp.layers.output_head import check_context, tie_projection
from latentnlp.precision import upcast

__all__ = ["LatentAttention", "LatentAttentionOutput"]

#: vocabulary scores built at once in exact mode (8 Mi: 32 MB in float32)
DEFAULT_MAX_CHUNK_ELEMENTS = 2**23

MODES = ("exact", "soft")
SCORES = ("mlp", "bilinear", "dot")


class LatentAttentionOutput(NamedTuple):
    """What :meth:`LatentAttention.forward` returns (``None`` where not asked or not defined).

    - ``log_prob [B, T]``: log p(y_t | ...) of the given targets, alignment summed out
    - ``log_probs [B, T, V]``: the full marginal distribution over the vocabulary (``full=True``)
    - ``log_alpha [B, T, S]``: prior alignment log-probabilities, ``-inf`` at padded sources
    - ``log_emission [B, T, S]``: log p(y_t | h_t, s_m) (exact mode, targets given), ``-inf`` at padding
    - ``context [B, T, H_s]``: the soft context ``c_t = sum_m alpha_tm s_m``
    - ``attentional [B, T, D]``: ``o(h_t, c_t)``, the attentional vector an input-feeding decoder
      feeds to its next step (both modes; soft mode reads it out)
    """

    log_prob: Tensor | None
    log_probs: Tensor | None
    log_alpha: Tensor
    log_emission: Tensor | None
    context: Tensor
    attentional: Tensor


class LatentAttention(nn.Module):
    """Attention whose alignment is a categorical latent variable, summed out exactly.

    Every method takes the decoder states ``h_t`` (the attention's queries) as ``hidden``, the
    name the :class:`~latentnlp.layers.output_head.OutputHead` protocol gives them.

    Args:
        input_size: decoder state size ``H``.
        memory_size: source state size ``H_s``.
        vocab_size: output vocabulary ``V``.
        mode: ``"exact"`` (latent alignment) or ``"soft"`` (context inside the softmax).
        score: ``"mlp"`` (Bahdanau), ``"bilinear"`` (Luong general) or ``"dot"`` (``H == H_s``).
        attention_size: hidden size of the MLP scorer (default ``input_size``).
        projection_size: size of the attentional hidden ``o`` (default ``input_size``).
        dropout: dropout on ``o`` before the vocabulary projection.
        max_chunk_elements: largest block of vocabulary scores built at once in exact mode
            (``[rows, V]`` for the targets' log-probabilities, ``[B, T, chunk, V]`` for the full
            marginal).  The default, 8 Mi elements (32 MB in float32), keeps blocks of at least
            a few hundred rows up to V = 32k: smaller blocks make each backward chunk re-read
            and accumulate the whole ``[V, D]`` weight gradient for few rows, and lose to the
            unchunked computation (``benchmarks/attention.py``).
        top_k: exact mode only: keep, for each target position, the ``k`` source positions of
            highest prior ``alpha_tm`` (:meth:`pruned_alignment`) and sum over those alone::

                log p_k(y_t | h_t, s) = logsumexp_{m in top_k(alpha_t)} (log alpha_tm + log p(y_t | h_t, s_m))

            a lower bound on the exact marginal (terms are dropped, nothing is renormalised), equal
            to it when ``k >= S``; the per-position read-out costs ``O(B T k)`` instead of
            ``O(B T S)`` rows.  ``None`` (default): the exact marginal.  May be changed between
            calls (e.g. ``layer.top_k = None`` to evaluate exactly).

    Attributes:
        output_projection: the vocabulary projection ``nn.Linear(D, V)`` (``W_o``, ``b_o``), to share
            (e.g. with a :class:`~latentnlp.layers.CopyGenerator`) or tie (:meth:`tie_weights`).

    Step-wise decoding (input feeding): call the layer with ``T = 1`` at each step; the
    ``attentional`` field of the output is ``o_t``, which the decoder feeds to its next step, in
    either mode.  Scores, log-probabilities and ``o_t`` equal those of one call over all ``T``
    with the same decoder states::

        attention = LatentAttention(H, H_s, V, mode="exact")
        cell = nn.LSTMCell(E + attention.projection_size, H)
        feed, state = memory.new_zeros(B, attention.projection_size), None
        for t in range(T):
            state = cell(torch.cat([embed(y_in[:, t]), feed], -1), state)
            step = attention(state[0][:, None], memory, memory_mask, y_out[:, t : t + 1])
            nll = nll - step.log_prob[:, 0]
            feed = step.attentional[:, 0]
    """

    def __init__(
        self,
        input_size: int,
        memory_size: int,
        vocab_size: int,
        *,
        mode: str = "exact",
        score: str = "mlp",
        attention_size: int | None = None,
        projection_size: int | None = None,
        dropout: float = 0.0,
        max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
        top_k: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if top_k is not None and (mode != "exact" or top_k < 1):
            raise ValueError(f"top_k must be None or >= 1 and needs mode='exact', got top_k={top_k} mode={mode!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if score == "dot" and input_size != memory_size:
            raise ValueError(f"dot scoring needs input_size == memory_size, got {input_size} and {memory_size}")
        self.mode, self.score_type = mode, score
        self.input_size, self.memory_size, self.vocab_size = input_size, memory_size, vocab_size
        self.max_chunk_elements = int(max_chunk_elements)
        self.top_k = top_k
        if score == "mlp":
            attention_size = attention_size or input_size
            self.score_query = nn.Linear(input_size, attention_size, bias=True)
            self.score_memory = nn.Linear(memory_size, attention_size, bias=False)
            self.score_v = nn.Linear(attention_size, 1, bias=False)
        elif score == "bilinear":
            self.score_weight = nn.Linear(memory_size, input_size, bias=False)
        projection_size = projection_size or input_size
        self.projection_size = projection_size
        self.out_query = nn.Linear(input_size, projection_size, bias=True)
        self.out_context = nn.Linear(memory_size, projection_size, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.output_projection = nn.Linear(projection_size, vocab_size)

    def tie_weights(self, embedding: nn.Embedding) -> None:
        """Use ``embedding.weight [V, D]`` as ``output_projection.weight`` (Press & Wolf 2017)."""
        tie_projection(self, self.output_projection, embedding)

    # ---- alignment prior ---------------------------------------------------------------------
    def scores(self, hidden: Tensor, memory: Tensor) -> Tensor:
        """Unnormalised alignment scores ``[B, T, S]``."""
        if self.score_type == "mlp":
            features = self.score_query(hidden)[:, :, None, :] + self.score_memory(memory)[:, None, :, :]
            return self.score_v(torch.tanh(features)).squeeze(-1)
        if self.score_type == "bilinear":
            memory = self.score_weight(memory)
        return torch.bmm(hidden, memory.transpose(1, 2))

    def alignment(
        self,
        hidden: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> MaskedCategorical:
        """The prior ``p(z_t | h_t, s)``.

        Args:
            hidden: ``[B, T, H]`` float decoder states.
            memory: ``[B, S, H_s]`` float source states, ``S >= 1``.
            memory_mask: ``[B, S]`` bool, **True at real positions** (``None``: all real).
            key_padding_mask: ``[B, S]`` bool, True at padding (``nn.MultiheadAttention``'s polarity);
                instead of ``memory_mask``, not with it.
            validate_args: overrides the validation switch for the value checks (e.g. ``False`` in a
                decoder loop that checked its source once).

        Returns:
            A :class:`MaskedCategorical` with batch shape ``[B, T]`` over ``S`` positions
            (``.logits`` is ``log alpha [B, T, S]``, ``-inf`` at padding).
        """
        memory_mask = self._check(hidden, memory, memory_mask, key_padding_mask, validate_args=validate_args)
        return self._prior(hidden, memory, memory_mask)

    def _prior(self, hidden: Tensor, memory: Tensor, memory_mask: Tensor | None) -> MaskedCategorical:
        mask = None if memory_mask is None else memory_mask[:, None, :]
        return MaskedCategorical(self.scores(hidden, memory), mask, validate_args=False)

    # ---- read-out ----------------------------------------------------------------------------
    @staticmethod
    def block_rows(vocab_size: int, max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> int:
        """Rows of ``[rows, V]`` target scores that exact mode builds at once."""
        return max(1, max_chunk_elements // vocab_size)

    def attentional_hidden(self, hidden: Tensor, context: Tensor) -> Tensor:
        """``o = tanh(W_h h + W_c c + b)`` with dropout; shapes broadcast over leading dims."""
        return self.dropout(torch.tanh(self.out_query(hidden) + self.out_context(context)))

    def log_prob_given_context(self, hidden: Tensor, context: Tensor, targets: Tensor | None = None) -> Tensor:
        """``log p(y | h, c)``: ``[..., T]`` for ``targets [..., T]``, else ``[..., T, V]``.

        ``hidden [..., T, H]``, ``context [..., T, H_s]`` and ``targets`` broadcast
        against each other (e.g. ``context [N, B, T, H_s]`` for ``N`` sampled alignments).
        """
        return self._read_out(self.attentional_hidden(hidden, context), targets)

    def _read_out(self, attentional: Tensor, targets: Tensor | None = None) -> Tensor:
        """``log_softmax(W_o o + b_o)``: ``[..., V]``, or ``[...]`` gathered at ``targets``."""
        log_probs = torch.log_softmax(self.output_projection(attentional), dim=-1)
        if targets is None:
            return log_probs
        targets = targets.expand(log_probs.shape[:-1])
        return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def log_prob_at(self, hidden: Tensor, memory: Tensor, index: Tensor, targets: Tensor) -> Tensor:
        """``log p(y_t | h_t, s_{index_t})`` for alignments ``index [..., B, T]`` -> ``[..., B, T]``."""
        rows = torch.arange(memory.shape[0], device=memory.device)[:, None]
        context = memory[rows, index]  # [..., B, T, H_s]
        return self.log_prob_given_context(hidden, context, targets)

    def emission_log_probs(
        self,
        hidden: Tensor,
        memory: Tensor,
        targets: Tensor,
        memory_mask: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """``log p(y_t | h_t, s_m)`` for every source position.

        Args:
            hidden: ``[B, T, H]`` float decoder states.
            memory: ``[B, S, H_s]`` float source states.
            targets: ``[B, T]`` long ids in ``0..V-1`` (ignored ids must be replaced first).
            memory_mask: ``[B, S]`` bool, True at real positions; or ``key_padding_mask`` (True at padding).

        Returns:
            ``[B, T, S]`` float, ``-inf`` at padded source positions.
        """
        memory_mask = self._check(hidden, memory, memory_mask, key_padding_mask, targets)
        return self._emission_log_probs(hidden, memory, targets, memory_mask)

    def _emission_log_probs(
        self, hidden: Tensor, memory: Tensor, targets: Tensor, memory_mask: Tensor | None
    ) -> Tensor:
        o = self.attentional_hidden(hidden[:, :, None, :], memory[:, None, :, :])  # [B, T, S, D]
        B, T, S, D = o.shape
        out = log_softmax_linear(
            o.reshape(-1, D),
            self.output_projection.weight,
            self.output_projection.bias,
            targets[:, :, None].expand(B, T, S).reshape(-1),
            self.max_chunk_elements,
        ).view(B, T, S)
        if memory_mask is not None:
            out = out.masked_fill(~memory_mask[:, None, :], float("-inf"))
        return out

    @staticmethod
    def pruned_alignment(log_alpha: Tensor, k: int) -> Tensor:
        """``log alpha [B, T, S]`` with all but the ``k`` largest entries of each row set to ``-inf``.

        Not renormalised: ``logsumexp`` over ``S`` is ``<= 0``, the prior mass kept.
        """
        if k >= log_alpha.shape[-1]:
            return log_alpha
        index = log_alpha.detach().topk(k, dim=-1).indices
        keep = torch.zeros_like(log_alpha, dtype=torch.bool).scatter(-1, index, True)
        return log_alpha.masked_fill(~keep, float("-inf"))

    def pruned_emission_log_probs(
        self, hidden: Tensor, memory: Tensor, targets: Tensor, log_alpha: Tensor, k: int
    ) -> Tensor:
        """``log p(y_t | h_t, s_m)`` ``[B, T, S]`` at the ``k`` positions of highest prior of each row,
        ``-inf`` elsewhere (and at padding); only those ``B T k`` rows are read out.

        Args:
            hidden: decoder states ``[B, T, H]``.
            memory: source states ``[B, S, H_s]``.
            targets: ``[B, T]`` long target ids.
            log_alpha: ``[B, T, S]`` prior alignment log-probabilities (``-inf`` at padding).
            k: how many positions to keep per row (``1 <= k <= S``).

        Returns:
            ``[B, T, S]``: the emission log-probabilities of the kept positions, ``-inf`` at the others.
        """
        index = log_alpha.detach().topk(k, dim=-1).indices  # [B, T, k]
        rows = torch.arange(memory.shape[0], device=memory.device)[:, None, None]
        o = self.attentional_hidden(hidden[:, :, None, :], memory[rows, index])  # [B, T, k, D]
        B, T, _, D = o.shape
        kept = log_softmax_linear(
            o.reshape(-1, D),
            self.output_projection.weight,
            self.output_projection.bias,
            targets[:, :, None].expand(B, T, k).reshape(-1),
            self.max_chunk_elements,
        ).view(B, T, k)
        kept = kept.masked_fill(torch.isneginf(log_alpha.gather(-1, index)), float("-inf"))
        return torch.full_like(log_alpha, float("-inf")).scatter(-1, index, kept.to(log_alpha.dtype))

    def marginal_log_probs(self, hidden: Tensor, memory: Tensor, log_alpha: Tensor) -> Tensor:
        """Exact ``log p(y | h_t, s) = logsumexp_m (log alpha_tm + log p(y | h_t, s_m))``.

        Args:
            hidden: ``[B, T, H]`` float decoder states.
            memory: ``[B, S, H_s]`` float source states.
            log_alpha: ``[B, T, S]`` normalised alignment log-probabilities, ``-inf`` at padding.

        Returns:
            ``[B, T, V]`` float log-probabilities.
        """
        hq = self.out_query(hidden)
        hk = self.out_context(memory)
        # finite stand-in for -inf: a chunk of padded positions must not give logsumexp(-inf...)
        safe_alpha = log_alpha.clamp_min(torch.finfo(log_alpha.dtype).min / 2)
        parts = self._map_chunks(self._marginal_chunk, hq, hk, safe_alpha)
        out = parts[0]
        for part in parts[1:]:
            out = torch.logaddexp(out, part)
        return out

    # ---- the layer ---------------------------------------------------------------------------
    def forward(
        self,
        hidden: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        targets: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        full: bool = False,
        log_alpha: Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> LatentAttentionOutput:
        """Marginal log-probabilities of ``targets`` (and of the whole vocabulary if ``full``).

        Args:
            hidden: ``[B, T, H]`` float decoder states ``h_t`` (finite; checked when validating): the
                attention's queries, named ``hidden`` as in the
                :class:`~latentnlp.layers.output_head.OutputHead` protocol.
            memory: ``[B, S, H_s]`` float source states, ``S >= 1`` (finite; checked when validating).
            memory_mask: ``[B, S]`` bool, **True at real positions** (``None``: all real); every row
                needs one real position (checked when validating).
            targets: ``[B, T]`` long ids in ``0..V-1`` or ``ignore_index`` (optional).
            key_padding_mask: ``[B, S]`` bool, True at padding (``nn.MultiheadAttention``'s polarity);
                instead of ``memory_mask``, not with it.
            full: also return the whole marginal ``[B, T, V]`` (always when ``targets`` is None).
            log_alpha: ``[B, T, S]`` an alignment already computed (e.g. by a decoder loop that
                needed it for input feeding): ``alignment(hidden, memory, memory_mask).logits``,
                normalised over ``S`` and ``-inf`` at padding (checked when validating).
            ignore_index: targets equal to it get log-probability 0 (and no gradient).

        Returns:
            A :class:`LatentAttentionOutput`; fields not asked for are ``None``.
        """
        memory_mask = self._check(hidden, memory, memory_mask, key_padding_mask, targets, ignore_index, log_alpha)
        if log_alpha is None:
            log_alpha = self._prior(hidden, memory, memory_mask).logits
        context = torch.bmm(log_alpha.exp(), memory)
        attentional = self.attentional_hidden(hidden, context)
        log_prob = log_probs = log_emission = ignored = None
        if targets is not None:
            ignored, targets = ignored_targets(targets, ignore_index)
        if self.mode == "soft":
            if full or targets is None:
                log_probs = self._read_out(attentional)
                if targets is not None:
                    log_prob = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            else:
                log_prob = self._read_out(attentional, targets)
        else:
            kept = None if self.top_k is None or self.top_k >= memory.shape[1] else self.top_k
            if targets is not None:
                if kept is None:
                    log_emission = self._emission_log_probs(hidden, memory, targets, memory_mask)
                else:
                    log_emission = self.pruned_emission_log_probs(hidden, memory, targets, log_alpha, kept)
                log_emission = log_emission.masked_fill(ignored[..., None], 0.0)
                log_prob = torch.logsumexp(log_alpha + log_emission, dim=-1)
            if full or targets is None:
                prior = log_alpha if kept is None else self.pruned_alignment(log_alpha, kept)
                log_probs = self.marginal_log_probs(hidden, memory, prior)
        if log_prob is not None:
            log_prob = log_prob.masked_fill(ignored, 0.0)
        return LatentAttentionOutput(log_prob, log_probs, log_alpha, log_emission, context, attentional)

    def log_prob(
        self,
        hidden: Tensor,
        targets: Tensor,
        *,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        log_alpha: Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        **context,
    ) -> Tensor:
        """The :class:`~latentnlp.layers.output_head.OutputHead` method: ``log p(targets | ...)``.

        Args:
            hidden: ``[B, T, H]`` float decoder states.
            targets: ``[B, T]`` long ids in ``0..V-1`` or ``ignore_index``.
            memory: ``[B, S, H_s]`` float source states.
            memory_mask: ``[B, S]`` bool, True at real positions; or ``key_padding_mask`` (True at padding).
            log_alpha: ``[B, T, S]`` optional precomputed alignment, as in :meth:`forward`.
            ignore_index: targets equal to it get log-probability 0 (and no gradient).
            **context: the other :data:`~latentnlp.layers.output_head.CONTEXT_KEYWORDS`, ignored;
                any other keyword is a ``TypeError``.

        Returns:
            ``[B, T]`` float log-probabilities (0 where ignored).
        """
        check_context(self, "log_prob", context)
        return self(
            hidden,
            memory,
            memory_mask,
            targets,
            key_padding_mask=key_padding_mask,
            log_alpha=log_alpha,
            ignore_index=ignore_index,
        ).log_prob

    def log_probs(
        self,
        hidden: Tensor,
        *,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        log_alpha: Tensor | None = None,
        **context,
    ) -> Tensor:
        """The :class:`~latentnlp.layers.output_head.OutputHead` method: ``log p(. | ...)``.

        Args:
            As in :meth:`log_prob` (no targets).

        Returns:
            ``[B, T, V]`` float log-probabilities, ``logsumexp`` over the last dim 0.
        """
        check_context(self, "log_probs", context)
        return self(
            hidden, memory, memory_mask, key_padding_mask=key_padding_mask, full=True, log_alpha=log_alpha
        ).log_probs

    # ---- internals ---------------------------------------------------------------------------
    def _block(self, hq: Tensor, hk: Tensor) -> Tensor:
        """Vocabulary scores ``[B, T, c, V]`` for the chunk ``hk [B, c, D]``."""
        o = self.dropout(torch.tanh(hq[:, :, None, :] + hk[:, None, :, :]))
        # half-precision scores are normalised in float32 (autocast leaves logsumexp in half)
        return upcast(self.output_projection(o))

    def _marginal_chunk(self, hq: Tensor, hk: Tensor, log_alpha: Tensor) -> Tensor:
        log_probs = torch.log_softmax(self._block(hq, hk), dim=-1)
        return torch.logsumexp(log_alpha[..., None] + log_probs, dim=2)

    def _map_chunks(self, fn, hq: Tensor, hk: Tensor, log_alpha: Tensor) -> list[Tensor]:
        """``[fn(hq, hk[:, chunk], log_alpha[:, :, chunk])]`` over chunks of source positions.

        Each chunk builds at most ``max_chunk_elements`` vocabulary scores; when there is more
        than one chunk and gradients are needed, each is recomputed in the backward pass.
        """
        b, t, _ = hq.shape
        s = hk.shape[1]
        size = max(1, self.max_chunk_elements // max(1, b * t * self.vocab_size))
        if size >= s:
            return [fn(hq, hk, log_alpha)]
        recompute = torch.is_grad_enabled() and (hq.requires_grad or hk.requires_grad or log_alpha.requires_grad)
        parts = []
        for start in range(0, s, size):
            hk_c = hk[:, start : start + size]
            alpha_c = log_alpha.narrow(2, start, hk_c.shape[1])
            if recompute:
                parts.append(checkpoint(fn, hq, hk_c, alpha_c, use_reentrant=False))
            else:
                parts.append(fn(hq, hk_c, alpha_c))
        return parts

    def _check(
        self,
        hidden: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None,
        key_padding_mask: Tensor | None = None,
        targets: Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        log_alpha: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> Tensor | None:
        """Check the inputs (values only when validating); return the mask True at real positions."""
        name = type(self).__name__
        if hidden.dim() != 3 or hidden.shape[-1] != self.input_size:
            raise ValueError(f"{name}: hidden must be [B, T, {self.input_size}], got {tuple(hidden.shape)}")
        if memory.dim() != 3 or memory.shape[-1] != self.memory_size or memory.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"{name}: memory must be [B={hidden.shape[0]}, S, {self.memory_size}], got {tuple(memory.shape)}"
            )
        memory_mask = resolve_memory_mask(self, memory_mask, key_padding_mask)
        check_memory_mask(self, memory_mask, tuple(memory.shape[:2]), validate_args)
        if targets is not None:
            if targets.shape != hidden.shape[:2] or targets.dtype != torch.long:
                raise ValueError(
                    f"{name}: targets must be a LongTensor [B, T] = {tuple(hidden.shape[:2])}, "
                    f"got {targets.dtype} {tuple(targets.shape)}"
                )
            check_target_range(self, targets, self.vocab_size, ignore_index, validate_args=validate_args)
        check_finite(self, validate_args, hidden=hidden, memory=memory)
        if log_alpha is not None:
            shape = (hidden.shape[0], hidden.shape[1], memory.shape[1])
            check_log_alpha(self, log_alpha, shape, validate_args, memory_mask)
        return memory_mask
