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

``trans`` is a tensor or a :class:`~latentnlp.transitions.Transition`, e.g. a
:class:`~latentnlp.transitions.LowRankTransition` ``P = exp(log_left) @ exp(log_right)``:
every member then runs through the factors, except those whose docstring says it densifies.

Between two chains over the same states and lengths, :func:`cross_entropy` and the KL
divergence (``torch.distributions.kl_divergence(p, q)``) are exact, by dynamic programming.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import lazy_property

from . import chain
from .masks import lengths_to_mask
from .precision import computation_dtype
from .semirings import expected_score
from .transitions import DenseTransition, Transition
from .validation import describe, is_validating

__all__ = ["ChainPosterior", "cross_entropy"]

METHODS = ("auto", "scaled", "log", "scan", "blocked")


class ChainPosterior(Distribution):
    r"""A distribution over state sequences of a linear chain (HMM posterior or CRF).

    Args:
        init: ``[K]`` or ``[B, K]``, ``init[..., k]`` = score of ``z_0 = k``.
        trans: a :class:`~latentnlp.transitions.Transition`, or a tensor ``[K, K]``,
            ``[B, K, K]`` or ``[B, T-1, K, K]`` (wrapped in a
            :class:`~latentnlp.transitions.DenseTransition`); ``trans[..., i, j]`` is the score
            of ``z_{t-1} = i -> z_t = j`` (row = from, column = to); in the time-varying form
            ``trans[:, t-1]`` scores the edge into position ``t``.
        emit: ``[B, T, K]``, score of observation ``t`` under state ``k``.
        lengths: ``[B]`` long in ``1..T`` (default: all ``T``).  Positions at or past a length
            never change a value or a gradient.
        method: ``"scaled"`` (probability space, hand-written backward; first-order
            gradients only; rows where scaling underflowed keep the probability-space value),
            ``"log"`` (log space, autograd; any order), ``"scan"`` (parallel prefix, for long
            chains with few states; dense), ``"blocked"`` (the scaled quantities through
            products of blocks of steps, ``O(sqrt T)`` sequential steps for ``O(T K^3)``
            arithmetic, with flagged rows redone in log space as for ``"auto"``; first-order;
            :func:`latentnlp.chain.blocked_log_partition`) or ``"auto"`` (scaled, or blocked for
            long chains with few states on the CPU by the measured rule of
            :func:`latentnlp.chain.prefers_blocked`, with the rows the kernel flags as underflowed
            redone in log space).  ``"blocked"`` and ``"auto"`` also pick the blocked kernels of
            :attr:`argmax`, :meth:`sample` and :meth:`entropy` (see each).
        validate_args: torch's switch (``None``: the global default,
            :func:`latentnlp.validation.is_validating`).  When validating, the checks that
            synchronise with the device run: lengths in ``1..T``, no NaN or ``+inf`` score,
            states of :meth:`log_prob`'s paths in range.  Shape checks always run.

    Scores may be ``-inf`` (structural zeros); NaN and ``+inf`` are rejected when validating
    (unvalidated, a NaN propagates into the results).  Half precision is computed in float32.
    Everything is in log space except :attr:`marginals`, :attr:`edge_marginals` and
    :attr:`final_filter`.  The scaled kernel itself synchronises once a call, to choose its
    shift (every state reachable or not), and ``"auto"`` once more, to find underflowed rows.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self,
        init: Tensor,
        trans: Tensor | Transition,
        emit: Tensor,
        lengths: Tensor | None = None,
        method: str = "auto",
        validate_args: bool | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        validating = is_validating(validate_args)
        self.init, self.transition, self.emit, self.lengths = self._canonical(init, trans, emit, lengths, validating)
        batch, steps, _ = self.emit.shape
        super().__init__(batch_shape=torch.Size([batch]), event_shape=torch.Size([steps]), validate_args=validate_args)
        if self._validate_args:
            self._check_finite()

    # ---- input handling ---------------------------------------------------------------------
    @staticmethod
    def _canonical(init, trans, emit, lengths, validating: bool):
        for name, x in (("init", init), ("emit", emit)):
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise ValueError(
                    f"{name} must be a floating-point tensor, got {type(x).__name__}"
                    + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else "")
                )
        transition = trans if isinstance(trans, Transition) else DenseTransition(trans)
        if emit.dim() != 3:
            raise ValueError(f"emit must have shape [B, T, K], got {describe(emit)}")
        batch, steps, k = emit.shape
        if steps < 1 or k < 1:
            raise ValueError(f"emit must have T >= 1 and K >= 1, got {describe(emit)}")
        if init.dim() not in (1, 2) or init.shape[-1] != k or (init.dim() == 2 and init.shape[0] != batch):
            raise ValueError(
                f"init must have shape [K] or [B, K] = [{k}] or [{batch}, {k}] to match emit "
                f"{describe(emit)}, got {describe(init)}"
            )
        transition.check_shape(batch, steps, k)
        full = lengths is None  # every chain has length T: no padding to zero
        if full:
            lengths = torch.full((batch,), steps, dtype=torch.long, device=emit.device)
        if not isinstance(lengths, Tensor) or lengths.shape != (batch,) or lengths.is_floating_point():
            raise ValueError(
                f"lengths must be an integer tensor of shape [B] = [{batch}], got "
                + (f"{lengths.dtype} {describe(lengths)}" if isinstance(lengths, Tensor) else type(lengths).__name__)
            )
        lengths = lengths.to(device=emit.device, dtype=torch.long)
        if validating and batch and not full:
            low, high = torch.stack([lengths.min(), lengths.max()]).tolist()
            if low < 1 or high > steps:
                raise ValueError(f"lengths must lie in 1..T = 1..{steps}, got values from {low} to {high}")
            full = low == steps
        dtype = computation_dtype(init.dtype, transition.dtype, emit.dtype)
        init, transition, emit = init.to(dtype), transition.to(dtype), emit.to(dtype)
        if init.dim() == 1:
            init = init.expand(batch, k)
        if full or not batch:
            return init, transition, emit, lengths
        # padding never reaches the kernels: zero it (this also zeroes its gradient)
        mask = lengths_to_mask(lengths, steps)
        emit = torch.where(mask.unsqueeze(-1), emit, torch.zeros((), dtype=dtype, device=emit.device))
        return init, transition.without_padding(mask[:, 1:]), emit, lengths

    def _check_finite(self) -> None:
        for name, x in (("init", self.init), ("emit", self.emit)):
            if x.numel() and not bool(x.amax() < float("inf")):  # one reduction: False for NaN and +inf
                bad = ~(x < float("inf"))
                raise ValueError(
                    f"{name} ({describe(x)}) contains NaN or +inf at "
                    f"{int(bad.sum())} positions; scores must be finite or -inf"
                )
        self.transition.check_finite()

    @classmethod
    def from_edges(cls, edges: Tensor, lengths: Tensor | None = None, **kwargs) -> ChainPosterior:
        r"""A chain from torch-struct ``LinearChainCRF`` edge potentials.

        ``edges [B, N-1, C, C]`` with torch-struct's index convention
        ``edges[b, n, c_next, c_prev]`` = score of ``(z_n = c_prev, z_{n+1} = c_next)``
        (unary scores folded into the edges), ``lengths [B]`` = number of positions ``N``.
        Converted to ``init = 0``, ``emit = 0`` and ``trans[b, n] = edges[b, n]^T``
        (row = from, column = to).
        """
        if not isinstance(edges, Tensor) or edges.dim() != 4 or edges.shape[-1] != edges.shape[-2]:
            raise ValueError(
                "edges must have shape [B, N-1, C, C], got "
                + (describe(edges) if isinstance(edges, Tensor) else type(edges).__name__)
            )
        batch, num_edges, k, _ = edges.shape
        zeros = edges.new_zeros(batch, num_edges + 1, k)
        # a copy, not a view: the chain must not change if the caller's tensor is later modified
        return cls(edges.new_zeros(batch, k), edges.transpose(-1, -2).clone(), zeros, lengths, **kwargs)

    # ---- sums -------------------------------------------------------------------------------
    def _forward(self, init: Tensor, transition: Transition, emit: Tensor, method: str | None = None):
        """``(log Z [B], final filter [B, K] or None)`` by ``method`` (default :attr:`method`)."""
        method = method or self.method
        if method == "log":
            return chain.log_space_forward(init, transition, emit, self.lengths)
        if method == "scan":
            return chain.scan_log_partition(init, transition, emit, self.lengths), None
        kernel = chain.blocked_log_partition if self._blocked(method, transition, emit) else chain.scaled_log_partition
        log_z, final_filter, underflowed = kernel(init, transition, emit, self.lengths)
        if method in ("auto", "blocked") and bool(underflowed.any()):
            return self._redo_underflowed(kernel, init, transition, emit, log_z, final_filter, underflowed)
        return log_z, final_filter

    def _blocked(self, method: str | None = None, transition: Transition | None = None, emit: Tensor | None = None):
        """Whether ``method`` (default :attr:`method`) takes the blocked kernels for ``transition`` and ``emit``
        (default the chain's): ``"blocked"``, or ``"auto"`` where :func:`latentnlp.chain.prefers_blocked` says
        so (one rule for the sum and the sampler's filters; Viterbi and the entropy have their own)."""
        method = method or self.method
        transition = self.transition if transition is None else transition
        emit = self.emit if emit is None else emit
        return method == "blocked" or (method == "auto" and chain.prefers_blocked(transition, emit))

    def _redo_underflowed(self, kernel, init, transition, emit, log_z, final_filter, underflowed):
        """``log Z`` with the flagged rows recomputed in log space.  When gradients are needed the
        other rows are recomputed by the probability-space ``kernel`` alone, so that no gradient passes
        through the flagged rows' probability-space pass (whose lost precision may hold ``0 * inf``)."""
        flagged = underflowed.nonzero().squeeze(-1)
        redone, redone_filter = chain.log_space_forward(
            init[flagged], transition.select_rows(flagged), emit[flagged], self.lengths[flagged]
        )
        if log_z.requires_grad:
            kept = (~underflowed).nonzero().squeeze(-1)
            log_z = log_z.detach()
            if kept.numel():
                kept_log_z, _, _ = kernel(init[kept], transition.select_rows(kept), emit[kept], self.lengths[kept])
                log_z = log_z.index_put((kept,), kept_log_z)
        log_z = log_z.index_put((flagged,), redone)
        return log_z, final_filter.index_put((flagged,), redone_filter)

    @lazy_property
    def _forward_result(self):
        return self._forward(self.init, self.transition, self.emit)

    @lazy_property
    def log_partition(self) -> Tensor:
        """``log sum_z exp s(z)`` (``= log p(x)`` for an HMM): ``[B]``.  Through the factors of a
        low-rank transition (``"scan"`` densifies)."""
        return self._forward_result[0]

    @lazy_property
    def final_filter(self) -> Tensor:
        r"""The last filtering distribution ``p(z_{L-1} = k | x_{\le L-1})``: ``[B, K]``, not differentiable.

        What a stream carries into its next chunk: pushed through one transition it is the next
        chunk's initial distribution.  A by-product of :attr:`log_partition` (no extra pass,
        except for ``method="scan"``, which runs the log-space forward for it); never densifies.
        """
        final_filter = self._forward_result[1]
        if final_filter is None:
            _, final_filter = chain.log_space_forward(
                self.init.detach(), self.transition.detach(), self.emit.detach(), self.lengths
            )
        return final_filter.detach()

    def _requires_grad(self) -> bool:
        return torch.is_grad_enabled() and (
            self.init.requires_grad or self.emit.requires_grad or self.transition.requires_grad
        )

    def _gradients_of_log_partition(self, wrt_trans: Tensor | None = None, method: str | None = None):
        """Gradients of ``sum_b log Z_b`` w.r.t. ``init [B, K]``, ``emit`` (and the dense ``wrt_trans``,
        if given, standing in for the transition); the graph is kept when the parameters require grad."""
        differentiable = self._requires_grad()

        def leaf(x: Tensor) -> Tensor:
            x = x if differentiable else x.detach()
            return x if x.requires_grad else x.detach().clone().requires_grad_()

        init, emit = leaf(self.init), leaf(self.emit)
        if wrt_trans is None:
            transition = self.transition if differentiable else self.transition.detach()
        else:
            transition = DenseTransition(wrt_trans)
        with torch.enable_grad():
            log_z, _ = self._forward(init, transition, emit, method)
            inputs = (init, emit) if wrt_trans is None else (init, emit, wrt_trans)
            return torch.autograd.grad(log_z.sum(), inputs, create_graph=differentiable, allow_unused=True)

    @lazy_property
    def marginals(self) -> Tensor:
        """Posterior marginals ``p(z_t = k)``: ``[B, T, K]``, zero at padding.

        The gradient of :attr:`log_partition` w.r.t. ``emit`` (through the factors of a low-rank
        transition).  Differentiable again when the parameters require grad and ``method`` is
        ``"log"`` or ``"scan"``.
        """
        _, grad_emit = self._gradients_of_log_partition()
        return grad_emit

    def _dense_pairs(self, time_varying: bool) -> Tensor:
        """The dense log transition laid out per row, ``[B, K, K]`` or ``[B, T-1, K, K]``, to be
        differentiated: its gradient is the edge marginals (summed over ``t`` in ``[B, K, K]``)."""
        batch, steps, k = self.emit.shape
        trans = self.transition.dense() if self._requires_grad() else self.transition.dense().detach()
        if time_varying:
            if trans.dim() != 4:
                source = trans if trans.dim() == 2 else trans.unsqueeze(1)
                trans = source.expand(batch, steps - 1, k, k)
        elif trans.dim() == 2:
            trans = trans.expand(batch, k, k)
        return trans if trans.requires_grad else trans.detach().clone().requires_grad_()

    @lazy_property
    def edge_marginals(self) -> Tensor:
        """Pairwise marginals ``p(z_t = i, z_{t+1} = j)``: ``[B, T-1, K, K]`` (dense: only on request;
        a low-rank transition is densified).  Zero where ``t + 1`` is at or past the length.
        """
        batch, steps, k = self.emit.shape
        if steps == 1:
            return self.emit.new_zeros(batch, 0, k, k)
        pairs = self._dense_pairs(time_varying=True)
        _, _, grad_trans = self._gradients_of_log_partition(wrt_trans=pairs)
        return grad_trans if grad_trans is not None else torch.zeros_like(pairs)

    def entropy(self) -> Tensor:
        """Exact entropy ``-sum_z p(z) log p(z)``: ``[B]`` (differentiable).

        By :func:`latentnlp.chain.chain_entropy` (the scaled forward-backward, ``log Z - E_p[s]``, flagged
        rows by an exact log-space recursion; a hand-written gradient); when no gradient is needed and
        ``method="blocked"``, or ``"auto"`` where :func:`latentnlp.chain.prefers_blocked_entropy` says so
        (the entropy's own measured rule), by :func:`latentnlp.chain.blocked_entropy` (``O(sqrt T)``
        sequential steps), with the chains it flags recomputed by the recursion.  Densifies a low-rank
        transition (``P log P`` does not factor): ``O(K^2)`` memory.
        """
        auto = self.method == "auto" and chain.prefers_blocked_entropy(self.transition, self.emit)
        if not (self.method == "blocked" or auto) or self._requires_grad():
            return chain.chain_entropy(self.init, self.transition, self.emit, self.lengths)
        entropy, flagged = chain.blocked_entropy(self.init, self.transition, self.emit, self.lengths)
        if bool(flagged.any()):
            rows = flagged.nonzero().squeeze(-1)
            redone = chain.chain_entropy(
                self.init[rows], self.transition.select_rows(rows), self.emit[rows], self.lengths[rows]
            )
            entropy = entropy.index_put((rows,), redone.detach())
        return entropy

    # ---- maxima -----------------------------------------------------------------------------
    @lazy_property
    def argmax(self) -> Tensor:
        """The Viterbi path ``argmax_z s(z)``: ``[B, T]`` long, padding 0 (densifies a low-rank transition).

        By :func:`latentnlp.chain.viterbi`, or :func:`latentnlp.chain.blocked_viterbi` for ``method="blocked"``,
        or ``"auto"`` where :func:`latentnlp.chain.prefers_blocked_viterbi` says so.
        Among tied optima either may return any maximiser.
        """
        blocked = self.method == "blocked" or (
            self.method == "auto" and chain.prefers_blocked_viterbi(self.transition, self.emit)
        )
        decode = chain.blocked_viterbi if blocked else chain.viterbi
        return decode(self.init, self.transition, self.emit, self.lengths)

    @lazy_property
    def max(self) -> Tensor:
        """``max_z s(z)``, the score of :attr:`argmax`: ``[B]`` (differentiable: a subgradient; densifies a
        low-rank transition, for the Viterbi path)."""
        return self.score(self.argmax)

    @property
    def mode(self) -> Tensor:
        return self.argmax

    def kbest(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` best paths and their scores: ``([k, B, T], [k, B])``, best first (densifies a
        low-rank transition)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return chain.kbest_viterbi(self.init, self.transition, self.emit, self.lengths, k)

    # ---- samples and scores -----------------------------------------------------------------
    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        """Exact samples by forward filtering, backward sampling: ``sample_shape + [B, T]`` long.

        The filters by :func:`latentnlp.chain.forward_filter`, or by
        :func:`latentnlp.chain.blocked_forward_filter` where the blocked kernels are taken
        (``method="blocked"``, or ``"auto"`` by :func:`latentnlp.chain.prefers_blocked`; dense), then
        :func:`latentnlp.chain.backward_sample`.  Otherwise through the rank of a low-rank transition
        (no ``K x K`` matrix).
        """
        sample_shape = torch.Size(sample_shape)
        if sample_shape.numel() == 0 or self.batch_shape.numel() == 0:
            return torch.zeros(sample_shape + self.emit.shape[:2], dtype=torch.long, device=self.emit.device)
        transition = self.transition.detach()
        filters = chain.blocked_forward_filter if self._blocked() else chain.forward_filter
        log_filter = filters(self.init.detach(), transition, self.emit.detach(), self.lengths)
        paths = chain.backward_sample(log_filter, transition, self.lengths, sample_shape.numel(), generator)
        return paths.reshape(sample_shape + paths.shape[1:])

    def score(self, value: Tensor) -> Tensor:
        """``s(z)`` of paths ``value [*, B, T]`` (entries past the length ignored): ``[*, B]``.

        Only the path's own edges are scored (``O(T r)`` for a low-rank transition).
        """
        self._check_path(value)
        return chain.path_score(self.init, self.transition, self.emit, self.lengths, value)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log p(z) = s(z) - log Z`` for ``value [*, B, T]``: ``[*, B]``."""
        return self.score(value) - self.log_partition

    def _check_path(self, value: Tensor) -> None:
        batch, steps, k = self.emit.shape
        if value.dim() < 2 or tuple(value.shape[-2:]) != (batch, steps) or value.is_floating_point():
            raise ValueError(
                f"value must be an integer tensor of shape [*, B, T] = [*, {batch}, {steps}], "
                f"got {value.dtype} {describe(value)}"
            )
        if not self._validate_args or not value.numel():
            return
        inside = value[..., lengths_to_mask(self.lengths, steps)]
        if inside.numel() and (inside.min() < 0 or inside.max() >= k):
            raise ValueError(f"value holds states outside 0..K-1 = 0..{k - 1}")

    # ---- divergences ------------------------------------------------------------------------
    def cross_entropy(self, other: ChainPosterior) -> Tensor:
        """``-E_p[log q(z)]`` with ``p = self``, ``q = other``: ``[B]``.  See :func:`cross_entropy`."""
        return cross_entropy(self, other)

    @property
    def support(self):
        return constraints.integer_interval(0, self.emit.shape[-1] - 1)

    def __repr__(self) -> str:
        batch, steps, k = self.emit.shape
        shapes = ", ".join(str(tuple(p.shape)) for p in self.transition.parameters)
        return (
            f"ChainPosterior(B={batch}, T={steps}, K={k}, trans={type(self.transition).__name__}({shapes}), "
            f"method={self.method!r})"
        )


def _check_comparable(p: ChainPosterior, q: ChainPosterior) -> None:
    if not isinstance(p, ChainPosterior) or not isinstance(q, ChainPosterior):
        raise ValueError(f"p and q must be ChainPosteriors, got {type(p).__name__} and {type(q).__name__}")
    if p.emit.shape != q.emit.shape:
        raise ValueError(
            f"p and q must have the same [B, T, K], got emit shapes {tuple(p.emit.shape)} and {tuple(q.emit.shape)}"
        )
    if p._validate_args and not torch.equal(p.lengths, q.lengths.to(p.lengths.device)):
        raise ValueError(f"p and q must have equal lengths, got {p.lengths.tolist()} and {q.lengths.tolist()}")


def cross_entropy(p: ChainPosterior, q: ChainPosterior) -> Tensor:
    r"""``H(p, q) = -E_p[log q(z)] = log Z_q - E_p[s_q(z)]`` for two chains over the same states: ``[B]``.

    By dynamic programming, no enumeration:

    .. math:: E_p[s_q(z)] = \sum_k p(z_0 = k)\, \mathrm{init}_q[k] + \sum_{t,k} p(z_t = k)\, \mathrm{emit}_q[t, k]
              + \sum_{t,i,j} \xi^p_t(i, j)\, \mathrm{trans}_{q,t}[i, j]

    with ``p``'s marginals and edge marginals ``xi^p`` as gradients of ``log Z_p``.  When neither
    transition is time-varying only ``sum_t xi^p_t`` is needed: the gradient of ``log Z_p``
    w.r.t. ``p``'s transition laid out per row (``[B, K, K]``), never the ``[B, T-1, K, K]``
    edge tensor.  A low-rank transition on either side is densified (``log q`` of a product
    of factors does not factor): ``O(B K^2)`` memory.  Differentiable in both chains (the
    gradient through ``p`` uses its log-space forward, which is twice differentiable).
    ``B``, ``T`` and ``K`` must match, and (when ``p`` validates) the lengths.
    """
    _check_comparable(p, q)
    q_trans = q.transition.dense()
    time_varying = p.transition.time_varying or q.transition.time_varying
    method = "log" if p._requires_grad() else None
    if p.emit.shape[1] == 1:
        first, states = p._gradients_of_log_partition(method=method)
        pair_term = torch.zeros_like(q.log_partition)
    else:
        pairs = p._dense_pairs(time_varying)
        first, states, edges = p._gradients_of_log_partition(wrt_trans=pairs, method=method)
        if time_varying and q_trans.dim() == 3:
            q_trans = q_trans.unsqueeze(1)
        pair_term = expected_score(edges, q_trans, tuple(range(1, edges.dim())))
    expected = expected_score(first, q.init, (-1,)) + expected_score(states, q.emit, (-2, -1)) + pair_term
    return q.log_partition - expected


@register_kl(ChainPosterior, ChainPosterior)
def _kl_chain_chain(p: ChainPosterior, q: ChainPosterior) -> Tensor:
    """``KL(p || q) = H(p, q) - H(p)``: :func:`cross_entropy` minus :meth:`ChainPosterior.entropy`, ``[B]``."""
    return cross_entropy(p, q) - p.entropy()
