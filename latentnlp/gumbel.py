r"""Gumbel noise, the one sampler behind the Gumbel-max trick and the Gumbel-softmax relaxation.

If ``g_k ~ Gumbel(0, 1)`` independently then ``argmax_k (logits_k + g_k) ~ Categorical(logits)``
(Gumbel-max); ``softmax((logits + g) / tau)`` is its continuous relaxation (Jang et al. 2017,
Maddison et al. 2017).  ``g = -log E`` with ``E ~ Exponential(1)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gumbel_noise", "gumbel_argmax"]


def gumbel_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel draws ``g = -log E``, ``E ~ Exp(1)``, of ``like``'s shape, dtype and device."""
    return -torch.empty_like(like).exponential_(generator=generator).log()


def gumbel_argmax(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One exact draw from ``Categorical(logits=logits)`` per row (last dim): ``logits.shape[:-1]`` long."""
    return (logits + gumbel_noise(logits, generator)).argmax(-1)
