"""Word vocabularies for language-model corpora.

A :class:`Vocabulary` is a list of token types (``itos``) with an inverse map and
up to four special tokens, each optional and each named by the caller:

========  ===========  =============================================================
role      default      meaning
========  ===========  =============================================================
``pad``   off          padding id of padded batches (ignored by every computation)
``bos``   off          start-of-sentence context symbol (never a target)
``eos``   ``<eos>``    end of sentence; a target, counted in perplexity
``unk``   ``<unk>``    out-of-vocabulary words map here (``None``: OOV is an error)
========  ===========  =============================================================

:meth:`Vocabulary.build` puts the specials first, in the order pad, bos, eos,
unk, then the training types by decreasing frequency, ties broken by first
appearance (so building is deterministic).  A special that already occurs in
the text (PTB's ``<unk>``) is not counted twice: PTB's 9,999 training types plus
``<eos>`` give the classic 10,000.

``encode`` accepts a token list or a whitespace-separated string; ``decode``
returns tokens.  ``save``/``load`` use JSON; :meth:`Vocabulary.from_file` reads
one-word-a-line or ``word<TAB>index`` vocabulary files (Yahoo's).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

_ROLES = ("pad", "bos", "eos", "unk")
_FORMAT = "latentnlp.Vocabulary"


class Vocabulary:
    """Token types <-> ids, with optional ``pad``/``bos``/``eos``/``unk`` specials.

    ``Vocabulary(itos, pad=..., bos=..., eos=..., unk=...)`` wraps an existing
    list of types; every special given must be in ``itos``.  ``counts`` (optional)
    keeps the training frequencies.
    """

    def __init__(
        self,
        itos: Sequence[str],
        *,
        pad: str | None = None,
        bos: str | None = None,
        eos: str | None = "<eos>",
        unk: str | None = "<unk>",
        counts: dict[str, int] | None = None,
    ) -> None:
        self.itos: list[str] = list(itos)
        self.stoi: dict[str, int] = {}
        for i, tok in enumerate(self.itos):
            if tok in self.stoi:
                raise ValueError(f"itos: token {tok!r} appears twice (ids {self.stoi[tok]} and {i})")
            self.stoi[tok] = i
        self.specials: dict[str, str | None] = {"pad": pad, "bos": bos, "eos": eos, "unk": unk}
        for role, tok in self.specials.items():
            if tok is not None and tok not in self.stoi:
                raise ValueError(f"{role}={tok!r} is not in the vocabulary")
        self.counts = dict(counts) if counts is not None else None

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        sentences: Iterable[Sequence[str] | str],
        *,
        max_size: int | None = None,
        min_freq: int = 1,
        pad: str | None = None,
        bos: str | None = None,
        eos: str | None = "<eos>",
        unk: str | None = "<unk>",
    ) -> Vocabulary:
        """Count the types of ``sentences`` (token lists or strings) and keep the frequent ones.

        ``max_size`` bounds the total size, specials included; ``min_freq`` drops
        rarer types.  Dropped types become ``unk`` at encoding time, so cutting the
        vocabulary requires ``unk``.
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts: Counter[str] = Counter()
        for s in sentences:
            counts.update(s.split() if isinstance(s, str) else s)
        specials = [t for t in (pad, bos, eos, unk) if t is not None]
        if len(set(specials)) != len(specials):
            raise ValueError(f"special tokens must be distinct, got {specials}")
        if max_size is not None and max_size < len(specials):
            raise ValueError(f"max_size={max_size} is smaller than the {len(specials)} specials")
        # Counter preserves first-insertion order, and sorted() is stable: ties by first appearance
        words = [w for w, c in sorted(counts.items(), key=lambda wc: -wc[1]) if c >= min_freq and w not in specials]
        if max_size is not None:
            words = words[: max_size - len(specials)]
        if unk is None and len(words) < sum(1 for w in counts if w not in specials):
            raise ValueError(
                "max_size/min_freq drop types but unk=None: dropped words could not be encoded; give an unk token"
            )
        return cls(specials + words, pad=pad, bos=bos, eos=eos, unk=unk, counts=dict(counts))

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        pad: str | None = None,
        bos: str | None = None,
        eos: str | None = "<eos>",
        unk: str | None = "<unk>",
    ) -> Vocabulary:
        """Read a vocabulary file: one token a line, or ``token<TAB>index`` lines.

        With indices the tokens are placed at them (they must be 0..n-1).  A special
        role is kept only if its token is in the file (so the same call works for
        files with and without ``<pad>``/``<bos>``/``<eos>``), except ``unk``, which
        must be there when given.
        """
        lines = [ln.rstrip("\n") for ln in Path(path).read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if ln.strip()]
        if lines and all("\t" in ln for ln in lines):
            pairs = [ln.rsplit("\t", 1) for ln in lines]
            try:
                indexed = sorted((int(i), w) for w, i in pairs)
            except ValueError as exc:
                raise ValueError(f"{path}: bad token<TAB>index line: {exc}") from None
            if [i for i, _ in indexed] != list(range(len(indexed))):
                raise ValueError(f"{path}: indices are not 0..{len(indexed) - 1}")
            itos = [w for _, w in indexed]
        else:
            itos = [ln.strip() for ln in lines]
        present = set(itos)
        if unk is not None and unk not in present:
            raise ValueError(f"{path}: unk token {unk!r} not in the file")
        keep = {k: (v if v in present else None) for k, v in {"pad": pad, "bos": bos, "eos": eos}.items()}
        return cls(itos, unk=unk, **keep)

    # ---- special ids ------------------------------------------------------------------------
    def _id(self, role: str) -> int | None:
        tok = self.specials[role]
        return None if tok is None else self.stoi[tok]

    @property
    def pad_id(self) -> int | None:
        return self._id("pad")

    @property
    def bos_id(self) -> int | None:
        return self._id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._id("eos")

    @property
    def unk_id(self) -> int | None:
        return self._id("unk")

    @property
    def pad(self) -> str | None:
        return self.specials["pad"]

    @property
    def bos(self) -> str | None:
        return self.specials["bos"]

    @property
    def eos(self) -> str | None:
        return self.specials["eos"]

    @property
    def unk(self) -> str | None:
        return self.specials["unk"]

    # ---- mapping ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: object) -> bool:
        return token in self.stoi

    def __getitem__(self, token: str) -> int:
        """Id of ``token`` (``unk``'s id for unknown words; ``KeyError`` without ``unk``)."""
        i = self.stoi.get(token)
        if i is not None:
            return i
        unk = self.unk_id
        if unk is None:
            raise KeyError(f"{token!r} is not in the vocabulary and it has no unk token")
        return unk

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos and self.specials == other.specials

    def __repr__(self) -> str:
        sp = ", ".join(f"{k}={v!r}" for k, v in self.specials.items() if v is not None)
        return f"Vocabulary(size={len(self)}, {sp})"

    def encode(self, tokens: Sequence[str] | str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of ``tokens`` (a string is split on whitespace), optionally framed by bos/eos."""
        if isinstance(tokens, str):
            tokens = tokens.split()
        stoi, unk = self.stoi, self.unk_id
        if unk is None:
            ids = [self[t] for t in tokens]
        else:
            ids = [stoi.get(t, unk) for t in tokens]
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but the vocabulary has no bos token")
            ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos=True but the vocabulary has no eos token")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> list[str]:
        """Tokens of ``ids`` (a list or a 1-D tensor); ``skip_special`` drops pad/bos/eos."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()  # type: ignore[union-attr]
        skip = {self._id(r) for r in ("pad", "bos", "eos")} - {None} if skip_special else set()
        n = len(self.itos)
        out = []
        for i in ids:
            if not 0 <= i < n:
                raise IndexError(f"id {i} out of range for a vocabulary of {n}")
            if i not in skip:
                out.append(self.itos[i])
        return out

    # ---- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": _FORMAT, "version": 1, "itos": self.itos, "specials": self.specials}
        if self.counts is not None:
            d["counts"] = self.counts
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        if d.get("format") != _FORMAT:
            raise ValueError(f"not a saved Vocabulary (format={d.get('format')!r})")
        return cls(d["itos"], counts=d.get("counts"), **d["specials"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
