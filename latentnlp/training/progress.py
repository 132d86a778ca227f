"""What a run shows the person watching it: tqdm bars on a terminal, log lines elsewhere.

Only rank 0 reports, and only with ``TrainConfig.progress``.  When stderr is a terminal it
draws tqdm bars (per epoch: loss and tokens/s; per evaluation); when it is not (a log file, a
batch job) every training log window and every evaluation becomes one INFO line of the
``latentnlp.training`` logger.  Python's logging is unconfigured in a plain script (INFO lines
would be dropped), so then the trainer gives that logger one stderr handler; an application
that configures logging keeps full control.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["LOGGER", "bar", "bars_enabled", "describe", "ensure_console", "lines_enabled"]

#: the logger every part of the trainer logs to (its modules' loggers are its children)
LOGGER = "latentnlp.training"


def bars_enabled(progress: bool, is_main: bool) -> bool:
    """Whether to draw tqdm bars: progress asked for, rank 0, stderr a terminal."""
    return progress and is_main and sys.stderr.isatty()


class _NoBar:
    """What :func:`bar` returns when no bar is drawn: the calls the trainer makes, doing nothing."""

    disable = True

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def bar(enabled: bool, **kwargs: Any):
    """A tqdm progress bar (``kwargs`` go to ``tqdm``) when ``enabled`` and tqdm is installed (the
    ``progress`` extra), else a bar that draws nothing: the core install needs torch only."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(**kwargs)
    return _NoBar()


def lines_enabled(progress: bool, is_main: bool) -> bool:
    """Whether to log a line per event instead: progress asked for, rank 0, stderr not a terminal."""
    return progress and is_main and not sys.stderr.isatty()


def ensure_console() -> None:
    """Give the ``latentnlp.training`` logger a stderr handler at INFO, unless logging is configured
    (a handler on the root logger or on that logger)."""
    logger = logging.getLogger(LOGGER)
    if logging.getLogger().handlers or logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def describe(event: Mapping[str, Any]) -> str:
    """One line for a run-log event: split, step, epoch, loss and the corpus numbers that exist."""
    parts = [f"{event['split']} {event['event']}", f"step {event['step']}", f"epoch {event['epoch'] + 1}"]
    for key in ("loss", "nll", "neg_elbo", "ppl", "ppl_bound", "kl", "mi"):
        if isinstance(event.get(key), float):
            parts.append(f"{key} {event[key]:.4f}")
    if "tokens_per_s" in event:
        parts.append(f"{event['tokens_per_s']:.0f} tok/s")
    parts.append(f"lr {event['lr']:.3g}")
    return ", ".join(parts)
