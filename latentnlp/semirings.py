"""The semirings the chain kernels need, as small stateless objects.

A semiring supplies ``plus`` (a reduction over a dimension) and ``matmul``
(``C_ij = plus_k A_ik (x) B_kj``).  The dynamic program in
:mod:`latentnlp.chain` is written once against this interface and run in

- :class:`LogSemiring` (``plus = logsumexp``, ``times = +``): log partition;
- :class:`MaxSemiring` (``plus = max``, ``times = +``): Viterbi scores.

The probability-space ("scaled") kernel and the entropy recursion do not go
through a semiring object: they are plain matrix products with per-step
renormalisation, written out in :mod:`latentnlp.chain`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def safe_log(x: Tensor) -> Tensor:
    """``log x`` with ``log 0 = -inf`` and a zero (not NaN) gradient where ``x = 0``."""
    positive = x > 0
    return torch.where(positive, torch.log(torch.where(positive, x, torch.ones_like(x))),
                       torch.full_like(x, float("-inf")))


def logsumexp(x: Tensor, dim: int) -> Tensor:
    """``log sum exp`` over ``dim`` (removed) whose value is ``-inf`` and gradient 0 (not NaN)
    where every entry is ``-inf``: the shift is :func:`finite_max`, the log :func:`safe_log`."""
    shift = finite_max(x, dim)
    return safe_log(torch.exp(x - shift).sum(dim)) + shift.squeeze(dim)


def finite_max(x: Tensor, dim: int) -> Tensor:
    """``max`` over ``dim`` (kept), detached, with rows of ``-inf`` mapped to 0 so shifts stay finite."""
    m = x.detach().amax(dim, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


class LogSemiring:
    """``(logsumexp, +)``: sums over paths of exponentiated scores, in log space."""

    zero = float("-inf")
    one = 0.0

    @staticmethod
    def plus(x: Tensor, dim: int) -> Tensor:
        return torch.logsumexp(x, dim)

    @staticmethod
    def matmul(a: Tensor, b: Tensor) -> Tensor:
        """``C_ij = log sum_k exp(a_ik + b_kj)`` by the shift-exp-matmul trick.

        ``a [..., M, K]``, ``b [..., K, N]`` -> ``[..., M, N]``.  Rows of ``a`` are
        shifted by their max and columns of ``b`` by theirs, so the product is
        one BLAS call on numbers in ``[0, 1]``; memory is that of the operands.
        """
        a_shift = finite_max(a, -1)
        b_shift = finite_max(b, -2)
        product = torch.matmul(torch.exp(a - a_shift), torch.exp(b - b_shift))
        return safe_log(product) + a_shift + b_shift


class MaxSemiring:
    """``(max, +)``: the best path score (Viterbi)."""

    zero = float("-inf")
    one = 0.0

    @staticmethod
    def plus(x: Tensor, dim: int) -> Tensor:
        return x.amax(dim)

    @staticmethod
    def matmul(a: Tensor, b: Tensor) -> Tensor:
        """``C_ij = max_k a_ik + b_kj``; ``a [..., M, K]``, ``b [..., K, N]`` -> ``[..., M, N]``."""
        return (a.unsqueeze(-1) + b.unsqueeze(-3)).amax(-2)

    @staticmethod
    def matmul_with_argmax(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Like :meth:`matmul`, also returning the maximising ``k`` for each ``(i, j)``."""
        return (a.unsqueeze(-1) + b.unsqueeze(-3)).max(-2)
