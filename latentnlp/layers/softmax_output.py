"""The one-softmax output layer, and the vocabulary-chunked log-normaliser it shares with MoS.

``SoftmaxOutput`` maps a hidden state ``h [..., H]`` to log-probabilities over a
vocabulary of ``V`` words::

    g(h) = a(P h + c)             (only with a projection to d = softmax_input_size < H, say;
                                   a = tanh, or the identity for a linear bottleneck)
    g(h) = h                      (without a projection; d = H)
    log p(y | h) = w_y . g(h) + b_y - log sum_v exp(w_v . g(h) + b_v)

The "softmax bottleneck" (Yang et al. 2018) is that the matrix of log-probabilities
``[contexts, V]`` a softmax can express has rank at most ``d + 1``;
:class:`~latentnlp.layers.MixtureOfSoftmaxes` lifts it.  With one expert a
mixture of softmaxes is exactly this layer with a projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

ACTIVATIONS = {"tanh": torch.tanh, "identity": lambda x: x}


def check_activation(layer: str, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{layer}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


def _upcast(x: Tensor) -> Tensor:
    """Half-precision scores are normalised in float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _logsumexp_chunk(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.logsumexp(_upcast(F.linear(x, weight, bias)), dim=-1)


def logsumexp_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                     chunk_size: int | None = None) -> Tensor:
    """``log sum_v exp(weight[v] . x + bias[v])``: ``x [..., d]``, ``weight [V, d]`` -> ``[...]``.

    With ``chunk_size`` the vocabulary is scored ``chunk_size`` rows of ``weight``
    at a time and each chunk is recomputed in the backward pass (activation
    checkpointing), so neither pass holds more than ``[..., chunk_size]`` scores.
    """
    vocab = weight.shape[0]
    if chunk_size is None or chunk_size >= vocab:
        return _logsumexp_chunk(x, weight, bias)
    recompute = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    parts = []
    for start in range(0, vocab, chunk_size):
        w = weight[start:start + chunk_size]
        b = None if bias is None else bias[start:start + chunk_size]
        if recompute:
            parts.append(checkpoint(_logsumexp_chunk, x, w, b,
                                    use_reentrant=False, preserve_rng_state=False))
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
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk_rows: int) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return _ChunkedLogSoftmaxLinear._forward(ctx, x, weight, bias, targets, chunk_rows)

    @staticmethod
    def _forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                 chunk_rows: int) -> Tensor:
        lse = torch.empty(x.shape[0], dtype=_upcast(x[:0]).dtype, device=x.device)
        for start in range(0, x.shape[0], chunk_rows):
            scores = _upcast(F.linear(x[start:start + chunk_rows], weight, bias))
            torch.logsumexp(scores, dim=-1, out=lse[start:start + chunk_rows])
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
            block = _upcast(F.linear(x[rows], weight, bias))             # [n, V] scores
            block.sub_(lse[rows, None]).exp_().mul_(-g[:, None])         # -g softmax
            block[torch.arange(block.shape[0], device=block.device), targets[rows]] += g
            block = block.to(weight.dtype)
            if need_x:
                torch.mm(block, weight, out=grad_x[rows])
            if need_w:
                grad_w.addmm_(block.t(), x[rows])
            if need_b:
                grad_b += block.sum(0)
        return grad_x, grad_w, grad_b, None, None


def log_softmax_linear(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                       chunk_rows: int | None = None) -> Tensor:
    """``log softmax(weight x + bias)[y]``: ``x [N, d]``, ``weight [V, d]``, ``targets [N]`` -> ``[N]``.

    Without ``chunk_rows`` (or with ``chunk_rows >= N``) the ``[N, V]`` scores are built
    whole and differentiated by autograd.  With ``chunk_rows`` at most ``[chunk_rows, V]``
    scores exist at a time in either pass: the forward keeps one normaliser per row and
    the backward recomputes each chunk's scores and forms its gradient in place (one more
    ``[n, d] x [d, V]`` product than autograd, but no ``[N, V]`` tensors written to memory
    and read back).  First-order gradients only.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or targets.shape != x.shape[:1]:
        raise ValueError(f"log_softmax_linear: needs x [N, d], weight [V, d], targets [N]; got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}")
    if chunk_rows is None or chunk_rows >= x.shape[0]:
        scores = _upcast(F.linear(x, weight, bias))
        return scores.gather(-1, targets[:, None]).squeeze(-1) - scores.logsumexp(-1)
    if chunk_rows < 1:
        raise ValueError(f"log_softmax_linear: chunk_rows must be >= 1, got {chunk_rows}")
    return _ChunkedLogSoftmaxLinear.apply(x.to(weight.dtype), weight, bias, targets, chunk_rows)


def target_logits(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    """Score of each target only: ``weight[y] . x + bias[y]``.

    ``x [..., d]`` or ``[..., K, d]`` (one row per expert) with ``targets [...]``;
    returns ``[...]`` or ``[..., K]``.  Never builds ``[..., V]``.
    """
    w_y = weight[targets]                                   # [..., d]
    if x.dim() == targets.dim() + 1:
        scores = (x * w_y).sum(-1)
    else:                                                   # experts: [..., K, d] . [..., d]
        scores = torch.matmul(x, w_y.unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        b_y = bias[targets]
        scores = scores + (b_y if x.dim() == targets.dim() + 1 else b_y.unsqueeze(-1))
    return _upcast(scores)


def check_hidden(layer: nn.Module, hidden: Tensor, input_size: int,
                 targets: Tensor | None = None) -> None:
    """ValueError naming the argument and the shapes seen when ``hidden``/``targets`` do not fit."""
    name = type(layer).__name__
    if hidden.dim() < 1 or hidden.shape[-1] != input_size:
        raise ValueError(f"{name}: hidden must be [..., {input_size}], got {tuple(hidden.shape)}")
    if targets is not None:
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(f"{name}: targets must be hidden.shape[:-1] = {tuple(hidden.shape[:-1])},"
                             f" got targets {tuple(targets.shape)}")
        if targets.dtype != torch.long:
            raise ValueError(f"{name}: targets must be a LongTensor, got {targets.dtype}")


class SoftmaxOutput(nn.Module):
    """One softmax over the vocabulary, with an optional low-dimensional projection.

    ``SoftmaxOutput(input_size H, vocab_size V, projection_size=None, bias=True,
    dropout=0.0, chunk_size=None, activation="tanh")``.  ``projection_size = d`` inserts
    ``g(h) = a(P h + c)`` of size ``d`` before the output embedding
    ``decoder.weight [V, d]``; ``dropout`` is applied to ``g``.  ``activation``
    ``a`` is ``"tanh"`` or ``"identity"``.  Trained with Adam at learning rates
    around 1e-3, the tanh saturates within tens of steps (``|P h| >> 1`` for most
    units) and the layer can stall at the unigram distribution; the identity
    gives the same rank bound without that failure.

    * ``forward(hidden [..., H]) -> [..., V]`` log-probabilities (they sum to one).
    * ``log_prob(hidden [..., H], targets [...]) -> [...]`` the log-probability of
      the given targets only; with ``chunk_size`` the normaliser is computed over
      vocabulary chunks so memory stays ``O(... x chunk_size)``.
    * ``tie_weights(embedding)`` shares ``decoder.weight`` with an input embedding
      (its dimension must be ``d``).
    """

    def __init__(self, input_size: int, vocab_size: int, projection_size: int | None = None, *,
                 bias: bool = True, dropout: float = 0.0, chunk_size: int | None = None,
                 activation: str = "tanh") -> None:
        super().__init__()
        check_activation("SoftmaxOutput", activation)
        for arg, value in (("input_size", input_size), ("vocab_size", vocab_size)):
            if value < 1:
                raise ValueError(f"SoftmaxOutput: {arg} must be >= 1, got {value}")
        if projection_size is not None and projection_size < 1:
            raise ValueError(f"SoftmaxOutput: projection_size must be >= 1 or None, got {projection_size}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"SoftmaxOutput: chunk_size must be >= 1 or None, got {chunk_size}")
        self.input_size = input_size
        self.vocab_size = vocab_size
        self.softmax_input_size = input_size if projection_size is None else projection_size
        self.chunk_size = chunk_size
        self.activation = activation
        self.projection = None if projection_size is None else nn.Linear(input_size, projection_size)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(self.softmax_input_size, vocab_size, bias=bias)

    def tie_weights(self, embedding: nn.Embedding) -> None:
        """Use ``embedding.weight`` ``[V, d]`` as the output embedding (Press & Wolf 2017)."""
        if tuple(embedding.weight.shape) != tuple(self.decoder.weight.shape):
            raise ValueError(f"{type(self).__name__}.tie_weights: embedding.weight must be "
                             f"{tuple(self.decoder.weight.shape)} = [vocab_size, softmax_input_size],"
                             f" got {tuple(embedding.weight.shape)}")
        self.decoder.weight = embedding.weight

    def features(self, hidden: Tensor) -> Tensor:
        """``g(h)`` ``[..., d]``: the softmax input."""
        g = hidden if self.projection is None else ACTIVATIONS[self.activation](self.projection(hidden))
        return self.dropout(g)

    def forward(self, hidden: Tensor) -> Tensor:
        check_hidden(self, hidden, self.input_size)
        return torch.log_softmax(_upcast(self.decoder(self.features(hidden))), dim=-1)

    def log_prob(self, hidden: Tensor, targets: Tensor, chunk_size: int | None = None) -> Tensor:
        """``log p(targets | hidden)`` ``[...]``; ``chunk_size`` overrides the layer's."""
        check_hidden(self, hidden, self.input_size, targets)
        chunk = self.chunk_size if chunk_size is None else chunk_size
        g = self.features(hidden)
        weight, bias = self.decoder.weight, self.decoder.bias
        return target_logits(g, weight, bias, targets) - logsumexp_linear(g, weight, bias, chunk)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, vocab_size={self.vocab_size}, "
                f"softmax_input_size={self.softmax_input_size}, chunk_size={self.chunk_size}, "
                f"activation={self.activation!r}")
