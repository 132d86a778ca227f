"""One trainer for every :class:`~latentnlp.models.base.LatentModel`, in parts.

- :mod:`~latentnlp.training.config`: :class:`TrainConfig`, its JSON form and command-line flags;
- :mod:`~latentnlp.training.loop`: :class:`Trainer` -- epochs, updates, validation, model
  selection, early stopping, skipping non-finite batches;
- :mod:`~latentnlp.training.evaluation`: :func:`evaluate`, corpus numbers without a trainer;
- :mod:`~latentnlp.training.checkpoint`: checkpoint files and :func:`load_model`;
- :mod:`~latentnlp.training.run_dir`: the run directory's files, :class:`FinishedRunError`;
- :mod:`~latentnlp.training.run_log`: ``metrics.jsonl``, its schema, :func:`read_metrics`;
- :mod:`~latentnlp.training.distributed`: torchrun process groups, DDP, data sharding;
- :mod:`~latentnlp.training.aggressive`: :class:`AggressiveInference`, He et al.'s aggressive
  inference-network schedule (its settings, stopping rule and MI check);
- :mod:`~latentnlp.training.optim`: the optimiser and learning-rate scheduler of a config;
- :mod:`~latentnlp.training.rng`: RNG state capture, restore and seeding;
- :mod:`~latentnlp.training.progress`: progress bars on a terminal, log lines elsewhere.

Schedules (learning rate, KL weight) live in :mod:`latentnlp.schedules`.

The names below are imported from their modules on first use, so that reading a run log
(``from latentnlp.training.run_log import read_metrics``, as the plots do) does not import the
trainer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from latentnlp.training.aggressive import AggressiveInference
    from latentnlp.training.checkpoint import CorruptCheckpointError, load_model
    from latentnlp.training.config import OPTIMIZERS, SCHEDULES, SELECTION_METRICS, TrainConfig
    from latentnlp.training.distributed import DataSource
    from latentnlp.training.evaluation import evaluate
    from latentnlp.training.loop import Trainer
    from latentnlp.training.run_dir import FinishedRunError
    from latentnlp.training.run_log import read_metrics, training_speed

_HOMES = {
    "AggressiveInference": "aggressive",
    "CorruptCheckpointError": "checkpoint",
    "load_model": "checkpoint",
    "OPTIMIZERS": "config",
    "SCHEDULES": "config",
    "SELECTION_METRICS": "config",
    "TrainConfig": "config",
    "DataSource": "distributed",
    "evaluate": "evaluation",
    "Trainer": "loop",
    "FinishedRunError": "run_dir",
    "read_metrics": "run_log",
    "training_speed": "run_log",
}

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "SELECTION_METRICS",
    "AggressiveInference",
    "CorruptCheckpointError",
    "DataSource",
    "FinishedRunError",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "load_model",
    "read_metrics",
    "training_speed",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
