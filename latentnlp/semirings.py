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

from typing import NamedTuple

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


def finite_max(x: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """``max`` over ``dim`` (one or several, kept), detached, with rows of ``-inf`` mapped to 0 so shifts stay
    finite."""
    return torch.nan_to_num(x.detach().amax(dim, keepdim=True), nan=0.0, posinf=0.0, neginf=0.0)


class Exponentiated(NamedTuple):
    """The right operand ``b [..., K, N]`` of :meth:`LogSemiring.matmul` prepared once for many products.

    ``probs = exp(b - shift - rows)`` with ``shift [..., 1, N]`` the max of each column of ``b`` and
    ``rows [..., 1, K]`` the max of each row of ``b - shift`` (``-inf`` for a row of ``-inf``); ``log``
    is ``b`` itself (for the exact products the shifted one cannot give) and ``support`` the
    indicator ``b > -inf`` in ``b``'s dtype.
    """

    probs: Tensor
    shift: Tensor
    rows: Tensor
    log: Tensor
    support: Tensor


_EXACT_CHUNK = 1 << 22
"""The most elements of one ``[..., M, k, N]`` broadcast in :func:`_exact_log_matmul` (16 MiB in float32)."""


def _exact_log_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``C_ij = logsumexp_k(a_ik + b_kj)`` with a shift per ``(i, j)``, as a broadcast over the
    contracted axis in chunks of at most ``_EXACT_CHUNK`` elements: each entry is exact to rounding
    (``-inf`` with gradient 0 where every term is ``-inf``), ``O(M K N)`` exponentials."""
    size = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]).numel() * a.shape[-2] * b.shape[-1]
    width = max(1, _EXACT_CHUNK // max(size, 1))
    parts = [
        logsumexp(a[..., start : start + width].unsqueeze(-1) + b[..., start : start + width, :].unsqueeze(-3), -2)
        for start in range(0, a.shape[-1], width)
    ]
    return parts[0] if len(parts) == 1 else logsumexp(torch.stack(parts, -1), -1)


class LogSemiring:
    """``(logsumexp, +)``: sums over paths of exponentiated scores, in log space."""

    @staticmethod
    def plus(x: Tensor, dim: int) -> Tensor:
        return torch.logsumexp(x, dim)

    @staticmethod
    def matmul(a: Tensor, b: Tensor) -> Tensor:
        """``C_ij = log sum_k exp(a_ik + b_kj)``, every entry exact to rounding (:meth:`matmul_exponentiated`).

        ``a [..., M, K]``, ``b [..., K, N]`` -> ``[..., M, N]``.
        """
        return LogSemiring.matmul_exponentiated(a, *LogSemiring.exponentiate(b))

    @staticmethod
    def exponentiate(b: Tensor) -> Exponentiated:
        """The right operand of :meth:`matmul` in probability space (:class:`Exponentiated`).

        Every row of ``probs`` that reaches a column has largest entry 1.  A matrix used by many
        products is exponentiated once.
        """
        b_shift = finite_max(b, -2)
        centred = b - b_shift
        rows = centred.detach().amax(-1, keepdim=True)  # [..., K, 1]
        probs = torch.exp(centred - torch.where(torch.isfinite(rows), rows, torch.zeros_like(rows)))
        support = (b.detach() > float("-inf")).to(b.dtype)
        return Exponentiated(probs, b_shift, rows.transpose(-1, -2), b, support)

    @staticmethod
    def matmul_exponentiated(
        a: Tensor, b_probs: Tensor, b_shift: Tensor, b_rows: Tensor, b: Tensor, b_support: Tensor
    ) -> Tensor:
        r""":meth:`matmul` of ``a`` and the matrix ``b`` given as :meth:`exponentiate` returns it.

        Fast path, one BLAS product: ``S_ij = sum_k exp(a_ik + r_k - m_i) exp(b_kj - s_j - r_k)``
        with ``m_i = max_k (a_ik + r_k)``, ``C_ij = log S_ij + m_i + s_j``.  Its factors lie in
        ``[0, 1]``, so a term it loses to underflow is below the smallest normal number ``tiny``
        and an entry with ``S_ij >= K tiny / eps`` (:func:`latentnlp.chain.underflow_threshold`
        times ``K``) is exact to rounding.  An entry below that bound whose terms are not all
        ``-inf`` (a path, of log-mass far below its row's maximum, that is the only way into
        column ``j``: one shift per row loses it, and with it whole chains in float32) is
        recomputed by the exact ``logsumexp_k`` with a shift per ``(i, j)`` (the broadcast
        ``[..., M, K, N]``, chunked), so every entry is exact to rounding, in value and gradient;
        an entry with no finite term is ``-inf`` with gradient 0.
        """
        weighted = a + b_rows
        a_shift = finite_max(weighted, -1)
        product = torch.matmul(torch.exp(weighted - a_shift), b_probs)
        info = torch.finfo(product.dtype)
        low = product < a.shape[-1] * info.tiny / info.eps
        if bool(low.any()):
            low = low & (torch.matmul((a.detach() > float("-inf")).to(b_support.dtype), b_support) > 0)
        if not bool(low.any()):
            return safe_log(product) + a_shift + b_shift
        fast = safe_log(torch.where(low, torch.ones_like(product), product)) + a_shift + b_shift
        return torch.where(low, _exact_log_matmul(a, b), fast)


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
