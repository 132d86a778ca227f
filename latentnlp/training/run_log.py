"""The run log, ``metrics.jsonl``: one JSON object per line, one event per object.

This module is the one definition of the log's schema (:data:`FIELDS`, :data:`REQUIRED`), the
writer the trainer uses (:class:`RunLog`) and the readers plots and recipes use
(:func:`read_metrics`, :func:`series`, :func:`training_speed`); none of them needs the trainer.

An event has a ``split`` (``train``, ``valid`` or ``test``) and an ``event`` kind:

- ``log``: a training window of ``log_every`` updates (split ``train``);
- ``eval``: an evaluation of the model on a split (``valid`` during training, ``test`` at the
  end), holding the corpus numbers of :func:`latentnlp.training.evaluate`;
- ``skip``: a training batch skipped for a non-finite loss or gradient;
- ``posterior``: posterior-collapse diagnostics of the validation set at an epoch end (split
  ``valid``: ``mi``, ``active_units``; under the aggressive inference-network schedule, whether
  it stays on).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["FIELDS", "METRICS", "REQUIRED", "RunLog", "read_metrics", "series", "training_speed"]

#: the log's file name in a run directory
METRICS = "metrics.jsonl"

#: every field an event may carry, and what it holds
FIELDS: dict[str, str] = {
    "split": "train, valid or test",
    "event": "log, eval, skip or posterior",
    "step": "optimiser updates made when the event was logged",
    "epoch": "the current epoch (0-based)",
    "position": "train: batches of the epoch's order consumed by all ranks",
    "loss": "per target token: log, the training objective's loss over the window; eval, the "
    "evaluation's nll or neg_elbo (see select_on); skip, the skipped batch's loss "
    "(its repr when not finite)",
    "nll": "negative log-likelihood (exact or importance-weighted) per target token",
    "neg_elbo": "negative evidence lower bound per target token (bounds nll from above)",
    "ppl": "exp(nll): perplexity, when the objective gives an nll",
    "ppl_bound": "exp(neg_elbo): the perplexity bound, when the objective gives an ELBO",
    "tokens": "target tokens summed over the window or corpus (<eos> counted, BOS not)",
    "examples": "examples summed over the window or corpus",
    "tokens_per_s": "target tokens per second (log: of training updates; eval: of the pass)",
    "lr": "learning rate of the first parameter group",
    "skipped": "batches skipped so far",
    "wall_time": "seconds since the run started, over all its sessions",
    "reason": "skip: 'non-finite loss' or 'non-finite gradient' (+ ' in an inner step' of the aggressive schedule)",
    "inner_steps": "log, under the aggressive schedule: inner inference-network updates over the window (rank 0)",
    "aggressive": "log and posterior events: whether the aggressive schedule is (still) on",
    "mi": "posterior: I_q(x; z) under the aggregate posterior of the validation set (nats)",
    "active_units": "posterior: latent units with Var_x E_q[z_d] > 0.01 over the validation set",
    "inner_steps_total": "posterior, under the aggressive schedule: inner inference-network updates so far",
    "select_on": "valid eval: the metric that selects best.pt",
    "*": "any other per-example metric m of the model, as m per token and m_per_example "
    "(e.g. kl, kl_per_example, reconstruction)",
}

#: the fields every event of a kind carries
REQUIRED: dict[str, tuple[str, ...]] = {
    "log": (
        "split",
        "event",
        "step",
        "epoch",
        "position",
        "loss",
        "tokens",
        "tokens_per_s",
        "lr",
        "skipped",
        "wall_time",
    ),
    "eval": ("split", "event", "step", "epoch", "loss", "tokens", "tokens_per_s", "lr", "skipped", "wall_time"),
    "skip": ("split", "event", "step", "epoch", "position", "reason", "loss", "lr", "skipped", "wall_time"),
    "posterior": ("split", "event", "step", "epoch", "mi", "active_units", "lr", "wall_time"),
}


class RunLog:
    """Appends events to ``path`` (a ``metrics.jsonl``), checking each against :data:`REQUIRED`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def write(self, event: Mapping[str, Any]) -> None:
        """Append one event; a ``ValueError`` names the required fields it lacks."""
        kind = event.get("event")
        if kind not in REQUIRED:
            raise ValueError(f"event must be one of {tuple(REQUIRED)}, got {kind!r}")
        missing = [name for name in REQUIRED[kind] if name not in event]
        if missing:
            raise ValueError(f"a {kind!r} event lacks {missing}")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(event)) + "\n")

    def size(self) -> int:
        """Bytes written so far (0 when there is no log): the offset :meth:`truncate` takes."""
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, offset: int) -> None:
        """Drop the events after byte ``offset`` (those logged after a checkpoint)."""
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(offset)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The events logged to ``run_dir/metrics.jsonl``, in order; ``[]`` when the folder holds no log."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def series(events: Iterable[Mapping[str, Any]], split: str, event: str, key: str) -> list[tuple[int, float]]:
    """``(step, event[key])`` of the events of that split and kind that carry ``key``, in order."""
    return [(e["step"], e[key]) for e in events if e.get("split") == split and e.get("event") == event and key in e]


def training_speed(run_dir: str | os.PathLike) -> float:
    """Mean training tokens/s over the logged windows of the run in ``run_dir`` (NaN if none)."""
    rates = [rate for _, rate in series(read_metrics(run_dir), "train", "log", "tokens_per_s")]
    return sum(rates) / len(rates) if rates else float("nan")
