"""Batch iterables: BPTT streams, length-bucketed sentence batches, parallel batches.

Every class here is a :class:`Batches`, a re-iterable with one interface a
trainer can resume from::

    len(batches)                       # batches in one epoch
    batches.iterate(epoch, start=k)    # the batches of `epoch`, from index k on
    batches.set_epoch(epoch)           # then `for batch in batches` == iterate(epoch)

An epoch's batches are a pure function of the data, the settings, ``seed`` and
``epoch``: shuffling uses a fresh ``torch.Generator`` seeded from ``(seed, epoch)``
(:func:`epoch_generator`), never the global RNG, so resuming at batch ``k`` of
epoch ``e`` after a restart (``iterate(e, start=k)``) gives exactly the batches
an uninterrupted run would have seen.  ``len`` does not depend on the epoch.
Batches are dicts of CPU tensors (``BPTTStream`` can keep its stream on a device).

Batch layouts (``B`` examples, padded with ``pad_id``; positions at or past a
length are padding and carry no meaning):

* :class:`BPTTStream` (language models over a running text):
  ``inputs [B, T]``, ``targets [B, T]`` (``targets[:, t]`` is the token after
  ``inputs[:, t]``), ``lengths [B]`` (all ``T``; the last chunk may be shorter
  than ``bptt``) and ``stream: True`` (a model may carry state across batches).
  Row ``b`` of consecutive batches continues the same stretch of text.
* :class:`SentenceBatches` (sentence-level LMs, VAEs): for a sentence
  ``w_1..w_n``, ``inputs = <bos> w_1..w_n``, ``targets = w_1..w_n <eos>``,
  ``lengths = n + 1``: ``<eos>`` is predicted and counted, ``<bos>`` is only
  context.  Also ``indices [B]``: each row's position in the example list.
* :class:`ParallelBatches` (seq2seq): ``src [B, S]`` (the source ids,
  optionally followed by ``<eos>``), ``src_lengths [B]``, ``tgt_in [B, T]``
  (``<bos> y_1..y_m``), ``tgt_out [B, T]`` (``y_1..y_m <eos>``),
  ``tgt_lengths [B]`` (``m + 1``), ``lengths`` (= ``tgt_lengths``, the target
  token count that :meth:`LatentModel.num_tokens` reads) and ``indices [B]``.

Bucketing (:func:`bucket_batches`): examples are ordered by length (ties in a
random order when shuffling), cut greedily into batches of at most
``batch_size`` examples and/or at most ``max_tokens`` padded tokens
(``rows x longest row``, source or target), and the batch order is shuffled.
An example longer than ``max_tokens`` gets a batch of its own; nothing is
dropped.

Distributed training: these objects always give the whole epoch; the
:class:`~latentnlp.training.Trainer` shares it out (batch ``i`` to rank
``i % W``; the rows of ``stream`` batches split over ranks).  The class
attribute ``stream`` tells it which kind an object is without iterating.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .subword import SentencePieceTokenizer
    from .vocabulary import Vocabulary

    Tokenizer = Vocabulary | SentencePieceTokenizer

Batch = dict[str, object]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, epoch)`` (the same everywhere)."""
    digest = hashlib.sha256(f"latentnlp:{int(seed)}:{int(epoch)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class Batches(ABC):
    """Base of the batch iterables: ``len``, ``iterate(epoch, start)``, ``set_epoch``."""

    epoch: int = 0
    #: True when consecutive batches continue each row (model state is carried over)
    stream: bool = False

    @abstractmethod
    def __len__(self) -> int:
        """Batches per epoch."""

    @abstractmethod
    def _batches(self, epoch: int, start: int) -> Iterator[Batch]: ...

    def iterate(self, epoch: int | None = None, start: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` (default: the current one), from index ``start`` on."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self)
        if not 0 <= start <= n:
            raise ValueError(f"start must be in 0..{n} (batches per epoch), got {start}")
        return self._batches(epoch, int(start))

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        """Make ``iter(self)`` give epoch ``epoch`` (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)


# ---------------------------------------------------------------------------------------------
# BPTT streams
# ---------------------------------------------------------------------------------------------
def lm_stream(sentences: Iterable[Sequence[str] | str], vocab: Vocabulary, *, prepend_eos: bool = False) -> Tensor:
    """The corpus as one LongTensor of ids: each sentence followed by ``<eos>``.

    ``prepend_eos`` puts one more ``<eos>`` in front, as the context of the first
    word, so that every word and every ``<eos>`` of the corpus is a target.
    """
    eos = vocab.eos_id
    if eos is None:
        raise ValueError("the vocabulary has no eos token; a stream needs one")
    ids: list[int] = [eos] if prepend_eos else []
    for s in sentences:
        ids += vocab.encode(s)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


class BPTTStream(Batches):
    """A token stream in ``B`` parallel rows, cut into chunks of ``bptt`` steps.

    With ``N`` ids and ``B = batch_size`` rows, each row holds ``L = (N - 1) // B``
    consecutive targets: row ``r`` reads inputs ``ids[r*L : (r+1)*L]`` and targets
    ``ids[r*L + 1 : (r+1)*L + 1]`` (the rows tile the stream, so every id after
    the first is a target once, save the last ``(N - 1) mod B``).  Batch ``i`` is
    columns ``i*bptt .. min((i+1)*bptt, L)``; there are ``ceil(L / bptt)``
    batches.  The order is fixed; ``epoch`` is accepted and ignored.  ``device``
    moves the whole stream there once.
    """

    stream = True

    def __init__(
        self, ids: Tensor | Sequence[int], batch_size: int, bptt: int, *, device: torch.device | str | None = None
    ) -> None:
        if batch_size < 1 or bptt < 1:
            raise ValueError(f"batch_size and bptt must be >= 1, got {batch_size}, {bptt}")
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        length = (ids.numel() - 1) // batch_size
        if length < 1:
            raise ValueError(f"a stream of {ids.numel()} ids is too short for {batch_size} rows")
        self.batch_size, self.bptt, self.row_length = batch_size, bptt, length
        self.inputs = ids[: batch_size * length].view(batch_size, length).to(device)
        self.targets = ids[1 : batch_size * length + 1].view(batch_size, length).to(device)

    @classmethod
    def from_sentences(
        cls,
        sentences: Iterable[Sequence[str] | str],
        vocab: Vocabulary,
        batch_size: int,
        bptt: int,
        *,
        prepend_eos: bool = False,
        **kwargs,
    ) -> BPTTStream:
        """Stream of ``sentences`` (see :func:`lm_stream`) in ``batch_size`` rows."""
        return cls(lm_stream(sentences, vocab, prepend_eos=prepend_eos), batch_size, bptt, **kwargs)

    def __len__(self) -> int:
        return -(-self.row_length // self.bptt)

    @property
    def num_tokens(self) -> int:
        """Targets per epoch (``batch_size * row_length``)."""
        return self.batch_size * self.row_length

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        for i in range(start, len(self)):
            lo = i * self.bptt
            hi = min(lo + self.bptt, self.row_length)
            yield {
                "inputs": self.inputs[:, lo:hi].contiguous(),
                "targets": self.targets[:, lo:hi].contiguous(),
                "lengths": torch.full((self.batch_size,), hi - lo, dtype=torch.long, device=self.inputs.device),
                "stream": True,
            }


# ---------------------------------------------------------------------------------------------
# length bucketing
# ---------------------------------------------------------------------------------------------
def bucket_batches(
    lengths: Sequence[int | tuple[int, ...]],
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    sort: bool = True,
) -> list[list[int]]:
    """Group example indices into batches of similar length.

    ``lengths[i]``: the padded length of example ``i``, or a tuple of them
    (``(target, source)``): examples are sorted by it (lexicographically), and a
    batch's padded size is its row count times its largest entry.  A batch closes
    before it would exceed ``batch_size`` rows or ``max_tokens`` padded tokens.
    ``shuffle`` randomises ties and then the batch order with ``generator``;
    ``sort=False`` keeps the given order (no bucketing).  Every index appears in
    exactly one batch.
    """
    if batch_size is None and max_tokens is None:
        raise ValueError("give batch_size, max_tokens or both")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    keys = [k if isinstance(k, tuple) else (int(k),) for k in lengths]
    n = len(keys)
    if len({len(k) for k in keys}) > 1:
        raise ValueError("lengths: all entries must have the same number of fields")
    order_t = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if sort and n:
        table = torch.tensor(keys, dtype=torch.long)  # [n, fields]
        if int(table.min()) < 0:
            raise ValueError("lengths must be >= 0")
        composite = torch.zeros(n, dtype=torch.long)  # lexicographic key as one integer
        for col in table.unbind(1):
            composite = composite * (int(table.max()) + 1) + col
        # stable: ties stay in the (random) order of the permutation
        order_t = order_t[torch.argsort(composite[order_t], stable=True)]
    order = order_t.tolist()
    sizes = [max(k) for k in keys]
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        size = sizes[i]
        new_max = max(cur_max, size)
        if cur and (
            (batch_size is not None and len(cur) >= batch_size)
            or (max_tokens is not None and new_max * (len(cur) + 1) > max_tokens)
        ):
            batches.append(cur)
            cur, new_max = [], size
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    if shuffle:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


class _Bucketed(Batches):
    """Shared plumbing of the bucketed batch iterables."""

    def _setup(
        self,
        keys: list[tuple[int, ...]],
        batch_size: int | None,
        max_tokens: int | None,
        shuffle: bool,
        seed: int,
        sort: bool,
    ) -> None:
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.shuffle, self.seed, self.sort = shuffle, int(seed), sort
        self._keys = keys
        # the number of batches is the same every epoch (ties only permute equal keys)
        self._num_batches = len(self.plan(0))

    def plan(self, epoch: int) -> list[list[int]]:
        """Example indices of each batch of ``epoch``, in order."""
        gen = epoch_generator(self.seed, epoch) if self.shuffle else None
        return bucket_batches(
            self._keys,
            batch_size=self.batch_size,
            max_tokens=self.max_tokens,
            shuffle=self.shuffle,
            generator=gen,
            sort=self.sort,
        )

    def __len__(self) -> int:
        return self._num_batches

    @abstractmethod
    def collate(self, indices: Sequence[int]) -> Batch:
        """The batch dict of the examples ``indices``."""

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        for idx in self.plan(epoch)[start:]:
            yield self.collate(idx)


def _encode_all(tok: Tokenizer, texts: Sequence[Sequence[str] | str]) -> list[list[int]]:
    from .subword import SentencePieceTokenizer

    if isinstance(tok, SentencePieceTokenizer):
        texts = [t if isinstance(t, str) else " ".join(t) for t in texts]
        return tok.encode(texts)  # type: ignore[return-value]
    return [tok.encode(t) for t in texts]


class SentenceBatches(_Bucketed):
    """Padded, length-bucketed sentence batches for sentence-level LMs (layout: module doc).

    ``examples``: id lists without specials.  ``pad_id`` defaults to ``eos_id``
    (padding is never read).  Give ``batch_size`` (sentences) and/or
    ``max_tokens`` (padded tokens).  ``shuffle`` with ``seed``: see module doc.
    """

    def __init__(
        self,
        examples: Sequence[Sequence[int]],
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int | None = None,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        sort: bool = True,
    ) -> None:
        if bos_id is None or eos_id is None:
            raise ValueError("SentenceBatches needs bos_id and eos_id (build the vocabulary with bos='<bos>')")
        self.examples = [list(e) for e in examples]
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self._setup([(len(e) + 1,) for e in self.examples], batch_size, max_tokens, shuffle, seed, sort)

    @classmethod
    def from_sentences(cls, sentences: Sequence[Sequence[str] | str], vocab: Tokenizer, **kwargs) -> SentenceBatches:
        """Encode ``sentences`` with ``vocab`` and take its bos/eos/pad ids."""
        return cls(
            _encode_all(vocab, sentences), bos_id=vocab.bos_id, eos_id=vocab.eos_id, pad_id=vocab.pad_id, **kwargs
        )

    def collate(self, indices: Sequence[int]) -> Batch:
        ex = [self.examples[i] for i in indices]
        return {
            "inputs": _pad([[self.bos_id] + e for e in ex], self.pad_id),
            "targets": _pad([e + [self.eos_id] for e in ex], self.pad_id),
            "lengths": torch.tensor([len(e) + 1 for e in ex], dtype=torch.long),
            "indices": torch.tensor(list(indices), dtype=torch.long),
        }


class ParallelBatches(_Bucketed):
    """Padded, length-bucketed (source, target) batches for seq2seq (layout: module doc).

    ``examples``: pairs of id lists without specials.  Target specials
    ``bos_id``/``eos_id``/``pad_id`` (``pad_id`` defaults to ``eos_id``); source
    padding ``src_pad_id`` (default ``pad_id``) and, when ``src_eos_id`` is given,
    an ``<eos>`` appended to every source.  Sources must not be empty unless
    ``src_eos_id`` is given (a length of 0 is not allowed).  Sorting is by
    (target, source) length; ``max_tokens`` bounds ``rows x max(S, T)``.
    """

    def __init__(
        self,
        examples: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int | None = None,
        src_pad_id: int | None = None,
        src_eos_id: int | None = None,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        sort: bool = True,
    ) -> None:
        if bos_id is None or eos_id is None:
            raise ValueError("ParallelBatches needs bos_id and eos_id for the target side")
        self.src = [list(s) for s, _ in examples]
        self.tgt = [list(t) for _, t in examples]
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.src_pad_id = self.pad_id if src_pad_id is None else int(src_pad_id)
        self.src_eos_id = None if src_eos_id is None else int(src_eos_id)
        extra = 0 if self.src_eos_id is None else 1
        empty = [i for i, s in enumerate(self.src) if len(s) + extra == 0]
        if empty:
            raise ValueError(
                f"examples: {len(empty)} empty source sentence(s) (first at index "
                f"{empty[0]}); filter them out or pass src_eos_id"
            )
        keys = [(len(t) + 1, len(s) + extra) for s, t in zip(self.src, self.tgt)]
        self._setup(keys, batch_size, max_tokens, shuffle, seed, sort)

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[tuple[Sequence[str] | str, Sequence[str] | str]],
        tokenizer: Tokenizer,
        tgt_tokenizer: Tokenizer | None = None,
        *,
        src_eos: bool = False,
        **kwargs,
    ) -> ParallelBatches:
        """Encode (source, target) text pairs; ``tokenizer`` for both sides unless
        ``tgt_tokenizer`` is given.  ``src_eos`` appends the source ``<eos>``."""
        tgt_tok = tokenizer if tgt_tokenizer is None else tgt_tokenizer
        src_ids = _encode_all(tokenizer, [s for s, _ in pairs])
        tgt_ids = _encode_all(tgt_tok, [t for _, t in pairs])
        return cls(
            list(zip(src_ids, tgt_ids)),
            bos_id=tgt_tok.bos_id,
            eos_id=tgt_tok.eos_id,
            pad_id=tgt_tok.pad_id,
            src_pad_id=tokenizer.pad_id,
            src_eos_id=tokenizer.eos_id if src_eos else None,
            **kwargs,
        )

    def collate(self, indices: Sequence[int]) -> Batch:
        src = [self.src[i] for i in indices]
        if self.src_eos_id is not None:
            src = [s + [self.src_eos_id] for s in src]
        tgt = [self.tgt[i] for i in indices]
        tgt_lengths = torch.tensor([len(t) + 1 for t in tgt], dtype=torch.long)
        return {
            "src": _pad(src, self.src_pad_id),
            "src_lengths": torch.tensor([len(s) for s in src], dtype=torch.long),
            "tgt_in": _pad([[self.bos_id] + t for t in tgt], self.pad_id),
            "tgt_out": _pad([t + [self.eos_id] for t in tgt], self.pad_id),
            "tgt_lengths": tgt_lengths,
            "lengths": tgt_lengths.clone(),
            "indices": torch.tensor(list(indices), dtype=torch.long),
        }
