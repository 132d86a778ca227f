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

        ``a [..., M, K]``, ``b [..., K, N]`` -> ``[..., M, N]``.  ``b`` is shifted by the max of
        each column and then of each row (:meth:`exponentiate`), ``a`` by the max of
        ``a_ik + (row shift of b)_k``, so the product is one BLAS call on numbers in ``[0, 1]``
        whose largest term is 1; memory is that of the operands.
        """
        return LogSemiring.matmul_exponentiated(a, *LogSemiring.exponentiate(b))

    @staticmethod
    def exponentiate(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The right operand of :meth:`matmul` in probability space: ``(exp(b - s - r), s, r)``.

        ``s [..., 1, N]`` is the max of each column of ``b`` and ``r [..., 1, K]`` the max of each
        row of ``b - s`` (``-inf`` for a row of ``-inf``, whose probabilities are 0), so every row
        that reaches a column has largest entry 1.  A matrix used by many products is
        exponentiated once.
        """
        b_shift = finite_max(b, -2)
        centred = b - b_shift
        rows = centred.detach().amax(-1, keepdim=True)  # [..., K, 1]
        probs = torch.exp(centred - torch.where(torch.isfinite(rows), rows, torch.zeros_like(rows)))
        return probs, b_shift, rows.transpose(-1, -2)

    @staticmethod
    def matmul_exponentiated(a: Tensor, b_probs: Tensor, b_shift: Tensor, b_rows: Tensor) -> Tensor:
        """:meth:`matmul` of ``a`` and the matrix ``b`` given as :meth:`exponentiate` returns it.

        ``sum_k exp(a_ik + r_k - m_i) exp(b_kj - s_j - r_k)`` with ``m_i = max_k (a_ik + r_k)``: a
        large entry of ``a`` on a row of ``b`` that is far below the others (or ``-inf``) neither
        sets the shift nor underflows the terms that matter, which would leave a subnormal sum
        whose log has an infinite gradient.
        """
        weighted = a + b_rows
        a_shift = finite_max(weighted, -1)
        return safe_log(torch.matmul(torch.exp(weighted - a_shift), b_probs)) + a_shift + b_shift


class MaxSemiring:
    """``(max, +)``: the best path score (Viterbi)."""

    @staticmethod
    def matmul_with_argmax(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``C_ij = max_k a_ik + b_kj`` and the maximising ``k``: ``a [..., M, K]``, ``b [..., K, N]``
        -> two ``[..., M, N]`` tensors (values, long indices)."""
        return (a.unsqueeze(-1) + b.unsqueeze(-3)).max(-2)


def expected_score(weights: Tensor, scores: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``sum weights * scores`` over ``dims``, with ``0 * (-inf) = 0`` (no mass on a structural zero)."""
    product = weights * scores
    return torch.where(weights == 0, torch.zeros_like(product), product).sum(dims)
