"""Computation precision: half-precision inputs are computed in float32.

Normalisers (``logsumexp`` over a vocabulary, a chain's forward pass) lose too much in
float16/bfloat16, so every kernel and layer that normalises upcasts through these two functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["computation_dtype", "upcast"]

_HALF = (torch.float16, torch.bfloat16)


def computation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The promoted floating dtype of ``dtypes``, with half precision raised to float32."""
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return torch.float32 if dtype in _HALF else dtype


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 if it is half precision, else ``x`` itself (no copy)."""
    return x.float() if x.dtype in _HALF else x
