r"""Linear-chain dynamic programs: forward, backward, Viterbi, FFBS, entropy.

A chain of length ``T`` over ``K`` states scores a state sequence
``z = (z_0, ..., z_{L-1})`` (``L`` = its length) as

.. math::

    s(z) = \mathrm{init}[z_0] + \sum_{t<L} \mathrm{emit}[t, z_t]
           + \sum_{1 \le t < L} \mathrm{trans}_t[z_{t-1}, z_t]

and the kernels here compute ``log Z = log sum_z exp s(z)`` and friends.

Shapes (batch first, :doc:`/design`): ``init [B, K]``, ``emit [B, T, K]``, ``lengths [B]`` and
the transition a :class:`~latentnlp.transitions.Transition` (dense ``[K, K]``, ``[B, K, K]``,
``[B, T-1, K, K]``, or low rank); the kernels only use its operations, so every algorithm
below that does not say "dense" runs through a low-rank transition's factors.  Callers
(:class:`latentnlp.structures.ChainPosterior`) validate inputs and zero the padding; kernels
assume both.

Algorithms:

* :func:`scaled_log_partition` -- probability space with per-step renormalisation, one BLAS
  call per step (``O(B K^2)``, or ``O(B K r)`` through a rank); its gradient is the classic
  backward recursion written by hand (an ``autograd.Function``), so no graph is kept over
  ``T`` and memory is ``O(B T K)``.  Underflow is reported by a flag, never by a NaN; rows whose
  backward overflows (the smoother far from the filter) get their gradient from log space.  On
  the CPU its time loops run compiled where one dense matrix serves every step (see "Compiled loops"
  below), else, while a step's largest product is at most ``ARRAY_LOOP_MAX_WORK`` (``2^18``
  multiply-adds: ``B K^2`` for a dense matrix, ``B K^L K`` for a factorial chain's), step on numpy
  views of their buffers, whose calls cost a fraction of a torch operation's dispatch.
* :func:`log_space_forward` -- the same recursion in the log semiring, autograd through it.
* :func:`scan_log_partition` -- parallel prefix: a balanced tree of log-space ``K x K``
  products, depth ``log T`` (dense).
* :func:`blocked_log_partition` -- the scaled algorithm's quantities through products of
  blocks of ``b ~ sqrt(T)`` steps: ``O(sqrt T)`` sequential batched operations instead of
  ``O(T)``, for ``O(B T K^3)`` arithmetic (dense), with a hand-written blocked backward;
  ``method="auto"`` takes it where :func:`prefers_blocked` (a measured rule) says.
* :func:`viterbi`, :func:`kbest_viterbi` (dense), :func:`forward_filter`,
  :func:`backward_sample`, :func:`chain_entropy` (dense), :func:`path_score`.
* The same blocks beyond the sum, ``O(sqrt T)`` sequential steps each (dense):
  :func:`blocked_viterbi` (max-plus block products, then the boundaries, then every block's
  scores, back-pointers and paths at once), :func:`blocked_forward_filter` (the blocked forward's
  filters, for :func:`backward_sample`: exact samples) and :func:`blocked_entropy`
  (``log Z - E[s(z)]`` from the blocked marginals); ``method="auto"`` takes Viterbi by
  :func:`prefers_blocked_viterbi`, the filters by :func:`prefers_blocked`, the entropy by
  :func:`prefers_blocked_entropy`.

Compiled loops: where one dense matrix serves every step and ``B K^2 <= COMPILED_LOOP_MAX_WORK``
(:func:`compiled_loops_apply`), the scaled forward and backward loops, Viterbi's max-plus forward
and backtracking and backward sampling run in C (``latentnlp._chain_loops``, built by the install
where a C compiler is found), a step costing its arithmetic; the blocked kernels then no longer win
and ``"auto"`` keeps the sequential ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy
import torch
from torch import Tensor

from .gumbel import gumbel_argmax
from .masks import lengths_to_mask
from .semirings import LogSemiring, expected_score, finite_max, logsumexp, safe_log
from .transitions import (
    DenseTransition,
    Transition,
    TransitionProbabilities,
    rounded_away,
    shifted_exp,
    smallest_positive,
)

try:  # built by the install where a C compiler is found (setup.py); else the loops step with numpy
    from . import _chain_loops
except ImportError:  # pragma: no cover - depends on the install
    _chain_loops = None

ARRAY_LOOP_MAX_WORK = 2**18
"""The largest step product (``B K^2`` multiply-adds for a dense matrix, see
:meth:`~latentnlp.transitions.TransitionProbabilities.step_work`) whose scaled recursion steps on numpy
views of CPU tensors (see :func:`_array_steps`).

Up to ``2^18`` multiply-adds a product (``65536 x 4``, OpenBLAS's default
``GEMM_MULTITHREAD_THRESHOLD``) numpy's OpenBLAS runs a ``[B, K] x [K, K]`` product on one thread;
past it, it splits the product over threads of its own, which then wait for the cores torch's
threads hold.  Measured on a 2-core machine, 2 torch threads (numpy against ``torch.mm``, one
product): 1.5 against 2.3 us at ``(B, K) = (16, 64)``, 6.8 against 13 at ``(16, 128)`` (``2^18``);
past the bound the gain, where there is one, is not safe: 14 against 89 us at ``(32, 128)``
(``2^19``) on a quiet machine, but 3,100 against 35 at ``(16, 256)`` (``2^20``), and the flattened
factorial chain at ``(8, 256)`` (``2^19``) took 1.0 s a pass against 19 ms through torch while
another process held a core.
"""


ENTROPY_RESOLUTION = 16.0
"""The resolution of an entropy from the marginals (``log Z - E_p[s]``, :func:`_smoother_entropy`) in
``eps`` times one plus the size of its terms: a value below minus it is flagged (the exact recursion
recomputes it), one within it of zero is returned clamped at 0."""


def _dense_at(trans: Tensor, t: int) -> Tensor:
    """The dense log matrix into position ``t >= 1`` of ``[K, K]``, ``[B, K, K]`` or ``[B, T-1, K, K]``."""
    return trans[:, t - 1] if trans.dim() == 4 else trans


# ----------------------------------------------------------------------------------------------
# scaled (probability-space) forward-backward
# ----------------------------------------------------------------------------------------------
def _reachable_shift(reach: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Shifted probabilities ``exp(scores - m)`` with ``m`` the max over *reachable* states.

    ``reach [B, K]`` is the predicted (unnormalised) mass of each state; states with zero mass
    get probability 0 and do not set the shift, so an emission peak on a state the chain
    cannot be in neither underflows the others nor overflows.  Returns ``([B, K], m [B])``.
    """
    reachable = reach > 0
    masked = torch.where(reachable, scores, torch.full_like(scores, float("-inf")))
    shift = finite_max(masked, -1)
    probs = torch.where(reachable, torch.exp(masked - shift), torch.zeros_like(scores))
    return probs, shift.squeeze(-1)


def underflow_threshold(dtype: torch.dtype) -> float:
    """Step normalisers ``c_t`` below ``tiny / eps`` mean the surviving mass was subnormal."""
    info = torch.finfo(dtype)
    return info.tiny / info.eps


def normaliser_floor(smallest: Tensor, states: int, dtype: torch.dtype) -> Tensor:
    r"""The smallest step normaliser ``c_t`` whose chain the scaled forward trusts: ``[B]`` or ``[]`` (float64),
    ``max(tiny / eps, S tiny / p)`` with ``p = smallest`` the transition's smallest positive entry
    (:meth:`TransitionProbabilities.smallest_entry`, ``[B]`` or ``[]``) and ``S`` the states.

    Why: an unnormalised ``a_t(j) e_t(j)`` below ``tiny`` (subnormal, or flushed to 0, as when its shifted
    emission or initial score underflows) carries an absolute error up to ``delta = tiny eps``, so the
    filter ``alpha_t(j)`` one of ``delta / c_t``, and the next step's ``a_{t+1}(l) = sum_j alpha_t(j)
    P(j, l)``, at least ``p`` where every state is reachable (``alpha_t`` sums to 1), one of at most
    ``S delta / c_t``: a relative error of at most ``eps`` where ``c_t >= S tiny / p``.  Below that, a
    state's mass rounded away at one step may be the one that later steps make the likeliest (scores
    hundreds of nats apart in float64, tens in float32: ``log Z`` was found 262 nats off, unflagged,
    in float64 and 2e-3 relative in float32); ``tiny / eps`` bounds ``c_t``'s own relative error.  With
    ``p`` near 1 the first term is the larger; a flag from the second needs ``p < sqrt(S tiny)`` (``c_t >=
    p`` always where every state is reachable): transition scores more than about 42 nats (float32) or
    350 (float64) below their matrix's largest."""
    info = torch.finfo(dtype)
    return torch.clamp(states * info.tiny / smallest.to(torch.float64), min=underflow_threshold(dtype))


def _underflowed(scale: Tensor, mask: Tensor, floor: Tensor | None = None) -> Tensor:
    """``[B]`` bool: some step's normaliser fell below ``floor`` (``[B]`` or ``[]``, :func:`normaliser_floor`;
    default :func:`underflow_threshold`; NaN is not below)."""
    floor = underflow_threshold(scale.dtype) if floor is None else floor.reshape(-1, 1)
    return ((scale.T < floor) & mask).any(-1)


class _ScaledForward(NamedTuple):
    """What :func:`_scaled_forward` returns (time-major): the filters ``alpha [T, B, K]``, the step
    normalisers ``scale [T, B]`` (``c_t``), the backward's ``weights [T, B, K]`` (``e_t / c_t``), the
    shifts ``[T, B]`` (``m_t``), the ``flagged [B]`` chains, and ``log_scale [B]`` (float64) where the
    compiled loop summed it, else None (:meth:`log_normaliser`)."""

    alpha: Tensor
    scale: Tensor
    weights: Tensor
    shifts: Tensor
    flagged: Tensor
    log_scale: Tensor | None

    def log_normaliser(self) -> Tensor:
        """``sum_t log c_t + sum_t m_t`` (``log Z`` less the transition's shifts): ``[B]`` float64, the
        compiled loop's (its normalisers multiplied in float64) or summed from ``scale`` and ``shifts``
        (the float logs accumulated in float64: ``T`` terms of magnitude ``|log c|`` lose precision in
        float32)."""
        if self.log_scale is not None:
            return self.log_scale
        return torch.log(self.scale).double().sum(0) + self.shifts.double().sum(0)


def _scaled_forward(init: Tensor, probs: TransitionProbabilities, emit: Tensor, mask: Tensor) -> _ScaledForward:
    r"""Scaled forward recursion, stored time-major.

    ``a_0 = exp(init + emit_0 - m_0)``; ``a_t = (alpha_{t-1} P_t) * e_t``; ``c_t = sum a_t``;
    ``alpha_t = a_t / c_t`` with ``e_t = exp(emit_t - m_t)``.  The shift ``m_t`` is the largest
    emission score of step ``t`` when every state is reachable (computed once for all steps),
    else the largest among the states reachable at ``t`` (see :func:`_reachable_shift`).
    Deciding which costs one synchronisation (no ``-inf`` in ``init``, ``P > 0``): an algorithm
    choice, made once per call.  Padding steps (``t >= L``) keep ``alpha`` and set ``c_t = 1``.
    Returns ``alpha [T, B, K]`` (each row a filtering distribution), ``scale [T, B]`` (the
    ``c_t``), ``weights [T, B, K]`` (``e_t / c_t``, the backward's), ``shifts [T, B]`` (``m_t``, 0 past the length;
    ``shifts[0]`` also holds the shift of ``init``), so that
    ``log Z = sum_t log c_t + sum_t shifts_t + transition shifts``, and ``flagged [B]`` (bool): the chains
    that underflowed (:func:`_underflowed`: some ``c_t`` inside the length below
    :func:`normaliser_floor`) or lost mass.

    Lost mass: when not every state is reachable, a state the chain can be in (one a positive entry of
    ``P_t`` leads to from the support of ``alpha_{t-1}``, with a finite emission score: an indicator
    propagated beside the filter, since the product ``alpha_{t-1} P_t`` itself underflows to 0 where
    a small filter entry meets a small ``P_t`` entry) got ``a_t`` below the smallest normal number: its
    mass was rounded away, and with it every path through it, which may be the paths that dominate
    later (a large score further on that only this state leads to), although no step's normaliser
    ``c_t`` is small.
    Such chains are underflowed as surely as those with a small ``c_t``.  When every state is
    reachable a state can be re-entered from every other at the next step, and what a rounded-away mass
    may cost is bounded through the smallest entry of ``P`` instead (:func:`normaliser_floor`).
    Returned as a :class:`_ScaledForward`.
    """
    batch, steps, k = emit.shape
    factors = _compiled_loop_factors(probs, emit.transpose(0, 1))
    if factors is not None:  # the compiled loop, from the scores; it declines where a state is not reachable
        alpha, weights = emit.new_empty(steps, batch, k), emit.new_empty(steps, batch, k)
        scale, shifts = emit.new_empty(steps, batch), emit.new_empty(steps, batch)
        all_valid_until = int(mask.sum(-1).min()) if batch else steps
        stored = _compiled_forward(
            init, probs, emit, ~mask, all_valid_until, factors, None, (alpha, scale, weights, shifts)
        )
        if stored is not None:
            return _ScaledForward(alpha, scale, weights, shifts, stored[2], stored[0])
    alpha = emit.new_empty(steps, batch, k)
    scale = emit.new_ones(steps, batch)
    lost = torch.zeros(batch, dtype=torch.bool, device=emit.device)
    tiny = torch.finfo(emit.dtype).tiny
    reachable = bool((init != float("-inf")).all()) and probs.all_positive()  # NaN stays NaN
    if reachable:
        shift = finite_max(emit, -1)
        # e_t = exp(emit_t - m_t), written time-major in one buffer (two passes, one allocation)
        emit_probs = emit.new_empty(steps, batch, k)
        torch.sub(emit.transpose(0, 1), shift.transpose(0, 1), out=emit_probs).exp_()
        shifts = torch.mul(shift.squeeze(-1).T, mask.T, out=emit.new_empty(steps, batch))
        init_shift = finite_max(init, -1)
        a = torch.exp(init - init_shift) * emit_probs[0]
        shifts[0] += init_shift.squeeze(-1)
    else:
        emit_probs = emit.new_zeros(steps, batch, k)
        shifts = emit.new_zeros(steps, batch)
        a, shifts[0] = _reachable_shift((init != float("-inf")).to(emit.dtype), init + emit[:, 0])
        # an entry of P rounded to 0 hides its paths from the support check below too
        lost = ((init + emit[:, 0] > float("-inf")) & (a < tiny)).any(-1) | probs.rounded_away()
    torch.sum(a, -1, keepdim=True, out=scale[0].unsqueeze(-1))
    torch.div(a, scale[0].unsqueeze(-1), out=alpha[0])
    all_valid_until = int(mask.sum(-1).min()) if mask.shape[0] else steps  # steps before this need no padding
    array_steps = _array_steps(probs, alpha)
    if array_steps is not None:
        _forward_steps_on_arrays(
            alpha, scale, emit_probs, shifts, lost, emit, mask, reachable, array_steps[0], all_valid_until
        )
        weights = emit_probs.div_(scale.unsqueeze(-1))
        underflowed = _underflowed(scale, mask, normaliser_floor(probs.smallest_entry(), k, emit.dtype))
        return _ScaledForward(alpha, scale, weights, shifts, underflowed | lost, None)
    # per-step views taken once: indexing inside the loop costs more than the small matmuls
    alpha_t, scale_t, emit_probs_t = alpha.unbind(0), scale.unsqueeze(-1).unbind(0), emit_probs.unbind(0)
    propagate = probs.forward
    support = None if reachable else torch.empty_like(alpha_t[0])
    for t in range(1, steps):
        current, c = alpha_t[t], scale_t[t]
        propagate(alpha_t[t - 1], t, current)  # reach = alpha_{t-1} P_t
        if reachable:
            current.mul_(emit_probs_t[t])
        else:
            e_t, m_t = _reachable_shift(current, emit[:, t])
            # the states the chain can be in: reach's support in exact arithmetic, which its product
            # loses where every term underflows (a filter entry times a small P entry)
            propagate((alpha_t[t - 1] > 0).to(alpha.dtype), t, support)
            possible = (support > 0) & (emit[:, t] > float("-inf"))
            current.mul_(e_t)
            lost |= (possible & (current < tiny)).any(-1) & mask[:, t]
            emit_probs_t[t].copy_(e_t)
            shifts[t] = torch.where(mask[:, t], m_t, torch.zeros_like(m_t))
        torch.sum(current, -1, keepdim=True, out=c)
        current.div_(c)
        if t >= all_valid_until:
            valid = mask[:, t].unsqueeze(-1)
            current.copy_(torch.where(valid, current, alpha_t[t - 1]))
            c.copy_(torch.where(valid, c, torch.ones_like(c)))
    weights = emit_probs.div_(scale.unsqueeze(-1))
    underflowed = _underflowed(scale, mask, normaliser_floor(probs.smallest_entry(), k, emit.dtype))
    return _ScaledForward(alpha, scale, weights, shifts, underflowed | lost, None)


def _array_steps(probs: TransitionProbabilities, beliefs: Tensor):
    """The transition's numpy steps (:meth:`TransitionProbabilities.array_steps`) when the recursion's loop
    over the time-major ``beliefs [T, B, K]`` runs on numpy views: CPU tensors and a step's largest product
    (:meth:`TransitionProbabilities.step_work`, ``B K^2`` for a dense matrix) at most
    :data:`ARRAY_LOOP_MAX_WORK`; else None (the loop steps with torch)."""
    if beliefs.device.type != "cpu" or probs.step_work(beliefs.shape[1], beliefs.shape[2]) > ARRAY_LOOP_MAX_WORK:
        return None
    return probs.array_steps()


_TILED_PRODUCT = _chain_loops is not None and _chain_loops.product() == "avx2-fma tiles"
COMPILED_LOOP_MAX_WORK = 2**18 if _TILED_PRODUCT else 2**16
"""The largest step product ``B K^2`` (one dense matrix for every step) whose scaled forward and backward
loops run compiled (``latentnlp._chain_loops``: a step costs its arithmetic, where a numpy call costs
about a microsecond).  Measured (forward + backward of ``log Z``, float32, 2 threads, compiled against
the numpy loop in one process): with the AVX2-FMA tiled product 3.1x at ``(B, T, K) = (8, 1024, 16)``,
10.7x at ``(4, 10000, 8)``, 1.2-1.6x from ``B K^2 = 2^13`` to ``2^18`` (``(16, 64, 128)``), 1.05x at
``2^19`` and 0.86-0.58x from ``2^20`` (against torch's two-thread loop); with the plain product (no AVX2)
2.5x and 7x, 1.2-1.6x up to ``2^15``, 1.0-1.07 at ``2^16``, 0.77-0.91 past it."""


def _compiled_loop_factors(probs: TransitionProbabilities, beliefs: Tensor) -> tuple[Tensor, ...] | None:
    """The step's factors (:meth:`TransitionProbabilities.step_factors`, contiguous, detached: one dense
    matrix, or a product of chains' ``L``) when the scaled loops over the time-major ``beliefs [T, B, S]``
    run compiled: the module built, CPU float32 or float64 tensors, the same factors for every step and a
    step's largest product (:meth:`TransitionProbabilities.step_work`, ``B K^2`` for one matrix,
    ``B K^L K`` for ``L`` chains) at most :data:`COMPILED_LOOP_MAX_WORK`; else None."""
    if _chain_loops is None or beliefs.device.type != "cpu" or beliefs.dtype not in (torch.float32, torch.float64):
        return None
    _, batch, states = beliefs.shape
    factors = probs.step_factors()
    if (
        factors is None
        or any(f.dtype != beliefs.dtype for f in factors)
        or probs.step_work(batch, states) > COMPILED_LOOP_MAX_WORK
    ):
        return None
    return tuple(f.detach().contiguous() for f in factors)


COMPILED_LOOP_THREAD_MIN_WORK = 2**23
"""The fewest multiply-adds (``T`` times a step's largest product) of a compiled loop over a product of
chains whose rows are shared among threads (:func:`_compiled_loop_threads`).  Measured (forward + backward
of ``log Z``, float32, two threads against one, alternating in one process, ``T = 128``): factorial chains
``(L, K) = (3, 12), (4, 8)`` at ``B = 8`` (``2^24``, ``2^25``) 1.37x and 1.28x with
``OMP_WAIT_POLICY=PASSIVE``, 1.42x and 1.26x with OpenMP's default (torch's idle threads spinning)."""

COMPILED_LOOP_THREAD_MIN_WORK_ONE_MATRIX = 2**27
"""The same bound for a loop over one matrix, whose rows are shared only four or more a thread (the
product's tile: ``(4, 1024, 128)``, two rows a thread, took 0.81x).  Measured as above: with OpenMP's
default, 1.26x at ``(B, T, K) = (16, 1024, 128)`` (``2^28``) and 1.10x at ``(64, 512, 64)`` (``2^27``),
but 0.94x at ``(64, 128, 64)`` (``2^25``), 0.84x at ``(16, 64, 128)`` (``2^24``) and 0.74x at
``(32, 256, 32)`` (``2^23``): a short loop's second thread meets torch's threads still spinning after the
operations before it.  With ``OMP_WAIT_POLICY=PASSIVE`` two threads already won from ``2^23`` (1.28x at
``(16, 64, 128)``, 1.14x at ``(8, 256, 64)``, 1.39x at ``(16, 1024, 128)``), the bound is the default's."""


def _compiled_forward(
    init: Tensor,
    probs: TransitionProbabilities,
    emit: Tensor,
    padding: Tensor | None,
    all_valid_until: int,
    factors: tuple[Tensor, ...],
    final_filter: Tensor | None,
    stored: tuple[Tensor, Tensor, Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor | None, Tensor] | None:
    r"""The scaled forward by the compiled loop (``latentnlp._chain_loops.scaled_forward``), from the scores:
    each step's shift ``m_t = max_j emit_t(j)`` and ``e_t = exp(emit_t - m_t)`` are taken in the loop, so that
    ``emit [B, T, K]`` is read once, batch-major.  ``padding [B, T]`` (bool: ``t >= L``) is read from step
    ``all_valid_until`` on (the shortest length), and may be None if that is ``T``.  ``factors``:
    :func:`_compiled_loop_factors`.  Writes
    ``final_filter [B, K]`` (``p(z_{L-1} | x)``) if given and, if ``stored = (alpha, scale, weights, shifts)``
    is given, the buffers :func:`_scaled_forward` returns (else the loop keeps two steps of the filter).
    Returns ``(log_scale [B] float64, final_filter, flagged [B] bool)`` with ``log_scale = sum_t log c_t +
    sum_t m_t`` inside the length (``log Z`` less the transition's shifts) and ``flagged`` the chains that
    underflowed (some ``c_t`` below :func:`normaliser_floor`, which the loop computes from the factors);
    None, writing nothing, where some state is not reachable (``init`` has a ``-inf`` or ``P`` a zero: the
    shift must then be over the reachable states, :func:`_reachable_shift`)
    or ``T = 0``.  ``init`` is ``[K]``, ``[1, K]`` or ``[B, K]`` (an expanded ``[K]`` is read once).
    """
    batch, steps, _ = emit.shape
    log_scale = torch.empty(batch, dtype=torch.float64)
    flagged = torch.zeros(batch, dtype=torch.bool)
    shared = init.dim() == 2 and batch and (init.shape[0] == 1 or init.stride(0) == 0)  # one init broadcast
    first = (init[0] if shared else init).to(emit.dtype)
    ran = _chain_loops.scaled_forward(
        emit.detach().contiguous().numpy(),
        first.detach().contiguous().numpy(),
        tuple(f.numpy() for f in factors),
        None if padding is None else padding.numpy(),
        all_valid_until,
        log_scale.numpy(),
        flagged.numpy(),
        _compiled_loop_threads(probs, emit.transpose(0, 1), factors),
        None if final_filter is None else final_filter.numpy(),
        *((None,) * 4 if stored is None else (x.numpy() for x in stored)),
    )
    return (log_scale, final_filter, flagged) if ran else None


def _compiled_loop_statistics(factors: tuple[Tensor, ...]) -> bool:
    """Whether the compiled backward also sums the edge statistics of the step's factors (in the loop, from
    the rows it holds: no ``u [T, B, S]`` buffer, no second pass over it): for a product of chains (two
    factors or more).  Measured (forward + backward of ``log Z``, float32, two threads, against the batched
    ``bmm`` of :meth:`~latentnlp.factorial._ProductProbabilities.parameter_gradients` on the stored ``u``,
    alternating in one process, ``T = 128``): ``(L, K) = (2, 16), (3, 12), (4, 8)`` 1.04x, 1.16x, 1.30x at
    ``B = 8`` and 1.13x, 1.10x, 1.24x at ``B = 1``; with the last axis's statistics held in registers
    over its rows (instead of updating a row of them per row of the message) a further 1.14x, 1.28x,
    1.09x at ``B = 8``.  One matrix keeps the single
    ``[K, T B] x [T B, K]`` product on the stored ``u``, which runs at the matmul rate."""
    return len(factors) > 1


def _compiled_loop_threads(probs: TransitionProbabilities, beliefs: Tensor, factors: tuple[Tensor, ...]) -> int:
    """How many threads share the rows of a compiled loop over ``beliefs [T, B, S]``: torch's intra-op
    count where the loop's products (``T`` times a step's largest, :meth:`TransitionProbabilities.step_work`)
    reach :data:`COMPILED_LOOP_THREAD_MIN_WORK` (a product of chains, a row or more a thread) or
    :data:`COMPILED_LOOP_THREAD_MIN_WORK_ONE_MATRIX` (one matrix, four rows or more a thread); else one."""
    steps, batch, states = beliefs.shape
    one_matrix = len(factors) == 1
    bound = COMPILED_LOOP_THREAD_MIN_WORK_ONE_MATRIX if one_matrix else COMPILED_LOOP_THREAD_MIN_WORK
    if steps * probs.step_work(batch, states) < bound:
        return 1
    return max(1, min(batch // (4 if one_matrix else 1), torch.get_num_threads()))


def _reachable_shift_array(reach, scores):
    """:func:`_reachable_shift` on numpy arrays ``reach [B, K]``, ``scores [B, K]``: ``(probs [B, K], shift [B])``."""
    reachable = reach > 0
    masked = numpy.where(reachable, scores, -numpy.inf)
    shift = masked.max(-1, keepdims=True)
    shift = numpy.where(numpy.isfinite(shift), shift, 0.0)
    return numpy.where(reachable, numpy.exp(masked - shift), 0.0), shift[:, 0]


def _forward_steps_on_arrays(alpha, scale, emit_probs, shifts, lost, emit, mask, reachable, propagate, all_valid_until):
    """The time loop of :func:`_scaled_forward` on numpy views of its buffers (CPU): the same recursion,
    ``t = 1 .. T-1``, written into ``alpha [T, B, K]``, ``scale [T, B]`` (and, when not every state is
    reachable, ``emit_probs [T, B, K]``, ``shifts [T, B]`` and ``lost [B]``)."""
    alpha_t = list(alpha.numpy())
    tiny = numpy.finfo(alpha_t[0].dtype).tiny
    scale_t = list(scale.numpy()[:, :, None])
    emit_probs_t = list(emit_probs.numpy())
    padding = (~mask).numpy()
    if not reachable:
        scores, shift_t, lost_rows = emit.detach().numpy(), shifts.numpy(), lost.numpy()
        support = numpy.empty_like(alpha_t[0])
    multiply, divide, total, copyto = numpy.multiply, numpy.divide, numpy.add.reduce, numpy.copyto
    with numpy.errstate(all="ignore"):  # a dead chain's 0 / 0 is NaN, as in torch (and flagged)
        for t in range(1, len(alpha_t)):
            current, c = alpha_t[t], scale_t[t]
            propagate(alpha_t[t - 1], t, current)  # reach = alpha_{t-1} P_t
            if reachable:
                multiply(current, emit_probs_t[t], out=current)
            else:
                e_t, m_t = _reachable_shift_array(current, scores[:, t])
                propagate((alpha_t[t - 1] > 0).astype(support.dtype), t, support)  # reach's exact support
                possible = (support > 0) & (scores[:, t] > -numpy.inf)
                multiply(current, e_t, out=current)
                lost_rows |= (possible & (current < tiny)).any(-1) & ~padding[:, t]
                emit_probs_t[t][...] = e_t
                shift_t[t] = numpy.where(padding[:, t], 0.0, m_t)
            total(current, -1, keepdims=True, out=c)
            divide(current, c, out=current)
            if t >= all_valid_until:
                pad = padding[:, t, None]
                copyto(current, alpha_t[t - 1], where=pad)
                copyto(c, 1.0, where=pad)


def _backward_steps_on_arrays(beta, u, weights, mask, propagate_back, all_valid_until):
    """The time loop of :func:`_scaled_backward` on numpy views of its buffers (CPU)."""
    beta_t, u_t, weights_t = list(beta.numpy()), list(u.numpy()), list(weights.numpy())
    padding = (~mask).numpy()
    multiply, copyto = numpy.multiply, numpy.copyto
    with numpy.errstate(all="ignore"):
        for t in range(len(beta_t) - 1, 0, -1):
            multiply(weights_t[t], beta_t[t], out=u_t[t])
            propagate_back(u_t[t], t, beta_t[t - 1])
            if t >= all_valid_until:
                pad = padding[:, t, None]
                copyto(u_t[t], 0.0, where=pad)
                copyto(beta_t[t - 1], beta_t[t], where=pad)


def _scaled_backward(
    alpha: Tensor, probs: TransitionProbabilities, weights: Tensor, mask: Tensor, statistics: bool = False
):
    r"""Backward recursion of the scaled algorithm (time-major), fused with the gradient.

    ``beta_{L-1} = 1``; ``beta_{t-1} = P_t u_t`` with ``u_t = e_t * beta_t / c_t``.  Posterior
    marginals are ``gamma_t = alpha_t * beta_t`` and edge marginals
    ``xi_t(i, j) = alpha_{t-1}(i) P_t(i, j) u_t(j)``.  ``weights [T, B, K]`` are ``e_t / c_t``.
    Returns ``gamma [T, B, K]`` (in ``beta``'s buffer; from the compiled loop, which keeps only two
    steps of ``beta``, a time-major view of a batch-major buffer), ``u [T, B, K]`` (``u_0 = 0``,
    ``u_t = 0`` past the length), ``finite``: True when the sum of ``gamma`` and ``u`` (or the
    statistics) is known finite (the compiled loop checks it as it writes ``gamma``), False when it
    is not, None when unchecked, and the edge statistics: with ``statistics`` set, where the compiled
    loop computes them (:func:`_compiled_loop_statistics`), each row's ``sum_t`` of every step factor's
    statistics ``[B, F, k, k]`` (:meth:`TransitionProbabilities.factor_gradients`), ``u`` then None;
    else None.
    """
    steps, batch, states = alpha.shape
    all_valid_until = int(mask.sum(-1).min()) if mask.shape[0] else steps
    factors = _compiled_loop_factors(probs, alpha) if weights.is_contiguous() and alpha.is_contiguous() else None
    if factors is not None:
        gamma = alpha.new_empty(batch, steps, states)  # batch-major: the emission gradient's layout
        factors_t = tuple(f.transpose(-1, -2).contiguous().numpy() for f in factors)
        threads = _compiled_loop_threads(probs, alpha, factors)

        def loop(u, *statistics):  # u: the backward messages' buffer, None where the statistics replace it
            return _chain_loops.scaled_backward(
                gamma.numpy(),
                u,
                weights.numpy(),
                factors_t,
                (~mask).numpy(),
                all_valid_until,
                alpha.numpy(),
                threads,
                *statistics,
            )

        if statistics and _compiled_loop_statistics(factors):
            k = factors[0].shape[-1]
            sums = alpha.new_empty(batch, len(factors), k, k)
            finite = loop(None, tuple(f.numpy() for f in factors), sums.numpy())
            return gamma.transpose(0, 1), None, finite, sums
        u = torch.empty_like(alpha)  # the loop writes u_t for every t >= 1
        u[0] = 0.0
        return gamma.transpose(0, 1), u, loop(u.numpy()), None
    beta = torch.empty_like(alpha)
    beta[steps - 1] = 1.0
    u = torch.empty_like(alpha)  # the loop writes u_t for every t >= 1
    u[0] = 0.0
    array_steps = _array_steps(probs, alpha)
    if array_steps is not None:
        _backward_steps_on_arrays(beta, u, weights, mask, array_steps[1], all_valid_until)
        return beta.mul_(alpha), u, None, None
    weights, beta_t, u_t = weights.unbind(0), beta.unbind(0), u.unbind(0)
    propagate_back = probs.backward
    for t in range(steps - 1, 0, -1):
        torch.mul(weights[t], beta_t[t], out=u_t[t])
        propagate_back(u_t[t], t, beta_t[t - 1])
        if t >= all_valid_until:
            valid = mask[:, t].unsqueeze(-1)
            u_t[t].copy_(torch.where(valid, u_t[t], torch.zeros_like(u_t[t])))
            beta_t[t - 1].copy_(torch.where(valid, beta_t[t - 1], beta_t[t]))
    return beta.mul_(alpha), u, None, None


class _ScaledLogPartition(torch.autograd.Function):
    """``log Z`` by the scaled forward algorithm, gradient by the scaled backward algorithm.

    ``apply(init, emit, lengths, transition, *transition.parameters)``: the transition's
    tensors are passed so that autograd routes their gradients, which the backward asks the
    transition's probability-space form for (:meth:`TransitionProbabilities.parameter_gradients`).
    """

    @staticmethod
    def forward(ctx, init: Tensor, emit: Tensor, lengths: Tensor, transition: Transition, *parameters: Tensor):
        mask = lengths_to_mask(lengths, emit.shape[1])
        probs = transition.probabilities()
        forward = _scaled_forward(init, probs, emit, mask)
        alpha, weights, underflowed = forward.alpha, forward.weights, forward.flagged  # u_t = weights_t beta_t
        log_z = forward.log_normaliser() + probs.log_shift_total(mask[:, 1:].double())
        ctx.save_for_backward(alpha, weights, mask, init, emit, lengths)
        ctx.probs, ctx.transition = probs, transition
        final_filter = alpha[-1]  # frozen past the length: p(z_{L-1} | x)
        ctx.mark_non_differentiable(final_filter, underflowed)
        return log_z.to(emit.dtype), final_filter, underflowed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, _grad_final_filter: Tensor, _grad_underflowed: Tensor):
        alpha, weights, mask, init, emit, lengths = ctx.saved_tensors
        probs = ctx.probs
        gamma, u, finite, statistics = _scaled_backward(alpha, probs, weights, mask, statistics=True)
        grad_init, grad_emit, grad_parameters = _smoother_gradients(
            grad, alpha, gamma, u, mask, probs, ctx.transition, init, emit, lengths, finite, statistics
        )
        return (grad_init, grad_emit, None, None) + grad_parameters


def _smoother_gradients(
    grad, alpha, gamma, u, mask, probs, transition, init, emit, lengths, finite=None, statistics=None
):
    r"""The gradient of ``sum_b grad[b] log Z[b]`` from a probability-space smoother: ``(init [B, K],
    emit [B, T, K], transition parameter gradients)``.

    ``d log Z / d emit_t = gamma_t`` (inside the length), ``d log Z / d init = gamma_0``, and the
    transition's from its filters and backward weights (``alpha [T, B, K]``, ``u [T, B, K]``,
    :meth:`TransitionProbabilities.parameter_gradients`).  ``beta_t = gamma_t / alpha_t`` overflows
    where the smoother puts its mass on a state the filter all but excludes (no step normaliser is
    small then, so the forward cannot flag it): such rows get their gradient from the log-space
    recursion (:func:`_log_space_gradient`).  One check, by a sum (inf and NaN propagate; a sum of
    huge finite ``u`` that overflows only costs a redo), an order of magnitude cheaper than
    ``isfinite().all()`` over ``[T, B, K]``, and none when the backward pass already found that sum over
    every row finite (``finite``, from the compiled loop).  ``u`` is the backward pass's own buffer,
    scaled in place.  Where the compiled backward summed each row's edge statistics (``statistics
    [B, F, k, k]``, ``u`` None), the transition's gradients are
    :meth:`TransitionProbabilities.factor_gradients` of them, each row's weighted by ``grad``, and the
    check sums them in place of ``u``.
    """
    redo = False
    if not finite:
        messages = u.sum(-1).sum(0) if statistics is None else statistics.flatten(1).sum(-1)
        overflowed = ~torch.isfinite(gamma.sum(-1).sum(0) + messages)
        redo = bool(overflowed.any())
    if redo:
        keep = ~overflowed.unsqueeze(-1)
        gamma = torch.where(keep, gamma, torch.zeros_like(gamma))
        alpha = torch.where(keep, alpha, torch.zeros_like(alpha))  # a NaN filter times u = 0 is NaN
        if statistics is None:
            u = torch.where(keep, u, torch.zeros_like(u))
        else:
            statistics = torch.where(keep[..., None, None], statistics, torch.zeros_like(statistics))
    g = grad.unsqueeze(-1)  # [B, 1]
    grad_init = gamma[0] * g
    # batch-major and contiguous, so that a caller's reshape of emit passes it back as a view; the compiled
    # backward's gamma is a batch-major buffer of its own, weighted in place (not at all for full-length
    # rows of weight 1)
    emit_weight = mask.unsqueeze(-1) * g.unsqueeze(-1)
    grad_emit = gamma.transpose(0, 1)
    if not grad_emit.is_contiguous():
        grad_emit = torch.mul(grad_emit, emit_weight, out=gamma.new_empty(grad_emit.shape))
    elif not (grad_emit.device.type == "cpu" and bool(mask.all()) and bool((grad == 1).all())):
        grad_emit.mul_(emit_weight)
    if statistics is None:
        # xi_t = alpha_{t-1} P_t (g u_t): u is the backward pass's own buffer, scaled in place
        grad_parameters = tuple(probs.parameter_gradients(alpha[:-1], u[1:].mul_(g)))
    else:
        grad_parameters = tuple(probs.factor_gradients(statistics.mul_(g[..., None, None])))
    if redo:
        rows = overflowed.nonzero().squeeze(-1)
        redone = _log_space_gradient(init, emit, lengths, transition, grad, rows)
        grad_init = grad_init.index_put((rows,), redone[0])
        grad_emit = grad_emit.index_put((rows,), redone[1])
        grad_parameters = tuple(a + b for a, b in zip(grad_parameters, redone[2:]))
    return grad_init, grad_emit, grad_parameters


def _log_space_gradient(
    init: Tensor, emit: Tensor, lengths: Tensor, transition: Transition, grad: Tensor, rows: Tensor
):
    """The gradient of ``sum_b grad[b] log Z[b]`` over the chains ``rows`` only, by autograd through
    :func:`log_space_forward`: ``(init [R, K], emit [R, T, K], *transition parameter gradients)``,
    the latter shaped as the full parameters (zero where no selected row uses them)."""
    with torch.enable_grad():
        parameters = tuple(p.detach().requires_grad_() for p in transition.parameters)
        selected = transition.with_parameters(*parameters).select_rows(rows)
        init_rows = init[rows].detach().requires_grad_()
        emit_rows = emit[rows].detach().requires_grad_()
        log_z, _ = log_space_forward(init_rows, selected, emit_rows, lengths[rows])
        inputs = (init_rows, emit_rows) + parameters
        grads = torch.autograd.grad(log_z, inputs, grad_outputs=grad[rows].to(log_z.dtype), allow_unused=True)
    return tuple(torch.zeros_like(x) if d is None else d for x, d in zip(inputs, grads))


def scaled_log_partition(
    init: Tensor, transition: Transition, emit: Tensor, lengths: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``log Z [B]`` by the scaled forward algorithm (first-order differentiable).

    Returns ``(log_z [B], final_filter [B, K], underflowed [B] bool)``: the last filtering
    distribution ``p(z_{L-1} | x)`` (not differentiable), which is what a stream carries into
    its next chunk, and a flag for chains where a step's surviving mass fell below
    :func:`underflow_threshold` (probability space lost precision, or the chain admits no
    path), whose ``log_z`` should be recomputed by :func:`log_space_forward`.  A NaN in the
    inputs gives a NaN ``log_z`` and no flag.

    With no gradient to take (autograd off, or no input requiring one) the compiled loop, where it runs,
    keeps two steps of the filter instead of the ``[T, B, K]`` buffers the backward pass needs.
    """
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (init, emit, *transition.parameters))):
        result = _log_partition_without_gradient(init, transition, emit, lengths)
        if result is not None:
            return result
    return _ScaledLogPartition.apply(init, emit, lengths, transition, *transition.parameters)


def _log_partition_without_gradient(
    init: Tensor, transition: Transition, emit: Tensor, lengths: Tensor
) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`scaled_log_partition` by the compiled forward loop alone (:func:`_compiled_forward`, nothing
    stored), or None where that loop does not run."""
    probs = transition.probabilities()
    factors = _compiled_loop_factors(probs, emit.transpose(0, 1))
    batch, steps, k = emit.shape
    if factors is None or steps == 0:
        return None
    all_valid_until = min(int(lengths.min()), steps) if batch else steps
    if all_valid_until == steps:  # every chain of length T: no padding to read, every edge counts
        padding, edges = None, torch.ones((), dtype=torch.float64).expand(batch, steps - 1)
    else:
        mask = lengths_to_mask(lengths, steps)
        padding, edges = ~mask, mask[:, 1:].double()
    result = _compiled_forward(init, probs, emit, padding, all_valid_until, factors, emit.new_empty(batch, k), None)
    if result is None:
        return None
    log_scale, final_filter, flagged = result
    return (log_scale + probs.log_shift_total(edges)).to(emit.dtype), final_filter, flagged


# ----------------------------------------------------------------------------------------------
# blocked (probability-space) forward-backward: few sequential steps
# ----------------------------------------------------------------------------------------------
def _normalised(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``x`` divided by its sum over ``dims``, at least the smallest normal number (a dead chain stays 0,
    not NaN; a subnormal sum is left unnormalised, and its step's normaliser is flagged as underflow)."""
    return x / x.sum(dims, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


class _Blocks:
    r"""The steps ``t = 1 .. n b`` of a chain cut into ``n`` blocks of ``b``: block ``m`` holds the
    steps ``t = m b + s``, ``s = 1 .. b`` (steps at or past ``T`` are padding, as are those past a
    length: both act as the identity).

    ``matrices`` is a dense per-step matrix layout (``[K, K]``, ``[B, K, K]`` or ``[B, T-1, K, K]``)
    and ``emit [B, T, K]`` the per-step vectors: the shifted transition and emission probabilities
    for the sums, the log scores for the max-plus kernels.  :meth:`at` gives step ``s`` of every
    block at once: the matrix as ``[K, K]``, ``[B, 1, K, K]`` or ``[B, n, K, K]``, the vectors
    ``[B, n, K]`` and the mask of real steps ``[B, n]`` (the values at padding steps are junk,
    which the kernels never use).
    """

    def __init__(self, matrices: Tensor, emit: Tensor, mask: Tensor, block: int):
        batch, steps, k = emit.shape
        self.block, self.count = block, -(-(steps - 1) // block)
        extra = self.count * block - (steps - 1)
        pad = torch.nn.functional.pad
        self.emit = pad(emit[:, 1:], (0, 0, 0, extra)).view(batch, self.count, block, k)
        self.mask = pad(mask[:, 1:], (0, extra)).view(batch, self.count, block)
        # steps s at which every block of every chain is real need no padding logic (one sync)
        self.all_valid = self.mask.all(1).all(0).tolist()
        if matrices.dim() == 4:
            self.matrices = pad(matrices, (0, 0, 0, 0, 0, extra)).view(batch, self.count, block, k, k)
        else:
            self.matrices = matrices if matrices.dim() == 2 else matrices.unsqueeze(1)

    def at(self, s: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Step ``s`` of every block: matrix, vectors and mask (None when every step is real)."""
        matrix = self.matrices[:, :, s - 1] if self.matrices.dim() == 5 else self.matrices
        return matrix, self.emit[:, :, s - 1], None if self.all_valid[s - 1] else self.mask[:, :, s - 1]


def _vectors_times(vectors: Tensor, probs: Tensor) -> Tensor:
    """``out[b, m] = vectors[b, m] @ P`` for ``vectors [B, n, K]`` and ``P`` as :meth:`_Blocks.at` gives it."""
    if probs.dim() == 2:
        return vectors @ probs
    if probs.shape[1] == 1:
        return torch.bmm(vectors, probs.squeeze(1))
    return (vectors.unsqueeze(-2) @ probs).squeeze(-2)


def _times_vectors(probs: Tensor, vectors: Tensor) -> Tensor:
    """``out[b, m] = P @ vectors[b, m]``: the backward direction of :func:`_vectors_times`."""
    if probs.dim() == 2:
        return vectors @ probs.transpose(0, 1)
    if probs.shape[1] == 1:
        return torch.bmm(vectors, probs.squeeze(1).transpose(1, 2))
    return (probs @ vectors.unsqueeze(-1)).squeeze(-1)


def _blocked_forward(
    init: Tensor, probs: Tensor, emit: Tensor, mask: Tensor, block: int, entries_rounded_away: Callable[[], Tensor]
):
    r"""Forward pass of the blocked algorithm: the scaled algorithm's quantities in ``2 b + n`` steps.

    With ``S_t = P_t diag(e_t)`` (the identity past the length) the filter is
    ``alpha_t \propto alpha_0 S_1 ... S_t``.  (1) The block products ``R_m = S_{mb+1} ... S_{mb+b}``
    of all ``n`` blocks at once, ``b`` batched matrix products, each row renormalised to sum 1;
    (2) the filters at the block boundaries, ``alpha_{(m+1)b} \propto alpha_{mb} R_m``, ``n``
    steps; (3) the filters inside every block at once from its first boundary, the scaled
    recursion ``a_t = (alpha_{t-1} P_t) * e_t``, ``c_t = sum a_t``, ``alpha_t = a_t / c_t``,
    ``b`` steps.  The shift of ``e_t`` is the largest emission score of step ``t`` (no
    reachability pass: a peak on a state the chain cannot be in costs precision, which the
    underflow flag reports).

    Each row of a block product (one start state) is normalised on its own, its log scale kept:
    ``R_m = diag(exp(r_m)) R'_m`` with the rows of ``R'_m`` summing to 1.  One normaliser for the
    whole matrix would let the row of a start state whose paths through the block score far below
    another's (a state that cannot reach the high emissions) fall below the smallest normal number,
    and a boundary filter on that state would then come from subnormal numbers, or from none.  The
    boundary step weighs the rows by ``alpha_{mb}(i) exp(r_m(i))`` shifted by its largest entry, so
    the dominant row has weight 1.  Returns ``alpha [T, B, K]``, ``scale [T, B]`` (the ``c_t``, 1
    past the length), ``emit_probs [B, T, K]``, the block products as ``(R' [B, n, K, K],
    r [B, n, K])`` (None when ``T = 1``), ``log_shift [B]``:
    ``log Z = sum_t log c_t + log_shift + transition shifts``, and ``lost [B]`` (bool), which marks,
    as :func:`_scaled_forward`'s does and only where not every state is reachable, chains where a
    state the chain can be in was rounded below the smallest normal number (at a step inside a
    block, in a block product's row, or in a boundary's weight or entry), or whose transition lost an
    entry of finite score to the shift (``entries_rounded_away()``, as :meth:`TransitionProbabilities.rounded_away`):
    the paths through it are gone, with no step normaliser small.
    """
    batch, steps, k = emit.shape
    shift = finite_max(emit, -1)
    emit_probs = torch.exp(emit - shift)
    init_shift = finite_max(init, -1)
    a = torch.exp(init - init_shift) * emit_probs[:, 0]
    log_shift = (shift.squeeze(-1) * mask).sum(-1) + init_shift.squeeze(-1)
    alpha0, scale0 = _normalised(a, (-1,)), a.sum(-1)
    tiny = torch.finfo(emit.dtype).tiny
    # as in _scaled_forward: lost mass is looked for only where a state may not be re-entered
    watch = not (bool((init != float("-inf")).all()) and bool((probs > 0).all()))
    lost = torch.zeros_like(mask[:, 0])
    if watch:
        lost = ((init + emit[:, 0] > float("-inf")) & (a < tiny)).any(-1) | entries_rounded_away()
    if steps == 1:
        return alpha0.unsqueeze(0), scale0.unsqueeze(0), emit_probs, None, log_shift, lost
    blocks = _Blocks(probs, emit_probs, mask, block)
    n = blocks.count
    if watch:  # tiny where the emission score is finite, else 0, as the blocks lay them out: [B, n, b, K]
        pad = (0, 0, 0, n * block - (steps - 1))
        floor = torch.nn.functional.pad((emit[:, 1:] > float("-inf")) * tiny, pad).view(batch, n, block, k)
        lost_rows = torch.zeros(batch, n, k, dtype=torch.bool, device=emit.device)  # row i of R_m lost mass
    product = torch.eye(k, dtype=emit.dtype, device=emit.device).expand(batch, n, k, k)
    log_rows = emit.new_zeros(batch, n, k)  # r_m: the log scale of each row of R'_m
    for s in range(1, block + 1):  # (1) the block products, all blocks at once
        p_s, e_s, valid = blocks.at(s)
        if watch:
            reach = product @ p_s
            step = reach * e_s.unsqueeze(-2)  # times P_t diag(e_t)
            rounded = ((reach > 0) & (step < floor[:, :, s - 1].unsqueeze(-2))).any(-1)  # a possible entry
            lost_rows |= rounded if valid is None else rounded & valid.unsqueeze(-1)
        else:
            step = product @ (p_s * e_s.unsqueeze(-2))  # times P_t diag(e_t)
        if valid is not None:
            step = torch.where(valid[..., None, None], step, product)
        rows = step.sum(-1).clamp_min(tiny)  # padding rows sum to 1
        product = step / rows.unsqueeze(-1)
        log_rows += torch.log(rows)
    # a dead row (no path from its state through the block) stays 0: its log scale is -inf
    log_rows = torch.where(product.sum(-1) > 0, log_rows, torch.full_like(log_rows, float("-inf")))
    lowest = torch.finfo(emit.dtype).min  # the shift of a dead chain's weights: they stay -inf
    boundary, weighed, reaching = [alpha0], [], []
    for m in range(n - 1):  # (2) the filters at the boundaries
        log_weights = torch.log(boundary[-1]) + log_rows[:, m]  # log alpha_{mb}(i) + r_m(i)
        weights = torch.exp(log_weights - log_weights.amax(-1, keepdim=True).clamp_min(lowest))
        reached = torch.bmm(weights.unsqueeze(1), product[:, m]).squeeze(1)
        boundary.append(_normalised(reached, (-1,)))
        weighed.append((log_weights > float("-inf")) & (lost_rows[:, m] | (weights < tiny)) if watch else None)
        reaching.append(reached)
    previous = torch.stack(boundary, 1)  # [B, n, K]: alpha_{mb}
    if watch and n > 1:  # a row that lost mass, or a weight or an entry rounded below the smallest normal number
        rows_lost, reached = torch.stack(weighed, 1), torch.stack(reaching, 1)  # [B, n - 1, K]
        rows_in = (previous[:, :-1] > 0) & (log_rows[:, : n - 1] > float("-inf"))
        entries_in = (rows_in.to(reached.dtype).unsqueeze(-2) @ (product[:, : n - 1] > 0).to(reached.dtype)).squeeze(-2)
        lost |= rows_lost.any(-1).any(-1) | ((entries_in > 0) & (reached < tiny)).any(-1).any(-1)
    alpha, scale = [], []
    for s in range(1, block + 1):  # (3) the filters inside the blocks
        p_s, e_s, valid = blocks.at(s)
        reach = _vectors_times(previous, p_s)
        a = reach * e_s
        if watch:
            rounded = ((reach > 0) & (a < floor[:, :, s - 1])).any(-1)
            lost |= (rounded if valid is None else rounded & valid).any(-1)
        c = a.sum(-1)
        if valid is None:
            previous = a / c.unsqueeze(-1).clamp_min(torch.finfo(a.dtype).tiny)
        else:
            previous = torch.where(valid.unsqueeze(-1), _normalised(a, (-1,)), previous)
            c = torch.where(valid, c, torch.ones_like(c))
        alpha.append(previous)
        scale.append(c)
    # [b, B, n, ...] -> steps t = m b + s, time-major, cut at T - 1
    alpha = torch.stack(alpha).permute(2, 0, 1, 3).reshape(n * block, batch, k)[: steps - 1]
    scale = torch.stack(scale).permute(2, 0, 1).reshape(n * block, batch)[: steps - 1]
    return (
        torch.cat([alpha0.unsqueeze(0), alpha]),
        torch.cat([scale0.unsqueeze(0), scale]),
        emit_probs,
        (product, log_rows, watch),
        log_shift,
        lost,
    )


def _blocked_backward(alpha: Tensor, probs: Tensor, emit_probs: Tensor, scale: Tensor, mask: Tensor, product, block):
    r"""Backward pass of the blocked algorithm: ``gamma [T, B, K]`` and ``u [T, B, K]`` as :func:`_scaled_backward`.

    The scaled algorithm's backward vectors, ``alpha_t . beta_t = 1`` at every ``t``, from
    ``beta_{T-1} = 1``: at the block boundaries through the saved block products
    (:func:`_blocked_forward`: ``R_m = diag(exp(r_m)) R'_m``),
    ``beta_{mb} = R_m beta_{(m+1)b} / (alpha_{mb} . R_m beta_{(m+1)b})`` (``n`` steps), then inside
    every block at once, ``beta_{t-1} = P_t (e_t * beta_t) / c_t`` (``b`` steps, the ``c_t`` of the
    forward pass).  Normalising by the filter rather than by the vector's own sum keeps precise the
    entries the marginals ``gamma_t = alpha_t * beta_t`` use: a sum would be set by a state the
    chain cannot be in (an emission peak there), beside which the states it is in fall below the
    smallest normal number.  Entries of states with ``alpha_t = 0`` are set to 0 (they meet only
    zero probabilities, and would otherwise grow without bound); as in :func:`_scaled_backward`, an
    entry can still overflow where the smoother puts its mass on a state the filter all but
    excludes.  ``u_t = e_t * beta_t / c_t`` (0 at ``t = 0`` and past the length).
    """
    steps, batch, k = alpha.shape
    product, log_rows, watch = product
    tiny = torch.finfo(alpha.dtype).tiny
    padding = -(-(steps - 1) // block) * block + 1 - steps  # positions T .. n b: the identity, alpha frozen
    filters = torch.cat([alpha, alpha[-1:].expand(padding, batch, k)])  # alpha_t, t = 0 .. n b
    # u_t = e_t * beta_t / c_t: the weights e_t / c_t, laid out in blocks with the P_t (c_t = 1 past the length)
    weights = emit_probs / scale.T.clamp_min(tiny).unsqueeze(-1)
    blocks = _Blocks(probs, weights, mask, block)
    n = blocks.count
    at_boundaries = filters[::block].transpose(0, 1)  # [B, n + 1, K]: alpha_{mb}
    # the rows' scales at the boundaries, 0 where the filter is: exp(r_m - max over the filter's states)
    seen = torch.where(at_boundaries[:, :n] > 0, log_rows, torch.full_like(log_rows, float("-inf")))
    rows = torch.exp(seen - seen.amax(-1, keepdim=True).clamp_min(torch.finfo(alpha.dtype).min))
    boundary = [(at_boundaries[:, n] > 0).to(alpha.dtype)]  # beta_{nb} = 1 (0 where alpha is)
    for m in range(n - 1, 0, -1):
        step = rows[:, m] * torch.bmm(product[:, m], boundary[-1].unsqueeze(-1)).squeeze(-1)
        boundary.append(step / (at_boundaries[:, m] * step).sum(-1, keepdim=True).clamp_min(tiny))
    following = torch.stack(boundary[::-1], 1)  # [B, n, K]: beta_{(m+1)b}
    if watch:  # where a state may be unreachable: its beta is set to 0 (alpha_{mb+s-1} at [m, s - 1])
        inner_reached = (filters[: n * block] > 0).to(alpha.dtype).view(n, block, batch, k).transpose(0, 2)
    backward = [following]
    for s in range(block, 0, -1):  # beta_{mb+s-1} from beta_{mb+s}
        p_s, w_s, valid = blocks.at(s)
        step = _times_vectors(p_s, w_s * following)
        if watch:
            step = step * inner_reached[:, s - 1]
        following = step if valid is None else torch.where(valid.unsqueeze(-1), step, following)
        backward.append(following)
    # backward[i] holds beta at s = b - i; reversed and cut, s = 0 .. b - 1 (positions m b + s)
    vectors = torch.stack(backward[::-1][:block])  # [b, B, n, K]
    beta = vectors.permute(2, 0, 1, 3).reshape(n * block, batch, k)[:steps]
    if beta.shape[0] < steps:  # T - 1 = n b: the last position is the final boundary
        beta = torch.cat([beta, backward[0][:, -1].unsqueeze(0)])
    norm = (alpha * beta).sum(-1, keepdim=True)
    beta = beta / torch.where(norm > 0, norm, torch.ones_like(norm))
    u = emit_probs.transpose(0, 1) * beta / scale.unsqueeze(-1)
    u = torch.where(mask.T.unsqueeze(-1), u, torch.zeros_like(u))
    u[0] = 0.0
    return alpha * beta, u


class _BlockedLogPartition(torch.autograd.Function):
    """``log Z`` by the blocked forward algorithm, gradient by the blocked backward algorithm.

    ``apply(init, emit, lengths, block, transition, *transition.parameters)``, as
    :class:`_ScaledLogPartition`; the gradient of the transition's parameters comes from its
    probability-space form (:meth:`TransitionProbabilities.parameter_gradients`).
    """

    @staticmethod
    def forward(ctx, init, emit, lengths, block, transition, *parameters):
        mask = lengths_to_mask(lengths, emit.shape[1])
        probs = transition.probabilities()
        alpha, scale, emit_probs, product, log_shift, lost = _blocked_forward(
            init, probs.dense(), emit, mask, block, probs.rounded_away
        )
        log_z = torch.log(scale).double().sum(0) + log_shift.double() + probs.log_shift_total(mask[:, 1:].double())
        floor = normaliser_floor(probs.smallest_entry(), emit.shape[-1], emit.dtype)
        underflowed = _underflowed(scale, mask, floor) | lost
        ctx.save_for_backward(alpha, scale, emit_probs, mask, init, emit, lengths)
        ctx.probs, ctx.product, ctx.block, ctx.transition = probs, product, block, transition
        final_filter = alpha[-1]
        ctx.mark_non_differentiable(final_filter, underflowed)
        return log_z.to(emit.dtype), final_filter, underflowed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_final_filter, _grad_underflowed):
        alpha, scale, emit_probs, mask, init, emit, lengths = ctx.saved_tensors
        probs = ctx.probs
        if ctx.product is None:  # T = 1
            gamma, u = alpha, torch.zeros_like(alpha)
        else:
            gamma, u = _blocked_backward(alpha, probs.dense(), emit_probs, scale, mask, ctx.product, ctx.block)
        grad_init, grad_emit, grad_parameters = _smoother_gradients(
            grad, alpha, gamma, u, mask, probs, ctx.transition, init, emit, lengths
        )
        return (grad_init, grad_emit, None, None, None) + grad_parameters


def default_block(steps: int) -> int:
    """``b = ceil(sqrt(T - 1))``: about ``3 sqrt(T)`` sequential steps forward, ``2 sqrt(T)`` backward."""
    return max(1, math.isqrt(max(steps - 2, 0)) + 1)


def _block_size(block: int | None, steps: int) -> int:
    """The blocked kernels' ``block`` argument: :func:`default_block` when None, else a positive integer."""
    if block is None:
        return default_block(steps)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer (or None for default_block), got {block!r}")
    return block


def blocked_log_partition(
    init: Tensor, transition: Transition, emit: Tensor, lengths: Tensor, block: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``log Z [B]`` by the blocked scaled algorithm (first-order differentiable): few sequential steps.

    The chain's ``T - 1`` steps are cut into ``n = ceil((T-1)/b)`` blocks of ``b`` (default
    :func:`default_block`); the forward pass takes ``2 b + n`` sequential batched operations
    (:func:`_blocked_forward`) and the backward ``b + n`` (:func:`_blocked_backward`) instead
    of ``T`` each, at the price of ``O(B T K^3)`` arithmetic for the block products (dense:
    a low-rank transition is densified for them).  Memory: ``O(B T K)`` for the vectors and
    ``O(B n K^2)`` for the block products (time-varying: the padded ``[B, n b, K, K]``
    probabilities).  Returns what :func:`scaled_log_partition` returns.

    Measured on the CPU (forward + backward, float32, 2 threads, alternating with the scaled
    algorithm in one process): it wins only where the chain is long and ``B K^3`` tiny, e.g. 2.4x
    at ``(B, T, K) = (4, 10000, 8)`` and 2.0x at ``(2, 4096, 4)``, even at ``(4, 10000, 16)``,
    but 0.7-0.8x at ``(8, 1024, 16)``, ``(8, 1024, 8)`` and ``(4, 256, 8)``, and 0.3x or less from
    ``K = 64``, where the block products' ``K^3`` outweighs the steps saved
    (:func:`prefers_blocked` is the rule ``method="auto"`` follows).
    """
    block = _block_size(block, emit.shape[1])
    return _BlockedLogPartition.apply(init, emit, lengths, block, transition, *transition.parameters)


BLOCKED_MIN_STEPS = 2048
BLOCKED_MAX_WORK = 2**12


def prefers_blocked(transition: Transition, emit: Tensor) -> bool:
    r"""``method="auto"``'s choice: the blocked algorithm (:func:`blocked_log_partition`) rather than the
    scaled one (:func:`scaled_log_partition`) for a chain of ``emit [B, T, K]``.

    On the CPU, with a dense transition: ``T >= BLOCKED_MIN_STEPS`` (2048) and
    ``B K^3 <= BLOCKED_MAX_WORK`` (4096).  The scaled recursion steps on numpy views there
    (about a microsecond a call), so its cost is ``T`` short steps; the blocked one's is
    ``O(B T K^3)`` batched arithmetic plus ``O(sqrt T)`` steps of several torch operations.
    Measured (forward + backward, float32, 2 threads, alternating in one process; blocked time /
    scaled time): 0.42 at ``(4, 10000, 8)`` (``B K^3 = 2048``), 0.50 at ``(2, 4096, 4)``, 0.98 at
    ``(4, 10000, 16)`` (16384), 0.74 at ``(1, 1024, 16)`` (one short chain), 1.3-1.4 at
    ``(8, 1024, 16)``, ``(8, 1024, 8)``, ``(4, 256, 8)`` and ``(4, 1024, 16)``, 1.8 at
    ``(32, 50, 20)`` and 3.7 at ``(16, 64, 64)``; the log-space forward and the scan were slower
    than both at every one of these sizes.  Elsewhere (other devices, low-rank and product
    transitions) the scaled algorithm, as before this rule: the blocked algorithm has not been
    measured on a GPU.

    The same rule takes :func:`blocked_viterbi` and :func:`blocked_forward_filter` (sampling) for
    ``method="auto"``.  Measured (``benchmarks/results/chain-blocked-decode.json``, as above, the
    machine loaded; blocked / sequential, medians): Viterbi 0.29 at ``(4, 10000, 8)`` and 0.18 at
    ``(2, 4096, 4)``, but 2.7 at ``(8, 1024, 16)`` and 0.94 at ``(4, 10000, 16)`` (fastest repeats
    1.26; 1.29 in an earlier run), outside the rule (max-plus products have no BLAS); sampling 0.83
    and 0.74 inside the rule, 0.99-1.01 outside it: the backward sampling's ``T - 1`` steps, the
    same in both, are most of its time.

    These ratios predate the blocked forward's per-row block normalisation and lost-mass checks
    (the float32 fixes), which made it 1.3-1.4x slower (1.8-2.4x with structural zeros); remeasured
    after them, inside the rule it still took 0.58-0.60 of the sequential kernels' time (0.25-0.82
    with structural zeros; ``docs/benchmarks.md``, a loaded machine).

    Not where the scaled loops run compiled (:func:`compiled_loops_apply`: one matrix for every step,
    which covers the whole rule but time-varying matrices): a step there costs its arithmetic, and the
    blocked kernels took 3.3-6.3x the scaled time for ``log Z`` forward + backward and 1.05-1.2x for
    sampling (2 threads, quiet machine, one process; ``(4, 10000, 8)``, ``(2, 4096, 4)``,
    ``(1, 4096, 16)``, ``(4, 10000, 16)``, ``(1, 2048, 8)``).  Viterbi has its own rule
    (:func:`prefers_blocked_viterbi`), with the same exception.
    """
    return prefers_blocked_viterbi(transition, emit) and not compiled_loops_apply(transition, emit)


def prefers_blocked_viterbi(transition: Transition, emit: Tensor) -> bool:
    """``method="auto"``'s choice of :func:`blocked_viterbi` over :func:`viterbi`: the rule of
    :func:`prefers_blocked` before the compiled loops (CPU, dense, ``T >= BLOCKED_MIN_STEPS``,
    ``B K^3 <= BLOCKED_MAX_WORK``), except where :func:`viterbi`'s loops run compiled
    (:func:`compiled_loops_apply`).  Against the torch-and-numpy sequential Viterbi, blocked /
    sequential was 0.29 at ``(4, 10000, 8)``, 0.18 at ``(2, 4096, 4)``, 0.38 at ``(1, 2048, 8)``;
    against the compiled one 20-25 (median of 7, 2 threads: those sizes, ``(8, 1024, 16)`` and
    ``(4, 10000, 16)``), so time-varying matrices are all the rule takes now."""
    batch, steps, k = emit.shape
    return (
        emit.device.type == "cpu"
        and isinstance(transition, DenseTransition)
        and steps >= BLOCKED_MIN_STEPS
        and batch * k**3 <= BLOCKED_MAX_WORK
        and not compiled_loops_apply(transition, emit)
    )


def compiled_loops_apply(transition: Transition, emit: Tensor) -> bool:
    """Whether the scaled forward and backward, Viterbi and backward sampling of a chain of
    ``emit [B, T, K]`` run compiled (``latentnlp._chain_loops``): a dense transition with one matrix for
    every step (:func:`_compiles`; the scaled loops also need, decided per call, every state
    reachable: no ``-inf`` in ``init`` or the matrix)."""
    return isinstance(transition, DenseTransition) and _compiles(transition.log, emit)


BLOCKED_ENTROPY_MIN_STEPS = 4096
BLOCKED_ENTROPY_MAX_WORK = 2**14


def prefers_blocked_entropy(transition: Transition, emit: Tensor) -> bool:
    r"""``method="auto"``'s choice for :meth:`ChainPosterior.entropy` without a gradient: :func:`blocked_entropy`
    rather than the scaled forward-backward of :func:`chain_entropy`, for a chain of ``emit [B, T, K]``.

    On the CPU, with a dense transition: ``T >= BLOCKED_ENTROPY_MIN_STEPS`` (4096) and
    ``B K^3 <= BLOCKED_ENTROPY_MAX_WORK`` (``2^14``): long chains of few states.  Measured
    (``benchmarks/results/chain-blocked-entropy-scaled.json``: float32, 2 threads, alternating in one
    process on a quiet machine; blocked time / scaled time, fastest and median of 5): 0.54-0.59 at
    ``(B, T, K) = (2, 4096, 4)``, 0.59-0.85 at ``(4, 10000, 8)``, 0.72-0.74 at ``(4, 10000, 16)``
    (``B K^3 = 2^14``); the scaled one wins everywhere else on the grid: 1.2-1.6 at ``(8, 1024, 16)``,
    ``(4, 256, 8)``, ``(1, 16, 4)`` and ``(16, 16, 16)``, 1.9-2.8 at ``(8, 1024, 32)``,
    ``(32, 50, 20)``, ``(2, 64, 64)``, ``(16, 64, 32)``, ``(4, 1024, 64)``, ``(8, 64, 64)``,
    ``(32, 50, 32)``, 3.5-10 at ``(16, 64, 64)``, ``(1, 2048, 128)`` and ``(16, 64, 128)``, 36-63 at
    ``(8, 256, 256)`` and ``(4, 128, 512)``.  (The rule was broader, ``B K^3 <= 2^19`` at any ``T``,
    while :func:`chain_entropy` was a log-space recursion of a dozen torch operations a step.)
    Elsewhere (other devices, low-rank transitions) the scaled one: the blocked kernels have not been
    measured on a GPU.  Not where the scaled loops run compiled (:func:`compiled_loops_apply`): there the
    blocked entropy took 2.3-12x the scaled one's time (the five sizes of :func:`prefers_blocked`).
    """
    batch, steps, k = emit.shape
    return (
        emit.device.type == "cpu"
        and isinstance(transition, DenseTransition)
        and steps >= BLOCKED_ENTROPY_MIN_STEPS
        and batch * k**3 <= BLOCKED_ENTROPY_MAX_WORK
        and not compiled_loops_apply(transition, emit)
    )


# ----------------------------------------------------------------------------------------------
# log space
# ----------------------------------------------------------------------------------------------
def log_space_forward(init: Tensor, transition: Transition, emit: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    r"""``log Z [B]`` by the forward recursion in the log semiring, autograd through it (any order).

    ``a_0 = init + emit_0``; ``a_t = logsumexp_i(a_{t-1}[i] + trans_t[i, :]) + emit_t``; result
    ``logsumexp_k a_{L-1}[k]``.  Each step is the transition's
    :meth:`~latentnlp.transitions.Transition.log_propagator` (through the factors of a low-rank
    one).  Also returns the last filtering distribution ``p(z_{L-1} | x) [B, K]`` (detached),
    as :func:`scaled_log_partition` does.
    """
    mask = lengths_to_mask(lengths, emit.shape[1])
    step = transition.log_propagator()
    a = init + emit[:, 0]
    for t in range(1, emit.shape[1]):
        a = torch.where(mask[:, t].unsqueeze(-1), step(a, t) + emit[:, t], a)
    total = LogSemiring.plus(a, -1)
    return total, torch.exp(a.detach() - total.detach().unsqueeze(-1))


def scan_log_partition(init: Tensor, transition: Transition, emit: Tensor, lengths: Tensor) -> Tensor:
    r"""``log Z [B]`` by a parallel prefix (tree) product of transfer matrices (dense).

    ``M_t[i, j] = trans_t[i, j] + emit_t[j]`` for ``1 <= t < L`` (the log-space identity
    past the length); ``log Z = logsumexp_{i,j} (init_i + emit_0[i] + (M_1 ... M_{T-1})[i, j])``
    with the product taken pairwise in ``ceil(log2 T)`` rounds of batched log-matmuls.
    Work ``O(T K^3)``, depth ``O(log T)``, memory ``O(B T K^2)``: for long chains with few states.
    """
    batch, steps, k = emit.shape
    start = init + emit[:, 0]
    if steps == 1:
        return torch.logsumexp(start, -1)
    trans = transition.dense()
    mask = lengths_to_mask(lengths, steps)[:, 1:]
    if trans.dim() == 4:
        trans_all = trans
    else:
        trans_all = (trans if trans.dim() == 2 else trans.unsqueeze(1)).expand(batch, steps - 1, k, k)
    eye = torch.full((k, k), float("-inf"), dtype=emit.dtype, device=emit.device)
    eye.fill_diagonal_(0.0)
    transfer = torch.where(mask[..., None, None], trans_all + emit[:, 1:].unsqueeze(-2), eye)
    while transfer.shape[1] > 1:
        if transfer.shape[1] % 2:
            transfer = torch.cat([transfer, eye.expand(batch, 1, k, k)], 1)
        transfer = LogSemiring.matmul(transfer[:, 0::2], transfer[:, 1::2])
    return torch.logsumexp(LogSemiring.matmul(start.unsqueeze(-2), transfer[:, 0]).squeeze(-2), -1)


# ----------------------------------------------------------------------------------------------
# Viterbi and k-best
# ----------------------------------------------------------------------------------------------
def _max_plus_forward(init: Tensor, trans: Tensor, emit: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, int]:
    r"""The Viterbi scores of every position, time-major: ``(scores [T, B, K], mask [B, T], all_valid_until)``.

    ``a_0 = init + emit_0``; ``a_t[j] = max_i (a_{t-1}[i] + trans_t[i, j]) + emit_t[j]`` for
    ``t < L`` and ``a_t = a_{t-1}`` past the length.  ``trans`` is dense (``[K, K]``,
    ``[B, K, K]`` or ``[B, T-1, K, K]``).  A step is one sum into a preallocated
    ``[K_prev, B, K_next]`` buffer and one max over its leading dimension, which reduces
    contiguous rows (several times faster than a max over a middle or last dimension of the
    same numbers); no back-pointers are stored (:func:`viterbi` recomputes the one it follows).
    ``all_valid_until = min(lengths)``: steps before it have no padding.
    """
    batch, steps, k = emit.shape
    mask = lengths_to_mask(lengths, steps)
    scores = emit.new_empty(steps, batch, k)
    torch.add(init, emit[:, 0], out=scores[0])
    # per-step views taken once: indexing inside the loop costs as much as the small reductions
    score_t, emit_t = scores.unbind(0), emit.unbind(1)
    previous_at = tuple(a.T.unsqueeze(-1) for a in score_t)  # a_t as [K_prev, B, 1]
    # the transition as [K_prev, 1 or B, K_next] views
    if trans.dim() == 4:
        trans_at = (None,) + tuple(x.transpose(0, 1) for x in trans.unbind(1))
    else:
        trans_at = (None,) + (trans.unsqueeze(1) if trans.dim() == 2 else trans.transpose(0, 1),) * (steps - 1)
    candidates = emit.new_empty(k, batch, k)  # [K_prev, B, K_next]
    all_valid_until = int(lengths.min()) if batch else steps
    for t in range(1, steps):
        current = score_t[t]
        torch.add(previous_at[t - 1], trans_at[t], out=candidates)
        torch.amax(candidates, 0, out=current)
        current.add_(emit_t[t])
        if t >= all_valid_until:
            current.copy_(torch.where(mask[:, t].unsqueeze(-1), current, score_t[t - 1]))
    return scores, mask, all_valid_until


def _backtrack(scores, columns, mask, all_valid_until: int, rows, path, where) -> None:
    r"""Viterbi backtracking over the scores ``a [T, B, K]`` of :func:`_max_plus_forward` into ``path [T, B]``.

    ``z_{L-1} = argmax_j a_{L-1}[j]`` and ``z_{t-1} = argmax_i (a_{t-1}[i] + trans_t[i, z_t])``
    for ``t < L`` (``z`` kept past the length, where ``path`` gets junk): the back-pointer of
    the chosen state only, a ``[B, K]`` argmax a step.  ``columns`` is the transition with the
    "from" state last, ``[K_next, K_prev]`` or ``[B, K_next, K_prev]``, or the time-varying
    ``[B, T-1, K_prev, K_next]`` itself; ``rows = arange(B)``.  The arrays are all torch
    tensors (``where = torch.where``) or all numpy arrays (``numpy.where``), whose indexing
    costs a fraction of torch's on the CPU; both libraries' argmax returns the first maximum,
    so ties go to the lowest state index.
    """
    steps = scores.shape[0]
    if columns.ndim == 4:

        def into(t, z):
            return columns[rows, t - 1, :, z]

    elif columns.ndim == 3:

        def into(t, z):
            return columns[rows, z]

    else:

        def into(t, z):
            return columns[z]

    current = scores[steps - 1].argmax(-1)  # frozen past the length: argmax of a_{L-1}
    for t in range(steps - 1, 0, -1):
        path[t] = current
        previous = (scores[t - 1] + into(t, current)).argmax(-1)
        current = where(mask[:, t], previous, current) if t >= all_valid_until else previous
    path[0] = current


@torch.no_grad()
def viterbi(init: Tensor, transition: Transition, emit: Tensor, lengths: Tensor) -> Tensor:
    r"""The highest-scoring path ``argmax_z s(z)``: ``[B, T]`` long, padding filled with 0.

    Max-plus forward ``a_t[j] = max_i (a_{t-1}[i] + trans_t[i, j]) + emit_t[j]``
    (:func:`_max_plus_forward`), then backtracking from ``z_{L-1} = argmax_j a_{L-1}[j]`` with
    ``z_{t-1} = argmax_i (a_{t-1}[i] + trans_t[i, z_t])`` (:func:`_backtrack`): the back-pointer
    of the chosen state is recomputed rather than stored for every state, because an argmax
    over ``K x K`` a step costs several times the max alone.  Ties go to the lowest state index,
    as a stored pointer's would.  On the CPU both loops run compiled where one matrix serves every
    step (:func:`_compiled_viterbi`), else the backtracking runs on numpy views of the same
    memory.  Dense: a max over a sum of factors has no factored form, so a low-rank transition
    is densified (:meth:`~latentnlp.transitions.Transition.dense`).
    """
    trans = transition.dense().detach()
    batch, steps, _ = emit.shape
    if _compiles(trans, emit):
        return _compiled_viterbi(init, trans, emit, lengths)
    scores, mask, all_valid_until = _max_plus_forward(init, trans, emit, lengths)
    columns = trans if trans.dim() == 4 else trans.transpose(-1, -2).contiguous()
    path = torch.empty(steps, batch, dtype=torch.long, device=emit.device)
    if emit.device.type == "cpu" and emit.dtype in (torch.float32, torch.float64):
        arrays = (scores.numpy(), columns.numpy(), mask.numpy(), all_valid_until, numpy.arange(batch))
        _backtrack(*arrays, path.numpy(), numpy.where)
    else:
        rows = torch.arange(batch, device=emit.device)
        _backtrack(scores, columns, mask, all_valid_until, rows, path, torch.where)
    return path.T.contiguous().mul_(mask)


def _compiles(trans: Tensor, scores: Tensor) -> bool:
    """Whether a loop over the dense log matrix ``trans`` and ``scores [B, T, K]`` runs compiled: the
    module built, CPU float32 or float64 tensors of one dtype, one matrix for every step (``[K, K]`` or
    ``[B, K, K]``) and ``B K^2 <= COMPILED_LOOP_MAX_WORK``."""
    batch, _, k = scores.shape
    return (
        _chain_loops is not None
        and scores.device.type == "cpu"
        and scores.dtype in (torch.float32, torch.float64)
        and trans.dtype == scores.dtype
        and trans.dim() <= 3
        and batch * k * k <= COMPILED_LOOP_MAX_WORK
    )


def _compiled_viterbi(init: Tensor, trans: Tensor, emit: Tensor, lengths: Tensor) -> Tensor:
    """:func:`viterbi` by the compiled loops (``latentnlp._chain_loops.viterbi``): the max-plus forward
    into ``scores [T, B, K]`` from ``a_0 = init + emit_0``, then the backtracking from the transition's
    columns, ties to the lowest index as in :func:`_backtrack`: ``[B, T]`` long, padding 0."""
    batch, steps, _ = emit.shape
    mask = lengths_to_mask(lengths, steps)
    emit = emit.detach().contiguous()
    scores = emit.new_empty(steps, batch, emit.shape[-1])
    torch.add(init.detach(), emit[:, 0], out=scores[0])
    matrix = trans.contiguous()
    columns = matrix.transpose(-1, -2).contiguous()
    path = torch.empty(steps, batch, dtype=torch.long)
    all_valid_until = int(lengths.min()) if batch else steps
    _chain_loops.viterbi(
        scores.numpy(), emit.numpy(), matrix.numpy(), columns.numpy(), (~mask).numpy(), all_valid_until, path.numpy()
    )
    return path.T.contiguous().mul_(mask)


MAX_PLUS_CHUNK = 2**24
"""The most elements of the broadcast sum of one of :func:`blocked_viterbi`'s max-plus products; a larger
product is reduced in chunks of its summed-over index (``K^2 B n`` elements a chunk at least)."""


def _max_plus_product(transfer: Tensor, product: Tensor) -> Tensor:
    """``out[j, i] = max_l (product[l, i] + transfer[l, j])`` over ``[K, K, N]`` operands: ``[K, K, N]``."""
    k, _, flat = product.shape
    chunk = max(1, MAX_PLUS_CHUNK // max(1, k * k * flat))
    out = None
    for start in range(0, k, chunk):
        part = (transfer[start : start + chunk].unsqueeze(2) + product[start : start + chunk].unsqueeze(1)).amax(0)
        out = part if out is None else torch.maximum(out, part, out=out)
    return out


def _max_plus_identity(k: int, like: Tensor) -> Tensor:
    """The max-plus identity ``[K, K]``: 0 on the diagonal, ``-inf`` elsewhere."""
    eye = torch.full((k, k), float("-inf"), dtype=like.dtype, device=like.device)
    return eye.fill_diagonal_(0.0)


@torch.no_grad()
def blocked_viterbi(
    init: Tensor, transition: Transition, emit: Tensor, lengths: Tensor, block: int | None = None
) -> Tensor:
    r"""The highest-scoring path ``argmax_z s(z)`` in ``O(sqrt T)`` sequential steps: ``[B, T]`` long, padding 0.

    The max-plus counterpart of :func:`blocked_log_partition`, with the steps cut into the same
    ``n`` blocks of ``b`` (default :func:`default_block`; steps past the length are the max-plus
    identity).  With the transfer matrices ``M_t[i, j] = trans_t[i, j] + emit_t[j]``:

    1. the block products ``Q_m = M_{mb+1} (x) ... (x) M_{mb+b}``,
       ``(A (x) M)[i, j] = max_l (A[i, l] + M[l, j])``, of all ``n`` blocks at once: ``b`` batched
       max-plus products, ``O(B n K^3)`` each (a broadcast sum and a max, in chunks of ``l`` past
       :data:`MAX_PLUS_CHUNK` elements);
    2. the Viterbi scores at the block boundaries, ``a_{(m+1)b}[j] = max_i (a_{mb}[i] + Q_m[i, j])``
       from ``a_0 = init + emit_0``: ``n`` steps;
    3. the scores inside every block at once from its first boundary,
       ``a_t[j] = max_i (a_{t-1}[i] + trans_t[i, j]) + emit_t[j]``, with each step's back-pointers
       of every block and state: ``b`` steps;
    4. for every block and every state ``k`` at its end, the block's best path into ``k``, by
       following the pointers of all blocks at once (``b`` steps); then from the last state,
       ``z_{T-1} = argmax_j a_{T-1}[j]`` (``= argmax a_{L-1}``: padding is the identity), the
       states at the boundaries, each the start of the following block's path into the state
       after it (``n`` steps), which select each block's path.

    Each block product and each boundary vector is shifted by its largest finite entry (an argmax
    is invariant to it), so scores stay of the size of one block's, whatever ``T``.  The path
    is assembled from the pointers of one pass, so it is consistent however rounding breaks
    near-ties; among tied optima any maximiser may be returned (not necessarily the one
    :func:`viterbi` returns).  ``3 b + 2 n`` sequential steps for ``O(B T K^3)`` arithmetic
    against :func:`viterbi`'s ``2 T`` steps of ``O(B K^2)``.  Dense: a low-rank transition is
    densified, as for :func:`viterbi`.  Returns what :func:`viterbi` returns.
    """
    trans = transition.dense().detach()
    batch, steps, k = emit.shape
    block = _block_size(block, steps)
    mask = lengths_to_mask(lengths, steps)
    first = init + emit[:, 0]
    if steps == 1:
        return first.argmax(-1, keepdim=True).mul_(mask)
    blocks = _Blocks(trans, emit, mask, block)
    n = blocks.count
    flat = batch * n

    # every [K, K]-by-block quantity is held as [K, K, B n], the blocks innermost, so that a step's
    # broadcast sum runs over contiguous rows of both operands and its max reduces the leading dimension
    def transfer_at(s: int) -> tuple[Tensor, Tensor | None]:
        """``M_t [K_prev, K_next, B n]`` at step ``s`` of every block, and the mask of real steps ``[B n]``."""
        trans_s, e_s, valid = blocks.at(s)
        transfer = (trans_s + e_s.unsqueeze(-2)).permute(2, 3, 0, 1).contiguous().view(k, k, flat)
        return transfer, None if valid is None else valid.reshape(flat)

    eye = _max_plus_identity(k, emit).unsqueeze(-1)
    product = None  # Q_m[i, j] as [j, i, B n]
    for s in range(1, block + 1):  # (1) the block products, all blocks at once
        transfer, valid = transfer_at(s)
        if product is None:
            step = transfer.transpose(0, 1).contiguous()
        else:  # Q[i, l] + M_t[l, j], maximised over l
            step = _max_plus_product(transfer, product)
        if valid is not None:
            step = torch.where(valid, step, eye if product is None else product)
        peak = step.amax((0, 1), keepdim=True)
        product = step - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    blocked_product = product.view(k, k, batch, n)
    boundary = [(first - finite_max(first, -1)).T]  # a_0 as [K, B]
    for m in range(n - 1):  # (2) the scores at the boundaries
        following = (boundary[-1].unsqueeze(0) + blocked_product[..., m]).amax(1)
        boundary.append(following - finite_max(following, 0))
    previous = torch.stack(boundary, -1).reshape(k, flat)  # a_{mb}, shifted, [K, B n]
    states = torch.arange(k, device=emit.device).unsqueeze(-1)
    pointers = []
    for s in range(1, block + 1):  # (3) the scores and back-pointers inside the blocks
        transfer, valid = transfer_at(s)
        best, pointer = (previous.unsqueeze(1) + transfer).max(0)  # [K_next, B n]
        if valid is not None:
            best, pointer = torch.where(valid, best, previous), torch.where(valid, pointer, states)
        previous = best
        pointers.append(pointer)
    # (4) every block's best path into each of its end states, all blocks at once: into[s - 1] holds
    # the state at m b + s of the path that ends at k at (m + 1) b (padding steps point to themselves)
    current = states.expand(k, flat)
    into = [None] * block
    for s in range(block, 0, -1):
        into[s - 1] = current
        current = pointers[s - 1].gather(0, current)
    start = current.view(k, batch, n)  # the state at m b of the path that ends at k at (m + 1) b
    end = torch.empty(batch, n, dtype=torch.long, device=emit.device)  # the path's state at (m + 1) b
    end[:, n - 1] = previous.view(k, batch, n)[..., n - 1].argmax(0)
    rows = torch.arange(batch, device=emit.device)
    for m in range(n - 1, 0, -1):
        end[:, m - 1] = start[end[:, m], rows, m]
    inner = torch.stack(into).view(block, k, batch, n).gather(1, end.expand(block, 1, batch, n)).squeeze(1)
    path = torch.cat([start[..., 0].gather(0, end[:, :1].T).T, inner.permute(1, 2, 0).reshape(batch, n * block)], 1)
    return path[:, :steps].mul_(mask)


def _kbest_forward(init: Tensor, trans: Tensor, emit: Tensor, lengths: Tensor, k: int):
    r"""The k-best recursion, time-major: ``(scores [T, B, K, k], pointers [T, B, K, k], mask, all_valid_until)``.

    ``a_0[j, 0] = init[j] + emit_0[j]`` (other ranks ``-inf``); ``a_t[j, r]`` = the ``r``-th best
    of ``a_{t-1}[i, r'] + trans_t[i, j]`` over ``(i, r')``, plus ``emit_t[j]``, with the
    back-pointer ``i k + r'``; ``a_t = a_{t-1}`` past the length.  A step is one
    ``[B, K_next, K_prev, k]`` sum into a preallocated buffer and one ``topk`` over its last two
    dimensions, written into the buffers.  ``trans`` dense; ``all_valid_until = min(lengths)``.
    """
    batch, steps, num_states = emit.shape
    mask = lengths_to_mask(lengths, steps)
    scores = emit.new_full((steps, batch, num_states, k), float("-inf"))
    pointers = torch.zeros(steps, batch, num_states, k, dtype=torch.long, device=emit.device)
    torch.add(init, emit[:, 0], out=scores[0, :, :, 0])
    # per-step views taken once; the transition with the "from" state last, [(B,) K_next, K_prev, 1]
    score_t, pointer_t, emit_t = scores.unbind(0), pointers.unbind(0), emit.unsqueeze(-1).unbind(1)
    into = trans.transpose(-1, -2).unsqueeze(-1)
    into_at = (None,) + (into.unbind(1) if trans.dim() == 4 else (into,) * (steps - 1))
    candidates = emit.new_empty(batch, num_states, num_states, k)
    flat_candidates = candidates.view(batch, num_states, num_states * k)
    all_valid_until = int(lengths.min()) if batch else steps
    for t in range(1, steps):
        current = score_t[t]
        torch.add(score_t[t - 1].unsqueeze(1), into_at[t], out=candidates)
        torch.topk(flat_candidates, k, -1, out=(current, pointer_t[t]))
        current.add_(emit_t[t])
        if t >= all_valid_until:
            current.copy_(torch.where(mask[:, t, None, None], current, score_t[t - 1]))
    return scores, pointers, mask, all_valid_until


@torch.no_grad()
def kbest_viterbi(init: Tensor, transition: Transition, emit: Tensor, lengths: Tensor, k: int) -> tuple[Tensor, Tensor]:
    r"""The ``k`` highest-scoring paths: ``(paths [k, B, T], scores [k, B])``, best first.

    Each state keeps its ``k`` best partial paths (:func:`_kbest_forward`); the ``k`` best of
    ``a_{L-1}`` over ``(state, rank)`` are followed back through the pointers
    (:func:`_kbest_backtrack`, on numpy views on the CPU).  If fewer than ``k`` paths exist the
    extra scores are ``-inf``.  Dense, as :func:`viterbi`.
    """
    trans = transition.dense().detach()
    batch, steps, num_states = emit.shape
    scores, pointers, mask, all_valid_until = _kbest_forward(init, trans, emit, lengths, k)
    best, flat = scores[steps - 1].reshape(batch, num_states * k).topk(k, dim=-1)  # [B, k]
    paths = torch.empty(steps, batch, k, dtype=torch.long, device=emit.device)
    if emit.device.type == "cpu":
        arrays = (pointers.numpy(), flat.numpy(), mask.numpy(), all_valid_until, numpy.arange(batch)[:, None])
        _kbest_backtrack(*arrays, k, paths.numpy(), numpy.where)
    else:
        rows = torch.arange(batch, device=emit.device).unsqueeze(-1)
        _kbest_backtrack(pointers, flat, mask, all_valid_until, rows, k, paths, torch.where)
    return paths.permute(2, 1, 0).mul_(mask).contiguous(), best.transpose(0, 1).contiguous()


def _kbest_backtrack(pointers, flat, mask, all_valid_until: int, rows, k: int, paths, where) -> None:
    """Follow the pointers ``[T, B, K, k]`` of :func:`_kbest_forward` from the final ``state * k + rank``
    entries ``flat [B, k]`` into ``paths [T, B, k]`` (junk past the length); ``rows = arange(B)[:, None]``.
    All torch tensors or all numpy arrays, as :func:`_backtrack`."""
    steps = pointers.shape[0]
    state, rank = flat // k, flat % k
    for t in range(steps - 1, 0, -1):
        paths[t] = state
        previous = pointers[t][rows, state, rank]
        if t >= all_valid_until:
            valid = mask[:, t, None]
            state, rank = where(valid, previous // k, state), where(valid, previous % k, rank)
        else:
            state, rank = previous // k, previous % k
    paths[0] = state


# ----------------------------------------------------------------------------------------------
# filtering and forward-filter backward-sample
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def forward_filter(init: Tensor, transition: Transition, emit: Tensor, lengths: Tensor) -> Tensor:
    r"""Log filtering distributions ``log p(z_t | x_{0..t})``: ``[B, T, K]`` (frozen past the length).

    Scaled recursion; if some chain's scaling underflows, the batch is redone in log space
    (:func:`_log_space_filter`).
    """
    mask = lengths_to_mask(lengths, emit.shape[1])
    forward = _scaled_forward(init, transition.probabilities(), emit, mask)
    alpha, flagged = forward.alpha, forward.flagged
    if torch.isfinite(alpha).all() and not flagged.any():
        return safe_log(alpha.transpose(0, 1))
    return _log_space_filter(init, transition, emit, mask)


@torch.no_grad()
def blocked_forward_filter(
    init: Tensor, transition: Transition, emit: Tensor, lengths: Tensor, block: int | None = None
) -> Tensor:
    r"""The filters of :func:`forward_filter` by the blocked forward pass: ``[B, T, K]``, ``2 b + n`` sequential steps.

    ``alpha_t`` for every ``t`` is what :func:`_blocked_forward` computes on its way to ``log Z``
    (the boundary filters through the block products, then every block's inner filters at once;
    ``b`` the block, default :func:`default_block`, ``n = ceil((T-1)/b)``), so with
    :func:`backward_sample` it draws exact samples, the filter's share of the ``T`` steps cut
    to ``O(sqrt T)``.  If some chain's step normaliser underflowed or its mass was lost (as
    :func:`blocked_log_partition` flags it), the batch is redone in log space, as
    :func:`forward_filter` does.  Dense: a low-rank transition is densified.
    """
    mask = lengths_to_mask(lengths, emit.shape[1])
    block = _block_size(block, emit.shape[1])
    probs = transition.probabilities()
    alpha, scale, _, _, _, lost = _blocked_forward(init, probs.dense(), emit, mask, block, probs.rounded_away)
    floor = normaliser_floor(probs.smallest_entry(), emit.shape[-1], emit.dtype)
    if torch.isfinite(alpha).all() and not (_underflowed(scale, mask, floor) | lost).any():
        return safe_log(alpha.transpose(0, 1))
    return _log_space_filter(init, transition, emit, mask)


def _log_space_filter(init: Tensor, transition: Transition, emit: Tensor, mask: Tensor) -> Tensor:
    """``log alpha_t`` by the log-space recursion (the transition's log propagation, through the factors
    of a low-rank one), the fallback of the probability-space filters: ``[B, T, K]``."""
    step = transition.log_propagator()
    log_alpha = torch.empty_like(emit)
    a = init + emit[:, 0]
    log_alpha[:, 0] = a - torch.logsumexp(a, -1, keepdim=True)
    for t in range(1, emit.shape[1]):
        a = step(log_alpha[:, t - 1], t) + emit[:, t]
        a = a - torch.logsumexp(a, -1, keepdim=True)
        log_alpha[:, t] = torch.where(mask[:, t].unsqueeze(-1), a, log_alpha[:, t - 1])
    return log_alpha


@torch.no_grad()
def backward_sample(
    log_filter: Tensor,
    transition: Transition,
    lengths: Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Exact posterior samples by backward sampling: ``[S, B, T]`` long, padding 0.

    ``z_{L-1} ~ p(z_{L-1} | x)`` (the last filtering distribution) and
    ``p(z_{t-1} = i | z_t = j, x) \propto alpha_{t-1}(i) exp(trans_t[i, j])``
    (:meth:`~latentnlp.transitions.Transition.sample_previous`; through the rank for a
    low-rank transition, ``O(S B (K + r))`` a step).  On the CPU, where one dense matrix serves
    every step and ``B K^2 <= COMPILED_LOOP_MAX_WORK``, the loop runs compiled, each draw inverting
    the cumulative weights at one uniform of ``torch.rand(T-1, S, B, generator=generator)``.
    """
    batch, steps, k = log_filter.shape
    mask = lengths_to_mask(lengths, steps)
    path = torch.zeros(num_samples, batch, steps, dtype=torch.long, device=log_filter.device)
    last = log_filter.gather(1, (lengths - 1).view(batch, 1, 1).expand(batch, 1, k)).squeeze(1)
    current = gumbel_argmax(last.expand(num_samples, batch, k), generator)
    if compiled_loops_apply(transition, log_filter):
        columns = transition.log.detach().transpose(-1, -2).contiguous()  # [(B,) K_next, K_prev]
        uniform = torch.rand(max(steps - 1, 0), num_samples, batch, generator=generator, dtype=log_filter.dtype)
        _chain_loops.backward_sample(
            log_filter.detach().contiguous().numpy(),
            columns.numpy(),
            (~mask).numpy(),
            uniform.numpy(),
            current.contiguous().numpy(),
            path.numpy(),
        )
        return path
    for t in range(steps - 1, 0, -1):
        valid = mask[:, t]
        path[:, :, t] = torch.where(valid, current, torch.zeros_like(current))
        previous = transition.sample_previous(log_filter[:, t - 1], current, t, generator)
        current = torch.where(valid, previous, current)
    path[:, :, 0] = current
    return path


# ----------------------------------------------------------------------------------------------
# entropy and path scores
# ----------------------------------------------------------------------------------------------
def chain_entropy(init: Tensor, transition: Transition, emit: Tensor, lengths: Tensor) -> Tensor:
    r"""Entropy of the chain distribution ``p(z) = exp(s(z) - log Z)``: ``[B]``, differentiable.

    ``H = log Z - E_p[s(z)]`` from the scaled forward-backward (:func:`_scaled_entropy`: the
    marginals and the step normalisers in the scores as the kernel shifted them, accumulated in
    float64, as :func:`blocked_entropy` does with the blocked one), ``O(T)`` steps of one
    ``[B, K] x [K, K]`` product each.  Rows it flags (a normaliser underflowed, mass was lost, a
    marginal does not sum to 1, a non-finite value) are recomputed by the exact log-space recursion
    :func:`_entropy_recursion`, which is finite and ``>= 0`` in float32 as in float64.  Terms of zero
    weight (structural zeros, ``-inf`` scores) are left out, value and gradient (0, never NaN).
    Dense: ``P log P`` of a low-rank ``P`` does not factor, so a low-rank transition is densified
    (``O(K^2)`` memory).

    The gradient is written by hand (:class:`_ChainEntropy`): with ``theta`` the scores (init, the
    transition's dense log matrix, emit) and ``mu = d log Z / d theta`` the marginals,
    ``H = log Z - <mu, theta>`` and ``dH / d theta = -(d^2 log Z / d theta^2) theta = -Cov_p(f, s)``:
    the derivative of the marginals along the scores themselves, one forward and one backward
    tangent recursion of the scaled algorithm (:func:`_entropy_gradient`), ``O(B T K^2)`` time and
    ``O(B T K)`` memory.  Flagged rows get theirs by autograd through the recursion.  First-order only.
    """
    trans = transition.dense()
    if torch.is_grad_enabled() and any(x.requires_grad for x in (init, trans, emit)):
        return _ChainEntropy.apply(init, emit, lengths, trans)
    return _ChainEntropy.value(init, trans, emit, lengths)[0]


def _entropy_recursion(init: Tensor, trans: Tensor, emit: Tensor, lengths: Tensor) -> Tensor:
    r"""The entropy of :func:`chain_entropy` by an exact log-space recursion on the dense log transition
    ``trans`` (autograd through it), for the rows the scaled algorithm flags.

    Uses the backward factorisation ``p(z) = p(z_{L-1}) prod_t p(z_{t-1} | z_t, x_{<t})`` with the
    backward conditionals ``w_t(i, j) = alpha_{t-1}(i) P_t(i, j) / c'_t(j)``,
    ``c'_t(j) = sum_i alpha_{t-1}(i) P_t(i, j)``:

    ``H_t(j) = sum_i w_t(i, j) (H_{t-1}(i) - log w_t(i, j))``, ``H_0 = 0``, and
    ``H = sum_j alpha_{L-1}(j) (H_{L-1}(j) - log alpha_{L-1}(j))``.

    All in log space: ``log w_t(i, j) = log alpha_{t-1}(i) + trans_t[i, j] - log c'_t(j)`` with
    ``log c'_t(j)`` a logsumexp over ``i`` shifted per column ``j`` (``[B, K, K]`` a step,
    ``O(B K^2)`` exponentials), and the filter ``log alpha_t = log c'_t + emit_t`` normalised by
    a logsumexp.  Each ``w_t(i, j)`` and ``log w_t(i, j)`` is so exact to rounding, however far a
    path's score is below the others, and every term of the sums is ``>= 0``: the entropy is
    finite and ``>= 0`` in float32 as in float64, with a relative error of ``O(T K eps)``.  Terms
    of zero or subnormal weight are left out, value and gradient (0, never NaN).
    """
    mask = lengths_to_mask(lengths, emit.shape[1])

    def normalised(log_a: Tensor) -> Tensor:
        total = logsumexp(log_a, -1).unsqueeze(-1)
        return log_a - torch.where(torch.isfinite(total), total, torch.zeros_like(total))

    # weights below the smallest normal number are left out: each term is under tiny * (H - log w),
    # beneath the resolution of any entropy the dtype can hold, and exp() of such arguments takes
    # a subnormal slow path (about 100x a normal one on the CPU)
    smallest_log_weight = math.log(torch.finfo(emit.dtype).tiny)

    def weighted(log_w: Tensor, entropy: Tensor, dim: int) -> Tensor:
        """``sum_dim w (entropy - log w)`` over the entries of normal ``w = exp(log w)``."""
        kept = log_w > smallest_log_weight
        finite_log_w = torch.where(kept, log_w, torch.zeros_like(log_w))
        terms = torch.exp(finite_log_w) * (entropy - finite_log_w)
        return torch.where(kept, terms, torch.zeros_like(terms)).sum(dim)

    log_alpha = normalised(init + emit[:, 0])
    entropy_to = torch.zeros_like(log_alpha)
    for t in range(1, emit.shape[1]):
        scores = log_alpha.unsqueeze(-1) + _dense_at(trans, t)  # log alpha_{t-1}(i) + trans_t[i, j]: [B, K, K]
        log_reach = logsumexp(scores, -2)  # log c'_t [B, K]
        reach_shift = torch.where(torch.isfinite(log_reach), log_reach, torch.zeros_like(log_reach))
        new_entropy = weighted(scores - reach_shift.unsqueeze(-2), entropy_to.unsqueeze(-1), -2)
        valid = mask[:, t].unsqueeze(-1)
        log_alpha = torch.where(valid, normalised(log_reach + emit[:, t]), log_alpha)
        entropy_to = torch.where(valid, new_entropy, entropy_to)
    return weighted(log_alpha, entropy_to, -1)


class _ChainEntropy(torch.autograd.Function):
    """The entropy of :func:`chain_entropy`, its gradient by :func:`_entropy_gradient`.

    ``apply(init, emit, lengths, trans)`` with ``trans`` the dense log transition (a low-rank one's
    ``dense()``, through which autograd takes the gradient on to its factors).
    """

    @staticmethod
    def value(init: Tensor, trans: Tensor, emit: Tensor, lengths: Tensor):
        """``(entropy [B], flagged [B], (alpha, weights, probs))``: the scaled value, flagged rows by the
        recursion; the scaled state is what :func:`_entropy_gradient` starts from."""
        entropy, flagged, state = _scaled_entropy(init, trans, emit, lengths)
        if bool(flagged.any()):
            rows = flagged.nonzero().squeeze(-1)
            redone = _entropy_recursion(
                init[rows] if init.dim() > 1 else init,
                trans[rows] if trans.dim() > 2 else trans,
                emit[rows],
                lengths[rows],
            )
            entropy = entropy.index_put((rows,), redone)
        return entropy, flagged, state

    @staticmethod
    def forward(ctx, init: Tensor, emit: Tensor, lengths: Tensor, trans: Tensor):
        entropy, flagged, (alpha, weights, probs) = _ChainEntropy.value(init, trans, emit, lengths)
        ctx.save_for_backward(init, emit, lengths, trans, alpha, weights, flagged)
        ctx.probs = probs
        return entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        init, emit, lengths, trans, alpha, weights, flagged = ctx.saved_tensors
        grad_init, grad_emit, grad_trans, redo = _entropy_gradient(
            grad, init, trans, emit, lengths, alpha, weights, ctx.probs, flagged
        )
        if bool(redo.any()):  # those rows by autograd through the recursion
            rows = redo.nonzero().squeeze(-1)
            batched_init, batched_trans = init.dim() > 1, trans.dim() > 2
            with torch.enable_grad():
                leaves = (
                    (init.detach()[rows] if batched_init else init.detach()).requires_grad_(),
                    (trans.detach()[rows] if batched_trans else trans.detach()).requires_grad_(),
                    emit.detach()[rows].requires_grad_(),
                )
                value = _entropy_recursion(leaves[0], leaves[1], leaves[2], lengths[rows])
                redone = torch.autograd.grad(value, leaves, grad[rows].to(value.dtype), allow_unused=True)
            redo_init, redo_trans, redo_emit = (torch.zeros_like(x) if r is None else r for x, r in zip(leaves, redone))
            grad_init = grad_init.index_put((rows,), redo_init) if batched_init else grad_init + redo_init
            grad_emit = grad_emit.index_put((rows,), redo_emit)
            grad_trans = grad_trans.index_put((rows,), redo_trans) if batched_trans else grad_trans + redo_trans
        return grad_init.to(init.dtype), grad_emit.to(emit.dtype), None, grad_trans.to(trans.dtype)


def _scaled_entropy(init: Tensor, trans: Tensor, emit: Tensor, lengths: Tensor):
    """``H = log Z - E_p[s]`` by the scaled forward-backward (:func:`_smoother_entropy`) on the dense log
    transition: ``(entropy [B], flagged [B] bool, (alpha, weights, probs))`` (``weights = e_t / c_t``,
    ``probs`` the transition's shifted probabilities)."""
    mask = lengths_to_mask(lengths, emit.shape[1])
    probs = DenseTransition(trans).probabilities()
    alpha, scale, weights, shifts, underflowed, _ = _scaled_forward(init, probs, emit, mask)
    gamma, u, _, _ = _scaled_backward(alpha, probs, weights, mask)
    emit_scores = emit - shifts.T.unsqueeze(-1)  # e_t = exp(emit_t - m_t) wherever e_t > 0
    first_scores = init + emit[:, 0] - shifts[0].unsqueeze(-1)  # a_0 = exp(init + emit_0 - m_0)
    shift = finite_max(trans.flatten(-2), -1).squeeze(-1)  # as shifted_exp: P = exp(trans - shift)
    entropy, flagged = _smoother_entropy(
        first_scores, emit_scores, trans, mask, probs.dense(), shift, alpha, scale, gamma, u
    )
    return entropy, flagged | underflowed, (alpha, weights, probs)


def _entropy_gradient(grad, init, trans, emit, lengths, alpha, weights, probs, flagged):
    r"""``d sum_b grad[b] H_b / d (init, emit, trans)`` as ``-grad[b]`` times the derivative of the
    marginals along the scores, and the rows to redo: ``(grad_init, grad_emit, grad_trans, redo [B] bool)``,
    from the scaled forward's ``alpha``, ``weights`` and shifted probabilities ``probs``
    (:func:`_scaled_entropy`) and the rows it ``flagged`` (redone too, with those whose tangents are
    not finite).

    Directions (shifted by constants per matrix and step, which ``Cov(f, s)`` ignores; 0 where a
    score is ``-inf``): ``v_0 = init - max``, ``V_t = trans_t - max``, ``d_t = emit_t - max``, and
    ``Q_t = P_t * V_t``.  With the scaled algorithm's ``alpha_t``, ``c_t``, ``w_t = e_t / c_t``, the
    forward tangent is ``x_t = (dalpha_{t-1} P_t + alpha_{t-1} Q_t) * w_t + alpha_t * d_t``
    (``x_0 = alpha_0 * (v_0 + d_0)``), ``kappa_t = sum x_t`` (``dc_t / c_t``),
    ``dalpha_t = x_t - alpha_t kappa_t``; the backward one, from ``beta_{T-1} = 1``,
    ``dbeta_{T-1} = 0``: ``u_t = w_t * beta_t``, ``du_t = u_t * (d_t - kappa_t) + w_t * dbeta_t``,
    ``beta_{t-1} = P_t u_t``, ``dbeta_{t-1} = Q_t u_t + P_t du_t`` (padding: ``dalpha`` and ``dbeta``
    frozen, ``u = du = 0``).  Then ``dgamma_t = dalpha_t * beta_t + alpha_t * dbeta_t`` (init and
    emit) and ``sum_t dxi_t = P * (S(dalpha, u) + S(alpha, du) + V * S(alpha, u))`` with
    ``P * S(a, b) = P * sum_t a_{t-1}^T b_t`` the transition's
    :meth:`~latentnlp.transitions.TransitionProbabilities.parameter_gradients`.
    """
    batch, steps, k = emit.shape
    mask = lengths_to_mask(lengths, steps)
    P = probs.dense()
    finite = torch.isfinite(trans)
    V = torch.where(finite, trans - finite_max(trans.flatten(-2), -1).unsqueeze(-1), torch.zeros_like(trans))
    Q = P * V
    d = torch.where(torch.isfinite(emit), emit - finite_max(emit, -1), torch.zeros_like(emit)).transpose(0, 1)
    v0 = torch.where(torch.isfinite(init), init - finite_max(init, -1), torch.zeros_like(init))
    alpha_dot, kappa = torch.empty_like(alpha), alpha.new_zeros(steps, batch)  # [T, B, K], [T, B]
    x = alpha[0] * (v0 + d[0])
    kappa[0] = x.sum(-1)
    alpha_dot[0] = x - alpha[0] * kappa[0].unsqueeze(-1)
    gamma_dot, u, u_dot = torch.empty_like(alpha), torch.zeros_like(alpha), torch.zeros_like(alpha)
    tangents = (alpha, weights, P, Q, d, mask, alpha_dot, kappa, gamma_dot, u, u_dot)
    if alpha.device.type == "cpu" and batch * k * k <= ARRAY_LOOP_MAX_WORK:
        _tangent_steps_on_arrays(*(x.numpy() for x in tangents))
    else:
        _tangent_steps(*tangents)
    redo = flagged | ~torch.isfinite(gamma_dot.sum((0, 2)) + u_dot.sum((0, 2)))
    g = torch.where(redo, torch.zeros_like(grad), grad).to(alpha.dtype).unsqueeze(-1)  # [B, 1]
    keep = ~redo.unsqueeze(-1)
    gamma_dot, alpha_dot = torch.where(keep, gamma_dot, 0.0), torch.where(keep, alpha_dot, 0.0)
    u, u_dot, a = torch.where(keep, u, 0.0), torch.where(keep, u_dot, 0.0), torch.where(keep, alpha, 0.0)
    grad_emit = -(gamma_dot.transpose(0, 1) * (mask.unsqueeze(-1) * g.unsqueeze(-1)))
    grad_init = -gamma_dot[0] * g
    if init.dim() == 1:
        grad_init = grad_init.sum(0)
    (moved,), (dmoved,), (edges,) = (
        probs.parameter_gradients(x[:-1], y[1:]) for x, y in ((alpha_dot * g, u), (a * g, u_dot), (a * g, u))
    )
    grad_trans = -(moved + dmoved + V * edges)
    return grad_init, grad_emit, grad_trans, redo


def _tangent_steps(alpha, weights, P, Q, d, mask, alpha_dot, kappa, gamma_dot, u, u_dot) -> None:
    """The tangent recursions of :func:`_entropy_gradient` (``t >= 1``; ``alpha_dot[0]`` and ``kappa[0]``
    given), written into ``alpha_dot``, ``kappa``, ``gamma_dot``, ``u`` and ``u_dot``."""
    steps = alpha.shape[0]
    for t in range(1, steps):
        p_t, q_t = _dense_at(P, t), _dense_at(Q, t)
        reach = torch.matmul(alpha_dot[t - 1].unsqueeze(-2), p_t) + torch.matmul(alpha[t - 1].unsqueeze(-2), q_t)
        x = reach.squeeze(-2) * weights[t] + alpha[t] * d[t]
        total = x.sum(-1, keepdim=True)
        valid = mask[:, t].unsqueeze(-1)
        alpha_dot[t] = torch.where(valid, x - alpha[t] * total, alpha_dot[t - 1])
        kappa[t] = torch.where(valid, total, torch.zeros_like(total)).squeeze(-1)
    beta, beta_dot = torch.ones_like(alpha[0]), torch.zeros_like(alpha[0])
    for t in range(steps - 1, 0, -1):
        gamma_dot[t] = alpha_dot[t] * beta + alpha[t] * beta_dot
        valid = mask[:, t].unsqueeze(-1)
        u_t = torch.where(valid, weights[t] * beta, torch.zeros_like(beta))
        du_t = torch.where(valid, u_t * (d[t] - kappa[t].unsqueeze(-1)) + weights[t] * beta_dot, torch.zeros_like(beta))
        u[t], u_dot[t] = u_t, du_t
        p_t, q_t = _dense_at(P, t), _dense_at(Q, t)
        following = torch.matmul(p_t, u_t.unsqueeze(-1)).squeeze(-1)
        following_dot = (torch.matmul(q_t, u_t.unsqueeze(-1)) + torch.matmul(p_t, du_t.unsqueeze(-1))).squeeze(-1)
        beta = torch.where(valid, following, beta)
        beta_dot = torch.where(valid, following_dot, beta_dot)
    gamma_dot[0] = alpha_dot[0] * beta + alpha[0] * beta_dot


def _tangent_steps_on_arrays(alpha, weights, P, Q, d, mask, alpha_dot, kappa, gamma_dot, u, u_dot) -> None:
    """:func:`_tangent_steps` on numpy views of CPU tensors (small ``B K^2``: a numpy call costs a
    fraction of a torch operation's dispatch, as in the scaled kernels' loops)."""
    steps = alpha.shape[0]
    matmul, multiply = numpy.matmul, numpy.multiply
    if P.ndim == 2:  # x @ M and M @ y for a shared [K, K], per-row [B, K, K] or per-step [B, T-1, K, K]
        P_t, Q_t = P.T, Q.T

        def times(x, m, t):
            return x @ m

        def into(m_t, y, t):
            return y @ m_t
    else:

        def times(x, m, t):
            m = m[:, t - 1] if m.ndim == 4 else m
            return matmul(x[:, None, :], m)[:, 0]

        def into(m, y, t):
            m = m[:, t - 1] if m.ndim == 4 else m
            return matmul(m, y[:, :, None])[:, :, 0]

        P_t, Q_t = P, Q
    padding = ~mask
    all_valid_until = int(mask.sum(-1).min()) if mask.shape[0] else steps
    with numpy.errstate(all="ignore"):
        for t in range(1, steps):
            x = times(alpha_dot[t - 1], P, t) + times(alpha[t - 1], Q, t)
            multiply(x, weights[t], out=x)
            x += alpha[t] * d[t]
            total = x.sum(-1)
            x -= alpha[t] * total[:, None]
            if t >= all_valid_until:
                x[padding[:, t]] = alpha_dot[t - 1][padding[:, t]]
                total[padding[:, t]] = 0.0
            alpha_dot[t], kappa[t] = x, total
        beta, beta_dot = numpy.ones_like(alpha[0]), numpy.zeros_like(alpha[0])
        for t in range(steps - 1, 0, -1):
            gamma_dot[t] = alpha_dot[t] * beta + alpha[t] * beta_dot
            u_t = weights[t] * beta
            du_t = u_t * (d[t] - kappa[t][:, None]) + weights[t] * beta_dot
            following = into(P_t, u_t, t)
            following_dot = into(Q_t, u_t, t) + into(P_t, du_t, t)
            if t >= all_valid_until:
                pad = padding[:, t]
                u_t[pad], du_t[pad] = 0.0, 0.0
                following[pad], following_dot[pad] = beta[pad], beta_dot[pad]
            u[t], u_dot[t] = u_t, du_t
            beta, beta_dot = following, following_dot
        gamma_dot[0] = alpha_dot[0] * beta + alpha[0] * beta_dot


@torch.no_grad()
def blocked_entropy(
    init: Tensor, transition: Transition, emit: Tensor, lengths: Tensor, block: int | None = None
) -> tuple[Tensor, Tensor]:
    r"""The entropy of :func:`chain_entropy` by the blocked forward-backward: ``(entropy [B], flagged [B] bool)``.

    ``H = log Z - E_p[s(z)]`` with the marginals of the blocked algorithm (:func:`_blocked_forward`,
    :func:`_blocked_backward`; ``b`` the block, default :func:`default_block`): ``2 b + n``
    sequential steps forward, ``b + n`` backward.  In the scores the kernels shift (``init - m``,
    ``log e_t = emit_t - m_t``, ``log P_t = trans_t - s_t``, each shift a constant added to
    every path's score and to ``log Z`` alike) ``log Z`` is ``sum_{t<L} log c_t``, so

    .. math:: H = \sum_{t<L} \log c_t - \langle \gamma_0, \mathrm{init} - m \rangle
              - \sum_{t<L} \langle \gamma_t, \log e_t \rangle
              - \sum_{1 \le t < L} \sum_{i,j} \xi_t(i, j) \log P_t(i, j)

    with ``gamma_t = alpha_t * beta_t`` and ``xi_t(i, j) = alpha_{t-1}(i) P_t(i, j) u_t(j)``; the
    terms of zero marginal are left out (``0 * -inf = 0``: structural zeros), the sums accumulated
    in float64.  The shifts keep both sides of the difference of the size of the entropy's own
    terms instead of ``log Z``'s, which in float32 would cost ``eps |log Z|``.  A shared or per-row
    transition needs only ``sum_t xi_t = P * sum_t alpha_{t-1}^T u_t`` (``[B, K, K]``, one batched
    product); a time-varying one ``alpha_{t-1} . ((P_t log P_t) u_t)`` a step, all steps at once.

    Not differentiable (the blocked backward is first-order: :meth:`ChainPosterior.entropy` takes
    :func:`chain_entropy` when a gradient is needed).  ``flagged`` marks the chains whose result
    should be recomputed by :func:`chain_entropy`: a step normaliser underflowed or mass was lost (as
    :func:`blocked_log_partition` flags it), some marginal ``gamma_t`` does not sum to 1 within
    ``sqrt(eps)`` (the backward lost precision), or the entropy is not finite.  Dense: a low-rank
    transition is densified (``P log P`` does not factor).
    """
    trans = transition.dense().detach()
    init, emit = init.detach(), emit.detach()
    batch, steps, k = emit.shape
    block = _block_size(block, steps)
    mask = lengths_to_mask(lengths, steps)
    probs, shift = shifted_exp(trans, 2)
    alpha, scale, emit_probs, product, _, lost = _blocked_forward(
        init, probs, emit, mask, block, lambda: rounded_away(probs, trans)
    )
    if product is None:  # T = 1
        gamma, u = alpha, torch.zeros_like(alpha)
    else:
        gamma, u = _blocked_backward(alpha, probs, emit_probs, scale, mask, product, block)
    emit_scores = emit - finite_max(emit, -1)  # the shifts of _blocked_forward
    first_scores = init - finite_max(init, -1) + emit_scores[:, 0]
    entropy, flagged = _smoother_entropy(first_scores, emit_scores, trans, mask, probs, shift, alpha, scale, gamma, u)
    return entropy, flagged | lost


def _smoother_entropy(first_scores, emit_scores, trans, mask, probs, shift, alpha, scale, gamma, u):
    r"""``H = log Z - E_p[s(z)]`` from a probability-space smoother (see :func:`blocked_entropy` for the
    equation): ``(entropy [B], flagged [B] bool)`` from the filters ``alpha``, normalisers ``scale``,
    marginals ``gamma`` and backward weights ``u`` (``[T, B, K]``) of the shifted probabilities
    ``probs = exp(trans - shift)``, and the scores as the kernel shifted them: ``first_scores [B, K]``
    with ``a_0 = exp(first_scores)`` and ``emit_scores [B, T, K]`` with ``e_t = exp(emit_scores_t)``
    (``t >= 1``).  ``flagged``: a normaliser underflowed, a marginal does not sum to 1 within
    ``sqrt(eps)``, the entropy is not finite, or below minus :data:`ENTROPY_RESOLUTION` ``eps`` times
    one plus the size of its terms (the caller adds its own lost-mass flag); the entropy is clamped at 0."""
    steps = emit_scores.shape[1]
    wide = torch.float64
    states = (gamma.transpose(0, 1) * mask.unsqueeze(-1))[:, 1:]  # [B, T-1, K], 0 past the length
    log_z = torch.log(scale).to(wide).sum(0)  # c_t = 1 past the length
    first = expected_score(gamma[0].to(wide), first_scores.to(wide), (-1,))
    emitted = expected_score(states.to(wide), emit_scores[:, 1:].to(wide), (-2, -1))
    log_probs = trans - shift[(...,) + (None,) * 2]
    if steps == 1:
        moved = torch.zeros_like(log_z)
    elif trans.dim() == 4:
        probs_log_probs = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
        following = (probs_log_probs @ u[1:].transpose(0, 1).unsqueeze(-1)).squeeze(-1)  # [B, T-1, K]
        moved = (alpha[:-1].transpose(0, 1) * following).sum(-1).to(wide).sum(-1)
    else:
        pairs = torch.bmm(alpha[:-1].permute(1, 2, 0), u[1:].transpose(0, 1)) * probs  # sum_t xi_t [B, K, K]
        moved = expected_score(pairs.to(wide), log_probs.to(wide), (-2, -1))
    entropy = log_z - first - emitted - moved
    eps = torch.finfo(emit_scores.dtype).eps
    unnormalised = (((gamma.sum(-1) - 1).abs() > math.sqrt(eps)) & mask.T).any(0)
    # a difference of terms each accurate to about eps times its size: within that of zero (a chain
    # all but deterministic) the entropy is 0 to the precision there is, and is returned >= 0; the
    # 1 is a floor for terms that are all about 0 (a deterministic chain whose shifted scores are 0)
    resolution = ENTROPY_RESOLUTION * eps * (1 + log_z.abs() + first.abs() + emitted.abs() + moved.abs())
    floor = normaliser_floor(smallest_positive(probs, 3 if probs.dim() == 4 else 2), probs.shape[-1], probs.dtype)
    flagged = _underflowed(scale, mask, floor) | unnormalised | ~torch.isfinite(entropy) | (entropy < -resolution)
    return entropy.clamp_min(0.0).to(emit_scores.dtype), flagged


def path_score(init: Tensor, transition: Transition, emit: Tensor, lengths: Tensor, path: Tensor) -> Tensor:
    r"""``s(z)`` for paths ``z [*, B, T]`` (entries past the length ignored): ``[*, B]``.

    The edge scores are the transition's :meth:`~latentnlp.transitions.Transition.edge_scores`
    of the path's pairs only (``O(T r)`` for a low-rank transition, never ``K x K``).
    """
    batch, steps, k = emit.shape
    mask = lengths_to_mask(lengths, steps)
    z = torch.where(mask, path, torch.zeros_like(path))
    lead = z.shape[:-2]
    score = init.expand(*lead, batch, k).gather(-1, z[..., :1]).squeeze(-1)
    score = score + (emit.expand(*lead, batch, steps, k).gather(-1, z.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    if steps > 1:
        edge = transition.edge_scores(z[..., :-1], z[..., 1:])
        score = score + torch.where(mask[:, 1:], edge, torch.zeros_like(edge)).sum(-1)
    return score
