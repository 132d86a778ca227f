"""Checkpoint files: atomic writing, reading with a clear error for a damaged file, and ``load_model``.

A checkpoint is a ``torch.save`` payload read back with ``weights_only=True``.  Both kinds
hold ``format`` (:data:`CHECKPOINT_FORMAT`), ``model`` (the state dict, stream state included)
and ``constructor`` (the model's :attr:`~latentnlp.models.base.LatentModel.constructor`
record, None when it could not be recorded).  ``last.pt`` adds what a bit-identical resume
needs (optimiser, scheduler, every rank's RNG state, counters, the run log's length, the
config); ``best.pt`` adds ``step``, ``epoch``, ``valid`` (the validation numbers) and
``select_on`` (the metric it was selected on).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentnlp.models.base import LatentModel

__all__ = ["CHECKPOINT_FORMAT", "CorruptCheckpointError", "atomic_save", "load_model", "read_checkpoint"]

#: bumped whenever the payload changes incompatibly (2: ``constructor``, ``best_value``/``select_on``)
CHECKPOINT_FORMAT = 2


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file cannot be read: truncated (a full disk, a killed copy) or overwritten."""


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``: a crash
    mid-write leaves the previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The payload of a checkpoint written by the trainer.

    A file that cannot be unpickled raises :class:`CorruptCheckpointError` naming it and what
    to do; one of another format (an older version of the library) raises ``ValueError``.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch.load raises RuntimeError, EOFError, UnpicklingError...
        raise CorruptCheckpointError(
            f"{path} is truncated or corrupt and cannot be loaded ({type(error).__name__}: {error}). "
            f"Delete it to go on without it: a run without last.pt restarts from the beginning "
            f"(pass overwrite=True or delete the run directory), and the run's other checkpoint "
            f"(best.pt or last.pt) may still load."
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path}: checkpoint format {found!r}, this version of latentnlp reads "
            f"format {CHECKPOINT_FORMAT}; retrain, or load it with the version that wrote it"
        )
    return payload


def load_model(source: str | os.PathLike, model: nn.Module | None = None, *, map_location: Any = "cpu") -> nn.Module:
    """The model saved at ``source``: a run directory (its ``best.pt``, else ``last.pt``) or a file.

    With ``model`` given, its parameters are replaced by the saved ones; without, the model is
    rebuilt from the checkpoint's constructor record (its class must be importable, and its
    constructor arguments plain data).  Returns the model, in training mode as built.
    """
    path = Path(source)
    if path.is_dir():
        path = next((path / name for name in ("best.pt", "last.pt") if (path / name).exists()), path / "best.pt")
    payload = read_checkpoint(path, map_location)
    if model is None:
        if payload.get("constructor") is None:
            raise ValueError(
                f"{path} does not record how its model was built (its constructor arguments "
                f"are not plain data); build the model yourself and pass it as model="
            )
        model = LatentModel.from_constructor(payload["constructor"])
    model.load_state_dict(payload["model"])
    return model
