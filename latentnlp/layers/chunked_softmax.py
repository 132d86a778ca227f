"""Vocabulary-chunked softmax operations on a linear read-out ``scores = x W^T + b``.

For inputs ``x [..., d]`` and an output embedding ``weight [V, d]`` (bias ``[V]``):

    logsumexp_linear(x, W, b)        = log sum_v exp(w_v . x + b_v)                 [...]
    target_logits(x, W, b, y)        = w_y . x + b_y                                [...]
    log_softmax_linear(x, W, b, y)   = w_y . x + b_y - log sum_v exp(w_v . x + b_v) [N]

Each can bound its memory by ``max_chunk_elements``, the most scores built at once (the name
the layers use too): the normaliser is computed over chunks of the vocabulary
(``logsumexp_linear``) or of the rows (``log_softmax_linear``), recomputed in the backward
pass, so ``[..., V]`` scores are never all held at once.  Half-precision scores are
normalised in float32 (:mod:`latentnlp.precision`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from latentnlp.precision import computation_dtype, upcast

__all__ = ["log_softmax_linear", "logsumexp_linear", "target_logits"]


def _logsumexp_chunk(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.logsumexp(upcast(F.linear(x, weight, bias)), dim=-1)


def logsumexp_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, max_chunk_elements: int | None = None
) -> Tensor:
    """``log sum_v exp(weight[v] . x + bias[v])``: ``x [..., d]``, ``weight [V, d]`` -> ``[...]``.

    With ``max_chunk_elements`` the vocabulary is scored ``max(1, max_chunk_elements // rows)``
    rows of ``weight`` at a time (``rows`` = the number of vectors in ``x``) and each chunk is
    recomputed in the backward pass (activation checkpointing), so neither pass holds more than
    about ``max_chunk_elements`` scores.
    """
    vocab = weight.shape[0]
    if max_chunk_elements is None:
        return _logsumexp_chunk(x, weight, bias)
    if max_chunk_elements < 1:
        raise ValueError(f"logsumexp_linear: max_chunk_elements must be >= 1 or None, got {max_chunk_elements}")
    chunk_size = max(1, max_chunk_elements // max(1, x.numel() // max(1, x.shape[-1])))
    if chunk_size >= vocab:
        return _logsumexp_chunk(x, weight, bias)
    recompute = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    parts = []
    for start in range(0, vocab, chunk_size):
        w = weight[start : start + chunk_size]
        b = None if bias is None else bias[start : start + chunk_size]
        if recompute:
            parts.append(checkpoint(_logsumexp_chunk, x, w, b, use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(_logsumexp_chunk(x, w, b))
    return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


class _ChunkedLogSoftmaxLinear(torch.autograd.Function):
    """``log_softmax(x W^T + b)[y]`` over row chunks; backward recomputes each chunk's scores.

    Forward keeps only the per-row normaliser ``lse [N]``.  Backward, per chunk of rows:
    ``G = g (onehot(y) - softmax(x W^T + b))`` built in place in the recomputed score
    block, then ``dx = G W``, ``dW += G^T x``, ``db += sum_rows G``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_rows: int) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return _ChunkedLogSoftmaxLinear._forward(ctx, x, weight, bias, targets, chunk_rows)

    @staticmethod
    def _forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_rows: int) -> Tensor:
        lse = torch.empty(x.shape[0], dtype=computation_dtype(x.dtype), device=x.device)
        for start in range(0, x.shape[0], chunk_rows):
            scores = upcast(F.linear(x[start : start + chunk_rows], weight, bias))
            torch.logsumexp(scores, dim=-1, out=lse[start : start + chunk_rows])
        ctx.chunk_rows = chunk_rows
        ctx.save_for_backward(x, weight, bias, targets, lse)
        return target_logits(x, weight, bias, targets) - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        with torch.autocast(grad.device.type, enabled=False):
            return _ChunkedLogSoftmaxLinear._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: Tensor):
        x, weight, bias, targets, lse = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        for start in range(0, x.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            g = grad[rows].to(lse.dtype)
            block = upcast(F.linear(x[rows], weight, bias))  # [n, V] scores
            block.sub_(lse[rows, None]).exp_().mul_(-g[:, None])  # -g softmax
            block[torch.arange(block.shape[0], device=block.device), targets[rows]] += g
            block = block.to(weight.dtype)
            if need_x:
                torch.mm(block, weight, out=grad_x[rows])
            if need_w:
                grad_w.addmm_(block.t(), x[rows])
            if need_b:
                grad_b += block.sum(0)
        return grad_x, grad_w, grad_b, None, None


def log_softmax_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, max_chunk_elements: int | None = None
) -> Tensor:
    """``log softmax(weight x + bias)[y]``: ``x [N, d]``, ``weight [V, d]``, ``targets [N]`` -> ``[N]``.

    Without ``max_chunk_elements`` (or when ``N V`` fits in it) the ``[N, V]`` scores are built
    whole and differentiated by autograd.  Otherwise at most ``[rows, V]`` scores,
    ``rows = max(1, max_chunk_elements // V)``, exist at a time in either pass: the forward keeps
    one normaliser per row and the backward recomputes each chunk's scores and forms its gradient
    in place (one more ``[n, d] x [d, V]`` product than autograd, but no ``[N, V]`` tensors written
    to memory and read back).  First-order gradients only.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or targets.shape != x.shape[:1]:
        raise ValueError(
            f"log_softmax_linear: needs x [N, d], weight [V, d], targets [N]; got x "
            f"{tuple(x.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )
    if max_chunk_elements is not None and max_chunk_elements < 1:
        raise ValueError(f"log_softmax_linear: max_chunk_elements must be >= 1 or None, got {max_chunk_elements}")
    rows = None if max_chunk_elements is None else max(1, max_chunk_elements // weight.shape[0])
    if rows is None or rows >= x.shape[0]:
        scores = upcast(F.linear(x, weight, bias))
        return scores.gather(-1, targets[:, None]).squeeze(-1) - scores.logsumexp(-1)
    return _ChunkedLogSoftmaxLinear.apply(x.to(weight.dtype), weight, bias, targets, rows)


def target_logits(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    """Score of each target only: ``weight[y] . x + bias[y]``.

    ``x [..., d]`` or ``[..., K, d]`` (one row per expert) with ``targets [...]``;
    returns ``[...]`` or ``[..., K]``.  Never builds ``[..., V]``.
    """
    w_y = weight[targets]  # [..., d]
    if x.dim() == targets.dim() + 1:
        scores = (x * w_y).sum(-1)
    else:  # experts: [..., K, d] . [..., d]
        scores = torch.matmul(x, w_y.unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        b_y = bias[targets]
        scores = scores + (b_y if x.dim() == targets.dim() + 1 else b_y.unsqueeze(-1))
    return upcast(scores)
