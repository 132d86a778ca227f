"""Sentencepiece subword models for translation (joint BPE or unigram).

:func:`train_sentencepiece` trains one model on the given lines (for a joint
source-target vocabulary, pass both sides: ``corpus.texts("train", "both")``) and
caches it on disk under a name keyed by a SHA-256 of the lines and of every
training setting, so a second call with the same inputs loads the file instead
of training (``tokenizer.from_cache`` tells which happened).  Files are written
atomically, so concurrent processes (DDP ranks) at worst train twice.

Special ids are fixed for every model trained here:

=======  ====  =========
piece    id    role
=======  ====  =========
<pad>    0     padding
<unk>    1     unknown
<bos>    2     target start (``tgt_in`` begins with it)
<eos>    3     end of sentence (``tgt_out`` ends with it)
=======  ====  =========

:class:`SentencePieceTokenizer` mirrors the :class:`~latentnlp.data.vocabulary.Vocabulary`
interface used by batching (``encode``, ``decode``, ``pad_id``, ``bos_id``,
``eos_id``, ``len``) and pickles (for ``DataLoader`` workers).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_PIECES = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}
CACHE_ENV = "LATENTNLP_CACHE"


def _sentencepiece():
    """The ``sentencepiece`` module, imported on first use so ``latentnlp.data`` needs only torch."""
    try:
        import sentencepiece
    except ImportError as exc:
        raise ImportError("subword models need the sentencepiece package: pip install sentencepiece") from exc
    return sentencepiece


def default_cache_dir() -> Path:
    """``$LATENTNLP_CACHE/sentencepiece``, else ``~/.cache/latentnlp/sentencepiece``."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "latentnlp")
    return Path(root).expanduser() / "sentencepiece"


class SentencePieceTokenizer:
    """A trained sentencepiece model: text <-> pieces <-> ids.

    Build with :func:`train_sentencepiece` (or :meth:`train`) or :meth:`load`.
    """

    def __init__(
        self, model_file: str | os.PathLike | None = None, *, model_proto: bytes | None = None, from_cache: bool = False
    ) -> None:
        if (model_file is None) == (model_proto is None):
            raise ValueError("give exactly one of model_file and model_proto")
        self.model_path = None if model_file is None else Path(model_file)
        self.from_cache = from_cache
        if model_proto is None:
            model_proto = Path(model_file).read_bytes()  # type: ignore[arg-type]
        self._proto = model_proto
        self.sp = _sentencepiece().SentencePieceProcessor(model_proto=model_proto)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        return cls(path)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, **kwargs) -> SentencePieceTokenizer:
        """Same as :func:`train_sentencepiece`."""
        return train_sentencepiece(texts, vocab_size, **kwargs)

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "from_cache": self.from_cache, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self.from_cache = state["from_cache"]
        self._proto = state["proto"]
        self.sp = _sentencepiece().SentencePieceProcessor(model_proto=self._proto)

    # ---- sizes and special ids --------------------------------------------------------------
    def __len__(self) -> int:
        return self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def __repr__(self) -> str:
        where = f", file={str(self.model_path)!r}" if self.model_path else ""
        return f"SentencePieceTokenizer(size={len(self)}{where})"

    # ---- encoding ---------------------------------------------------------------------------
    def encode(
        self, text: str | Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[int] | list[list[int]]:
        """Ids of ``text``; a list of strings gives a list of id lists (encoded in parallel)."""
        return self.sp.encode(
            text if isinstance(text, str) else list(text), out_type=int, add_bos=add_bos, add_eos=add_eos
        )

    def encode_pieces(self, text: str | Sequence[str]) -> list[str] | list[list[str]]:
        """Pieces of ``text`` (``"▁"`` marks a word start)."""
        return self.sp.encode(text if isinstance(text, str) else list(text), out_type=str)

    def decode(self, ids: Iterable[int] | Iterable[Iterable[int]], *, skip_special: bool = True) -> str | list[str]:
        """Text of ``ids`` (a list, a 1-D tensor, or a list of lists / 2-D tensor).

        ``skip_special`` (default) drops pad, bos and eos ids first.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()  # type: ignore[union-attr]
        ids = list(ids)
        if ids and not isinstance(ids[0], int):
            return [self.decode(x, skip_special=skip_special) for x in ids]  # type: ignore[misc]
        if skip_special:
            drop = {self.pad_id, self.bos_id, self.eos_id}
            ids = [i for i in ids if i not in drop]
        return self.sp.decode(ids)

    def decode_pieces(self, pieces: Sequence[str]) -> str:
        return self.sp.decode_pieces(list(pieces))


def cache_key(texts: Sequence[str], settings: dict) -> str:
    """SHA-256 (hex) of the training settings and every line."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(b"\0")
    for line in texts:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    *,
    model_type: str = "bpe",
    cache_dir: str | os.PathLike | None = None,
    character_coverage: float = 1.0,
    num_threads: int | None = None,
    verbose: bool = False,
    **options,
) -> SentencePieceTokenizer:
    """Train (or load from the cache) a sentencepiece model of ``vocab_size`` pieces.

    ``texts``: the training lines (both languages for a joint model).
    ``model_type``: ``"bpe"`` or ``"unigram"`` (also ``"char"``, ``"word"``).
    ``cache_dir``: where models are kept (default :func:`default_cache_dir`); the
    file is ``spm-{model_type}-{vocab_size}-{hash16}.model``.  Extra ``options``
    go to ``SentencePieceTrainer.train`` and are part of the cache key.
    ``num_threads`` (default: all CPUs) and ``verbose`` do not change the model
    and are not; unless ``verbose``, training logs nothing (sentencepiece's
    ``minloglevel=2``).  A ``vocab_size`` larger than the text supports is a
    ``ValueError`` (pass ``hard_vocab_limit=False`` to make it a soft limit).
    """
    if model_type not in ("bpe", "unigram", "char", "word"):
        raise ValueError(f"model_type must be bpe, unigram, char or word, got {model_type!r}")
    if vocab_size < len(SPECIAL_PIECES) + 1:
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_PIECES)} specials, got {vocab_size}")
    spm = _sentencepiece()
    texts = [t for t in texts]
    if not any(t.strip() for t in texts):
        raise ValueError("texts: no non-empty line to train sentencepiece on")
    settings = {
        "vocab_size": int(vocab_size),
        "model_type": model_type,
        "character_coverage": float(character_coverage),
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        **{f"{k}_piece": v for k, v in SPECIAL_PIECES.items()},
        "sentencepiece": spm.__version__,
        **options,
    }
    key = cache_key(texts, settings)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / f"spm-{model_type}-{vocab_size}-{key[:16]}.model"
    if path.is_file():
        return SentencePieceTokenizer(path, from_cache=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp_prefix = root / f".tmp-{key[:16]}-{os.getpid()}"
    train_args = {k: v for k, v in settings.items() if k != "sentencepiece"}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=str(tmp_prefix),
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
            **train_args,
        )
    except RuntimeError as exc:
        if "Vocabulary size too high" in str(exc):
            raise ValueError(
                f"vocab_size={vocab_size} is too large for these texts ({exc}); lower it or pass hard_vocab_limit=False"
            ) from exc
        raise
    else:
        os.replace(f"{tmp_prefix}.vocab", path.with_suffix(".vocab"))
        os.replace(f"{tmp_prefix}.model", path)
    finally:
        for ext in (".model", ".vocab"):
            Path(f"{tmp_prefix}{ext}").unlink(missing_ok=True)
    return SentencePieceTokenizer(path, from_cache=False)
