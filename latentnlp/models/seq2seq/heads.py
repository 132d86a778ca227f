"""Output heads of the attentional decoder: how ``log p(y_t | ...)`` uses the alignment.

Each head is an :class:`~latentnlp.layers.output_head.OutputHead` on the decoder states
``hidden [B, T, H]`` (the ``h_t`` of :class:`~.core.AttentionalEncoderDecoder`) with the core's
context ``memory [B, S, H]``, ``memory_mask [B, S]`` (True at real source positions),
``log_alpha [B, T, S]`` and ``attentional [B, T, H]`` (the fed ``o_t``):

============================  ================================================================
:class:`SoftAttentionHead`    ``log p(y_t | h_t, c_t)``, ``c_t = sum_m alpha_tm s_m``
:class:`LatentAttentionHead`  ``log sum_m alpha_tm p(y_t | h_t, s_m)`` (the alignment summed out; with
                              ``top_k``, over the ``k`` positions of highest prior: a lower bound)
:class:`CopyHead`             ``o_t`` read out with an exactly marginalised copy switch
============================  ================================================================

``p(y_t | h, c) = softmax(W_o tanh(W_h h + W_c c + b) + b_o)`` is the core's
:class:`~latentnlp.layers.LatentAttention` read-out, shared by the heads.  Besides the two
:class:`OutputHead` methods a head says what it needs from a batch (:meth:`Seq2SeqHead.batch_context`,
:meth:`Seq2SeqHead.batch_targets`) and from decoding (:meth:`Seq2SeqHead.decoding_context`,
:meth:`Seq2SeqHead.decoder_input`), so the model runs every head the same way.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from latentnlp.layers.checks import IGNORE_INDEX, check_finite, check_target_range, ignored_targets
from latentnlp.layers.copy_generator import CopyGenerator
from latentnlp.layers.latent_attention import LatentAttention
from latentnlp.layers.output_head import check_context
from latentnlp.models.base import Batch
from latentnlp.validation import is_validating

__all__ = ["CopyHead", "LatentAttentionHead", "Seq2SeqHead", "SoftAttentionHead"]


class Seq2SeqHead(nn.Module):
    """An :class:`~latentnlp.layers.output_head.OutputHead` of the attentional decoder, with its batch needs.

    ``latent_alignment``: True when the alignment is a latent variable of the head's likelihood
    (then :attr:`attention` gives the per-position terms ``log p(y_t | h_t, s_m)`` an ELBO needs).
    """

    latent_alignment: ClassVar[bool] = False

    #: True when :meth:`log_prob` is a lower bound on the likelihood (a pruned sum) rather than it;
    #: :meth:`exact_log_prob` is then the likelihood itself
    pruned: bool = False

    def log_prob(self, hidden: Tensor, targets: Tensor, **context) -> Tensor:
        raise NotImplementedError

    def exact_log_prob(self, hidden: Tensor, targets: Tensor, **context) -> Tensor:
        """The head's exact ``log p(y_t | ...)`` ``[B, T]``: :meth:`log_prob` unless the head is :attr:`pruned`."""
        return self.log_prob(hidden, targets, **context)

    def log_probs(self, hidden: Tensor, **context) -> Tensor:
        raise NotImplementedError

    def batch_context(self, batch: Batch) -> dict[str, Tensor]:
        """Context the head reads from a training batch (beyond the core's)."""
        return {}

    def target_key(self, batch: Batch) -> str:
        """The batch key of the target ids the head scores."""
        return "tgt_out"

    def batch_targets(self, batch: Batch) -> Tensor:
        """The target ids ``[B, T]`` the head scores, ``batch[self.target_key(batch)]``."""
        return batch[self.target_key(batch)]

    @property
    def target_vocab_size(self) -> int | None:
        """The number of target ids the head scores (ids ``0..V-1``); ``None`` when any id ``>= 0``
        may be scored (the copy head's extended ids, which its generator checks)."""
        return self.attention.vocab_size

    def decoding_context(self, batch: Batch, memory_mask: Tensor) -> dict[str, object]:
        """Context kept in the decoder state for step-wise decoding (``memory_mask [B, S]`` True at real positions)."""
        return {}

    def decoder_input(self, tokens: Tensor) -> Tensor:
        """The decoder input ids for output ids ``tokens [N]`` of the previous step."""
        return tokens


class SoftAttentionHead(Seq2SeqHead):
    """``log p(y_t | h_t, c_t)`` with the soft context ``c_t = sum_m alpha_tm s_m`` (the baseline)."""

    def __init__(self, attention: LatentAttention) -> None:
        super().__init__()
        self.attention = attention

    def log_prob(
        self,
        hidden: Tensor,
        targets: Tensor,
        *,
        memory: Tensor,
        log_alpha: Tensor,
        ignore_index: int = IGNORE_INDEX,
        **context,
    ) -> Tensor:
        """``log p(y_t | h_t, c_t)``.

        Args:
            hidden: ``[B, T, H]`` float decoder states.
            targets: ``[B, T]`` long ids in ``0..V-1`` or ``ignore_index``.
            memory: ``[B, S, H]`` float source states.
            log_alpha: ``[B, T, S]`` alignment log-probabilities (``-inf`` at padded sources).
            ignore_index: targets equal to it get log-probability 0 (and no gradient).
            **context: the other :data:`~latentnlp.layers.output_head.CONTEXT_KEYWORDS`, ignored;
                any other keyword is a ``TypeError``.

        Returns:
            ``[B, T]`` float log-probabilities (0 where ignored).
        """
        check_context(self, "log_prob", context)
        check_finite(self, hidden=hidden, memory=memory)
        check_target_range(self, targets, self.attention.vocab_size, ignore_index)
        ignored, targets = ignored_targets(targets, ignore_index)
        context_vector = torch.bmm(log_alpha.exp(), memory)
        return self.attention.log_prob_given_context(hidden, context_vector, targets).masked_fill(ignored, 0.0)

    def log_probs(self, hidden: Tensor, *, memory: Tensor, log_alpha: Tensor, **context) -> Tensor:
        """``log p(. | h_t, c_t)``.

        Args:
            hidden: ``[B, T, H]`` float decoder states.
            memory: ``[B, S, H]`` float source states.
            log_alpha: ``[B, T, S]`` alignment log-probabilities (``-inf`` at padded sources).
            **context: the other :data:`~latentnlp.layers.output_head.CONTEXT_KEYWORDS`, ignored;
                any other keyword is a ``TypeError``.

        Returns:
            ``[B, T, V]`` float log-probabilities.
        """
        check_context(self, "log_probs", context)
        return self.attention.log_prob_given_context(hidden, torch.bmm(log_alpha.exp(), memory))


class LatentAttentionHead(Seq2SeqHead):
    """``log p(y_t | x, y_<t) = logsumexp_m (log alpha_tm + log p(y_t | h_t, s_m))``: exact latent attention.

    ``top_k``: sum only over the ``k`` source positions of highest prior ``alpha_tm`` of each target
    position (``LatentAttention(..., top_k=k)``): :meth:`log_prob` and :meth:`log_probs` are then
    the pruned sum, a lower bound on the marginal (equal to it when ``k >= S``) that reads out
    ``B T k`` instead of ``B T S`` rows; :meth:`exact_log_prob` stays exact.  A model trains the
    bound and evaluates the exact marginal; beam search decodes with the pruned (faster) scores.
    ``None`` (default): exact everywhere.
    """

    latent_alignment = True

    def __init__(self, attention: LatentAttention, *, top_k: int | None = None) -> None:
        super().__init__()
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {top_k}")
        self.attention = attention
        self.top_k = top_k
        self.pruned = top_k is not None

    def log_prob(
        self,
        hidden: Tensor,
        targets: Tensor,
        *,
        memory: Tensor,
        memory_mask: Tensor,
        log_alpha: Tensor,
        ignore_index: int = IGNORE_INDEX,
        **context,
    ) -> Tensor:
        """``logsumexp_m (log alpha_tm + log p(y_t | h_t, s_m))``, over the ``top_k`` positions of highest
        prior when the head has one (the pruned lower bound, what training with this head maximises).

        Args:
            hidden: ``[B, T, H]`` float decoder states.
            targets: ``[B, T]`` long ids in ``0..V-1`` or ``ignore_index``.
            memory: ``[B, S, H]`` float source states.
            memory_mask: ``[B, S]`` bool, True at real source positions.
            log_alpha: ``[B, T, S]`` alignment log-probabilities (``-inf`` at padded sources).
            ignore_index: targets equal to it get log-probability 0 (and no gradient).
            **context: the other :data:`~latentnlp.layers.output_head.CONTEXT_KEYWORDS`, ignored;
                any other keyword is a ``TypeError``.

        Returns:
            ``[B, T]`` float log-probabilities (0 where ignored); with ``top_k < S``, ``<=`` :meth:`exact_log_prob`.
        """
        check_context(self, "log_prob", context)
        return self._log_prob(hidden, targets, memory, memory_mask, log_alpha, ignore_index, self.top_k)

    def exact_log_prob(
        self,
        hidden: Tensor,
        targets: Tensor,
        *,
        memory: Tensor,
        memory_mask: Tensor,
        log_alpha: Tensor,
        ignore_index: int = IGNORE_INDEX,
        **context,
    ) -> Tensor:
        """The exact marginal, ``logsumexp_m`` over every source position whatever ``top_k``.

        Arguments and result as in :meth:`log_prob`.
        """
        check_context(self, "exact_log_prob", context)
        return self._log_prob(hidden, targets, memory, memory_mask, log_alpha, ignore_index, None)

    def _log_prob(
        self,
        hidden: Tensor,
        targets: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        log_alpha: Tensor,
        ignore_index: int,
        top_k: int | None,
    ) -> Tensor:
        check_target_range(self, targets, self.attention.vocab_size, ignore_index)
        ignored, targets = ignored_targets(targets, ignore_index)
        if top_k is None:
            emission = self.emission_log_probs(hidden, targets, memory, memory_mask)
        else:
            emission = self.kept_emission_log_probs(hidden, targets, memory, memory_mask, log_alpha)
        log_p = torch.logsumexp(log_alpha + emission, -1)
        return log_p.masked_fill(ignored, 0.0)

    def kept_emission_log_probs(
        self, hidden: Tensor, targets: Tensor, memory: Tensor, memory_mask: Tensor, log_alpha: Tensor
    ) -> Tensor:
        """:meth:`emission_log_probs` at the ``top_k`` positions of highest prior of each row, ``-inf``
        elsewhere (every position when ``top_k`` is None or ``>= S``); only those rows are read out."""
        if self.top_k is None or self.top_k >= memory.shape[1]:
            return self.emission_log_probs(hidden, targets, memory, memory_mask)
        return self.attention.pruned_emission_log_probs(hidden, memory, targets, log_alpha, self.top_k)

    def log_probs(self, hidden: Tensor, *, memory: Tensor, log_alpha: Tensor, **context) -> Tensor:
        """``logsumexp_m (log alpha_tm + log p(. | h_t, s_m))``, mixed over chunks of source positions.

        With ``top_k``, the sum over the ``k`` positions of highest prior (a sub-distribution: each
        row sums to the prior mass kept, ``<= 1``); decoding uses these pruned scores.

        Args:
            hidden: ``[B, T, H]`` float decoder states.
            memory: ``[B, S, H]`` float source states.
            log_alpha: ``[B, T, S]`` alignment log-probabilities (``-inf`` at padded sources).
            **context: the other :data:`~latentnlp.layers.output_head.CONTEXT_KEYWORDS`, ignored
                (``memory_mask`` is already in ``log_alpha``); any other keyword is a ``TypeError``.

        Returns:
            ``[B, T, V]`` float log-probabilities.
        """
        check_context(self, "log_probs", context)
        if self.top_k is not None:
            log_alpha = self.attention.pruned_alignment(log_alpha, self.top_k)
        return self.attention.marginal_log_probs(hidden, memory, log_alpha)

    def emission_log_probs(self, hidden: Tensor, targets: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """``log p(y_t | h_t, s_m)`` ``[B, T, S]`` for every source position.

        ``-inf`` where ``memory_mask [B, S]`` is False (padding; True at real positions).
        """
        return self.attention.emission_log_probs(hidden, memory, targets, memory_mask)


class CopyHead(Seq2SeqHead):
    """The attentional vector ``o_t`` read out by a :class:`~latentnlp.layers.CopyGenerator`.

    ``p(y_t = w) = p(gen | o_t) p_vocab(w | o_t) + p(copy | o_t) sum_{m: src_m = w} alpha_tm`` over the
    extended vocabulary; ``hidden`` is not read (``o_t`` comes as the context ``attentional``).

    Batches carry ``src_ext [B, S]`` (source tokens as extended target ids; optional when
    ``shared_vocabulary``: then ``src`` is used) and optionally ``tgt_out_ext [B, T]``.  Decoding
    feeds copied source-only words back as ``unk_id``.
    """

    def __init__(self, generator: CopyGenerator, *, shared_vocabulary: bool, unk_id: int | None = None) -> None:
        super().__init__()
        self.generator = generator
        self.shared_vocabulary, self.unk_id = shared_vocabulary, unk_id

    def log_prob(
        self,
        hidden: Tensor,
        targets: Tensor,
        *,
        attentional: Tensor,
        log_alpha: Tensor,
        src_ext: Tensor,
        extended_size: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        **context,
    ) -> Tensor:
        """``log p(y_t)`` of extended-id targets.

        Args:
            hidden: not read.
            targets: ``[B, T]`` long extended ids, or ``ignore_index``.
            attentional: ``[B, T, H]`` float attentional vectors ``o_t``.
            log_alpha: ``[B, T, S]`` alignment log-probabilities (``-inf`` at padded sources).
            src_ext: ``[B, S]`` long source as extended ids (values at padded positions are ignored).
            extended_size: ``V_ext`` (optional; ids past it are refused when validating).
            ignore_index: targets equal to it get log-probability 0 (and no gradient).
            **context: the other :data:`~latentnlp.layers.output_head.CONTEXT_KEYWORDS`, ignored;
                any other keyword is a ``TypeError``.

        Returns:
            ``[B, T]`` float log-probabilities (0 where ignored).
        """
        check_context(self, "log_prob", context)
        return self.generator.log_prob(
            attentional,
            targets,
            log_alpha=log_alpha,
            src_ext=src_ext,
            extended_size=extended_size,
            ignore_index=ignore_index,
        )

    def log_probs(
        self,
        hidden: Tensor,
        *,
        attentional: Tensor,
        log_alpha: Tensor,
        src_ext: Tensor,
        extended_size: int | None = None,
        **context,
    ) -> Tensor:
        """The distribution over the extended vocabulary.

        Args:
            hidden: not read.
            attentional: ``[B, T, H]`` float attentional vectors ``o_t``.
            log_alpha: ``[B, T, S]`` alignment log-probabilities (``-inf`` at padded sources).
            src_ext: ``[B, S]`` long source as extended ids.
            extended_size: ``V_ext`` (default: from the ids).
            **context: the other :data:`~latentnlp.layers.output_head.CONTEXT_KEYWORDS`, ignored;
                any other keyword is a ``TypeError``.

        Returns:
            ``[B, T, V_ext]`` float log-probabilities.
        """
        check_context(self, "log_probs", context)
        return self.generator.log_probs(attentional, log_alpha=log_alpha, src_ext=src_ext, extended_size=extended_size)

    def batch_context(self, batch: Batch) -> dict[str, Tensor]:
        if "src_ext" in batch:
            return {"src_ext": batch["src_ext"]}
        if self.shared_vocabulary:
            return {"src_ext": batch["src"]}
        raise ValueError(
            "the copy head needs batch['src_ext'] (source tokens as target ids) when the "
            "source and target vocabularies differ"
        )

    def target_key(self, batch: Batch) -> str:
        """``"tgt_out_ext"`` when the batch has extended targets, else ``"tgt_out"``."""
        return "tgt_out_ext" if "tgt_out_ext" in batch else "tgt_out"

    @property
    def target_vocab_size(self) -> None:
        """``None``: extended ids past ``V`` are scored too (the generator checks them)."""
        return None

    def decoding_context(self, batch: Batch, memory_mask: Tensor) -> dict[str, object]:
        """``src_ext`` and one extended vocabulary size for the whole batch."""
        src_ext = self.batch_context(batch)["src_ext"]
        return {
            "src_ext": src_ext,
            "extended_size": max(self.generator.vocab_size, int(src_ext[memory_mask].max()) + 1),
        }

    def decoder_input(self, tokens: Tensor) -> Tensor:
        """Source-only ids (``>= V``) become ``unk_id``."""
        copied = tokens >= self.generator.vocab_size
        if self.unk_id is None:
            if is_validating() and bool(copied.any()):
                raise ValueError("the copy head needs unk_id to feed back copied source-only words")
            return tokens
        return tokens.masked_fill(copied, self.unk_id)
