"""The extended vocabulary of a batch: what copy attention needs from token strings.

A :class:`~latentnlp.layers.CopyGenerator` scores words of an *extended vocabulary*: ids
``0..V-1`` are the output vocabulary, and the ``k``-th distinct source word of row ``b`` that is
not in it gets id ``V + k`` (per row), so ``V_ext = V + max_b (source-only words of row b)``.
A source-only word can only be copied; a target word that is neither in the vocabulary nor in
its source is ``unk_id``.  :class:`ExtendedVocabulary` builds, for one batch,

- ``src_ext [B, S]``: the source in extended ids (``0`` at padding, where attention is ``-inf``),
- ``extended_targets(tgt_tokens) [B, T]``: the targets in extended ids (``ignore_index`` at padding),
- ``words(ids)``: extended ids back to words (a copied source-only word is its own string),
- ``decoder_inputs(ids)``: extended ids to feed back to the decoder (source-only words as ``unk_id``).

The per-sentence functions :func:`source_extended_ids` and :func:`target_extended_ids` do the same
for one sentence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from latentnlp.layers.checks import IGNORE_INDEX
from latentnlp.masks import lengths_to_mask

__all__ = ["ExtendedVocabulary", "source_extended_ids", "target_extended_ids"]


def source_extended_ids(
    tokens: Sequence[str], vocab: Mapping[str, int], vocab_size: int | None = None
) -> tuple[list[int], list[str]]:
    """Ids of a source sentence in the extended vocabulary, and its source-only words.

    A token in ``vocab`` (anything with ``in`` and ``[]``, e.g. a dict or a
    :class:`~latentnlp.data.vocabulary.Vocabulary`) keeps its id; the ``k``-th distinct
    token not in it gets ``vocab_size + k`` (``vocab_size`` defaults to ``len(vocab)``).
    """
    size = len(vocab) if vocab_size is None else vocab_size
    oovs: list[str] = []
    ids = []
    for token in tokens:
        if token in vocab:
            ids.append(int(vocab[token]))
        else:
            if token not in oovs:
                oovs.append(token)
            ids.append(size + oovs.index(token))
    return ids, oovs


def target_extended_ids(
    tokens: Sequence[str], vocab: Mapping[str, int], oovs: Sequence[str], unk_id: int, vocab_size: int | None = None
) -> list[int]:
    """Ids of a target sentence: vocabulary ids, else the source-only id from ``oovs``, else ``unk_id``."""
    size = len(vocab) if vocab_size is None else vocab_size
    position = {w: size + k for k, w in enumerate(oovs)}
    return [int(vocab[w]) if w in vocab else position.get(w, unk_id) for w in tokens]


class ExtendedVocabulary:
    """Source map, extended targets and the way back to words for one batch of copy attention.

    Build it with :meth:`from_batch`.  Attributes: ``src_ext [B, S]`` long (source tokens as
    extended ids, 0 at padding), ``memory_mask [B, S]`` bool (True at real source positions),
    ``oovs`` (each row's source-only words, in id order), ``vocab_size`` ``V`` and
    ``extended_size`` ``V_ext``.

    Example: a GRU encoder-decoder with copy attention (teacher forcing, input feeding)::

        vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "the": 3, "cat": 4, "sat": 5}
        src = [["the", "cat", "zork"], ["zork", "sat"]]
        tgt = [["zork", "sat", "<eos>"], ["the", "zork", "<eos>"]]
        ext = ExtendedVocabulary.from_batch(src, vocab, unk_id=0)
        y_out = ext.extended_targets(tgt)                          # [B, T], -100 at padding
        y_in = ext.decoder_inputs(torch.cat([torch.ones(2, 1, dtype=torch.long), y_out[:, :-1]], 1))

        embed = nn.Embedding(len(vocab), E)
        encoder, cell = nn.GRU(E, H, batch_first=True), nn.GRUCell(E + H, H)
        attention = LatentAttention(H, H, len(vocab), mode="soft")
        copy = CopyGenerator.for_attention(attention)             # shares output_projection

        memory, h = encoder(embed(ext.decoder_inputs(ext.src_ext)))
        h, feed, loss = h[0], memory.new_zeros(2, H), 0.0
        for t in range(y_out.shape[1]):
            h = cell(torch.cat([embed(y_in[:, t]), feed], -1), h)
            step = copy.attend(attention, h[:, None], memory, ext.memory_mask, y_out[:, t : t + 1],
                               src_ext=ext.src_ext, extended_size=ext.extended_size)
            loss = loss - step.log_prob.sum()                      # 0 where y_out is -100
            feed = step.attentional[:, 0]
        ext.words(y_out)   # [["zork", "sat", "<eos>"], ["the", "zork", "<eos>"]]
    """

    def __init__(
        self,
        src_ext: Tensor,
        memory_mask: Tensor,
        oovs: Sequence[Sequence[str]],
        vocab: Mapping[str, int],
        *,
        vocab_size: int | None = None,
        unk_id: int | None = None,
    ) -> None:
        if src_ext.dim() != 2 or src_ext.dtype != torch.long or memory_mask.shape != src_ext.shape:
            raise ValueError(
                f"ExtendedVocabulary: src_ext must be a LongTensor [B, S] with memory_mask [B, S], got "
                f"{src_ext.dtype} {tuple(src_ext.shape)} and {tuple(memory_mask.shape)}"
            )
        if len(oovs) != src_ext.shape[0]:
            raise ValueError(
                f"ExtendedVocabulary: oovs must have one list per row ({src_ext.shape[0]}), got {len(oovs)}"
            )
        self.src_ext, self.memory_mask = src_ext, memory_mask
        self.oovs = [list(row) for row in oovs]
        self.vocab = vocab
        self.vocab_size = len(vocab) if vocab_size is None else vocab_size
        self.unk_id = unk_id
        self.extended_size = self.vocab_size + max((len(row) for row in self.oovs), default=0)
        itos = getattr(vocab, "itos", None)
        self._itos = dict(enumerate(itos)) if itos is not None else {int(i): w for w, i in vocab.items()}

    @classmethod
    def from_batch(
        cls,
        src_tokens: Sequence[Sequence[str]],
        vocab: Mapping[str, int],
        *,
        vocab_size: int | None = None,
        unk_id: int | None = None,
        device: torch.device | str | None = None,
    ) -> ExtendedVocabulary:
        """The extended vocabulary of a batch of source sentences.

        Args:
            src_tokens: ``B`` source sentences, each a list of token strings (any lengths >= 1).
            vocab: the output vocabulary, ``token -> id`` (a dict or a
                :class:`~latentnlp.data.vocabulary.Vocabulary`).
            vocab_size: ``V`` (default ``len(vocab)``).
            unk_id: the id of target words neither in ``vocab`` nor in the source, and of fed-back
                source-only words (needed by :meth:`extended_targets` and :meth:`decoder_inputs`).
            device: where ``src_ext`` and ``memory_mask`` live.

        Returns:
            An :class:`ExtendedVocabulary` with ``src_ext [B, S_max]`` (0 at padding) and
            ``memory_mask [B, S_max]`` (True at real positions).
        """
        if not src_tokens or any(len(row) == 0 for row in src_tokens):
            raise ValueError(
                "ExtendedVocabulary.from_batch: src_tokens must be a non-empty batch of non-empty sentences"
            )
        rows = [source_extended_ids(row, vocab, vocab_size) for row in src_tokens]
        width = max(len(ids) for ids, _ in rows)
        src_ext = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (ids, _) in enumerate(rows):
            src_ext[b, : len(ids)] = torch.tensor(ids)
        lengths = torch.tensor([len(ids) for ids, _ in rows])
        memory_mask = lengths_to_mask(lengths, width)
        return cls(
            src_ext.to(device),
            memory_mask.to(device),
            [oovs for _, oovs in rows],
            vocab,
            vocab_size=vocab_size,
            unk_id=unk_id,
        )

    def extended_targets(self, tgt_tokens: Sequence[Sequence[str]], *, pad_id: int = IGNORE_INDEX) -> Tensor:
        """Target sentences as extended ids ``[B, T_max]``.

        Args:
            tgt_tokens: ``B`` target sentences of token strings, row ``b`` aligned with source ``b``.
            pad_id: the id after each row's end (default ``ignore_index``, so no loss is computed there).

        Returns:
            ``[B, T_max]`` long: vocabulary ids, ``V + k`` for the row's ``k``-th source-only word,
            else ``unk_id``; ``pad_id`` at padding.
        """
        if len(tgt_tokens) != len(self.oovs):
            raise ValueError(
                f"ExtendedVocabulary.extended_targets: one target per source row ({len(self.oovs)}), "
                f"got {len(tgt_tokens)}"
            )
        if self.unk_id is None:
            raise ValueError("ExtendedVocabulary.extended_targets needs unk_id (from_batch(..., unk_id=...))")
        rows = [
            target_extended_ids(row, self.vocab, oovs, self.unk_id, self.vocab_size)
            for row, oovs in zip(tgt_tokens, self.oovs, strict=True)
        ]
        out = torch.full((len(rows), max(map(len, rows), default=0)), pad_id, dtype=torch.long)
        for b, ids in enumerate(rows):
            out[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out.to(self.src_ext.device)

    def decoder_inputs(self, ids: Tensor) -> Tensor:
        """Extended ids ``[B, ...]`` to feed to a decoder's embedding: source-only words (``>= V``) and
        negative ids (``ignore_index`` padding) become ``unk_id``."""
        if self.unk_id is None:
            raise ValueError("ExtendedVocabulary.decoder_inputs needs unk_id (from_batch(..., unk_id=...))")
        return ids.masked_fill((ids >= self.vocab_size) | (ids < 0), self.unk_id)

    def words(self, ids: Tensor | Sequence[Sequence[int]]) -> list[list[str]]:
        """Extended ids of each row (``[B, L]``, e.g. decoded ids) back to words.

        Vocabulary ids map through ``vocab``; ``V + k`` is row ``b``'s ``k``-th source-only word;
        negative ids (``ignore_index`` padding) are dropped.  ``ValueError`` for an id past the row's
        extended vocabulary.
        """
        rows = ids.tolist() if isinstance(ids, Tensor) else [list(row) for row in ids]
        if len(rows) != len(self.oovs):
            raise ValueError(f"ExtendedVocabulary.words: one row per source row ({len(self.oovs)}), got {len(rows)}")
        out = []
        for b, row in enumerate(rows):
            words = []
            for i in row:
                if i < 0:
                    continue
                if i < self.vocab_size:
                    words.append(self._itos[i])
                elif i - self.vocab_size < len(self.oovs[b]):
                    words.append(self.oovs[b][i - self.vocab_size])
                else:
                    raise ValueError(
                        f"ExtendedVocabulary.words: id {i} in row {b} is past its extended vocabulary "
                        f"(V = {self.vocab_size} + {len(self.oovs[b])} source-only words)"
                    )
            out.append(words)
        return out
