r"""Distributions over structures: :class:`ChainPosterior` (HMM posteriors and linear-chain CRFs).

``ChainPosterior(init, trans, emit, lengths)`` is the distribution

.. math:: p(z) = \exp(s(z) - \log Z), \qquad
          s(z) = \mathrm{init}[z_0] + \sum_{t<L} \mathrm{emit}[t, z_t]
                 + \sum_{1 \le t < L} \mathrm{trans}_t[z_{t-1}, z_t]

over state sequences of each batch element's length ``L``.  For an HMM,
``init``, ``trans`` and ``emit`` are the log initial, transition and emission
probabilities of the observed ``x``, so ``log Z = log p(x)`` and ``p(z)`` is
the posterior ``p(z | x)``::

    init = torch.log_softmax(torch.randn(K), -1)            # log p(z_0)
    trans = torch.log_softmax(torch.randn(K, K), -1)        # log p(z_t = j | z_{t-1} = i)
    emit = torch.log_softmax(torch.randn(K, V), -1)[:, x].transpose(-1, -2)  # [B, T, K]
    posterior = ChainPosterior(init, trans, emit, lengths)
    posterior.log_partition       # log p(x), [B]

For a linear-chain CRF the same class takes arbitrary scores, e.g.
``emit = features @ weights`` and ``trans`` a learned ``[K, K]`` matrix, and
``-posterior.log_prob(tags)`` is the CRF's negative log-likelihood.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.utils import lazy_property

from . import chain
from .semirings import LogSemiring

METHODS = ("auto", "scaled", "log", "scan")


def _describe(x: Tensor) -> str:
    return f"shape {tuple(x.shape)}"


class ChainPosterior(Distribution):
    r"""A distribution over state sequences of a linear chain (HMM posterior or CRF).

    Args:
        init: ``[K]`` or ``[B, K]``, ``init[..., k]`` = score of ``z_0 = k``.
        trans: ``[K, K]``, ``[B, K, K]`` or ``[B, T-1, K, K]``; ``trans[..., i, j]`` is the
            score of ``z_{t-1} = i -> z_t = j`` (row = from, column = to); in the time-varying
            form ``trans[:, t-1]`` scores the edge into position ``t``.
        emit: ``[B, T, K]``, score of observation ``t`` under state ``k``.
        lengths: ``[B]`` long in ``1..T`` (default: all ``T``).  Positions at or past a length
            never change a value or a gradient.
        method: ``"scaled"`` (probability space, hand-written backward; first-order
            gradients only), ``"log"`` (log space, autograd; any order), ``"scan"``
            (parallel prefix, for long chains with few states) or ``"auto"`` (scaled, falling
            back to log space if scaling underflows).

    Scores may be ``-inf`` (structural zeros); NaN and ``+inf`` are rejected.  Half precision
    is computed in float32.  Everything is in log space except :attr:`marginals`.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, init: Tensor, trans: Tensor, emit: Tensor, lengths: Tensor | None = None,
                 method: str = "auto", validate_args: bool | None = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        init, trans, emit, lengths = self._canonical(init, trans, emit, lengths)
        self.init, self.trans, self.emit, self.lengths = init, trans, emit, lengths
        batch, steps, _ = emit.shape
        super().__init__(batch_shape=torch.Size([batch]), event_shape=torch.Size([steps]),
                         validate_args=validate_args)
        if self._validate_args:
            self._check_finite()

    # ---- input handling ---------------------------------------------------------------------
    @staticmethod
    def _canonical(init, trans, emit, lengths):
        for name, x in (("init", init), ("trans", trans), ("emit", emit)):
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {type(x).__name__}"
                                 + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
        if emit.dim() != 3:
            raise ValueError(f"emit must have shape [B, T, K], got {_describe(emit)}")
        batch, steps, k = emit.shape
        if steps < 1 or k < 1:
            raise ValueError(f"emit must have T >= 1 and K >= 1, got {_describe(emit)}")
        if init.dim() not in (1, 2) or init.shape[-1] != k or (init.dim() == 2 and init.shape[0] != batch):
            raise ValueError(f"init must have shape [K] or [B, K] = [{k}] or [{batch}, {k}] to match emit "
                             f"{_describe(emit)}, got {_describe(init)}")
        expected = {2: (k, k), 3: (batch, k, k), 4: (batch, steps - 1, k, k)}
        if trans.dim() not in expected or tuple(trans.shape) != expected[trans.dim()]:
            raise ValueError(f"trans must have shape [K, K], [B, K, K] or [B, T-1, K, K] with B={batch}, "
                             f"T={steps}, K={k} (from emit {_describe(emit)}), got {_describe(trans)}")
        if lengths is None:
            lengths = torch.full((batch,), steps, dtype=torch.long, device=emit.device)
        if not isinstance(lengths, Tensor) or lengths.shape != (batch,) or lengths.is_floating_point():
            raise ValueError(f"lengths must be an integer tensor of shape [B] = [{batch}], got "
                             + (_describe(lengths) if isinstance(lengths, Tensor) else type(lengths).__name__))
        lengths = lengths.to(device=emit.device, dtype=torch.long)
        if batch and (lengths.min() < 1 or lengths.max() > steps):
            raise ValueError(f"lengths must lie in 1..T = 1..{steps}, got values from {int(lengths.min())} "
                             f"to {int(lengths.max())}")
        dtype = torch.promote_types(torch.promote_types(init.dtype, trans.dtype), emit.dtype)
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        init, trans, emit = init.to(dtype), trans.to(dtype), emit.to(dtype)
        if init.dim() == 1:
            init = init.expand(batch, k)
        if batch and int(lengths.min()) == steps:
            return init, trans, emit, lengths
        # padding never reaches the kernels: zero it (this also zeroes its gradient)
        mask = chain.step_mask(lengths, steps)
        emit = torch.where(mask.unsqueeze(-1), emit, torch.zeros((), dtype=dtype, device=emit.device))
        if trans.dim() == 4:
            trans = torch.where(mask[:, 1:, None, None], trans, torch.zeros((), dtype=dtype, device=emit.device))
        return init, trans, emit, lengths

    def _check_finite(self) -> None:
        for name, x in (("init", self.init), ("trans", self.trans), ("emit", self.emit)):
            bad = torch.isnan(x) | (x == float("inf"))
            if bad.any():
                raise ValueError(f"{name} ({_describe(x)}) contains NaN or +inf at "
                                 f"{int(bad.sum())} positions; scores must be finite or -inf")

    @classmethod
    def from_edges(cls, edges: Tensor, lengths: Tensor | None = None, **kwargs) -> "ChainPosterior":
        r"""A chain from torch-struct ``LinearChainCRF`` edge potentials.

        ``edges [B, N-1, C, C]`` with torch-struct's index convention
        ``edges[b, n, c_next, c_prev]`` = score of ``(z_n = c_prev, z_{n+1} = c_next)``
        (unary scores folded into the edges), ``lengths [B]`` = number of positions ``N``.
        Converted to ``init = 0``, ``emit = 0`` and ``trans[b, n] = edges[b, n]^T``
        (row = from, column = to).
        """
        if not isinstance(edges, Tensor) or edges.dim() != 4 or edges.shape[-1] != edges.shape[-2]:
            raise ValueError(f"edges must have shape [B, N-1, C, C], got "
                             + (_describe(edges) if isinstance(edges, Tensor) else type(edges).__name__))
        batch, num_edges, k, _ = edges.shape
        zeros = edges.new_zeros(batch, num_edges + 1, k)
        # a copy, not a view: the chain must not change if the caller's tensor is later modified
        return cls(edges.new_zeros(batch, k), edges.transpose(-1, -2).clone(), zeros, lengths, **kwargs)

    # ---- sums -------------------------------------------------------------------------------
    def _log_partition_of(self, init, trans, emit) -> Tensor:
        method = self.method
        if method == "log":
            return chain.log_space_forward(init, trans, emit, self.lengths, LogSemiring)
        if method == "scan":
            return chain.scan_log_partition(init, trans, emit, self.lengths)
        log_z = chain.scaled_log_partition(init, trans, emit, self.lengths)
        if method == "auto" and not torch.isfinite(log_z).all():
            # scaling underflowed (or some chains admit no path): redo in log space
            return chain.log_space_forward(init, trans, emit, self.lengths, LogSemiring)
        return log_z

    @lazy_property
    def log_partition(self) -> Tensor:
        """``log sum_z exp s(z)`` (``= log p(x)`` for an HMM): ``[B]``."""
        return self._log_partition_of(self.init, self.trans, self.emit)

    def _gradients_of_log_partition(self, wrt_trans: Tensor | None = None):
        """Gradients of ``sum_b log Z_b`` w.r.t. ``emit`` (and ``wrt_trans`` if given)."""
        differentiable = torch.is_grad_enabled() and any(
            x.requires_grad for x in (self.init, self.trans, self.emit))
        emit = self.emit if differentiable and self.emit.requires_grad else self.emit.detach().requires_grad_()
        init = self.init if differentiable else self.init.detach()
        trans = wrt_trans if wrt_trans is not None else (self.trans if differentiable else self.trans.detach())
        with torch.enable_grad():
            log_z = self._log_partition_of(init, trans, emit)
            inputs = (emit,) if wrt_trans is None else (emit, wrt_trans)
            return torch.autograd.grad(log_z.sum(), inputs, create_graph=differentiable, allow_unused=True)

    @lazy_property
    def marginals(self) -> Tensor:
        """Posterior marginals ``p(z_t = k)``: ``[B, T, K]``, zero at padding.

        The gradient of :attr:`log_partition` w.r.t. ``emit``.  Differentiable again when the
        parameters require grad and ``method`` is ``"log"`` or ``"scan"``.
        """
        (grad_emit,) = self._gradients_of_log_partition()
        return grad_emit

    @lazy_property
    def edge_marginals(self) -> Tensor:
        """Pairwise marginals ``p(z_t = i, z_{t+1} = j)``: ``[B, T-1, K, K]`` (dense: only on request).

        Zero where ``t + 1`` is at or past the length.
        """
        batch, steps, k = self.emit.shape
        if steps == 1:
            return self.emit.new_zeros(batch, 0, k, k)
        if self.trans.dim() == 4:
            expanded = self.trans
        else:
            source = self.trans if self.trans.dim() == 2 else self.trans.unsqueeze(1)
            expanded = source.expand(batch, steps - 1, k, k)
        expanded = expanded.detach().clone().requires_grad_() if not expanded.requires_grad else expanded
        _, grad_trans = self._gradients_of_log_partition(wrt_trans=expanded)
        return grad_trans if grad_trans is not None else torch.zeros_like(expanded)

    def entropy(self) -> Tensor:
        """Exact entropy ``-sum_z p(z) log p(z)`` by a forward recursion: ``[B]`` (differentiable)."""
        return chain.chain_entropy(self.init, self.trans, self.emit, self.lengths)

    # ---- maxima -----------------------------------------------------------------------------
    @lazy_property
    def argmax(self) -> Tensor:
        """The Viterbi path ``argmax_z s(z)``: ``[B, T]`` long, padding 0."""
        return chain.viterbi(self.init, self.trans, self.emit, self.lengths)

    @lazy_property
    def max(self) -> Tensor:
        """``max_z s(z)``, the score of :attr:`argmax`: ``[B]`` (differentiable: a subgradient)."""
        return self.score(self.argmax)

    @property
    def mode(self) -> Tensor:
        return self.argmax

    def kbest(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` best paths and their scores: ``([k, B, T], [k, B])``, best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return chain.kbest_viterbi(self.init, self.trans, self.emit, self.lengths, k)

    # ---- samples and scores -----------------------------------------------------------------
    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        """Exact samples by forward filtering, backward sampling: ``sample_shape + [B, T]`` long."""
        sample_shape = torch.Size(sample_shape)
        log_filter = chain.forward_filter(self.init.detach(), self.trans.detach(), self.emit.detach(),
                                          self.lengths)
        paths = chain.backward_sample(log_filter, self.trans.detach(), self.lengths,
                                      max(sample_shape.numel(), 1), generator)
        return paths.reshape(sample_shape + paths.shape[1:])

    def score(self, value: Tensor) -> Tensor:
        """``s(z)`` of paths ``value [*, B, T]`` (entries past the length ignored): ``[*, B]``."""
        self._check_path(value)
        return chain.path_score(self.init, self.trans, self.emit, self.lengths, value)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log p(z) = s(z) - log Z`` for ``value [*, B, T]``: ``[*, B]``."""
        return self.score(value) - self.log_partition

    def _check_path(self, value: Tensor) -> None:
        batch, steps, k = self.emit.shape
        if value.dim() < 2 or tuple(value.shape[-2:]) != (batch, steps) or value.is_floating_point():
            raise ValueError(f"value must be an integer tensor of shape [*, B, T] = [*, {batch}, {steps}], "
                             f"got {value.dtype} {_describe(value)}")
        mask = chain.step_mask(self.lengths, steps)
        inside = value[..., mask] if value.numel() else value
        if inside.numel() and (inside.min() < 0 or inside.max() >= k):
            raise ValueError(f"value holds states outside 0..K-1 = 0..{k - 1}")

    @property
    def support(self):
        return constraints.integer_interval(0, self.emit.shape[-1] - 1)

    def __repr__(self) -> str:
        batch, steps, k = self.emit.shape
        return f"ChainPosterior(B={batch}, T={steps}, K={k}, trans={tuple(self.trans.shape)}, method={self.method!r})"
