"""The random-number state of a process: capture, restore, seed, and isolate a pass from it.

The state covers python's ``random``, numpy's global RNG (when numpy is installed), torch's CPU
generator and, on a CUDA device, that device's generator.  Checkpoints store it per rank so a
resumed run draws the numbers an uninterrupted one would have drawn.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

try:  # numpy is optional: its RNG is saved and restored only when it is installed
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

__all__ = ["get_rng_state", "isolated_rng", "seed_everything", "set_rng_state"]


def get_rng_state(device: torch.device) -> dict[str, Any]:
    """The RNG states (``torch``, ``python``, ``numpy``, and ``cuda`` on a CUDA ``device``),
    in a form ``torch.load(weights_only=True)`` reads back."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (name, keys.tolist(), int(pos), int(has_gauss), float(gauss))
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    if np is not None and state.get("numpy") is not None:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """Seed python, numpy and torch: every CUDA device, or only ``device`` when given."""
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
    if device is None:
        torch.manual_seed(seed)
        return
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


@contextmanager
def isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block under RNGs seeded with ``seed``, then restore the state from before it."""
    saved = get_rng_state(device)
    seed_everything(seed, device)
    try:
        yield
    finally:
        set_rng_state(saved, device)
