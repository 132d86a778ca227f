r"""A chain's transition as an object: the few operations the dynamic programs need.

A chain of length ``T`` over ``K`` states has a transition score ``trans_t[i, j]`` for the edge
``z_{t-1} = i -> z_t = j`` into each position ``1 <= t < T`` (row = from, column = to).  The
kernels of :mod:`latentnlp.chain` never index a transition tensor themselves; they ask a
:class:`Transition` to

* propagate a belief in probability space, ``alpha @ P_t`` forward and ``P_t @ u`` back, with
  ``P_t = exp(trans_t - s_t)`` shifted once for the whole recursion
  (:meth:`Transition.probabilities`, one BLAS call a step),
* propagate a log belief, ``b'_j = log sum_i exp(b_i + trans_t[i, j])`` (:meth:`Transition.log_propagator`,
  the :class:`~latentnlp.semirings.LogSemiring` product),
* score the edges of paths (:meth:`Transition.edge_scores`),
* sample a previous state given the next one (:meth:`Transition.sample_previous`, backward
  sampling) or a next state given the previous one (:meth:`Transition.sample_next`, ancestral
  sampling),
* give the dense log matrix, only on request (:meth:`Transition.dense`).

Two kinds:

* :class:`DenseTransition` holds the log tensor: ``[K, K]`` (shared by the batch and the
  positions), ``[B, K, K]`` (one per batch element) or ``[B, T-1, K, K]`` (time-varying,
  ``log[:, t-1]`` scores the edge into position ``t``).
* :class:`LowRankTransition` holds two log factors, ``P = exp(log_left) @ exp(log_right)``
  with ``log_left [K, r]``, ``log_right [r, K]`` (shared), so that ``trans = log P`` has rank
  ``r`` in probability space and a step costs ``O(B K r)`` instead of ``O(B K^2)``.  For an
  HMM the rows of both factors are distributions; any non-negative scores are allowed.

Transitions are immutable; :meth:`Transition.detach` and :meth:`Transition.to` return new ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy
import torch
from torch import Tensor

from .gumbel import gumbel_argmax
from .semirings import LogSemiring, finite_max, logsumexp

__all__ = ["DenseTransition", "LowRankTransition", "Transition", "TransitionProbabilities"]


def shifted_exp(log: Tensor, dims: int) -> tuple[Tensor, Tensor]:
    """``exp(log - s)`` with ``s`` the max over the last ``dims`` dimensions (0 where all ``-inf``).

    Returns the probabilities (shape of ``log``) and ``s`` of shape ``log.shape[:-dims]``.
    """
    shift = finite_max(log, tuple(range(-dims, 0)))
    return torch.exp(log - shift), shift.reshape(log.shape[:-dims])


def rounded_away(probs: Tensor, log: Tensor) -> Tensor:
    """The chains whose shifted probabilities ``probs = exp(log - s)`` (``[K, K']``, ``[B, K, K']`` or
    ``[B, T-1, K, K']``) hold an entry rounded to 0 from a finite log score (one more than about 103 nats
    below its matrix's largest in float32, 745 in float64): ``[B]`` bool, or ``[]`` for one shared
    matrix (then every chain).  The probability-space kernels cannot see the paths through such an
    entry, which a large emission score further on may make the likeliest, so they flag these chains
    (``method="auto"`` redoes them in log space)."""
    rounded = (probs == 0) & (log > float("-inf"))
    return rounded.flatten(1).any(-1) if rounded.dim() > 2 else rounded.any()


def smallest_positive(probs: Tensor, dims: int) -> Tensor:
    """The smallest positive entry over the last ``dims`` dimensions of ``probs`` (``inf`` where none is):
    ``probs.shape[:-dims]``."""
    inf = torch.full((), float("inf"), dtype=probs.dtype, device=probs.device)
    if probs.numel() == 0:  # no step (T = 1) or no batch row
        return inf.expand(probs.shape[:-dims])
    return torch.where(probs > 0, probs, inf).amin(tuple(range(-dims, 0)))


class TransitionProbabilities(ABC):
    r"""A transition in probability space, shifted once for a whole recursion.

    ``P_t = exp(trans_t - s_t)`` with ``s_t`` a per-matrix shift (so the largest entry is 1),
    and ``sum_{1 <= t < L} s_t`` is added back to ``log Z`` by :meth:`log_shift_total`.
    Built by :meth:`Transition.probabilities`; the step operations allocate nothing beyond
    their output and take their per-step views once, outside the time loop.
    """

    @abstractmethod
    def forward(self, vector: Tensor, t: int, out: Tensor) -> Tensor:
        """``out[b] = vector[b] @ P_t[(b)]`` for ``vector [B, K]``, written into ``out [B, K]``."""

    @abstractmethod
    def backward(self, vector: Tensor, t: int, out: Tensor) -> Tensor:
        """``out[b] = P_t[(b)] @ vector[b]`` for ``vector [B, K]``, written into ``out [B, K]``."""

    def step_work(self, batch: int, states: int) -> int:
        """Multiply-adds of the largest single product in one step over ``batch`` rows of ``states``
        (``B K^2`` for a dense matrix): the size by which the chain kernels decide whether a step runs on
        numpy (:data:`~latentnlp.chain.ARRAY_LOOP_MAX_WORK`)."""
        return batch * states * states

    def array_steps(self) -> tuple[Callable, Callable] | None:
        """:meth:`forward` and :meth:`backward` over numpy arrays (views of CPU tensors), ``(forward, backward)``
        with the same ``(vector, t, out)`` arguments, or None when the transition has none (the kernels then
        step with torch).  A numpy call costs a fraction of a torch operation's dispatch, which is most of a
        step's time when ``B K^2`` is small (the kernels' CPU loops)."""
        return None

    def step_factors(self) -> tuple[Tensor, ...] | None:
        """The dense matrices whose Kronecker product every step multiplies by, for the scaled recursion's
        compiled time loops (:data:`~latentnlp.chain.COMPILED_LOOP_MAX_WORK`): ``(P,)`` where one dense
        matrix serves, ``[K, K]`` (shared) or ``[B, K, K]`` (one per chain); one ``[k, k]`` or
        ``[B, k, k]`` per axis of the ``k^L`` joint states for a product of chains
        (:class:`~latentnlp.factorial.ProductTransition`, factor ``l`` on axis ``l``); None when the steps
        differ or are not dense (time-varying, low-rank).  The factors are in the order of
        :attr:`Transition.parameters`, one each (:meth:`factor_gradients`)."""
        return None

    def factor_gradients(self, statistics: Tensor) -> tuple[Tensor, ...]:
        r"""The gradients of :meth:`parameter_gradients` from the step factors' edge statistics summed over
        the steps, ``statistics [B, F, k, k]`` (each row's already weighted by its incoming gradient):
        factor ``l`` (:meth:`step_factors`) is parameter ``l``, and
        ``d log Z / d log P^l = P^l * sum_b statistics[b, l]`` (per row for a ``[B, k, k]`` factor)."""
        factors = self.step_factors()
        return tuple(
            f * (statistics[:, ell] if f.dim() == 3 else statistics[:, ell].sum(0)) for ell, f in enumerate(factors)
        )

    @abstractmethod
    def dense(self) -> Tensor:
        """The shifted matrices ``P_t`` in the dense layout, ``[K, K]``, ``[B, K, K]`` or ``[B, T-1, K, K]``
        (a low-rank one multiplied out: ``O(K^2)`` memory)."""

    @abstractmethod
    def log_shift_total(self, edges: Tensor) -> Tensor:
        """``sum_t s_t * edges[b, t-1]`` for the edge mask ``edges [B, T-1]`` (float; float64 edges give a
        float64 total, as ``log Z`` is accumulated): ``[B]``."""

    @abstractmethod
    def all_positive(self) -> bool:
        """True when every ``P_t(i, j) > 0`` (synchronises with the device)."""

    @abstractmethod
    def smallest_entry(self) -> Tensor:
        """A lower bound on each chain's smallest positive ``P_t(i, j)`` over its steps: ``[B]``, or ``[]`` for
        all (``inf`` where none is positive).  The scaled forward's accuracy rests on it
        (:func:`~latentnlp.chain.normaliser_floor`)."""

    @abstractmethod
    def rounded_away(self) -> Tensor:
        """The chains (``[B]`` bool, or ``[]`` for all) whose shifted probabilities lost an entry of finite log
        score to rounding (:func:`rounded_away`); none can where :meth:`all_positive`."""

    @abstractmethod
    def parameter_gradients(self, alpha: Tensor, u: Tensor) -> tuple[Tensor, ...]:
        r"""Gradients of ``log Z`` w.r.t. the transition's log parameters.

        ``alpha [T-1, B, K]`` holds the filtering distributions ``alpha_{t-1}`` (already
        multiplied by the incoming gradient of each row) and ``u [T-1, B, K]`` the backward
        messages ``u_t = e_t * beta_t / c_t`` of the scaled algorithm (zero past the length), so
        that the edge marginals are ``xi_t(i, j) = alpha_{t-1}(i) P_t(i, j) u_t(j)``.  Returns
        one gradient per tensor of :attr:`Transition.parameters`, in that order.
        """


class Transition(ABC):
    r"""The transition scores ``trans_t[i, j]`` of a chain, ``1 <= t < T`` (row = from, column = to).

    Shapes: beliefs are ``[B, K]``, paths ``[*, B, T]``; a transition may also be rectangular
    (``K_from != K_to``) for a single propagation, e.g. a stream's carried belief pushed into
    a different set of states.
    """

    # ---- parameters -------------------------------------------------------------------------
    @property
    @abstractmethod
    def parameters(self) -> tuple[Tensor, ...]:
        """The log-space tensors that define the transition (gradients flow to these)."""

    @property
    @abstractmethod
    def parameter_names(self) -> tuple[str, ...]:
        """Names of :attr:`parameters`, for error messages."""

    @abstractmethod
    def with_parameters(self, *parameters: Tensor) -> Transition:
        """The same kind of transition over new parameter tensors (same shapes)."""

    @property
    @abstractmethod
    def num_states(self) -> int:
        """``K`` (the number of states transitioned into)."""

    @property
    @abstractmethod
    def rank(self) -> int:
        """The rank ``r`` of ``P`` as the transition holds it (``K`` for a dense one)."""

    @property
    def time_varying(self) -> bool:
        """True when the scores depend on the position (only a dense ``[B, T-1, K, K]`` one)."""
        return False

    @property
    def dtype(self) -> torch.dtype:
        return self.parameters[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parameters[0].device

    @property
    def requires_grad(self) -> bool:
        return any(p.requires_grad for p in self.parameters)

    def detach(self) -> Transition:
        return self.with_parameters(*(p.detach() for p in self.parameters))

    def to(self, dtype: torch.dtype) -> Transition:
        if dtype == self.dtype:
            return self
        return self.with_parameters(*(p.to(dtype) for p in self.parameters))

    # ---- checks and batch handling ------------------------------------------------------------
    @abstractmethod
    def check_shape(self, batch: int, steps: int, num_states: int) -> None:
        """``ValueError`` naming the shapes seen unless the transition fits a ``[B, T, K]`` chain."""

    def check_finite(self) -> None:
        """``ValueError`` if a parameter holds NaN or ``+inf`` (``-inf`` is a structural zero); syncs."""
        for name, x in zip(self.parameter_names, self.parameters):
            if not bool((x < float("inf")).all()):  # one pass: False for NaN and +inf
                bad = ~(x < float("inf"))
                raise ValueError(
                    f"trans: {name} (shape {tuple(x.shape)}) contains NaN or +inf at "
                    f"{int(bad.sum())} positions; scores must be finite or -inf"
                )

    def without_padding(self, edges: Tensor) -> Transition:
        """The transition with edges past each length (``edges [B, T-1]`` False) set to 0.

        Only a time-varying transition has such entries; the others are returned as they are.
        """
        return self

    @abstractmethod
    def select_rows(self, rows: Tensor) -> Transition:
        """The transition of the batch elements ``rows [B']`` (a shared one is returned as is)."""

    # ---- the kernels' operations ------------------------------------------------------------
    @abstractmethod
    def probabilities(self) -> TransitionProbabilities:
        """The shifted probability-space form for the scaled recursion (no autograd graph kept)."""

    @abstractmethod
    def log_propagator(self) -> Callable[[Tensor, int], Tensor]:
        r"""A function ``step(b, t)`` with ``step(b, t)_j = log sum_i exp(b_i + trans_t[i, j])``.

        ``b [B, K_from] -> [B, K_to]``, differentiable.  Whatever is shared by all steps (the
        exponential of a shared matrix or of the factors) is computed once, here.
        """

    @abstractmethod
    def edge_scores(self, previous: Tensor, following: Tensor) -> Tensor:
        """``trans_{t+1}[previous[..., b, t], following[..., b, t]]`` for ``[*, B, T-1]`` states."""

    @abstractmethod
    def sample_previous(
        self, log_alpha: Tensor, following: Tensor, t: int, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""``z_{t-1} ~ p(z_{t-1} = i | z_t = j) \propto alpha_{t-1}(i) P_t(i, j)``.

        ``log_alpha [B, K]`` (``log alpha_{t-1}``), ``following [S, B]`` (``j``): ``[S, B]``.
        """

    @abstractmethod
    def sample_next(self, previous: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``z' ~ P(previous, .)`` for states ``previous [N]`` of a shared transition: ``[N]``."""

    @abstractmethod
    def dense(self) -> Tensor:
        """The log matrix ``trans`` in the dense layout (low rank: ``O(K^2)`` memory, ``O(K^2 r)`` time)."""


# ==============================================================================================
# dense
# ==============================================================================================
class DenseTransition(Transition):
    """A transition held as its log matrix: ``[K, K]``, ``[B, K, K]`` or ``[B, T-1, K, K]``.

    ``log[..., i, j] = trans[z_{t-1} = i -> z_t = j]``; in the time-varying layout ``log[:, t-1]``
    scores the edge into position ``t``.  Nothing is densified: every operation is that of
    the matrix itself (``O(K^2)`` per step and batch element).
    """

    def __init__(self, log: Tensor):
        if not isinstance(log, Tensor) or not log.is_floating_point():
            raise ValueError(
                f"trans must be a floating-point tensor, got {type(log).__name__}"
                + (f" of dtype {log.dtype}" if isinstance(log, Tensor) else "")
            )
        if log.dim() not in (2, 3, 4):
            raise ValueError(f"trans must have shape [K, K], [B, K, K] or [B, T-1, K, K], got shape {tuple(log.shape)}")
        self.log = log

    @property
    def parameters(self) -> tuple[Tensor, ...]:
        return (self.log,)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return ("trans",)

    def with_parameters(self, log: Tensor) -> DenseTransition:
        return DenseTransition(log)

    @property
    def num_states(self) -> int:
        return self.log.shape[-1]

    @property
    def rank(self) -> int:
        return self.log.shape[-1]

    @property
    def time_varying(self) -> bool:
        return self.log.dim() == 4

    def at(self, t: int) -> Tensor:
        """The log matrix into position ``t >= 1``: ``[K, K]`` or ``[B, K, K]``."""
        return self.log[:, t - 1] if self.log.dim() == 4 else self.log

    def check_shape(self, batch: int, steps: int, num_states: int) -> None:
        k = num_states
        expected = {2: (k, k), 3: (batch, k, k), 4: (batch, steps - 1, k, k)}
        if tuple(self.log.shape) != expected[self.log.dim()]:
            raise ValueError(
                f"trans must have shape [K, K], [B, K, K] or [B, T-1, K, K] with B={batch}, "
                f"T={steps}, K={k} (from emit shape ({batch}, {steps}, {k})), "
                f"got shape {tuple(self.log.shape)}"
            )

    def without_padding(self, edges: Tensor) -> DenseTransition:
        if self.log.dim() != 4:
            return self
        return DenseTransition(
            torch.where(edges[:, :, None, None], self.log, torch.zeros((), dtype=self.dtype, device=self.device))
        )

    def select_rows(self, rows: Tensor) -> DenseTransition:
        return self if self.log.dim() == 2 else DenseTransition(self.log[rows])

    def probabilities(self) -> TransitionProbabilities:
        probs, shift = shifted_exp(self.log, 2)
        if self.log.dim() == 2:
            return _SharedProbabilities(probs, shift, self.log)
        if self.log.dim() == 3:
            return _BatchedProbabilities(probs, shift, self.log)
        return _TimeVaryingProbabilities(probs, shift, self.log)

    def log_propagator(self) -> Callable[[Tensor, int], Tensor]:
        if self.log.dim() == 4:
            log = self.log

            def step(belief: Tensor, t: int) -> Tensor:
                return LogSemiring.matmul(belief.unsqueeze(-2), log[:, t - 1]).squeeze(-2)

            return step
        exponentiated = LogSemiring.exponentiate(self.log)
        if self.log.dim() == 2:
            return lambda belief, t: LogSemiring.matmul_exponentiated(belief, *exponentiated)
        return lambda belief, t: LogSemiring.matmul_exponentiated(belief.unsqueeze(-2), *exponentiated).squeeze(-2)

    def edge_scores(self, previous: Tensor, following: Tensor) -> Tensor:
        if self.log.dim() == 2:
            return self.log[previous, following]
        batch = self.log.shape[0]
        rows = torch.arange(batch, device=previous.device).view(batch, 1)
        if self.log.dim() == 3:
            return self.log[rows, previous, following]
        times = torch.arange(previous.shape[-1], device=previous.device).view(1, -1)
        return self.log[rows, times, previous, following]

    def sample_previous(
        self, log_alpha: Tensor, following: Tensor, t: int, generator: torch.Generator | None = None
    ) -> Tensor:
        into = self.at(t).transpose(-1, -2)  # [(B,) K_next, K_prev]
        if into.dim() == 2:
            columns = into[following]
        else:
            columns = into[torch.arange(into.shape[0], device=following.device), following]
        return gumbel_argmax(log_alpha + columns, generator)  # [S, B]

    def sample_next(self, previous: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.multinomial(self.log[previous].exp(), 1, generator=generator).squeeze(-1)

    def dense(self) -> Tensor:
        """The log matrix itself (no copy)."""
        return self.log


class _SharedProbabilities(TransitionProbabilities):
    def __init__(self, probs: Tensor, shift: Tensor, log: Tensor):
        self.probs, self.shift, self.log = probs, shift, log
        self.probs_t = probs.transpose(0, 1)

    def forward(self, vector, t, out):
        return torch.mm(vector, self.probs, out=out)

    def backward(self, vector, t, out):
        return torch.mm(vector, self.probs_t, out=out)

    def array_steps(self):
        probs = self.probs.numpy()
        probs_t = probs.T
        return (lambda vector, t, out: numpy.dot(vector, probs, out=out)), (
            lambda vector, t, out: numpy.dot(vector, probs_t, out=out)
        )

    def step_factors(self):
        return (self.probs,)

    def dense(self):
        return self.probs

    def log_shift_total(self, edges):
        return self.shift * edges.sum(-1)

    def all_positive(self):
        return bool((self.probs > 0).all())

    def smallest_entry(self):
        return smallest_positive(self.probs, 2)

    def rounded_away(self):
        return rounded_away(self.probs, self.log)

    def parameter_gradients(self, alpha, u):
        k = alpha.shape[-1]
        return (self.probs * (alpha.reshape(-1, k).transpose(0, 1) @ u.reshape(-1, k)),)


class _BatchedProbabilities(TransitionProbabilities):
    def __init__(self, probs: Tensor, shift: Tensor, log: Tensor):
        self.probs, self.shift, self.log = probs, shift, log

    def forward(self, vector, t, out):
        return torch.bmm(vector.unsqueeze(1), self.probs, out=out.unsqueeze(1)).squeeze(1)

    def backward(self, vector, t, out):
        return torch.bmm(self.probs, vector.unsqueeze(-1), out=out.unsqueeze(-1)).squeeze(-1)

    def array_steps(self):
        probs = self.probs.numpy()
        probs_t = probs.transpose(0, 2, 1)
        matmul = numpy.matmul
        return (lambda vector, t, out: matmul(vector[:, None], probs, out=out[:, None])), (
            lambda vector, t, out: matmul(vector[:, None], probs_t, out=out[:, None])
        )

    def step_factors(self):
        return (self.probs,)

    def dense(self):
        return self.probs

    def log_shift_total(self, edges):
        return self.shift * edges.sum(-1)

    def all_positive(self):
        return bool((self.probs > 0).all())

    def smallest_entry(self):
        return smallest_positive(self.probs, 2)

    def rounded_away(self):
        return rounded_away(self.probs, self.log)

    def parameter_gradients(self, alpha, u):
        return (self.probs * torch.bmm(alpha.permute(1, 2, 0), u.transpose(0, 1)),)


class _TimeVaryingProbabilities(TransitionProbabilities):
    def __init__(self, probs: Tensor, shift: Tensor, log: Tensor):
        self.probs, self.shift, self.log = probs, shift, log
        self.probs_at = (None,) + probs.unbind(1)  # per-step views taken once: probs_at[t] = P_t

    def forward(self, vector, t, out):
        return torch.bmm(vector.unsqueeze(1), self.probs_at[t], out=out.unsqueeze(1)).squeeze(1)

    def backward(self, vector, t, out):
        return torch.bmm(self.probs_at[t], vector.unsqueeze(-1), out=out.unsqueeze(-1)).squeeze(-1)

    def array_steps(self):
        probs = self.probs.numpy()
        into = (None,) + tuple(probs[:, t] for t in range(probs.shape[1]))  # P_t [B, K, K]
        from_ = (None,) + tuple(p.transpose(0, 2, 1) for p in into[1:])
        matmul = numpy.matmul
        return (lambda vector, t, out: matmul(vector[:, None], into[t], out=out[:, None])), (
            lambda vector, t, out: matmul(vector[:, None], from_[t], out=out[:, None])
        )

    def dense(self):
        return self.probs

    def log_shift_total(self, edges):
        return (self.shift * edges).sum(-1)

    def all_positive(self):
        return bool((self.probs > 0).all())

    def smallest_entry(self):
        return smallest_positive(self.probs, 3)

    def rounded_away(self):
        return rounded_away(self.probs, self.log)

    def parameter_gradients(self, alpha, u):
        return (self.probs * (alpha.unsqueeze(-1) * u.unsqueeze(-2)).transpose(0, 1),)


# ==============================================================================================
# low rank
# ==============================================================================================
class LowRankTransition(Transition):
    r"""A shared transition of rank ``r``: ``P = U V``, ``U = exp(log_left) [K, r]``, ``V = exp(log_right) [r, K]``.

    ``trans[i, j] = log sum_c U[i, c] V[c, j]``.  Read as an HMM, ``c`` is a pseudo-state
    between consecutive states: ``p(c | z_{t-1} = i) = U[i, c]``, ``p(z_t = j | c) = V[c, j]``.
    Every operation goes through the rank and costs ``O(K r)`` per belief instead of ``O(K^2)``;
    only :meth:`dense` builds the ``K x K`` matrix.
    """

    def __init__(self, log_left: Tensor, log_right: Tensor):
        for name, x in (("log_left", log_left), ("log_right", log_right)):
            if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
                raise ValueError(
                    f"trans: {name} must be a 2-D floating-point tensor, got "
                    + (f"{x.dtype} shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__)
                )
        if log_left.shape[1] != log_right.shape[0]:
            raise ValueError(
                f"trans: log_left [K, r] and log_right [r, K] must share r, got shapes "
                f"{tuple(log_left.shape)} and {tuple(log_right.shape)}"
            )
        self.log_left, self.log_right = log_left, log_right

    @property
    def parameters(self) -> tuple[Tensor, ...]:
        return (self.log_left, self.log_right)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return ("log_left", "log_right")

    def with_parameters(self, log_left: Tensor, log_right: Tensor) -> LowRankTransition:
        return LowRankTransition(log_left, log_right)

    @property
    def num_states(self) -> int:
        return self.log_right.shape[1]

    @property
    def rank(self) -> int:
        return self.log_left.shape[1]

    def check_shape(self, batch: int, steps: int, num_states: int) -> None:
        if self.log_left.shape[0] != num_states or self.log_right.shape[1] != num_states:
            raise ValueError(
                f"trans: log_left must have shape [K, r] and log_right [r, K] with K={num_states} "
                f"(from emit), got shapes {tuple(self.log_left.shape)} and "
                f"{tuple(self.log_right.shape)}"
            )

    def select_rows(self, rows: Tensor) -> LowRankTransition:
        return self

    def probabilities(self) -> TransitionProbabilities:
        left, left_shift = shifted_exp(self.log_left, 2)
        right, right_shift = shifted_exp(self.log_right, 2)
        return _LowRankProbabilities(left, right, left_shift + right_shift, self.log_left, self.log_right)

    def log_propagator(self) -> Callable[[Tensor, int], Tensor]:
        left = LogSemiring.exponentiate(self.log_left)
        right = LogSemiring.exponentiate(self.log_right)

        def step(belief: Tensor, t: int) -> Tensor:
            through_rank = LogSemiring.matmul_exponentiated(belief, *left)  # [B, r]
            return LogSemiring.matmul_exponentiated(through_rank, *right)

        return step

    def edge_scores(self, previous: Tensor, following: Tensor) -> Tensor:
        """``logsumexp_c(log_left[i, c] + log_right[c, j])`` for the pairs only: ``O(r)`` a pair."""
        return logsumexp(self.log_left[previous] + self.log_right.T[following], -1)

    def sample_previous(
        self, log_alpha: Tensor, following: Tensor, t: int, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Through the rank: ``p(i, c | j) \propto alpha(i) U[i, c] V[c, j]``, so first
        ``c ~ (alpha U)[c] V[c, j]``, then ``i ~ alpha(i) U[i, c]``: ``O(S B (K + r))``."""
        through_rank = LogSemiring.matmul(log_alpha, self.log_left)  # log (alpha U) [B, r]
        pseudo = gumbel_argmax(through_rank + self.log_right.T[following], generator)  # [S, B]
        return gumbel_argmax(log_alpha + self.log_left.T[pseudo], generator)

    def sample_next(self, previous: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``c ~ U[previous]``, then ``z' ~ V[c]``: no ``K x K`` matrix."""
        pseudo = torch.multinomial(self.log_left[previous].exp(), 1, generator=generator).squeeze(-1)
        return torch.multinomial(self.log_right[pseudo].exp(), 1, generator=generator).squeeze(-1)

    def dense(self) -> Tensor:
        """``log(U V)`` as a ``[K, K]`` matrix: ``O(K^2)`` memory, ``O(K^2 r)`` time (one matmul)."""
        return LogSemiring.matmul(self.log_left, self.log_right)


class _LowRankProbabilities(TransitionProbabilities):
    def __init__(self, left: Tensor, right: Tensor, shift: Tensor, log_left: Tensor, log_right: Tensor):
        self.left, self.right, self.shift = left, right, shift
        self.log_left, self.log_right = log_left, log_right
        self.left_t, self.right_t = left.transpose(0, 1), right.transpose(0, 1)

    def forward(self, vector, t, out):
        return torch.mm(vector @ self.left, self.right, out=out)

    def backward(self, vector, t, out):
        return torch.mm(vector @ self.right_t, self.left_t, out=out)

    def array_steps(self):
        left, right = self.left.numpy(), self.right.numpy()
        left_t, right_t, dot = left.T, right.T, numpy.dot
        return (lambda vector, t, out: dot(dot(vector, left), right, out=out)), (
            lambda vector, t, out: dot(dot(vector, right_t), left_t, out=out)
        )

    def dense(self):
        return self.left @ self.right

    def log_shift_total(self, edges):
        return self.shift * edges.sum(-1)

    def all_positive(self):
        return bool((self.left > 0).all()) and bool((self.right > 0).all())

    def smallest_entry(self):
        """``min_r`` of the smallest positive ``U[:, r]`` times the smallest positive ``V[r, :]``: a positive
        entry of ``U V`` has at least one such term."""
        return (smallest_positive(self.left.T, 1) * smallest_positive(self.right, 1)).amin()

    def rounded_away(self):
        """Either factor's entry rounded away (a term of ``P = U V`` lost: conservative, every chain)."""
        return rounded_away(self.left, self.log_left) | rounded_away(self.right, self.log_right)

    def parameter_gradients(self, alpha, u):
        r"""``dU = U * sum_t alpha_{t-1}^T (u_t V^T)``, ``dV = V * sum_t (alpha_{t-1} U)^T u_t``."""
        k = alpha.shape[-1]
        alpha, u = alpha.reshape(-1, k), u.reshape(-1, k)
        grad_left = self.left * (alpha.transpose(0, 1) @ (u @ self.right_t))
        grad_right = self.right * ((alpha @ self.left).transpose(0, 1) @ u)
        return grad_left, grad_right
