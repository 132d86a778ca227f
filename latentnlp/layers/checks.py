"""Input checks shared by the output layers: each raises ``ValueError`` naming the argument
and the shapes seen.  They look at shapes and dtypes only, so they never synchronise with the
device and stay on whatever the validation switch (:mod:`latentnlp.validation`) says."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["check_activation", "check_hidden"]


def check_activation(layer: str, activation: str, choices) -> None:
    """``ValueError`` unless ``activation`` is one of ``choices`` (names of activations)."""
    if activation not in choices:
        raise ValueError(f"{layer}: activation must be one of {sorted(choices)}, got {activation!r}")


def check_hidden(layer: nn.Module, hidden: Tensor, input_size: int, targets: Tensor | None = None) -> None:
    """ValueError naming the argument and the shapes seen when ``hidden``/``targets`` do not fit."""
    name = type(layer).__name__
    if hidden.dim() < 1 or hidden.shape[-1] != input_size:
        raise ValueError(f"{name}: hidden must be [..., {input_size}], got {tuple(hidden.shape)}")
    if targets is not None:
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(
                f"{name}: targets must be hidden.shape[:-1] = {tuple(hidden.shape[:-1])},"
                f" got targets {tuple(targets.shape)}"
            )
        if targets.dtype != torch.long:
            raise ValueError(f"{name}: targets must be a LongTensor, got {targets.dtype}")
