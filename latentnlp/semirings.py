"""The semirings of the chain kernels, and the safe log-space reductions they are built from.

A semiring supplies ``plus`` (a reduction over a dimension) and ``matmul``
(``C_ij = plus_k A_ik (x) B_kj``):

- :class:`LogSemiring` (``plus = logsumexp``, ``times = +``): the log-space propagation of
  every transition (:meth:`latentnlp.transitions.Transition.log_propagator`, hence the
  log-space forward, the log-space filter and a stream's carried belief), the parallel-prefix
  products of :func:`latentnlp.chain.scan_log_partition`, low-rank densification and
  backward sampling through a rank;
- :class:`MaxSemiring` (``plus = max``, ``times = +``): the Viterbi recursion as a product with
  the maximising index (the back-pointers).

The probability-space ("scaled") kernel, the entropy recursion and Viterbi do not go through
a semiring object: they are written out in :mod:`latentnlp.chain` and
:mod:`latentnlp.transitions` (the scaled ones as plain matrix products with per-step
renormalisation; Viterbi as a max into preallocated buffers, without the index, which its
backtracking recomputes for the chosen state only).
"""

from __future__ import annotations

import torch
from torch import Tensor


def safe_log(x: Tensor) -> Tensor:
    """``log x`` with ``log 0 = -inf`` and a zero (not NaN) gradient where ``x = 0``; NaN stays NaN."""
    zero = x == 0
    return torch.where(zero, torch.full_like(x, float("-inf")), torch.log(torch.where(zero, torch.ones_like(x), x)))


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
        return LogSemiring.matmul_exponentiated(a, *LogSemiring.exponentiate(b))

    @staticmethod
    def exponentiate(b: Tensor) -> tuple[Tensor, Tensor]:
        """The right operand of :meth:`matmul` in probability space: ``(exp(b - s), s)`` with ``s``
        the max of each column (``[..., 1, N]``).  A matrix used by many products is exponentiated once."""
        b_shift = finite_max(b, -2)
        return torch.exp(b - b_shift), b_shift

    @staticmethod
    def matmul_exponentiated(a: Tensor, b_probs: Tensor, b_shift: Tensor) -> Tensor:
        """:meth:`matmul` of ``a`` and the matrix ``b`` given as :meth:`exponentiate` returns it."""
        a_shift = finite_max(a, -1)
        return safe_log(torch.matmul(torch.exp(a - a_shift), b_probs)) + a_shift + b_shift


class MaxSemiring:
    """``(max, +)``: the best path score (Viterbi)."""

    @staticmethod
    def matmul_with_argmax(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``C_ij = max_k a_ik + b_kj`` and the maximising ``k``: ``a [..., M, K]``, ``b [..., K, N]``
        -> two ``[..., M, N]`` tensors (values, long indices)."""
        return (a.unsqueeze(-1) + b.unsqueeze(-3)).max(-2)
