"""Lengths to masks: the one place where ``lengths [B]`` become a boolean ``[B, T]`` mask.

Convention (``docs/design.md``): ``lengths`` is a LongTensor ``[B]`` with ``1 <= lengths[b] <= T``
and ``mask[b, t] = t < lengths[b]`` is True at real positions, False at padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lengths_to_mask"]


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """``mask[b, t] = t < lengths[b]``: ``[B, max_len]`` bool, True at real positions.

    Args:
        lengths: ``[B]`` integer tensor.
        max_len: the width ``T`` of the mask (default ``max(lengths)``, 0 for an empty batch).
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D [B], got shape {tuple(lengths.shape)}")
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    return torch.arange(max_len, device=lengths.device) < lengths.unsqueeze(-1)
