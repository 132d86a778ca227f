r"""Factorial chains: ``L`` independent Markov chains whose observations depend on all of them.

A factorial HMM (Ghahramani & Jordan 1997) has ``L`` chains of ``K`` states each; chain ``l``
has its own ``init^l`` and ``trans^l_t`` (row = from, column = to), and observation ``t`` is
scored by all chains' states at once.  The score of a path ``z [T, L]`` of length ``N`` is

.. math:: s(z) = \sum_l \Big(\mathrm{init}^l[z^l_0] + \sum_{1 \le t < N} \mathrm{trans}^l_t[z^l_{t-1}, z^l_t]\Big)
          + \sum_{t < N} \mathrm{emit}[t, z^0_t, \dots, z^{L-1}_t]

and :class:`FactorialChainPosterior` is ``p(z) = exp(s(z) - log Z)``.  Read as one chain over the
``K^L`` joint states (flattened row-major, ``z = sum_l z^l K^(L-1-l)``), its transition is the
Kronecker product ``P = P^0 (x) ... (x) P^{L-1}`` in probability space.  :class:`ProductTransition`
is that transition as a :class:`~latentnlp.transitions.Transition` that never builds ``P``: a
joint message ``[B, K, ..., K]`` is propagated by contracting one chain's axis at a time (one
BLAS matmul per chain, ``O(B L K^(L+1))`` a step instead of ``O(B K^(2L))``), so the chain
kernels of :mod:`latentnlp.chain` (scaled forward-backward with its hand-written backward and
underflow flag, log-space forward, forward filtering and backward sampling) run on it unchanged.

Where ``K^L`` is too large for exact inference, :func:`structured_mean_field` fits
``q(z) = prod_l q_l(z^l)``, each ``q_l`` an exact :class:`~latentnlp.structures.ChainPosterior`,
by coordinate ascent on the evidence lower bound, for an emission given as a joint tensor
(:class:`JointEmission`), as a Gaussian with additive means (:class:`GaussianEmission`), or as
Bernoulli or categorical variables with additive logits (:class:`BernoulliEmission`,
:class:`CategoricalEmission`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy
import torch
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.utils import lazy_property

from .chain import ARRAY_LOOP_MAX_WORK
from .gumbel import gumbel_argmax
from .masks import lengths_to_mask
from .precision import computation_dtype
from .semirings import LogSemiring, expected_score, safe_log
from .structures import ChainPosterior
from .transitions import (
    DenseTransition,
    Transition,
    TransitionProbabilities,
    rounded_away,
    shifted_exp,
    smallest_positive,
)
from .validation import describe, is_validating

__all__ = [
    "BernoulliEmission",
    "CategoricalEmission",
    "FactorialChainPosterior",
    "GaussianEmission",
    "JointEmission",
    "MeanField",
    "ProductTransition",
    "structured_mean_field",
]

FACTORIAL_METHODS = ("auto", "scaled", "log")

GRADIENT_CHUNK_STATES = 2**18
"""The most joint states (``steps x B x K^L``) in one chunk of the product transition's gradient
(:meth:`_ProductProbabilities.parameter_gradients`), 1 MB of float32 in each of its ``L + 1`` buffers.

Measured (2 threads, alternating in one process, the benchmark's allocator that returns every
large block to the system): the gradient at ``(L, K, B, T) = (4, 8, 8, 128)`` took 52 ms against
75 ms with chunks of ``T / L`` steps, 22 against 29 ms at ``(3, 12, 8, 128)``; the same with
glibc's default allocator, which reuses freed blocks (no page faults to save)."""


def _digits(index: Tensor, num_chains: int, num_states: int) -> list[Tensor]:
    """The per-chain states ``z^l`` of joint states ``index`` (row-major): ``L`` tensors of its shape."""
    return [(index // num_states ** (num_chains - 1 - ell)) % num_states for ell in range(num_chains)]


def _joint_index(states: Sequence[Tensor], num_states: int) -> Tensor:
    """The joint state ``sum_l z^l K^(L-1-l)`` of per-chain states (the inverse of :func:`_digits`)."""
    index = torch.zeros_like(states[0])
    for z in states:
        index = index * num_states + z
    return index


def _on_axis(x: Tensor, axis: int, num_chains: int) -> Tensor:
    """``x [..., K]`` viewed as ``[..., 1, .., K, .., 1]`` with its states on chain axis ``axis`` of ``L``."""
    shape = [1] * num_chains
    shape[axis] = x.shape[-1]
    return x.reshape(*x.shape[:-1], *shape)


# ==============================================================================================
# the product transition
# ==============================================================================================
class ProductTransition(Transition):
    r"""The transition of ``L`` independent chains over their ``K^L`` joint states, never densified.

    ``trans_t[z, z'] = sum_l trans^l_t[z^l, z'^l]`` with joint states flattened row-major.  Each
    chain's log matrix is ``[K, K]``, ``[B, K, K]`` or ``[B, T-1, K, K]`` (the layouts of
    :class:`~latentnlp.transitions.DenseTransition`; the chains may mix them).  A belief
    ``[B, K^L]`` is propagated as ``[B, K, ..., K]`` by contracting chain ``l``'s axis with
    ``P^l``, for ``l = 0..L-1``: the axis being contracted is first, the product
    ``[B, K^(L-1), K] @ P^l`` (the message seen transposed, as BLAS takes it) puts the result
    last, so after ``L`` contractions the axes are back in order, with one batched product per
    chain (numpy's on the CPU while a step is small, else ``torch.bmm``) and no copy of the message
    (``O(B L K^(L+1))`` a step).  Only :meth:`dense` builds the ``K^L x K^L`` matrix.
    """

    def __init__(self, chains: Sequence[Tensor]):
        if not len(chains):
            raise ValueError("trans must hold at least one chain's transition, got none")
        self.chains = tuple(DenseTransition(log) for log in chains)
        sizes = {c.num_states for c in self.chains}
        if len(sizes) != 1 or any(c.log.shape[-2] != c.num_states for c in self.chains):
            raise ValueError(
                "trans: every chain must have a square [K, K] transition with the same K, got shapes "
                + ", ".join(str(tuple(c.log.shape)) for c in self.chains)
            )
        self.chain_states = sizes.pop()

    @property
    def parameters(self) -> tuple[Tensor, ...]:
        return tuple(c.log for c in self.chains)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(f"trans[{ell}]" for ell in range(len(self.chains)))

    def with_parameters(self, *parameters: Tensor) -> ProductTransition:
        return ProductTransition(parameters)

    @property
    def num_chains(self) -> int:
        return len(self.chains)

    @property
    def num_states(self) -> int:
        return self.chain_states**self.num_chains

    @property
    def rank(self) -> int:
        return self.num_states

    @property
    def time_varying(self) -> bool:
        return any(c.time_varying for c in self.chains)

    def check_shape(self, batch: int, steps: int, num_states: int) -> None:
        if num_states != self.num_states:
            raise ValueError(
                f"trans: {self.num_chains} chains of K={self.chain_states} states make "
                f"{self.num_states} joint states, but the chain has {num_states}"
            )
        for ell, c in enumerate(self.chains):
            try:
                c.check_shape(batch, steps, self.chain_states)
            except ValueError as error:
                raise ValueError(f"trans[{ell}]: {error}") from None

    def check_finite(self) -> None:
        _check_transitions_finite(self.chains)

    def without_padding(self, edges: Tensor) -> ProductTransition:
        return ProductTransition([c.without_padding(edges).log for c in self.chains])

    def select_rows(self, rows: Tensor) -> ProductTransition:
        return ProductTransition([c.select_rows(rows).log for c in self.chains])

    def probabilities(self) -> TransitionProbabilities:
        return _ProductProbabilities(
            [shifted_exp(c.log, 2) for c in self.chains], self.chain_states, [c.log for c in self.chains]
        )

    def log_propagator(self) -> Callable[[Tensor, int], Tensor]:
        r"""``b'(z') = log sum_z exp(b(z) + sum_l trans^l_t[z^l, z'^l])``, one chain's axis at a time
        (log-semiring products on the rotating layout of the class docstring)."""
        k = self.chain_states
        shared = [None if c.time_varying else LogSemiring.exponentiate(c.log) for c in self.chains]

        def step(belief: Tensor, t: int) -> Tensor:
            x = belief
            for c, exponentiated in zip(self.chains, shared):
                rotated = x.reshape(x.shape[0], k, belief.shape[-1] // k).transpose(1, 2)  # [B, K^(L-1), K_from]
                if exponentiated is None:
                    x = LogSemiring.matmul(rotated, c.at(t))
                else:
                    x = LogSemiring.matmul_exponentiated(rotated, *exponentiated)
            return x.reshape(belief.shape)

        return step

    def edge_scores(self, previous: Tensor, following: Tensor) -> Tensor:
        """``sum_l trans^l_{t+1}[z^l_t, z^l_{t+1}]`` of joint states ``[*, B, T-1]``: ``O(L)`` a pair."""
        before = _digits(previous, self.num_chains, self.chain_states)
        after = _digits(following, self.num_chains, self.chain_states)
        return sum(c.edge_scores(i, j) for c, i, j in zip(self.chains, before, after))

    def sample_previous(
        self, log_alpha: Tensor, following: Tensor, t: int, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""``z ~ alpha_{t-1}(z) prod_l P^l_t(z^l, z'^l)`` for joint ``z' = following [S, B]``: ``[S, B]``.

        The column of the product transition is the sum of the chains' columns over the joint
        axes (``O(S B K^L)``), never a row of the ``K^L x K^L`` matrix.
        """
        num_chains, k = self.num_chains, self.chain_states
        column = log_alpha.reshape(*log_alpha.shape[:-1], *(k,) * num_chains)
        for ell, (c, j) in enumerate(zip(self.chains, _digits(following, num_chains, k))):
            into = c.at(t).transpose(-1, -2)  # [(B,) K_next, K_prev]
            rows = into[j] if into.dim() == 2 else into[torch.arange(into.shape[0], device=j.device), j]
            column = column + _on_axis(rows, ell, num_chains)  # [S, B, K, ..., K]
        return gumbel_argmax(column.flatten(-num_chains), generator)

    def sample_next(self, previous: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``z'^l ~ P^l(z^l, .)`` for each chain of shared transitions, from joint ``previous [N]``: ``[N]``."""
        digits = _digits(previous, self.num_chains, self.chain_states)
        return _joint_index([c.sample_next(z, generator) for c, z in zip(self.chains, digits)], self.chain_states)

    def dense(self) -> Tensor:
        """The ``K^L x K^L`` log matrix (``O(K^(2L))`` memory): ``[S, S]``, ``[B, S, S]`` or ``[B, T-1, S, S]``
        after the chains' most specific layout.  Only on request; no member of this module uses it."""
        num_chains, k = self.num_chains, self.chain_states
        total = 0
        for ell, c in enumerate(self.chains):
            log = {2: c.log[None, None], 3: c.log[:, None], 4: c.log}[c.log.dim()]  # [B | 1, T-1 | 1, K, K]
            shape = [1] * (2 * num_chains)
            shape[ell], shape[num_chains + ell] = k, k
            total = total + log.reshape(*log.shape[:2], *shape)
        total = total.reshape(*total.shape[:2], self.num_states, self.num_states)
        if self.time_varying:
            return total
        return total[:, 0] if any(c.log.dim() == 3 for c in self.chains) else total[0, 0]


class _ProductProbabilities(TransitionProbabilities):
    r"""The chains' shifted probabilities ``P^l_t = exp(trans^l_t - s^l_t)``, applied one axis at a time.

    A step is the rotation of :class:`ProductTransition`: for ``l = 0..L-1``,
    ``x <- [B, K^(L-1), K] (axis l first, seen transposed) @ P^l`` row by row, the result's axis
    last, so that after ``L`` products the axes are back in order, the intermediate messages in two
    preallocated buffers.  Backward (``P u``) is the same rotation with ``P^l^T``: the chains'
    products commute, so their order does not matter.  The ``L`` products of a step are small
    (inner size ``K``), so their calls cost as much as their arithmetic: on the CPU, while one
    chain's product ``B K^L K`` is at most :data:`~latentnlp.chain.ARRAY_LOOP_MAX_WORK` (the bound
    measured for the chain kernels' numpy steps: past it numpy's BLAS splits a product over threads
    of its own), they are ``numpy.matmul`` calls on views of the tensors (:meth:`array_steps`,
    which the chain kernels' numpy loops take too, chosen by the same bound through
    :meth:`step_work`), a microsecond or two each to call where ``torch.bmm`` takes
    several; elsewhere one ``torch.bmm`` per chain, each chain's ``P^l`` laid out
    once per batch size as a contiguous ``[B, K, K]`` (a shared one materialised over the batch:
    BLAS gets no zero batch stride, which sends it down a slow path).
    """

    def __init__(self, shifted: Sequence[tuple[Tensor, Tensor]], num_states: int, logs: Sequence[Tensor]):
        self.probs = [p for p, _ in shifted]
        self.logs = list(logs)
        self.shifts = [s for _, s in shifted]
        self.k = num_states
        # per-step views taken once: at[l][t] = P^l_t as [B, K, K] (time-varying chains only)
        self.at = [(None,) + p.unbind(1) if p.dim() == 4 else None for p in self.probs]
        self._laid: dict[tuple[int, bool], list[Tensor | None]] = {}
        self._buffers: dict[int, tuple[Tensor, Tensor]] = {}
        self._arrays: tuple[Callable, Callable] | None = None

    def _batched(self, batch: int, transpose: bool) -> list[Tensor | None]:
        """Each chain's ``P^l`` (or ``P^l^T``) as a contiguous ``[batch, K, K]``; None for time-varying ones."""
        key = (batch, transpose)
        if key not in self._laid:
            k = self.k
            self._laid[key] = [
                None if p.dim() == 4 else (p.transpose(-1, -2) if transpose else p).expand(batch, k, k).contiguous()
                for p in self.probs
            ]
        return self._laid[key]

    def _rotate(self, vector: Tensor, t: int, out: Tensor, transpose: bool) -> Tensor:
        batch, k = vector.shape[0], self.k
        laid, last = self._batched(batch, transpose), len(self.probs) - 1
        if batch not in self._buffers:
            self._buffers[batch] = (torch.empty_like(vector), torch.empty_like(vector))
        buffers, x, rest = self._buffers[batch], vector, vector.shape[1] // k
        for ell in range(last + 1):
            step = laid[ell]
            if step is None:
                step = self.at[ell][t].transpose(-1, -2) if transpose else self.at[ell][t]
            target = out if ell == last else buffers[ell % 2]
            torch.bmm(x.view(batch, k, rest).transpose(1, 2), step, out=target.view(batch, rest, k))
            x = target
        return out

    def array_steps(self) -> tuple[Callable, Callable]:
        """The rotation on numpy arrays ``[B, K^L]`` (views of CPU tensors): ``(forward, backward)``."""
        if self._arrays is None:
            k, last, matmul = self.k, len(self.probs) - 1, numpy.matmul
            buffers: dict[int, tuple[numpy.ndarray, numpy.ndarray]] = {}

            def laid(transpose: bool) -> list:
                """Per chain ``P^l`` (``P^l^T``) as an array, or per step (``[t]``) for a time-varying one."""
                matrices = []
                for p in self.probs:
                    a = p.detach().numpy()
                    a = a.swapaxes(-1, -2) if transpose else a
                    matrices.append((None,) + tuple(a[:, s] for s in range(a.shape[1])) if a.ndim == 4 else a)
                return matrices

            def rotation(matrices: list) -> Callable:
                def step(vector, t, out):
                    batch = vector.shape[0]
                    if batch not in buffers:
                        buffers[batch] = (numpy.empty_like(vector), numpy.empty_like(vector))
                    scratch, x, rest = buffers[batch], vector, vector.shape[1] // k
                    for ell, m in enumerate(matrices):
                        target = out if ell == last else scratch[ell % 2]
                        into = m[t] if isinstance(m, tuple) else m
                        matmul(x.reshape(batch, k, rest).swapaxes(1, 2), into, out=target.reshape(batch, rest, k))
                        x = target
                    return out

                return step

            self._arrays = rotation(laid(False)), rotation(laid(True))
        return self._arrays

    def step_work(self, batch, states):
        """One chain's product, ``B K^L K``: the largest of a step's ``L``."""
        return batch * states * self.k

    def step_factors(self):
        """The chains' ``P^l`` (``[K, K]`` or ``[B, K, K]``), factor ``l`` on axis ``l``; None when one is
        time-varying."""
        return None if any(p.dim() == 4 for p in self.probs) else tuple(self.probs)

    def _on_arrays(self, vector: Tensor, out: Tensor) -> bool:
        """Step on numpy views: CPU tensors, ``out`` contiguous, one chain's product (:meth:`step_work`) small."""
        return (
            vector.device.type == "cpu" and self.step_work(*vector.shape) <= ARRAY_LOOP_MAX_WORK and out.is_contiguous()
        )

    def forward(self, vector, t, out):
        if self._on_arrays(vector, out):
            self.array_steps()[0](vector.numpy(), t, out.numpy())
            return out
        return self._rotate(vector, t, out, transpose=False)

    def backward(self, vector, t, out):
        if self._on_arrays(vector, out):
            self.array_steps()[1](vector.numpy(), t, out.numpy())
            return out
        return self._rotate(vector, t, out, transpose=True)

    def dense(self):
        """``P_t = kron_l P^l_t`` as one ``[S, S]``, ``[B, S, S]`` or ``[B, T-1, S, S]`` matrix
        (``O(K^(2L))`` memory), in the layout of :meth:`ProductTransition.dense`."""
        num_chains, k = len(self.probs), self.k
        product = 1
        for ell, p in enumerate(self.probs):
            laid = {2: p[None, None], 3: p[:, None], 4: p}[p.dim()]  # [B | 1, T-1 | 1, K, K]
            shape = [1] * (2 * num_chains)
            shape[ell], shape[num_chains + ell] = k, k
            product = product * laid.reshape(*laid.shape[:2], *shape)
        states = k**num_chains
        product = product.reshape(*product.shape[:2], states, states)
        if any(p.dim() == 4 for p in self.probs):
            return product
        return product[:, 0] if any(p.dim() == 3 for p in self.probs) else product[0, 0]

    def log_shift_total(self, edges):
        return sum((s * edges).sum(-1) if s.dim() == 2 else s * edges.sum(-1) for s in self.shifts)

    def all_positive(self):
        return all(bool((p > 0).all()) for p in self.probs)

    def smallest_entry(self):
        """The product of the chains' smallest positive entries (an entry of the Kronecker product is a
        product of one entry of each chain's matrix), per row where a chain's matrix is."""
        smallest = [smallest_positive(p, 2 if p.dim() < 4 else 3) for p in self.probs]
        return functools.reduce(torch.mul, smallest)

    def rounded_away(self):
        """Any chain's entry rounded away (its joint states' paths through it lost)."""
        rounded = [rounded_away(p, log) for p, log in zip(self.probs, self.logs)]
        return functools.reduce(torch.logical_or, rounded)

    def parameter_gradients(self, alpha, u):
        r"""Per chain, ``d log Z / d trans^l_t[i, j] = P^l_t(i, j) sum_rest A^l_{t-1}[i, rest] U^l_t[rest, j]``.

        ``A^l = alpha_{t-1}`` with chains ``0..l-1`` applied forward (the forward pass's state
        before chain ``l``, recomputed here) and ``U^l = u_t`` with chains ``l+1..L-1`` applied
        backward, both on the rotating layout with the steps and rows of a chunk as one batch of
        ``N = steps x B`` messages: every contraction is one ``bmm`` over ``N`` with the operands'
        transposes read in place (no copy of a message), and the statistics of chain ``l`` are one
        ``bmm`` ``[N, K, K^(L-1)] @ [N, K^(L-1), K]`` summed over the steps (and rows, for a shared
        chain).  The ``L - 1`` recomputed ``A^l`` and the two ``U^l`` being stepped go to ``L + 1``
        buffers taken once and reused by every chunk of steps, not to new tensors per chunk and
        chain: fresh memory costs a page fault per page, more than the product that fills it.  A
        chunk is at most ``T / L`` steps (the buffers within ``O(B T K^L)`` memory) and at most
        :data:`GRADIENT_CHUNK_STATES` joint states (``steps x B x K^L``, at least one step), so that
        the buffers' pages, touched once, are few.
        """
        steps, batch, states = alpha.shape
        num_chains, k = len(self.probs), self.k
        grads = [torch.zeros_like(p) for p in self.probs]
        chunk = max(1, min(math.ceil(steps / num_chains), GRADIENT_CHUNK_STATES // max(1, batch * states)))
        buffers = alpha.new_empty(num_chains + 1, min(chunk, steps) * batch, states)

        def laid(ell: int, span: slice, n: int) -> Tensor:
            """``P^l`` of the chunk's steps as a contiguous ``[n B, K, K]``, row ``(s, b)``."""
            p = self.probs[ell]
            if p.dim() == 4:
                p = p[:, span].transpose(0, 1)  # [n, B, K, K]
            return p.expand(n, batch, k, k).reshape(n * batch, k, k)

        for start in range(0, steps, chunk):
            stop = min(steps, start + chunk)
            span, n = slice(start, stop), stop - start
            rows = n * batch
            before = [alpha[span].reshape(rows, k, states // k)]  # [N, K (axis l), rest]
            for ell in range(num_chains - 1):
                x = torch.bmm(
                    before[-1].transpose(1, 2), laid(ell, span, n), out=buffers[ell, :rows].view(rows, states // k, k)
                )
                before.append(x.view(rows, k, states // k))
            y = u[span].reshape(rows, states)
            for ell in reversed(range(num_chains)):
                after = y.view(rows, states // k, k)  # [N, rest, K (axis l)]
                statistics = torch.bmm(before[ell], after).view(n, batch, k, k)
                if self.probs[ell].dim() == 4:
                    grads[ell][:, span] += statistics.transpose(0, 1)
                elif self.probs[ell].dim() == 3:
                    grads[ell] += statistics.sum(0)
                else:
                    grads[ell] += statistics.sum((0, 1))
                if ell:
                    target = buffers[num_chains - 1 + ell % 2, :rows]
                    y = torch.bmm(laid(ell, span, n), after.transpose(1, 2), out=target.view(rows, k, states // k))
        return tuple(p * g for p, g in zip(self.probs, grads))


# ==============================================================================================
# input handling shared by the exact and the variational posterior
# ==============================================================================================
def _canonical_chains(init, trans, batch: int, steps: int, num_chains: int, num_states: int):
    """``init [B, L, K]`` and one :class:`Transition` per chain, checked against ``B, T, L, K``."""
    expected = f"L={num_chains}, K={num_states}"
    if not isinstance(init, Tensor) or not init.is_floating_point():
        raise ValueError(f"init must be a floating-point tensor [L, K] or [B, L, K], got {describe(init)}")
    if (
        init.dim() not in (2, 3)
        or tuple(init.shape[-2:]) != (num_chains, num_states)
        or (init.dim() == 3 and init.shape[0] != batch)
    ):
        raise ValueError(
            f"init must have shape [L, K] or [B, L, K] = [{num_chains}, {num_states}] or "
            f"[{batch}, {num_chains}, {num_states}] ({expected} from the emission), got {describe(init)}"
        )
    if isinstance(trans, Tensor):
        if (
            trans.dim() not in (3, 4)
            or tuple(trans.shape[-3:]) != (num_chains, num_states, num_states)
            or (trans.dim() == 4 and trans.shape[0] != batch)
        ):
            raise ValueError(
                f"trans must have shape [L, K, K] or [B, L, K, K] with B={batch}, {expected} "
                f"(from the emission), got {describe(trans)}"
            )
        transitions = [DenseTransition(trans[ell] if trans.dim() == 3 else trans[:, ell]) for ell in range(num_chains)]
    elif isinstance(trans, Sequence):
        if len(trans) != num_chains:
            raise ValueError(f"trans must hold L={num_chains} transitions (from the emission), got {len(trans)}")
        transitions = [t if isinstance(t, Transition) else DenseTransition(t) for t in trans]
    else:
        raise ValueError(f"trans must be a tensor or a sequence of L transitions, got {type(trans).__name__}")
    for ell, transition in enumerate(transitions):
        try:
            transition.check_shape(batch, steps, num_states)
        except ValueError as error:
            raise ValueError(f"trans[{ell}]: {error}") from None
    return (init if init.dim() == 3 else init.expand(batch, num_chains, num_states)), transitions


def _canonical_lengths(lengths, batch: int, steps: int, device: torch.device, validating: bool) -> Tensor:
    if lengths is None:
        return torch.full((batch,), steps, dtype=torch.long, device=device)
    if not isinstance(lengths, Tensor) or lengths.shape != (batch,) or lengths.is_floating_point():
        raise ValueError(f"lengths must be an integer tensor of shape [B] = [{batch}], got {describe(lengths)}")
    lengths = lengths.to(device=device, dtype=torch.long)
    if validating and batch:
        low, high = torch.stack([lengths.min(), lengths.max()]).tolist()
        if low < 1 or high > steps:
            raise ValueError(f"lengths must lie in 1..T = 1..{steps}, got values from {low} to {high}")
    return lengths


def _check_transitions_finite(transitions: Sequence[Transition]) -> None:
    """``ValueError`` naming the chain if a transition holds NaN or ``+inf`` (synchronises)."""
    for ell, transition in enumerate(transitions):
        try:
            transition.check_finite()
        except ValueError as error:
            raise ValueError(f"trans[{ell}]: {error}") from None


def _check_finite(name: str, x: Tensor) -> None:
    # one reduction, no temporary: the max is NaN if any entry is, +inf if any entry is
    if x.numel() and not bool(x.detach().amax() < float("inf")):
        raise ValueError(
            f"{name} ({describe(x)}) contains NaN or +inf at {int((~(x < float('inf'))).sum())} positions; "
            "scores must be finite or -inf"
        )


# ==============================================================================================
# exact inference
# ==============================================================================================
class FactorialChainPosterior(Distribution):
    r"""The exact distribution over the paths ``[B, T, L]`` of ``L`` chains with a joint emission.

    Args:
        init: ``[L, K]`` or ``[B, L, K]``, ``init[..., l, k]`` = score of ``z^l_0 = k``.
        trans: ``[L, K, K]`` or ``[B, L, K, K]`` (``trans[..., l, i, j]`` scores
            ``z^l_{t-1} = i -> z^l_t = j``), or a sequence of ``L`` transitions (tensors in
            :class:`~latentnlp.transitions.DenseTransition`'s layouts, time-varying included, or
            :class:`~latentnlp.transitions.Transition` objects, densified to ``K x K`` each).
        emit: ``[B, T, K, ..., K]`` with ``L`` state axes: the joint score of observation ``t``.
        lengths: ``[B]`` long in ``1..T`` (default: all ``T``); positions at or past a length
            never change a value or a gradient.
        method: ``"auto"`` (scaled, rows flagged as underflowed redone in log space),
            ``"scaled"`` or ``"log"``, as for :class:`~latentnlp.structures.ChainPosterior`.
        validate_args: torch's switch; when validating, lengths are range-checked and NaN or
            ``+inf`` scores rejected (both synchronise).  Shape checks always run.

    The chain over the ``K^L`` joint states (flattened row-major) is a
    :class:`~latentnlp.structures.ChainPosterior` with a :class:`ProductTransition`, so
    ``log_partition`` is the scaled forward algorithm at ``O(T L K^(L+1))`` with its hand-written
    backward (no graph over ``T``, ``O(B T K^L)`` memory) and the same ``"auto"`` underflow rule.
    No member builds the ``K^L x K^L`` transition.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self,
        init: Tensor,
        trans: Tensor | Sequence[Tensor | Transition],
        emit: Tensor,
        lengths: Tensor | None = None,
        method: str = "auto",
        validate_args: bool | None = None,
    ):
        if method not in FACTORIAL_METHODS:
            raise ValueError(f"method must be one of {FACTORIAL_METHODS}, got {method!r}")
        validating = is_validating(validate_args)
        if not isinstance(emit, Tensor) or not emit.is_floating_point() or emit.dim() < 3:
            raise ValueError(f"emit must be a floating-point tensor [B, T, K, ..., K], got {describe(emit)}")
        batch, steps, k = emit.shape[:3]
        num_chains = emit.dim() - 2
        if steps < 1 or k < 1 or any(size != k for size in emit.shape[2:]):
            raise ValueError(
                f"emit must have shape [B, T, K, ..., K] with T >= 1 and L equal state axes, got {describe(emit)}"
            )
        init, transitions = _canonical_chains(init, trans, batch, steps, num_chains, k)
        self.lengths = _canonical_lengths(lengths, batch, steps, emit.device, validating)
        if validating:
            _check_finite("init", init)
            _check_finite("emit", emit)
            _check_transitions_finite(transitions)
        self.num_chains, self.num_states = num_chains, k
        dtype = computation_dtype(init.dtype, emit.dtype, *(t.dtype for t in transitions))
        joint_init = sum(_on_axis(init[:, ell].to(dtype), ell, num_chains) for ell in range(num_chains))
        product = ProductTransition([t.dense().to(dtype) for t in transitions])
        self.chain = ChainPosterior(
            joint_init.reshape(batch, k**num_chains),
            product,
            emit.reshape(batch, steps, k**num_chains),
            None if lengths is None else self.lengths,  # None: no padding for the chain to zero
            method,
            validate_args=False,
        )
        super().__init__(
            batch_shape=torch.Size([batch]), event_shape=torch.Size([steps, num_chains]), validate_args=validate_args
        )

    @property
    def method(self) -> str:
        return self.chain.method

    @property
    def _joint_shape(self) -> tuple[int, ...]:
        return (self.num_states,) * self.num_chains

    # ---- sums -------------------------------------------------------------------------------
    @property
    def log_partition(self) -> Tensor:
        """``log sum_z exp s(z)`` (``= log p(x)`` for a factorial HMM): ``[B]``."""
        return self.chain.log_partition

    @lazy_property
    def joint_marginals(self) -> Tensor:
        """``p(z^0_t, ..., z^{L-1}_t)``: ``[B, T, K, ..., K]``, zero at padding (the gradient of
        :attr:`log_partition` w.r.t. ``emit``; differentiable again with ``method="log"``)."""
        return self.chain.marginals.reshape(*self.chain.emit.shape[:2], *self._joint_shape)

    @lazy_property
    def marginals(self) -> Tensor:
        """Per-chain marginals ``p(z^l_t = k)``: ``[B, T, L, K]``, zero at padding (:attr:`joint_marginals`
        summed over the other chains' axes)."""
        joint, axes = self.joint_marginals, range(2, 2 + self.num_chains)
        others = [tuple(a for a in axes if a != 2 + ell) for ell in range(self.num_chains)]
        return torch.stack([joint.sum(dims) if dims else joint for dims in others], 2)

    def entropy(self) -> Tensor:
        r"""``H(p) = log Z - E_p[s(z)]``: ``[B]``, with ``E_p[s]`` from the gradients of ``log Z`` (the
        marginals and each chain's edge marginals summed over time, laid out per row).

        Differentiable: when the parameters require grad the gradients come from the log-space
        forward with ``create_graph``.  ``O(B T K^L)`` memory, no ``K^L x K^L`` matrix.
        """
        chain = self.chain
        differentiable = torch.is_grad_enabled() and (
            chain.init.requires_grad or chain.emit.requires_grad or chain.transition.requires_grad
        )

        def leaf(x: Tensor) -> Tensor:
            x = x if differentiable else x.detach()
            return x if x.requires_grad else x.detach().clone().requires_grad_()

        batch = chain.emit.shape[0]
        rows = [c.log if c.log.dim() != 2 else c.log.expand(batch, *c.log.shape) for c in chain.transition.chains]
        init, emit, rows = leaf(chain.init), leaf(chain.emit), [leaf(r) for r in rows]
        method = "log" if differentiable else chain.method
        with torch.enable_grad():
            log_z = ChainPosterior(init, ProductTransition(rows), emit, self.lengths, method, False).log_partition
            grads = torch.autograd.grad(
                log_z.sum(), (init, emit, *rows), create_graph=differentiable, allow_unused=True
            )
        expected = expected_score(grads[0], init, (-1,)) + expected_score(grads[1], emit, (-2, -1))
        for grad, row in zip(grads[2:], rows):
            if grad is not None:
                expected = expected + expected_score(grad, row, tuple(range(1, row.dim())))
        return log_z - expected

    # ---- maxima -----------------------------------------------------------------------------
    @lazy_property
    def argmax(self) -> Tensor:
        """The joint Viterbi path: ``[B, T, L]`` long, padding 0 (see :func:`factorial_viterbi`)."""
        chain = self.chain
        path = factorial_viterbi(chain.init, chain.transition, chain.emit, self.lengths)
        return torch.stack(_digits(path, self.num_chains, self.num_states), -1)

    @lazy_property
    def max(self) -> Tensor:
        """``max_z s(z)``, the score of :attr:`argmax`: ``[B]`` (differentiable: a subgradient)."""
        return self.score(self.argmax)

    @property
    def mode(self) -> Tensor:
        return self.argmax

    # ---- samples and scores -----------------------------------------------------------------
    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        """Exact samples by forward filtering, backward sampling on the joint states: ``sample_shape + [B, T, L]``."""
        joint = self.chain.sample(sample_shape, generator)
        return torch.stack(_digits(joint, self.num_chains, self.num_states), -1)

    def score(self, value: Tensor) -> Tensor:
        """``s(z)`` of paths ``value [*, B, T, L]`` (entries past the length ignored): ``[*, B]``."""
        batch, steps = self.chain.emit.shape[:2]
        if value.dim() < 3 or tuple(value.shape[-3:]) != (batch, steps, self.num_chains) or value.is_floating_point():
            raise ValueError(
                f"value must be an integer tensor of shape [*, B, T, L] = [*, {batch}, {steps}, {self.num_chains}], "
                f"got {value.dtype} {describe(value)}"
            )
        if self._validate_args and value.numel():
            inside = value[..., lengths_to_mask(self.lengths, steps), :]
            if inside.numel() and (inside.min() < 0 or inside.max() >= self.num_states):
                raise ValueError(f"value holds states outside 0..K-1 = 0..{self.num_states - 1}")
        return self.chain.score(_joint_index(value.unbind(-1), self.num_states))

    def log_prob(self, value: Tensor) -> Tensor:
        """``log p(z) = s(z) - log Z`` for ``value [*, B, T, L]``: ``[*, B]``."""
        return self.score(value) - self.log_partition

    @property
    def support(self):
        return constraints.integer_interval(0, self.num_states - 1)

    def __repr__(self) -> str:
        batch, steps = self.chain.emit.shape[:2]
        return (
            f"FactorialChainPosterior(B={batch}, T={steps}, L={self.num_chains}, K={self.num_states}, "
            f"method={self.method!r})"
        )


@torch.no_grad()
def factorial_viterbi(init: Tensor, transition: ProductTransition, emit: Tensor, lengths: Tensor) -> Tensor:
    r"""The best joint path ``argmax_z s(z)`` as joint states: ``[B, T]`` long, padding 0.

    The max-plus forward ``a_t(z') = max_z (a_{t-1}(z) + sum_l trans^l_t[z^l, z'^l]) + emit_t(z')``
    maximises one chain's axis at a time (the max distributes over the separable sum), on the
    rotating layout of :class:`ProductTransition`, keeping one back-pointer tensor per chain and
    step: ``O(B L K^(L+1))`` a step, ``O(B T L K^L)`` pointers.  ``init [B, K^L]``, ``emit [B, T, K^L]``.
    """
    batch, steps, size = emit.shape
    num_chains, k = transition.num_chains, transition.chain_states
    rows = torch.arange(batch, device=emit.device)
    mask = lengths_to_mask(lengths, steps)
    a = init + emit[:, 0]
    pointers = []
    for t in range(1, steps):
        x, step = a, []
        for c in transition.chains:
            log = c.at(t)
            # [B, rest, K_from, K_to]: the chain's axis first, moved last, meets its transition
            candidates = x.reshape(batch, k, size // k).transpose(1, 2).unsqueeze(-1) + (
                log if log.dim() == 2 else log[:, None]
            )
            x, pointer = candidates.max(-2)  # [B, rest, K_to]
            step.append(pointer)
        pointers.append(step)
        a = torch.where(mask[:, t].unsqueeze(-1), x.reshape(batch, size) + emit[:, t], a)
    path = torch.zeros(batch, steps, dtype=torch.long, device=emit.device)
    current = a.argmax(-1)
    for t in range(steps - 1, 0, -1):
        valid = mask[:, t]
        path[:, t] = torch.where(valid, current, torch.zeros_like(current))
        following = _digits(current, num_chains, k)
        previous = [None] * num_chains
        for ell in reversed(range(num_chains)):
            # the pointer's rest axes: chains l+1..L-1 at t-1 (already traced), chains 0..l-1 at t
            rest = (
                _joint_index(previous[ell + 1 :] + following[:ell], k) if num_chains > 1 else torch.zeros_like(current)
            )
            previous[ell] = pointers[t - 1][ell][rows, rest, following[ell]]
        current = torch.where(valid, _joint_index(previous, k), current)
    path[:, 0] = current
    return path


# ==============================================================================================
# structured mean field
# ==============================================================================================
class JointEmission:
    r"""An emission given as its joint log-score ``emit [B, T, K, ..., K]`` (``L`` state axes; small ``K^L``).

    Update of chain ``l`` (the expectation over the other chains' current marginals ``q_m``):

    .. math:: h^l_t(k) = \sum_{z: z^l = k} \prod_{m \ne l} q_m(z^m_t)\, \mathrm{emit}[t, z]

    and ``E_q[emit_t] = sum_z prod_m q_m(z^m_t) emit[t, z]``; ``O(B T L K^L)`` per chain update.
    """

    def __init__(self, emit: Tensor):
        if not isinstance(emit, Tensor) or not emit.is_floating_point() or emit.dim() < 3:
            raise ValueError(f"emit must be a floating-point tensor [B, T, K, ..., K], got {describe(emit)}")
        if emit.shape[1] < 1 or any(size != emit.shape[2] for size in emit.shape[2:]):
            raise ValueError(f"emit must have shape [B, T, K, ..., K] with equal state axes, got {describe(emit)}")
        self.emit = emit
        self.batch, self.steps, self.num_states = emit.shape[:3]
        self.num_chains = emit.dim() - 2
        self.dtype = emit.dtype

    def check_values(self) -> None:
        _check_finite("emit", self.emit)

    def detach(self) -> JointEmission:
        return JointEmission(self.emit.detach())

    def _weights(self, marginals: Tensor, skip: int | None = None) -> Tensor:
        """``prod_{m != skip} q_m(z^m_t)`` broadcast over the joint axes: ``[B, T, K | 1, ..., K | 1]``."""
        weights = marginals.new_ones(())
        for m in range(self.num_chains):
            if m != skip:
                weights = weights * _on_axis(marginals[:, :, m], m, self.num_chains)
        return weights

    def potentials(self, marginals: Tensor, chain: int) -> Tensor:
        """``h^chain [B, T, K]`` from the current marginals ``[B, T, L, K]``."""
        others = tuple(2 + m for m in range(self.num_chains) if m != chain)
        weights = self._weights(marginals, chain).expand_as(self.emit)
        return expected_score(weights, self.emit, others) if others else self.emit

    def expected_log_likelihood(self, marginals: Tensor) -> Tensor:
        """``E_q[emit_t]``: ``[B, T]`` (0 where the marginals are 0, e.g. at padding)."""
        weights = self._weights(marginals).expand_as(self.emit)
        return expected_score(weights, self.emit, tuple(range(2, 2 + self.num_chains)))


class GaussianEmission:
    r"""``x_t ~ N(sum_l W_l[z^l_t], diag(variance))``: ``observations [B, T, D]``, ``weights [L, K, D]``,
    ``variance [D]`` (positive).  Never builds the ``K^L`` joint tensor.

    With ``mu_m(t) = sum_k q_m(k) W_m[k]`` and ``v_m(t) = sum_k q_m(k) W_m[k]^2 - mu_m(t)^2`` (per
    dimension), the update of chain ``l`` is (Ghahramani & Jordan 1997, the structured
    approximation; ``r = x_t - sum_{m != l} mu_m(t)``)

    .. math:: h^l_t(k) = -\tfrac12 \sum_d \Big[\log 2\pi\sigma^2_d
              + \big((r_d - W_l[k, d])^2 + \sum_{m \ne l} v_{m,d}(t)\big) / \sigma^2_d\Big]

    i.e. ``W_l[k] C^{-1} r - W_l[k] C^{-1} W_l[k] / 2`` plus terms constant in ``k``: ``O(B T K D)``
    per chain update, ``O(T L K D)`` per sweep; and
    ``E_q[log p(x_t | z_t)] = -1/2 sum_d [log 2 pi sigma^2_d + ((x_t - sum_m mu_m)^2 + sum_m v_m) / sigma^2_d]``.
    """

    def __init__(self, observations: Tensor, weights: Tensor, variance: Tensor):
        for name, x in (("observations", observations), ("weights", weights), ("variance", variance)):
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {describe(x)}")
        if observations.dim() != 3 or weights.dim() != 3 or weights.shape[-1] != observations.shape[-1]:
            raise ValueError(
                f"observations must have shape [B, T, D] and weights [L, K, D] with the same D, got "
                f"{describe(observations)} and {describe(weights)}"
            )
        if variance.shape != observations.shape[-1:]:
            raise ValueError(
                f"variance must have shape [D] = [{observations.shape[-1]}] (from observations), "
                f"got {describe(variance)}"
            )
        self.observations, self.weights, self.variance = observations, weights, variance
        self.batch, self.steps = observations.shape[:2]
        self.num_chains, self.num_states = weights.shape[:2]
        self.dtype = computation_dtype(observations.dtype, weights.dtype, variance.dtype)

    def check_values(self) -> None:
        for name, x in (("observations", self.observations), ("weights", self.weights)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} ({describe(x)}) must be finite")
        if not bool((self.variance > 0).all()) or not bool(torch.isfinite(self.variance).all()):
            raise ValueError(f"variance ({describe(self.variance)}) must be positive and finite")

    def detach(self) -> GaussianEmission:
        return GaussianEmission(self.observations.detach(), self.weights.detach(), self.variance.detach())

    def _moments(self, marginals: Tensor) -> tuple[Tensor, Tensor]:
        """Per chain ``mu_m`` and ``v_m``: two ``[B, T, L, D]`` tensors."""
        mean = torch.einsum("btlk,lkd->btld", marginals, self.weights)
        second = torch.einsum("btlk,lkd->btld", marginals, self.weights.square())
        return mean, second - mean.square()

    def potentials(self, marginals: Tensor, chain: int) -> Tensor:
        """``h^chain [B, T, K]`` from the current marginals ``[B, T, L, K]``."""
        mean, spread = self._moments(marginals)
        precision = self.variance.reciprocal()
        residual = self.observations - (mean.sum(2) - mean[:, :, chain])  # [B, T, D]
        others = (spread.sum(2) - spread[:, :, chain]) @ precision  # [B, T]
        w = self.weights[chain]  # [K, D]
        squares = (residual.square() @ precision).unsqueeze(-1) - 2 * residual @ (w * precision).T
        squares = squares + (w.square() @ precision)
        constant = torch.log(2 * math.pi * self.variance).sum()
        return -0.5 * (constant + squares + others.unsqueeze(-1))

    def expected_log_likelihood(self, marginals: Tensor) -> Tensor:
        """``E_q[log p(x_t | z_t)]``: ``[B, T]`` (the caller masks padding)."""
        mean, spread = self._moments(marginals)
        precision = self.variance.reciprocal()
        squares = ((self.observations - mean.sum(2)).square() + spread.sum(2)) @ precision
        return -0.5 * (torch.log(2 * math.pi * self.variance).sum() + squares)


class BernoulliEmission:
    r"""``x_{t,v} ~ Bernoulli(sigmoid(eta_{t,v}))`` with additive logits ``eta_t = bias + sum_l W_l[z^l_t]``:
    ``observations [B, T, V]`` in ``{0, 1}`` (e.g. piano rolls), ``weights [L, K, V]``, ``bias [V]``.

    ``log p(x_t | z) = sum_v log sigmoid(s_v eta_v)`` (``s = 2x - 1``) does not factor over the
    chains; it is bounded below by Jaakkola & Jordan's quadratic bound

    .. math:: \log\sigma(y) \ge \log\sigma(\xi) + (y - \xi)/2 - \lambda(\xi)(y^2 - \xi^2),
              \qquad \lambda(\xi) = \tanh(\xi/2) / (4\xi),

    tight at ``xi^2 = y^2``.  Its expectation needs only the moments of ``eta`` under ``q``
    (``mu_m``, ``v_m`` as for :class:`GaussianEmission`), and ``xi_{t,v}^2 = E_q[eta_{t,v}^2]``
    maximises it.  Each update first sets ``xi`` from the current marginals, then
    (``eta^{-l} = bias + sum_{m != l} mu_m``, ``v^{-l} = sum_{m != l} v_m``)

    .. math:: h^l_t(k) = \sum_v \Big[\log\sigma(\xi_v) - \xi_v/2 + \lambda(\xi_v)\xi_v^2
              + s_v (\eta^{-l}_v + W_l[k, v])/2
              - \lambda(\xi_v)\big((\eta^{-l}_v + W_l[k, v])^2 + v^{-l}_v\big)\Big]

    ``O(B T K V)`` per chain update; both steps raise the bound, so the sweeps stay monotone, and
    the result is a lower bound on the exact ELBO of the same ``q`` (hence on ``log Z``).
    """

    def __init__(self, observations: Tensor, weights: Tensor, bias: Tensor):
        for name, x in (("observations", observations), ("weights", weights), ("bias", bias)):
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {describe(x)}")
        if observations.dim() != 3 or weights.dim() != 3 or weights.shape[-1] != observations.shape[-1]:
            raise ValueError(
                f"observations must have shape [B, T, V] and weights [L, K, V] with the same V, got "
                f"{describe(observations)} and {describe(weights)}"
            )
        if bias.shape != observations.shape[-1:]:
            raise ValueError(
                f"bias must have shape [V] = [{observations.shape[-1]}] (from observations), got {describe(bias)}"
            )
        self.observations, self.weights, self.bias = observations, weights, bias
        self.batch, self.steps = observations.shape[:2]
        self.num_chains, self.num_states = weights.shape[:2]
        self.dtype = computation_dtype(observations.dtype, weights.dtype, bias.dtype)

    def check_values(self) -> None:
        if not bool(((self.observations == 0) | (self.observations == 1)).all()):
            raise ValueError(f"observations ({describe(self.observations)}) must hold only 0 and 1")
        for name, x in (("weights", self.weights), ("bias", self.bias)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} ({describe(x)}) must be finite")

    def detach(self) -> BernoulliEmission:
        return BernoulliEmission(self.observations.detach(), self.weights.detach(), self.bias.detach())

    @staticmethod
    def _curvature(xi: Tensor) -> Tensor:
        """``lambda(xi) = tanh(xi / 2) / (4 xi)``, ``1/8 - xi^2/96`` near 0 (its series; no 0/0)."""
        small = xi < 1e-4
        safe = torch.where(small, torch.ones_like(xi), xi)
        return torch.where(small, 0.125 - xi.square() / 96, torch.tanh(safe / 2) / (4 * safe))

    def _logit_moments(self, marginals: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per chain ``mu_m``, ``v_m`` (``[B, T, L, V]``) and the optimal ``xi`` (``[B, T, V]``, detached)."""
        mean = torch.einsum("btlk,lkv->btlv", marginals, self.weights)
        spread = torch.einsum("btlk,lkv->btlv", marginals, self.weights.square()) - mean.square()
        xi = ((self.bias + mean.sum(2)).square() + spread.sum(2)).clamp_min(0).sqrt().detach()
        return mean, spread, xi

    def potentials(self, marginals: Tensor, chain: int) -> Tensor:
        """``h^chain [B, T, K]`` from the current marginals ``[B, T, L, K]`` (``xi`` set from them first)."""
        mean, spread, xi = self._logit_moments(marginals)
        curvature, sign = self._curvature(xi), 2 * self.observations - 1
        eta = (self.bias + mean.sum(2) - mean[:, :, chain]).unsqueeze(-2) + self.weights[chain]  # [B, T, K, V]
        rest = (spread.sum(2) - spread[:, :, chain]).unsqueeze(-2)
        constant = torch.nn.functional.logsigmoid(xi) - xi / 2 + curvature * xi.square()
        terms = sign.unsqueeze(-2) * eta / 2 - curvature.unsqueeze(-2) * (eta.square() + rest)
        return (constant.unsqueeze(-2) + terms).sum(-1)

    def expected_log_likelihood(self, marginals: Tensor) -> Tensor:
        """The bound on ``E_q[log p(x_t | z_t)]`` at the optimal ``xi``: ``[B, T]`` (the caller masks padding)."""
        mean, spread, xi = self._logit_moments(marginals)
        eta = self.bias + mean.sum(2)
        square = eta.square() + spread.sum(2)
        sign = 2 * self.observations - 1
        bound = (
            torch.nn.functional.logsigmoid(xi) + (sign * eta - xi) / 2 - self._curvature(xi) * (square - xi.square())
        )
        return bound.sum(-1)


class CategoricalEmission:
    r"""``x_t ~ Categorical(softmax(eta_t))`` with additive logits ``eta_t = bias + sum_l W_l[z^l_t]``:
    ``observations [B, T]`` long in ``0..V-1`` (e.g. words; padding too must hold an id, which is
    ignored), ``weights [L, K, V]``, ``bias [V]``.

    ``log p(x_t | z) = eta_{x_t} - log sum_v exp eta_v`` does not factor over the chains; as ``q``
    factorises at each step, Jensen's inequality gives the bound (Nepal & Yates 2013)

    .. math:: E_q[\log p(x_t | z_t)] \ge E_q[\eta_{x_t}] - \log \phi_t, \qquad
              \phi_t = \sum_v e^{b_v} \prod_m E_{q_m}[e^{W_m[z^m_t, v]}],

    ``O(T L K V)`` by shifted matmuls in log space (:meth:`~latentnlp.semirings.LogSemiring.matmul`,
    memory ``O(B T L V)``).  For chain ``l`` its ``-log`` is minorised, tight at the current
    ``q``, by ``-log a >= -a / phi_t - log phi_t + 1``, which is linear in ``q_l``; so

    .. math:: h^l_t(k) = b_{x_t} + W_l[k, x_t] + \sum_{m \ne l} E_{q_m}[W_m[z^m_t, x_t]]
              - \frac1{\phi_t} \sum_v e^{b_v + W_l[k, v]} \prod_{m \ne l} E_{q_m}[e^{W_m[z^m_t, v]}]
              - \log \phi_t + 1

    (``O(B T K V)`` per chain update) raises the bound, and the sweeps stay monotone.
    """

    def __init__(self, observations: Tensor, weights: Tensor, bias: Tensor):
        if not isinstance(observations, Tensor) or observations.dim() != 2 or observations.is_floating_point():
            raise ValueError(f"observations must be an integer tensor [B, T], got {describe(observations)}")
        for name, x in (("weights", weights), ("bias", bias)):
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {describe(x)}")
        if weights.dim() != 3 or bias.shape != weights.shape[-1:]:
            raise ValueError(
                f"weights must have shape [L, K, V] and bias [V] with the same V, got "
                f"{describe(weights)} and {describe(bias)}"
            )
        self.observations, self.weights, self.bias = observations, weights, bias
        self.batch, self.steps = observations.shape
        self.num_chains, self.num_states = weights.shape[:2]
        self.dtype = computation_dtype(weights.dtype, bias.dtype)

    def check_values(self) -> None:
        vocabulary = self.weights.shape[-1]
        if self.observations.numel() and not (
            0 <= int(self.observations.min()) <= int(self.observations.max()) < vocabulary
        ):
            raise ValueError(f"observations must lie in 0..V-1 = 0..{vocabulary - 1}")
        for name, x in (("weights", self.weights), ("bias", self.bias)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} ({describe(x)}) must be finite")

    def detach(self) -> CategoricalEmission:
        return CategoricalEmission(self.observations, self.weights.detach(), self.bias.detach())

    def _terms(self, marginals: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``W_m[k, x_t]`` ``[B, T, L, K]``, ``log E_{q_m}[e^{W_m[., v]}]`` ``[B, T, L, V]``, ``log phi_t [B, T]``."""
        at_observed = self.weights[:, :, self.observations].permute(2, 3, 0, 1)
        log_moments = LogSemiring.matmul(safe_log(marginals).transpose(1, 2), self.weights).transpose(1, 2)
        log_phi = torch.logsumexp(self.bias + log_moments.sum(2), -1)
        return at_observed, log_moments, log_phi

    def potentials(self, marginals: Tensor, chain: int) -> Tensor:
        """``h^chain [B, T, K]`` from the current marginals ``[B, T, L, K]`` (``phi`` set from them first)."""
        at_observed, log_moments, log_phi = self._terms(marginals)
        means = (marginals * at_observed).sum(-1)  # E_{q_m}[W_m[., x_t]]: [B, T, L]
        others = [m for m in range(self.num_chains) if m != chain]
        linear = (
            self.bias[self.observations].unsqueeze(-1)
            + at_observed[:, :, chain]
            + means[:, :, others].sum(-1, keepdim=True)
        )
        rest = self.bias + log_moments[:, :, others].sum(2)  # [B, T, V]
        log_normaliser = LogSemiring.matmul(rest, self.weights[chain].T)  # [B, T, K]
        return linear - torch.exp(log_normaliser - log_phi.unsqueeze(-1)) - log_phi.unsqueeze(-1) + 1

    def expected_log_likelihood(self, marginals: Tensor) -> Tensor:
        """The bound ``E_q[eta_{x_t}] - log phi_t``: ``[B, T]`` (the caller masks padding)."""
        at_observed, _, log_phi = self._terms(marginals)
        return self.bias[self.observations] + (marginals * at_observed).sum((-2, -1)) - log_phi


Emission = JointEmission | GaussianEmission | BernoulliEmission | CategoricalEmission


class MeanField(NamedTuple):
    """The result of :func:`structured_mean_field`."""

    elbo: Tensor
    """``[B]``: the bound at the final ``q``, differentiable in the model's parameters (``q`` held fixed)."""
    elbo_trace: Tensor
    """``[sweeps run, B]``: the bound after each sweep (non-decreasing), detached."""
    marginals: Tensor
    """``[B, T, L, K]``: ``q_l(z^l_t = k)``, zero at padding, detached."""
    chains: tuple[ChainPosterior, ...]
    """``q_l`` for each chain: the model's ``init^l``, ``trans^l`` and the potentials ``h^l`` (detached)."""


def _filled(marginals: Tensor, mask: Tensor) -> Tensor:
    """``marginals [B, T, L, K]`` with uniform rows at padding, where they are 0: an emission's
    expectations are then finite there (and masked out), e.g. a log-moment of no mass."""
    return torch.where(mask[..., None, None], marginals, torch.full_like(marginals, 1 / marginals.shape[-1]))


def _elbo(log_z: Sequence[Tensor], potentials: Tensor, marginals: Tensor, emission: Emission, mask: Tensor) -> Tensor:
    r"""``sum_l (log Z_l - E_{q_l}[sum_t h^l_t]) + sum_t E_q[emit_t]``: ``[B]``.

    For ``q_l`` the chain with potentials ``h^l``, ``H(q_l) + E_{q_l}[init^l + trans^l] =
    log Z_l - E_{q_l}[sum_t h^l_t]``, so this is ``E_q[s(z)] + H(q)``.
    """
    bound = sum(log_z) - expected_score(marginals, potentials, (1, 2, 3))
    expected = emission.expected_log_likelihood(_filled(marginals, mask))
    return bound + torch.where(mask, expected, torch.zeros_like(expected)).sum(-1)


def structured_mean_field(
    init: Tensor,
    trans: Tensor | Sequence[Tensor | Transition],
    emission: Tensor | Emission,
    lengths: Tensor | None = None,
    iterations: int = 10,
    tol: float | None = None,
    validate_args: bool | None = None,
) -> MeanField:
    r"""Ghahramani & Jordan's structured mean field for ``L`` chains with a joint emission.

    ``q(z) = prod_l q_l(z^l)`` with ``q_l`` the chain of ``init^l``, ``trans^l`` and variational
    emission potentials ``h^l [B, T, K]``.  Each sweep sets, for ``l = 0..L-1``, the ``q_l`` that
    maximises the bound with the other chains fixed, ``h^l_t(k) = E_{q_{-l}}[log p(x_t | z^l_t = k,
    z^{-l}_t)]`` (the emission's ``potentials``), so the bound

    .. math:: \mathrm{ELBO}(q) = E_q[s(z)] + H(q) = \sum_l \big(\log Z_l - E_{q_l}[\textstyle\sum_t h^l_t]\big)
              + \sum_t E_q[\mathrm{emit}_t] \le \log Z

    never decreases.  The sweeps start from the prior chains (``h = 0``).

    Args:
        init, trans, lengths: as for :class:`FactorialChainPosterior` (transition objects are used
            as they are, e.g. a low-rank one through its factors).
        emission: a :class:`JointEmission`, :class:`GaussianEmission`, :class:`BernoulliEmission` or
            :class:`CategoricalEmission`, or a joint tensor ``[B, T, K, ..., K]`` (taken as a
            :class:`JointEmission`).
        iterations: the most sweeps (``>= 1``).
        tol: stop once a sweep raises no row's bound by more than ``tol`` (synchronises once a
            sweep); ``None`` runs every sweep.
        validate_args: as for :class:`FactorialChainPosterior`.

    The sweeps run without a graph; the returned ``elbo`` is recomputed at the final ``q`` with
    ``q`` held fixed, so its gradient w.r.t. the model's parameters is that of the bound.
    """
    emission = JointEmission(emission) if isinstance(emission, Tensor) else emission
    if not isinstance(emission, (JointEmission, GaussianEmission, BernoulliEmission, CategoricalEmission)):
        raise ValueError(
            "emission must be a JointEmission, GaussianEmission, BernoulliEmission, CategoricalEmission or a tensor, "
            f"got {describe(emission)}"
        )
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be None or >= 0, got {tol!r}")
    validating = is_validating(validate_args)
    batch, steps, num_chains, k = emission.batch, emission.steps, emission.num_chains, emission.num_states
    init, transitions = _canonical_chains(init, trans, batch, steps, num_chains, k)
    lengths = _canonical_lengths(lengths, batch, steps, init.device, validating)
    if validating:
        _check_finite("init", init)
        emission.check_values()
        _check_transitions_finite(transitions)
    dtype = computation_dtype(init.dtype, emission.dtype, *(t.dtype for t in transitions))
    mask = lengths_to_mask(lengths, steps)
    potentials = init.new_zeros(batch, steps, num_chains, k, dtype=dtype)
    marginals = torch.zeros_like(potentials)
    log_z = [None] * num_chains
    trace = []
    with torch.no_grad():
        fixed, fixed_transitions, fixed_emission = init.detach(), [t.detach() for t in transitions], emission.detach()

        def fit(ell: int) -> None:
            q = ChainPosterior(
                fixed[:, ell], fixed_transitions[ell], potentials[:, :, ell], lengths, validate_args=False
            )
            marginals[:, :, ell], log_z[ell] = q.marginals, q.log_partition

        for ell in range(num_chains):
            fit(ell)
        for _ in range(iterations):
            for ell in range(num_chains):
                h = fixed_emission.potentials(_filled(marginals, mask), ell)
                potentials[:, :, ell] = torch.where(mask.unsqueeze(-1), h, torch.zeros_like(h))
                fit(ell)
            trace.append(_elbo(log_z, potentials, marginals, fixed_emission, mask))
            if tol is not None and len(trace) > 1 and not bool(((trace[-1] - trace[-2]) > tol).any()):
                break
    chains = tuple(
        ChainPosterior(init[:, ell], transitions[ell], potentials[:, :, ell], lengths, validate_args=validate_args)
        for ell in range(num_chains)
    )
    elbo = _elbo([q.log_partition for q in chains], potentials, marginals, emission, mask)
    return MeanField(elbo, torch.stack(trace), marginals, chains)
