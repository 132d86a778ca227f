"""Finding a corpus: ``--data`` directory, then ``$LATENTNLP_DATA``, then the Hugging Face hub.

Resolution order (the first that works wins):

1. ``data``: the directory given on the command line (``--data DIR``);
2. ``$LATENTNLP_DATA``: one directory, or several joined by ``os.pathsep``;
3. the Hugging Face hub through ``datasets.load_dataset``, only for corpora with a
   known hub copy (:class:`HubSpec`) and only when the hub can be reached.

In each directory ``ROOT`` the corpus is looked for in ``ROOT/<subdir>`` for each of
its usual directory names (``ptb/``, ``iwslt14/``, ...) and then in ``ROOT`` itself,
so ``--data`` may name either the folder holding all corpora or one corpus folder.
A candidate matches when every *required* file is present; *optional* files (a
training split the shared copy lacks) are picked up when there.

The hub is tried only when no local copy matched.  Offline (``HF_HUB_OFFLINE`` or
``HF_DATASETS_OFFLINE`` set, or no route to the hub's host within a few seconds)
it is skipped at once instead of waiting on network time-outs.  When nothing works
a :class:`CorpusNotFoundError` lists every place tried, in order, and why each failed.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

DATA_ENV = "LATENTNLP_DATA"
"""Environment variable naming the data directory (or directories, ``os.pathsep``-separated)."""

_TRUE = {"1", "true", "yes", "on"}


class CorpusNotFoundError(FileNotFoundError):
    """No local copy and no usable hub copy of a corpus; ``tried`` lists each attempt."""

    def __init__(self, message: str, tried: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.tried = list(tried)


class MissingSplitError(KeyError):
    """A split was asked for that the located copy of a corpus does not have."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class HubSpec:
    """Where a corpus lives on the Hugging Face hub and how its columns map to ours.

    ``splits`` maps our split names (``train``, ``valid``, ``test``) to the hub's.
    For monolingual corpora ``text`` names the text column.  For parallel corpora
    ``languages`` maps a language code to its column, or ``nested`` names one column
    holding ``{lang: text}`` dicts (the ``translation`` layout).
    """

    path: str
    name: str | None = None
    splits: Mapping[str, str] = field(default_factory=lambda: {"train": "train", "valid": "validation", "test": "test"})
    text: str | None = None
    languages: Mapping[str, str] | None = None
    nested: str | None = None
    note: str = ""


@dataclass
class Source:
    """Where a corpus was found: a local directory or a hub dataset.

    ``files`` maps each required or optional file name that exists to its path
    (local sources only); ``tried`` records the places looked at before this one.
    """

    name: str
    path: Path | None = None
    hub: HubSpec | None = None
    files: dict[str, Path] = field(default_factory=dict)
    tried: list[str] = field(default_factory=list)

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def describe(self) -> str:
        """Where the corpus is, as a results file records it (:func:`portable_path` of a local one)."""
        if self.path is not None:
            return portable_path(self.path)
        assert self.hub is not None
        return f"hf://datasets/{self.hub.path}" + (f" ({self.hub.name})" if self.hub.name else "")


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as results record it, free of the machine that made them: ``$LATENTNLP_DATA/<rel>``
    under a directory of ``$LATENTNLP_DATA``, ``~/<rel>`` under the home directory, else unchanged."""
    resolved = Path(path).expanduser().resolve()
    for part in os.environ.get(DATA_ENV, "").split(os.pathsep):
        if part:
            root = Path(part).expanduser().resolve()
            if resolved == root or root in resolved.parents:
                return "/".join([f"${DATA_ENV}", *resolved.relative_to(root).parts])
    home = Path.home().resolve()
    if home in resolved.parents:
        return "/".join(["~", *resolved.relative_to(home).parts])
    return str(path)


def data_roots(data: str | os.PathLike | None = None) -> list[tuple[str, Path | None, str]]:
    """The directories searched, in order, as ``(label, path or None, why-none)``."""
    roots: list[tuple[str, Path | None, str]] = []
    if data is None or str(data) == "":
        roots.append(("--data", None, "not given"))
    else:
        roots.append(("--data", Path(data).expanduser(), ""))
    env = os.environ.get(DATA_ENV, "")
    if not env:
        roots.append((f"${DATA_ENV}", None, "not set"))
    else:
        for part in env.split(os.pathsep):
            if part:
                roots.append((f"${DATA_ENV}", Path(part).expanduser(), ""))
    return roots


def find_local(
    name: str,
    required: Sequence[str],
    *,
    optional: Sequence[str] = (),
    subdirs: Sequence[str] = (),
    data: str | os.PathLike | None = None,
) -> tuple[Source | None, list[str]]:
    """Search ``data`` then ``$LATENTNLP_DATA`` for a directory holding all ``required`` files.

    Returns ``(source, tried)``: ``source`` is ``None`` when no candidate matched;
    ``tried`` has one line per place looked at, saying why it did not match.
    """
    tried: list[str] = []
    subdirs = tuple(subdirs) or (name,)
    for label, root, why in data_roots(data):
        if root is None:
            tried.append(f"{label}: {why}")
            continue
        if not root.is_dir():
            tried.append(f"{label}={root}: no such directory")
            continue
        cands = [root / s for s in subdirs if (root / s).is_dir()]
        if not cands:
            also = f" (nor {', '.join(s + '/' for s in subdirs[1:])})" if subdirs[1:] else ""
            tried.append(f"{label}: {root / subdirs[0]}: no such directory{also}")
        for cand in cands + [root]:
            missing = [f for f in required if not (cand / f).is_file()]
            if missing:
                if cand != root or not cands:  # a corpus subfolder explains more than its parent
                    tried.append(f"{label}: {cand}: missing {', '.join(missing)}")
                continue
            files = {f: cand / f for f in list(required) + list(optional) if (cand / f).is_file()}
            return Source(name=name, path=cand, files=files, tried=tried), tried
    return None, tried


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in _TRUE


def hub_status(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face hub can be used now, and why not.

    Checks the offline switches first, then opens one TCP connection to the hub's
    host (``$HF_ENDPOINT`` or huggingface.co) with ``timeout`` seconds, so an
    offline machine fails fast instead of waiting on HTTP retries.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_true(var):
            return False, f"offline ({var}={os.environ[var]})"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[str] = []

    def probe() -> None:  # in a thread: name resolution ignores socket time-outs
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append("")
        except OSError as exc:
            result.append(f"unreachable ({host}:{port}: {exc})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        return False, f"unreachable ({host}:{port}: no answer within {timeout:g} s)"
    return (not result[0]), result[0]


def locate(
    name: str,
    required: Sequence[str],
    *,
    optional: Sequence[str] = (),
    subdirs: Sequence[str] = (),
    data: str | os.PathLike | None = None,
    hub: HubSpec | None = None,
    use_hub: bool = True,
) -> Source:
    """Find corpus ``name``: local directories first, then its hub copy (see module docstring).

    Raises :class:`CorpusNotFoundError` listing every place tried.  A hub
    :class:`Source` is only returned after checking the hub is reachable; loading
    it is the reader's job (:func:`load_hub`).
    """
    source, tried = find_local(name, required, optional=optional, subdirs=subdirs, data=data)
    if source is not None:
        return source
    if hub is None:
        tried.append(f"Hugging Face hub: no hub copy of {name!r} is known")
    elif not use_hub:
        tried.append(f"Hugging Face hub {hub.path!r}: disabled by the caller")
    else:
        ok, why = hub_status()
        if ok:
            return Source(name=name, hub=hub, tried=tried)
        tried.append(f"Hugging Face hub {hub.path!r}: skipped, {why}")
    raise not_found(name, required, tried)


def not_found(name: str, required: Sequence[str], tried: Sequence[str]) -> CorpusNotFoundError:
    """The error raised when corpus ``name`` could not be found, listing ``tried``."""
    needs = f" (needs {', '.join(required)})" if required else ""
    lines = [f"Could not find corpus {name!r}{needs}. Tried, in order:"]
    lines += [f"  {i}. {t}" for i, t in enumerate(tried, 1)]
    lines.append(f"Pass --data DIR (a folder holding {name}/ or the files themselves) or set {DATA_ENV}.")
    return CorpusNotFoundError("\n".join(lines), tried)


def load_hub(source: Source, *, cache_dir: str | os.PathLike | None = None) -> dict[str, object]:
    """Load a hub :class:`Source` with ``datasets.load_dataset``: ``{our split: Dataset}``.

    Any failure becomes a :class:`CorpusNotFoundError` that still lists the local
    places tried before the hub.
    """
    import datasets

    spec = source.hub
    assert spec is not None
    try:
        dd = datasets.load_dataset(spec.path, spec.name, cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as exc:  # network, missing repo, format: all mean "not found here"
        tried = source.tried + [f"Hugging Face hub {spec.path!r}: {type(exc).__name__}: {exc}"]
        raise not_found(source.name, [], tried) from exc
    return {ours: dd[theirs] for ours, theirs in spec.splits.items() if theirs in dd}
