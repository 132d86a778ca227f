"""Corpus readers: PTB, Yahoo, IWSLT14, Multi30k and plain parallel text.

Local files are read with plain Python (:func:`read_lines`: UTF-8, gzip handled), quietly and
without caching anything; only a hub copy (no local copy found) goes through Hugging Face
``datasets``, whose cache ``cache_dir`` names.  Text is returned as plain Python objects:

* language-model corpora (:func:`read_ptb`, :func:`read_yahoo`) give an
  :class:`LMCorpus`: per split a ``list[list[str]]`` of whitespace tokens, one
  list per line (a sentence for PTB, a document for Yahoo);
* parallel corpora (:func:`read_iwslt14`, :func:`read_multi30k`,
  :func:`read_parallel_corpus`) give a :class:`ParallelCorpus`: per split a
  ``list[tuple[str, str]]`` of (source, target) lines, stripped but otherwise
  untouched, ready for sentencepiece (``.split()`` them for word level).

Splits are always called ``train``, ``valid`` and ``test``.  A split the located
copy lacks (IWSLT14 and Yahoo train in the shared data) is reported with a
:class:`MissingSplitWarning` when reading, listed in ``corpus.missing``, and
``corpus["train"]`` then raises :class:`~latentnlp.data.sources.MissingSplitError`
with the same explanation.  Corpora are found by :func:`~latentnlp.data.sources.locate`
(``--data``, ``$LATENTNLP_DATA``, the hub).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .sources import HubSpec, MissingSplitError, Source, load_hub, locate

if TYPE_CHECKING:
    from .vocabulary import Vocabulary

PathLike = str | os.PathLike

SPLITS = ("train", "valid", "test")

#: Hub copies tried when no local copy exists (``datasets.load_dataset`` names).
PTB_HUB = HubSpec("ptb-text-only/ptb_text_only", text="sentence", note="Mikolov's PTB, one sentence per row")
MULTI30K_HUB = HubSpec(
    "bentrevett/multi30k", languages={"de": "de", "en": "en"}, note="Multi30k task 1; raw (cased, untokenised) text"
)


class MissingSplitWarning(UserWarning):
    """A corpus was read without one of its splits (e.g. IWSLT14 train)."""


# ---------------------------------------------------------------------------------------------
# reading local text files
# ---------------------------------------------------------------------------------------------
#: Compressed files are read through the standard library, chosen by the file's suffix.
_OPENERS: dict[str, Callable[..., IO[str]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def read_lines(files: Mapping[str, PathLike]) -> dict[str, list[str]]:
    """Read local text files: ``{key: [line, ...]}``, one entry per line of ``files[key]``.

    Plain Python reading, UTF-8 with universal newlines (``\\n``, ``\\r\\n`` and ``\\r`` end a
    line); ``.gz``, ``.bz2`` and ``.xz`` files are decompressed.  Lines keep their content (no
    stripping) minus the line break, and empty lines are kept so that parallel files stay
    aligned.  Nothing is cached and nothing is printed.
    """
    missing = [str(path) for path in files.values() if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"no such file: {', '.join(missing)}")
    out: dict[str, list[str]] = {}
    for key, path in files.items():
        opener = _OPENERS.get(Path(path).suffix, open)
        with opener(path, "rt", encoding="utf-8") as f:
            out[key] = [line.rstrip("\n") for line in f]
    return out


def _missing(name: str, absent: Sequence[str], why: Callable[[str], str]) -> dict[str, str]:
    """``{split: explanation}`` for the ``absent`` splits, each also warned about."""
    out = {}
    for split in absent:
        out[split] = f"{name}: the {split} split is not available: {why(split)}"
        warnings.warn(out[split], MissingSplitWarning, stacklevel=3)  # -> the reader's caller
    return out


# ---------------------------------------------------------------------------------------------
# corpus objects
# ---------------------------------------------------------------------------------------------
class _SplitAccess:
    """``corpus[split]`` and ``corpus.train/valid/test`` over ``splits``, with a clear error that
    says why a split is missing (``missing[split]``) or which splits exist."""

    name: str
    splits: dict
    missing: dict

    def __getitem__(self, split: str) -> list:
        if split in self.splits:
            return self.splits[split]
        if split in self.missing:
            raise MissingSplitError(self.missing[split])
        raise MissingSplitError(f"{self.name} has no split {split!r}; it has {sorted(self.splits)}")

    def __contains__(self, split: object) -> bool:
        return split in self.splits

    @property
    def train(self) -> list:
        return self["train"]

    @property
    def valid(self) -> list:
        return self["valid"]

    @property
    def test(self) -> list:
        return self["test"]


@dataclass
class LMCorpus(_SplitAccess):
    """A language-modelling corpus: ``splits[split]`` is a list of token lists.

    ``unk`` is the corpus's own unknown-word token (``<unk>`` for PTB, ``_UNK``
    for Yahoo); ``vocab_file`` a vocabulary shipped with the corpus, if any.
    """

    name: str
    splits: dict[str, list[list[str]]]
    source: Source | None = None
    missing: dict[str, str] = field(default_factory=dict)
    unk: str = "<unk>"
    vocab_file: Path | None = None

    def num_tokens(self, split: str, *, eos: bool = True) -> int:
        """Word tokens of ``split``, plus one ``<eos>`` per line when ``eos``."""
        lines = self[split]
        return sum(len(t) for t in lines) + (len(lines) if eos else 0)

    def vocabulary(
        self,
        *,
        eos: str | None = "<eos>",
        pad: str | None = None,
        bos: str | None = None,
        max_size: int | None = None,
        min_freq: int = 1,
    ) -> Vocabulary:
        """The word vocabulary of this corpus.

        Built from the training split (:meth:`Vocabulary.build`, with this corpus's
        ``unk``); when train is missing and the corpus ships a vocabulary file
        (Yahoo), that file is loaded instead, as it is: ``max_size``/``min_freq``
        do not apply, and the ``pad``/``bos``/``eos`` roles (default ``<pad>``,
        ``<bos>``, ``<eos>``) are set for the tokens the file has.
        """
        from .vocabulary import Vocabulary

        if "train" in self.splits:
            return Vocabulary.build(
                self.splits["train"], unk=self.unk, eos=eos, pad=pad, bos=bos, max_size=max_size, min_freq=min_freq
            )
        if self.vocab_file is not None:
            return Vocabulary.from_file(self.vocab_file, unk=self.unk, eos=eos, pad=pad or "<pad>", bos=bos or "<bos>")
        raise MissingSplitError(self.missing.get("train", f"{self.name}: no training split to build a vocabulary from"))


@dataclass
class ParallelCorpus(_SplitAccess):
    """A parallel corpus: ``splits[split]`` is a list of ``(source, target)`` line pairs."""

    name: str
    src_lang: str
    tgt_lang: str
    splits: dict[str, list[tuple[str, str]]]
    source: Source | None = None
    missing: dict[str, str] = field(default_factory=dict)

    def texts(self, split: str, side: str = "both") -> list[str]:
        """Lines of one side (``"src"``, ``"tgt"``) or of both (sources then targets)."""
        pairs = self[split]
        if side == "src":
            return [s for s, _ in pairs]
        if side == "tgt":
            return [t for _, t in pairs]
        if side == "both":
            return [s for s, _ in pairs] + [t for _, t in pairs]
        raise ValueError(f"side must be 'src', 'tgt' or 'both', got {side!r}")

    def tokens(self, split: str) -> list[tuple[list[str], list[str]]]:
        """Pairs of whitespace token lists (for word-level models)."""
        return [(s.split(), t.split()) for s, t in self[split]]


# ---------------------------------------------------------------------------------------------
# plain parallel text
# ---------------------------------------------------------------------------------------------
def _pair_up(src: list[str], tgt: list[str], src_path: object, tgt_path: object) -> list[tuple[str, str]]:
    if len(src) != len(tgt):
        raise ValueError(f"parallel files are not aligned: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)}")
    return [(s.strip(), t.strip()) for s, t in zip(src, tgt)]


def read_parallel(src_path: PathLike, tgt_path: PathLike) -> list[tuple[str, str]]:
    """Two aligned files (line *i* of one translates line *i* of the other) as pairs."""
    lines = read_lines({"src": src_path, "tgt": tgt_path})
    return _pair_up(lines["src"], lines["tgt"], src_path, tgt_path)


def read_parallel_corpus(
    files: Mapping[str, tuple[PathLike, PathLike]],
    *,
    name: str = "parallel",
    src_lang: str = "src",
    tgt_lang: str = "tgt",
) -> ParallelCorpus:
    """A :class:`ParallelCorpus` from local files, ``{split: (src_path, tgt_path)}``."""
    flat: dict[str, PathLike] = {}
    for split, (s, t) in files.items():
        flat[f"{split}\0src"], flat[f"{split}\0tgt"] = s, t
    lines = read_lines(flat)
    splits = {split: _pair_up(lines[f"{split}\0src"], lines[f"{split}\0tgt"], s, t) for split, (s, t) in files.items()}
    return ParallelCorpus(name=name, src_lang=src_lang, tgt_lang=tgt_lang, splits=splits)


# ---------------------------------------------------------------------------------------------
# language-model corpora
# ---------------------------------------------------------------------------------------------
def _lm_from_source(
    name: str, source: Source, names: Mapping[str, str], cache_dir: PathLike | None
) -> tuple[dict[str, list[list[str]]], list[str]]:
    """Token lists per split from a local or hub source; also the splits not found."""
    if source.is_local:
        present = {split: source.files[f] for split, f in names.items() if f in source.files}
        lines = read_lines(present)
    else:
        spec = source.hub
        assert spec is not None and spec.text is not None
        hub = load_hub(source, cache_dir=cache_dir)
        lines = {split: list(ds[spec.text]) for split, ds in hub.items()}
    splits = {split: [line.split() for line in lines[split]] for split in names if split in lines}
    return splits, [s for s in names if s not in splits]


def read_ptb(data: PathLike | None = None, *, cache_dir: PathLike | None = None, use_hub: bool = True) -> LMCorpus:
    """Penn Treebank, Mikolov's version: ``ptb.{train,valid,test}.txt``, one sentence a line.

    The files already contain ``<unk>`` and ``N``; train has 9,999 types, so
    ``corpus.vocabulary()`` (with ``<eos>``) has the usual 10,000.  ``cache_dir`` is the
    ``datasets`` cache used only for the hub copy (default: ``datasets``' own).
    """
    names = {s: f"ptb.{s}.txt" for s in SPLITS}
    source = locate("ptb", list(names.values()), subdirs=("ptb",), data=data, hub=PTB_HUB, use_hub=use_hub)
    splits, absent = _lm_from_source("ptb", source, names, cache_dir)
    missing = _missing("ptb", absent, lambda s: f"not in {source.describe()}")
    return LMCorpus("ptb", splits, source=source, missing=missing, unk="<unk>")


def read_yahoo(data: PathLike | None = None) -> LMCorpus:
    """Yahoo Answers of Yang et al. 2017: ``yahoo.{train,valid,test}.txt``, one document a line.

    Documents are lowercased and tokenised, 20 to 200 tokens, with ``_UNK`` for
    words outside the 20k vocabulary.  Train may be missing (the shared copy has
    valid and test only); then ``corpus.vocabulary()`` loads the shipped
    ``vocab.freq_indexed.tsv`` (``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``_UNK`` 3,
    20,000 entries) or, failing that, ``vocab.txt``.
    """
    names = {s: f"yahoo.{s}.txt" for s in SPLITS}
    vocab_files = ("vocab.freq_indexed.tsv", "vocab.txt")
    source = locate(
        "yahoo",
        [names["valid"], names["test"]],
        optional=[names["train"], *vocab_files],
        subdirs=("yahoo",),
        data=data,
        hub=None,
    )
    splits, absent = _lm_from_source("yahoo", source, names, cache_dir=None)
    missing = _missing(
        "yahoo",
        absent,
        lambda s: f"{source.describe()} has no {names[s]} (the shared copy has valid and test only; see its README)",
    )
    vocab_file = next((source.files[f] for f in vocab_files if f in source.files), None)
    return LMCorpus("yahoo", splits, source=source, missing=missing, unk="_UNK", vocab_file=vocab_file)


# ---------------------------------------------------------------------------------------------
# parallel corpora
# ---------------------------------------------------------------------------------------------
def _parallel_from_source(
    name: str, source: Source, names: Mapping[str, tuple[str, str]], src: str, tgt: str, cache_dir: PathLike | None
) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    if source.is_local:
        present = {
            split: (source.files[s], source.files[t])
            for split, (s, t) in names.items()
            if s in source.files and t in source.files
        }
        corpus = read_parallel_corpus(present)
        splits = corpus.splits
    else:
        spec = source.hub
        assert spec is not None
        splits = {}
        for split, ds in load_hub(source, cache_dir=cache_dir).items():
            if split not in names:
                continue
            if spec.nested is not None:
                rows = ds[spec.nested]
                splits[split] = [(r[src].strip(), r[tgt].strip()) for r in rows]
            else:
                assert spec.languages is not None
                splits[split] = list(
                    zip((x.strip() for x in ds[spec.languages[src]]), (x.strip() for x in ds[spec.languages[tgt]]))
                )
    return splits, [s for s in names if s not in splits]


def read_iwslt14(data: PathLike | None = None, *, src: str = "de", tgt: str = "en") -> ParallelCorpus:
    """IWSLT14 German-English in fairseq's layout: ``{train,valid,test}.{de,en}``.

    Moses-tokenised and lowercased (fairseq ``prepare-iwslt14.sh``).  Valid and
    test are required; train is optional because the shared copy lacks it: a
    :class:`MissingSplitWarning` says so and ``corpus.train`` raises.
    """
    names = {s: (f"{s}.{src}", f"{s}.{tgt}") for s in SPLITS}
    required = [*names["valid"], *names["test"]]
    source = locate(
        "iwslt14",
        required,
        optional=list(names["train"]),
        subdirs=("iwslt14", "iwslt14.tokenized.de-en"),
        data=data,
        hub=None,
    )
    splits, absent = _parallel_from_source("iwslt14", source, names, src, tgt, cache_dir=None)
    missing = _missing(
        "iwslt14",
        absent,
        lambda s: (
            f"{source.describe()} has no {names[s][0]} / {names[s][1]}. The shared copy has valid "
            "and test only (160,239 training pairs in fairseq's split are not available); "
            "train on Multi30k (read_multi30k) or add fairseq's prepare-iwslt14.sh output there"
        ),
    )
    return ParallelCorpus("iwslt14", src, tgt, splits, source=source, missing=missing)


def read_multi30k(
    data: PathLike | None = None,
    *,
    src: str = "de",
    tgt: str = "en",
    variant: str = "tok",
    test: str = "test_2016_flickr",
    extra_splits: Iterable[str] = (),
    cache_dir: PathLike | None = None,
    use_hub: bool = True,
) -> ParallelCorpus:
    """Multi30k task 1 (Elliott et al. 2016), English-German.

    ``variant="tok"``: ``tok/{split}.lc.norm.tok.{lang}`` (lowercased, normalised,
    Moses-tokenised: the usual form); ``variant="raw"``: ``raw/{split}.{lang}.gz``
    (cased originals).  Splits: ``train`` (29,000), ``valid`` (``val``, 1,014) and
    ``test`` (``test``, default ``test_2016_flickr``, 1,000); ``extra_splits``
    adds other test sets under their own names (``test_2017_flickr``,
    ``test_2017_mscoco``, ``test_2018_flickr``).  The hub fallback
    (``bentrevett/multi30k``) has raw text and the three main splits only; ``cache_dir`` is
    the ``datasets`` cache used only for it (default: ``datasets``' own).
    """
    if variant == "tok":

        def fname(split: str, lang: str) -> str:
            return f"tok/{split}.lc.norm.tok.{lang}"
    elif variant == "raw":

        def fname(split: str, lang: str) -> str:
            return f"raw/{split}.{lang}.gz"
    else:
        raise ValueError(f"variant must be 'tok' or 'raw', got {variant!r}")
    files = {"train": "train", "valid": "val", "test": test}
    files.update({x: x for x in extra_splits})
    names = {ours: (fname(theirs, src), fname(theirs, tgt)) for ours, theirs in files.items()}
    required = [f for pair in names.values() for f in pair]
    source = locate("multi30k", required, subdirs=("multi30k",), data=data, hub=MULTI30K_HUB, use_hub=use_hub)
    splits, absent = _parallel_from_source("multi30k", source, names, src, tgt, cache_dir)
    missing = _missing("multi30k", absent, lambda s: f"not in {source.describe()}")
    return ParallelCorpus("multi30k", src, tgt, splits, source=source, missing=missing)


def lines_of(corpus: LMCorpus | ParallelCorpus, splits: Sequence[str] = ("train",)) -> list[str]:
    """Every line of ``splits`` as text (both sides of a parallel corpus), for sentencepiece."""
    out: list[str] = []
    for split in splits:
        if isinstance(corpus, ParallelCorpus):
            out += corpus.texts(split, "both")
        else:
            out += [" ".join(t) for t in corpus[split]]
    return out
