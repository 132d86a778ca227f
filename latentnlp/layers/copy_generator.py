"""A copy switch marginalised exactly (pointer-generator output layer).

A Bernoulli switch ``g_t`` chooses between generating from the vocabulary and
copying a source position chosen by the attention ``alpha_t``.  Both are summed
out::

    p(y_t = w) = p(gen | h_t) p_vocab(w | h_t) + p(copy | h_t) sum_{m: src_m = w} alpha_tm,

    p(gen | h_t) = sigmoid(u . x_t + c),   p_vocab = softmax(W h_t + b)   (x_t = switch input, default h_t)

over an *extended vocabulary*: ids ``0..V-1`` are the output vocabulary and
``V..V_ext-1`` are source-only words of the batch
(:class:`~latentnlp.layers.ExtendedVocabulary` builds such ids from token strings).
A source-only word can only be copied; a vocabulary word can be generated and copied.

Everything is computed in log space: ``log sigmoid`` for the switch,
``log_softmax`` for the vocabulary, and the copy sum as a log-space scatter
(each word shifted by its own largest ``log alpha``), so no ``log(p + eps)``
appears and impossible words get ``-inf`` with finite (zero) gradients.

The layer is an :class:`~latentnlp.layers.output_head.OutputHead` over the extended
vocabulary, with context ``log_alpha``, ``src_ext`` (and ``extended_size``).
:meth:`CopyGenerator.attend` composes it with the soft attention of a
:class:`~latentnlp.layers.LatentAttention` in one call (``alpha_t`` its prior, ``h_t`` its
attentional vector ``o_t``), and :meth:`CopyGenerator.for_attention` builds the layer that shares
that attention's vocabulary projection.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentnlp.layers.checks import IGNORE_INDEX, check_finite, check_log_alpha, ignored_targets
from latentnlp.layers.output_head import check_context, tie_projection
from latentnlp.semirings import logsumexp, safe_log
from latentnlp.validation import is_validating

if TYPE_CHECKING:
    from latentnlp.layers.latent_attention import LatentAttention

__all__ = ["CopyGenerator", "CopyOutput"]


class CopyOutput(NamedTuple):
    """What :meth:`CopyGenerator.forward` and :meth:`CopyGenerator.attend` return.

    - ``log_prob [B, T]``: log p(y_t) of the targets (``None`` without targets)
    - ``log_probs [B, T, V_ext]``: the whole extended distribution (``full=True``)
    - ``log_p_copy [B, T]``: log p(copy | h_t)
    - ``log_alpha [B, T, S]``: the copy attention (:meth:`~CopyGenerator.attend` only)
    - ``attentional [B, T, D]``: ``o_t``, what was read out and an input-feeding decoder feeds
      to its next step (:meth:`~CopyGenerator.attend` only)
    """

    log_prob: Tensor | None
    log_probs: Tensor | None
    log_p_copy: Tensor
    log_alpha: Tensor | None = None
    attentional: Tensor | None = None


def _scatter_logsumexp(values: Tensor, index: Tensor, size: int) -> Tensor:
    """``out[..., w] = log sum_{m: index[..., m] = w} exp(values[..., m])`` (``-inf`` if none).

    Each word is shifted by its own largest value, so no term underflows needlessly.
    """
    shape = values.shape[:-1] + (size,)
    peak = values.new_full(shape, -math.inf).scatter_reduce(
        -1, index, values.detach(), reduce="amax", include_self=True
    )
    peak = peak.masked_fill(~torch.isfinite(peak), 0.0)
    weights = (values - peak.gather(-1, index)).exp()
    total = values.new_zeros(shape).scatter_add(-1, index, weights)
    return safe_log(total) + peak


class CopyGenerator(nn.Module):
    """Output layer with an exactly marginalised copy switch.

    Args:
        input_size: size of the decoder feature ``h_t`` read out to the vocabulary.
        vocab_size: output vocabulary ``V``.
        switch_input_size: size of the switch input ``x_t`` (default: ``input_size``; ``x_t = h_t``).
        output_projection: an existing ``nn.Linear(input_size, vocab_size)`` to share (e.g. the
            ``output_projection`` of a :class:`~latentnlp.layers.LatentAttention`); default: a new one.

    Attributes:
        output_projection: the vocabulary projection ``p_vocab = softmax(W h + b)``; :meth:`tie_weights`
            ties it to an input embedding.
        switch: the switch ``nn.Linear(switch_input_size, 1)``.
    """

    def __init__(
        self,
        input_size: int,
        vocab_size: int,
        *,
        switch_input_size: int | None = None,
        output_projection: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        if output_projection is not None:
            shape = (output_projection.in_features, output_projection.out_features)
            if shape != (input_size, vocab_size):
                raise ValueError(
                    f"CopyGenerator: output_projection must map input_size {input_size} -> vocab_size "
                    f"{vocab_size}, got {shape[0]} -> {shape[1]}"
                )
        self.input_size, self.vocab_size = input_size, vocab_size
        self.output_projection = nn.Linear(input_size, vocab_size) if output_projection is None else output_projection
        self.switch = nn.Linear(switch_input_size or input_size, 1)

    @classmethod
    def for_attention(cls, attention: LatentAttention, *, switch_input_size: int | None = None) -> CopyGenerator:
        """The copy layer that reads out ``attention``'s ``o_t`` with its (shared) ``output_projection``."""
        return cls(
            attention.projection_size,
            attention.vocab_size,
            switch_input_size=switch_input_size,
            output_projection=attention.output_projection,
        )

    def attend(
        self,
        attention: LatentAttention,
        hidden: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        targets: Tensor | None = None,
        *,
        src_ext: Tensor,
        key_padding_mask: Tensor | None = None,
        extended_size: int | None = None,
        full: bool = False,
        switch_input: Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> CopyOutput:
        """Soft attention composed with the copy switch, in one call.

        ``alpha_t = attention.alignment(h_t, s)`` is the copy distribution and
        ``o_t = tanh(W_h h_t + W_c sum_m alpha_tm s_m + b)`` (``attention``'s attentional vector)
        the feature read out by this layer::

            p(y_t = w) = p(gen | o_t) softmax(W o_t + b)_w + p(copy | o_t) sum_{m: src_m = w} alpha_tm

        Works step-wise (``T = 1``) as well: ``attentional`` of the output is the vector to feed.

        Args:
            attention: the :class:`~latentnlp.layers.LatentAttention` that scores the source;
                its ``projection_size`` must be this layer's ``input_size``.
            hidden: ``[B, T, H]`` float decoder states ``h_t`` (the attention's queries).
            memory: ``[B, S, H_s]`` float source states.
            memory_mask: ``[B, S]`` bool, **True at real positions** (or ``key_padding_mask``,
                True at padding; not both).
            targets: ``[B, T]`` long extended ids, or ``ignore_index`` (optional).
            src_ext: ``[B, S]`` long source as extended ids (e.g. ``ExtendedVocabulary.src_ext``).
            extended_size, full, switch_input, ignore_index: as in :meth:`forward`.

        Returns:
            A :class:`CopyOutput` with ``log_alpha`` and ``attentional`` filled in.
        """
        if attention.projection_size != self.input_size:
            raise ValueError(
                f"CopyGenerator.attend: attention.projection_size {attention.projection_size} must be this "
                f"layer's input_size {self.input_size}"
            )
        log_alpha = attention.alignment(hidden, memory, memory_mask, key_padding_mask=key_padding_mask).logits
        attentional = attention.attentional_hidden(hidden, torch.bmm(log_alpha.exp(), memory))
        out = self(
            attentional,
            log_alpha,
            src_ext,
            targets,
            extended_size=extended_size,
            full=full,
            switch_input=switch_input,
            ignore_index=ignore_index,
        )
        return out._replace(log_alpha=log_alpha, attentional=attentional)

    def tie_weights(self, embedding: nn.Embedding) -> None:
        """Use ``embedding.weight [V, input_size]`` as ``output_projection.weight`` (Press & Wolf 2017)."""
        tie_projection(self, self.output_projection, embedding)

    def forward(
        self,
        hidden: Tensor,
        log_alpha: Tensor,
        src_ext: Tensor,
        targets: Tensor | None = None,
        *,
        extended_size: int | None = None,
        full: bool = False,
        switch_input: Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> CopyOutput:
        """Log-probabilities with the switch and the copied position summed out.

        Args:
            hidden: ``[B, T, D]`` float decoder features (finite; checked when validating).
            log_alpha: ``[B, T, S]`` float copy attention log-probabilities, normalised over ``S``,
                ``-inf`` at padded sources, a possible position in every row (checked when validating).
            src_ext: ``[B, S]`` long source tokens as extended ids in ``0..V_ext-1`` (values at padded
                positions, where ``log_alpha`` is ``-inf``, are ignored).
            targets: ``[B, T]`` long extended ids to score, or ``ignore_index`` (optional).
            extended_size: ``V_ext >= V`` (default: ``V`` or one more than the largest id seen).
            full: also return the whole distribution over the extended vocabulary.
            switch_input: ``[B, T, D_x]`` float features of the switch (default ``hidden``).
            ignore_index: targets equal to it get log-probability 0 (and no gradient).

        Returns:
            A :class:`CopyOutput`; ``log_prob`` is ``None`` without targets, ``log_probs`` unless ``full``.
        """
        self._check(hidden, log_alpha, src_ext, targets, switch_input, extended_size)
        if full or is_validating():
            size = self._extended_size(src_ext, targets, log_alpha, extended_size, ignore_index)
        switch = self.switch(hidden if switch_input is None else switch_input).squeeze(-1)
        log_gen, log_copy = F.logsigmoid(switch), F.logsigmoid(-switch)
        log_vocab = torch.log_softmax(self.output_projection(hidden), dim=-1)  # [B, T, V]
        # a NaN in a row's inputs makes every output of the row NaN, never a smaller total probability
        nan = torch.isnan(log_alpha)
        nan_row = nan.any(-1) | torch.isnan(log_vocab).any(-1) | torch.isnan(switch)
        valid = ~torch.isneginf(log_alpha)
        src = src_ext[:, None, :].expand_as(log_alpha)
        log_prob = log_probs = None
        if targets is not None:
            ignored, targets = ignored_targets(targets, ignore_index)
            in_vocab = targets < self.vocab_size
            gen = log_vocab.gather(-1, torch.where(in_vocab, targets, 0).unsqueeze(-1)).squeeze(-1)
            gen = gen.masked_fill(~in_vocab, -math.inf)
            other_word = (src != targets.unsqueeze(-1)) & ~nan
            copy = logsumexp(log_alpha.masked_fill(other_word, -math.inf), -1)
            log_prob = logsumexp(torch.stack([log_gen + gen, log_copy + copy], -1), -1)
            log_prob = log_prob.masked_fill(nan_row, math.nan).masked_fill(ignored, 0.0)
        if full:
            copy = _scatter_logsumexp(log_alpha, torch.where(valid, src, 0), size)
            gen = F.pad(log_vocab, (0, size - self.vocab_size), value=-math.inf)
            log_probs = logsumexp(torch.stack([log_gen[..., None] + gen, log_copy[..., None] + copy], -1), -1)
            log_probs = log_probs.masked_fill(nan_row[..., None], math.nan)
        return CopyOutput(log_prob, log_probs, log_copy)

    def log_prob(
        self,
        hidden: Tensor,
        targets: Tensor,
        *,
        log_alpha: Tensor,
        src_ext: Tensor,
        extended_size: int | None = None,
        switch_input: Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        **context,
    ) -> Tensor:
        """The :class:`~latentnlp.layers.output_head.OutputHead` method: ``log p(targets | ...)``.

        Args:
            hidden: ``[B, T, D]`` float decoder features.
            targets: ``[B, T]`` long extended ids, or ``ignore_index``.
            log_alpha, src_ext, extended_size, switch_input: as in :meth:`forward`.
            ignore_index: targets equal to it get log-probability 0 (and no gradient).
            **context: the other :data:`~latentnlp.layers.output_head.CONTEXT_KEYWORDS`, ignored;
                any other keyword is a ``TypeError``.

        Returns:
            ``[B, T]`` float log-probabilities (0 where ignored).
        """
        check_context(self, "log_prob", context)
        return self(
            hidden,
            log_alpha,
            src_ext,
            targets,
            extended_size=extended_size,
            switch_input=switch_input,
            ignore_index=ignore_index,
        ).log_prob

    def log_probs(
        self,
        hidden: Tensor,
        *,
        log_alpha: Tensor,
        src_ext: Tensor,
        extended_size: int | None = None,
        switch_input: Tensor | None = None,
        **context,
    ) -> Tensor:
        """The :class:`~latentnlp.layers.output_head.OutputHead` method: ``log p(. | ...)``.

        Args:
            As in :meth:`forward` (no targets).

        Returns:
            ``[B, T, V_ext]`` float log-probabilities over the extended vocabulary.
        """
        check_context(self, "log_probs", context)
        return self(
            hidden, log_alpha, src_ext, extended_size=extended_size, full=True, switch_input=switch_input
        ).log_probs

    def _extended_size(
        self, src_ext: Tensor, targets: Tensor | None, log_alpha: Tensor, extended_size: int | None, ignore_index: int
    ) -> int:
        """``V_ext``; when validating, also every id used in ``0..V_ext-1`` (one read from the device)."""
        if extended_size is not None and not is_validating():  # trusted: no read from the device
            return extended_size
        name = type(self).__name__
        used = src_ext[:, None, :].expand_as(log_alpha)[~torch.isneginf(log_alpha)]
        kept = targets[targets != ignore_index] if targets is not None else src_ext.new_zeros(0)
        ids = torch.cat([used, kept])
        low, high = torch.stack([ids.min(), ids.max()]).tolist() if ids.numel() else (0, 0)
        if low < 0:
            raise ValueError(f"{name}: extended ids (src_ext, targets) must be >= 0, got {low}")
        largest = max(self.vocab_size - 1, high)
        if extended_size is None:
            return largest + 1
        if extended_size <= largest:
            raise ValueError(
                f"{name}: extended_size {extended_size} must exceed the largest id used in src_ext or targets "
                f"({largest}); ids past the extended vocabulary cannot be scored"
            )
        return extended_size

    def _check(
        self,
        hidden: Tensor,
        log_alpha: Tensor,
        src_ext: Tensor,
        targets: Tensor | None,
        switch_input: Tensor | None,
        extended_size: int | None,
    ) -> None:
        name = type(self).__name__
        if hidden.dim() != 3 or hidden.shape[-1] != self.input_size:
            raise ValueError(f"{name}: hidden must be [B, T, {self.input_size}], got {tuple(hidden.shape)}")
        b, t = hidden.shape[:2]
        if log_alpha.dim() != 3 or log_alpha.shape[:2] != (b, t):
            raise ValueError(f"{name}: log_alpha must be [B, T, S] with B, T = {b}, {t}, got {tuple(log_alpha.shape)}")
        check_log_alpha(self, log_alpha, tuple(log_alpha.shape))
        if src_ext.shape != (b, log_alpha.shape[2]) or src_ext.dtype != torch.long:
            raise ValueError(
                f"{name}: src_ext must be a LongTensor [B, S] = {(b, log_alpha.shape[2])}, "
                f"got {src_ext.dtype} {tuple(src_ext.shape)}"
            )
        if targets is not None and (targets.shape != (b, t) or targets.dtype != torch.long):
            raise ValueError(
                f"{name}: targets must be a LongTensor [B, T] = {(b, t)}, got {targets.dtype} {tuple(targets.shape)}"
            )
        switch_size = self.switch.in_features
        if switch_input is not None and (switch_input.dim() != 3 or switch_input.shape != (b, t, switch_size)):
            raise ValueError(
                f"{name}: switch_input must be [B, T, {switch_size}] = {(b, t, switch_size)}, "
                f"got {tuple(switch_input.shape)}"
            )
        if extended_size is not None and extended_size < self.vocab_size:
            raise ValueError(f"{name}: extended_size must be >= vocab_size = {self.vocab_size}, got {extended_size}")
        check_finite(self, hidden=hidden, switch_input=switch_input)
