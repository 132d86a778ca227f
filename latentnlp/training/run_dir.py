"""The run directory: its files, refusing a finished run, ``config.json`` and ``finished.json``.

Files (only rank 0 writes; the directory must be visible to every rank): ``config.json`` (the
trainer config, the model, the run's own settings and, after a resume under a changed config,
``changed_on_resume``); ``metrics.jsonl`` (:mod:`~latentnlp.training.run_log`); ``last.pt``
and ``best.pt`` (:mod:`~latentnlp.training.checkpoint`); ``finished.json``, the summary,
written last.  A directory holding ``finished.json`` is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from latentnlp.training.run_log import METRICS

__all__ = [
    "BEST",
    "CONFIG",
    "FILES",
    "FINISHED",
    "LAST",
    "FinishedRunError",
    "config_changes",
    "prepare",
    "write_config",
    "write_finished",
]

LAST, BEST, FINISHED, CONFIG = "last.pt", "best.pt", "finished.json", "config.json"
#: the files the trainer owns in a run directory (``overwrite`` deletes these and no others)
FILES = (LAST, BEST, FINISHED, METRICS, CONFIG)

#: config fields that do not change a run's result, so changing them on resume is not recorded
_UNRECORDED = ("overwrite", "device", "progress")


class FinishedRunError(FileExistsError):
    """The output directory holds a finished run and ``overwrite`` was not set."""


def prepare(out: Path, overwrite: bool, is_main: bool) -> None:
    """Refuse a finished run unless ``overwrite``; create ``out``; with ``overwrite``, delete
    the trainer's files there (rank 0 only)."""
    if (out / FINISHED).exists() and not overwrite:
        raise FinishedRunError(
            f"{out} holds a finished run ({FINISHED}); pass overwrite=True (--overwrite) to start "
            f"afresh there, or delete {FINISHED} and raise max_steps / max_epochs to continue it"
        )
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in FILES:
                (out / name).unlink(missing_ok=True)


def config_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{field: {"checkpoint": old, "now": new}}`` for the fields (of ``TrainConfig.to_dict``)
    that differ, leaving out those that do not change a result (device, progress, overwrite)."""
    return {
        k: {"checkpoint": saved.get(k), "now": v}
        for k, v in sorted(now.items())
        if k not in _UNRECORDED and saved.get(k) != v
    }


def write_config(
    out: Path, info: Mapping[str, Any], *, step: int, changed_on_resume: Mapping[str, Any] | None = None
) -> None:
    """Write ``config.json``; a resume under a changed config appends ``{"step", "changes"}`` to
    the ``changed_on_resume`` list of the file it replaces."""
    info = dict(info)
    if changed_on_resume:
        previous = out / CONFIG
        earlier = json.loads(previous.read_text()).get("changed_on_resume", []) if previous.exists() else []
        info["changed_on_resume"] = earlier + [{"step": step, "changes": dict(changed_on_resume)}]
    with open(out / CONFIG, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, default=repr)  # run_info is the caller's: anything goes


def write_finished(out: Path, summary: Mapping[str, Any]) -> None:
    with open(out / FINISHED, "w", encoding="utf-8") as f:
        json.dump(dict(summary), f, indent=2)
