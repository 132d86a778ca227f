r"""Baum-Welch: maximum-likelihood (or MAP) EM for an HMM with categorical emissions.

The model over a word sequence ``x_0 .. x_{L-1}`` (ids in ``0..V-1``) with hidden states
``z_t`` in ``0..K-1``:

.. math:: p(x, z) = \pi_{z_0} \prod_{1 \le t < L} A_{z_{t-1} z_t} \prod_{t < L} B_{z_t x_t}

with probabilities (not logs, as the names say) ``init_probs`` :math:`\pi` ``[K]``,
``trans_probs`` :math:`A` ``[K, K]`` (row = from, column = to:
``trans_probs[i, j] = p(z_t = j | z_{t-1} = i)``) and ``emission_probs`` :math:`B` ``[K, V]``
(``emission_probs[k, v] = p(x_t = v | z_t = k)``), held in :class:`HMMParameters`.

**E-step** (:func:`e_step`), for a batch ``words [N, T]`` with ``lengths [N]``: the posterior of
each sequence is a :class:`~latentnlp.structures.ChainPosterior` with ``init = log pi``, the
shared ``trans = log A`` and ``emit[n, t, k] = log B[k, x_{n,t}]``.  One backward pass of
``sum_n log p(x_n)`` gives every expected count:

.. math::
    \text{init}_k = \sum_n \gamma_{n,0}(k), \qquad
    \text{trans}_{ij} = \sum_n \sum_{1 \le t < L_n} \xi_{n,t}(i, j)
        = \frac{\partial \sum_n \log p(x_n)}{\partial \log A_{ij}}, \qquad
    \text{emission}_{kv} = \sum_n \sum_{t < L_n,\ x_{n,t} = v} \gamma_{n,t}(k)

where :math:`\gamma_{n,t}(k) = p(z_t = k | x_n)` (``ChainPosterior.marginals``, the gradient
w.r.t. ``emit``) and :math:`\xi_{n,t}(i,j) = p(z_{t-1} = i, z_t = j | x_n)`; the transition
counts are the gradient w.r.t. the shared ``[K, K]`` log transition, so the dense
``[N, T-1, K, K]`` edge marginals are never built.  The emission counts scatter-add the
marginals over the observed word ids.

**M-step** (:func:`m_step`), closed form, with optional Dirichlet smoothing by pseudo-counts
``c >= 0`` (:class:`DirichletSmoothing`; a Dirichlet prior of concentration ``1 + c`` on every
row, and the update is its MAP estimate):

.. math::
    \pi_k \propto \text{init}_k + c^{\pi}_k, \qquad
    A_{ij} \propto \text{trans}_{ij} + c^{A}_{ij}, \qquad
    B_{kv} \propto \text{emission}_{kv} + c^{B}_{kv}

each row normalised.  A row with nothing to normalise (no counts, no pseudo-counts: a state the
posterior never visits) becomes uniform: any row maximises the expected complete-data
log-likelihood there.  (hmmlearn's ``CategoricalHMM`` with ``startprob_prior = 1 + c`` and so on
computes the same update.)

**Objective**: EM never decreases the log-likelihood :math:`\sum_n \log p(x_n)`, and with
smoothing it never decreases the log posterior, up to its constant,

.. math:: \sum_n \log p(x_n) + \sum_k c^{\pi}_k \log \pi_k + \sum_{ij} c^{A}_{ij} \log A_{ij}
          + \sum_{kv} c^{B}_{kv} \log B_{kv}

(:func:`log_prior`; a zero pseudo-count contributes zero, even where the probability is zero).
:func:`fit` records both every iteration.

Example::

    params = baum_welch.random_parameters(num_states=16, vocab_size=V, generator=g)
    result = baum_welch.fit(params, words, lengths, iterations=50, tol=1e-4)
    result.params.trans_probs, result.log_likelihood   # [K, K], one entry per iteration

For a corpus too large for one batch, sum :func:`e_step`'s counts over batches
(``ExpectedCounts`` add) and call :func:`m_step` once per pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .masks import lengths_to_mask
from .precision import upcast
from .structures import ChainPosterior
from .validation import describe, is_validating

__all__ = [
    "DirichletSmoothing",
    "ExpectedCounts",
    "FitResult",
    "HMMParameters",
    "e_step",
    "fit",
    "log_prior",
    "m_step",
    "random_parameters",
]


class HMMParameters(NamedTuple):
    """The probabilities of a categorical-emission HMM (each row sums to one).

    Attributes:
        init_probs: ``[K]``, ``p(z_0 = k)``.
        trans_probs: ``[K, K]``, ``p(z_t = j | z_{t-1} = i)`` at ``[i, j]`` (row = from).
        emission_probs: ``[K, V]``, ``p(x_t = v | z_t = k)`` at ``[k, v]``.
    """

    init_probs: Tensor
    trans_probs: Tensor
    emission_probs: Tensor

    @property
    def num_states(self) -> int:
        return self.trans_probs.shape[-1]

    @property
    def vocab_size(self) -> int:
        return self.emission_probs.shape[-1]


class DirichletSmoothing(NamedTuple):
    """Pseudo-counts (``>= 0``) added to the expected counts before normalising: MAP under a
    Dirichlet prior of concentration ``1 + c`` on every row.  Each is a float or a tensor that
    broadcasts to its parameter's shape (``[K]``, ``[K, K]``, ``[K, V]``)."""

    init: float | Tensor = 0.0
    trans: float | Tensor = 0.0
    emission: float | Tensor = 0.0


@dataclass
class ExpectedCounts:
    """Expected sufficient statistics of a batch under the current parameters (see the module).

    Attributes:
        init: ``[K]``, expected number of sequences starting in each state.
        trans: ``[K, K]``, expected number of ``i -> j`` transitions.
        emission: ``[K, V]``, expected number of times state ``k`` emitted word ``v``.
        log_likelihood: ``[]``, ``sum_n log p(x_n)`` under the parameters the counts came from.

    Counts of disjoint batches under the same parameters add (``a + b``).
    """

    init: Tensor
    trans: Tensor
    emission: Tensor
    log_likelihood: Tensor

    def __add__(self, other: ExpectedCounts) -> ExpectedCounts:
        if not isinstance(other, ExpectedCounts):
            return NotImplemented
        return ExpectedCounts(
            self.init + other.init,
            self.trans + other.trans,
            self.emission + other.emission,
            self.log_likelihood + other.log_likelihood,
        )


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
        params: the parameters after the last M-step.
        log_likelihood: ``[I]`` float64, ``sum_n log p(x_n)`` at each E-step: entry ``i`` is that
            of the parameters after ``i`` updates (the starting parameters first), as in
            hmmlearn's ``monitor_.history``; the returned ``params`` are one update further.
        log_posterior: ``[I]`` float64, ``log_likelihood + log_prior`` of the same parameters
            (equal to ``log_likelihood`` without smoothing): what EM never decreases.
        converged: whether the last improvement of ``log_posterior`` was below ``tol``.
    """

    params: HMMParameters
    log_likelihood: Tensor
    log_posterior: Tensor
    converged: bool


# ---- input checks -----------------------------------------------------------------------------


def _check_parameters(params: HMMParameters, validating: bool) -> None:
    if not isinstance(params, HMMParameters):
        raise ValueError(f"params must be HMMParameters, got {type(params).__name__}")
    init, trans, emission = params
    for name, x in (("init_probs", init), ("trans_probs", trans), ("emission_probs", emission)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"params.{name} must be a floating-point tensor, got {describe(x)}")
    if trans.dim() != 2 or trans.shape[0] != trans.shape[1] or trans.shape[0] < 1:
        raise ValueError(f"params.trans_probs must have shape [K, K], got {describe(trans)}")
    k = trans.shape[0]
    if init.shape != (k,):
        raise ValueError(f"params.init_probs must have shape [K] = [{k}], got {describe(init)}")
    if emission.dim() != 2 or emission.shape[0] != k or emission.shape[1] < 1:
        raise ValueError(f"params.emission_probs must have shape [K, V] = [{k}, V], got {describe(emission)}")
    if not validating:
        return
    for name, x in (("init_probs", init), ("trans_probs", trans), ("emission_probs", emission)):
        if not bool(((x >= 0) & (x <= 1)).all()):  # also False for NaN
            raise ValueError(f"params.{name} must hold probabilities in [0, 1] (no NaN), got {describe(x)}")
        # a row of n probabilities each rounded once sums within about n * eps of one
        tol = max(1e-6 if x.dtype == torch.float64 else 1e-4, x.shape[-1] * torch.finfo(x.dtype).eps)
        err = float((x.sum(-1) - 1).abs().max())
        if err > tol:
            raise ValueError(f"params.{name} must be normalised: its rows sum to one within {tol:g}, off by {err:.3g}")


def _check_batch(words: Tensor, lengths: Tensor | None, vocab_size: int, validating: bool) -> Tensor:
    """The checked ``lengths`` (all ``T`` when None)."""
    if not isinstance(words, Tensor) or words.dim() != 2 or words.is_floating_point() or words.dtype == torch.bool:
        raise ValueError(
            f"words must be an integer tensor [N, T], got {describe(words)}"
            + (f" of dtype {words.dtype}" if isinstance(words, Tensor) else "")
        )
    n, steps = words.shape
    if n < 1 or steps < 1:
        raise ValueError(f"words must have N >= 1 and T >= 1, got {describe(words)}")
    if lengths is None:
        lengths = torch.full((n,), steps, dtype=torch.long, device=words.device)
    if not isinstance(lengths, Tensor) or lengths.shape != (n,) or lengths.is_floating_point():
        raise ValueError(f"lengths must be an integer tensor of shape [N] = [{n}], got {describe(lengths)}")
    lengths = lengths.to(device=words.device, dtype=torch.long)
    if validating:
        low, high = torch.stack([lengths.min(), lengths.max()]).tolist()
        if low < 1 or high > steps:
            raise ValueError(f"lengths must lie in 1..T = 1..{steps}, got values from {low} to {high}")
        real = words[lengths_to_mask(lengths, steps)]
        low, high = torch.stack([real.min(), real.max()]).tolist()
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"words must hold ids in 0..V-1 = 0..{vocab_size - 1} at real positions, "
                f"got values from {low} to {high}"
            )
    return lengths


def _pseudo_counts(smoothing: DirichletSmoothing | float | None, like: tuple[Tensor, Tensor, Tensor], validating):
    """Three pseudo-count tensors shaped like ``init``, ``trans``, ``emission`` (None: no smoothing)."""
    if smoothing is None:
        return None
    if isinstance(smoothing, (int, float)):
        smoothing = DirichletSmoothing(float(smoothing), float(smoothing), float(smoothing))
    if not isinstance(smoothing, DirichletSmoothing):
        raise ValueError(f"smoothing must be DirichletSmoothing, a float or None, got {type(smoothing).__name__}")
    out = []
    for name, c, x in zip(("init", "trans", "emission"), smoothing, like):
        c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
        try:
            c = c.expand_as(x)
        except RuntimeError:
            raise ValueError(f"smoothing.{name} must broadcast to shape {tuple(x.shape)}, got {describe(c)}") from None
        if validating and not bool((c >= 0).all() & torch.isfinite(c).all()):
            raise ValueError(f"smoothing.{name} must be finite pseudo-counts >= 0")
        out.append(c)
    return out


# ---- EM ---------------------------------------------------------------------------------------
def random_parameters(
    num_states: int,
    vocab_size: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> HMMParameters:
    """Starting parameters with every row drawn from a flat Dirichlet (uniform on the simplex)."""
    if num_states < 1 or vocab_size < 1:
        raise ValueError(f"num_states and vocab_size must be >= 1, got {num_states} and {vocab_size}")

    def rows(*shape):
        x = -torch.rand(shape, generator=generator, dtype=dtype).clamp_min(1e-12).log()  # Exp(1)
        return (x / x.sum(-1, keepdim=True)).to(device)

    return HMMParameters(rows(num_states), rows(num_states, num_states), rows(num_states, vocab_size))


def e_step(
    params: HMMParameters,
    words: Tensor,
    lengths: Tensor | None = None,
    *,
    method: str = "auto",
    validate_args: bool | None = None,
) -> ExpectedCounts:
    """Expected counts and log-likelihood of a batch (the module's E-step equations).

    Args:
        params: the current :class:`HMMParameters` (``K`` states, ``V`` words).
        words: ``[N, T]`` word ids in ``0..V-1``; entries at or past a length are ignored.
        lengths: ``[N]`` long in ``1..T`` (default: all ``T``).
        method: the :class:`~latentnlp.structures.ChainPosterior` algorithm (``"auto"``: scaled
            forward-backward, underflowed rows redone in log space).
        validate_args: check values (normalised parameters, id and length ranges; synchronises);
            ``None``: torch's global switch.  Shape checks always run.

    Returns :class:`ExpectedCounts` (``init [K]``, ``trans [K, K]``, ``emission [K, V]``,
    ``log_likelihood []``) in the parameters' dtype (half precision is computed, and counted, in
    float32).  When validating, a sequence of probability zero under ``params`` is a
    ``ValueError`` (its posterior is undefined).  Never builds ``[N, T-1, K, K]``; works under
    ``torch.no_grad()`` and never differentiates the caller's tensors.
    """
    validating = is_validating(validate_args)
    _check_parameters(params, validating)
    lengths = _check_batch(words, lengths, params.vocab_size, validating)
    params = HMMParameters(*(upcast(p) for p in params))
    k, v = params.num_states, params.vocab_size
    device = params.trans_probs.device
    words, lengths = words.to(device), lengths.to(device)
    n, steps = words.shape
    mask = lengths_to_mask(lengths, steps)
    with torch.enable_grad():
        log_init = params.init_probs.detach().log().requires_grad_()
        log_trans = params.trans_probs.detach().log().requires_grad_()
        # emit[n, t, k] = log B[k, x_nt]: a [V, K] table looked up by word (padding reads id 0)
        table = params.emission_probs.detach().log().t()
        emit = table[torch.where(mask, words, 0)].requires_grad_()
        posterior = ChainPosterior(log_init, log_trans, emit, lengths, method=method, validate_args=False)
        log_partition = posterior.log_partition
        if validating and not bool(torch.isfinite(log_partition).all()):
            impossible = (~torch.isfinite(log_partition)).nonzero().flatten().tolist()
            raise ValueError(
                f"words: sequences {impossible[:10]} have probability zero (or NaN) under params; "
                "their posterior, and so their counts, are undefined"
            )
        log_likelihood = log_partition.sum()
        init, trans, gamma = torch.autograd.grad(log_likelihood, (log_init, log_trans, emit), allow_unused=True)
    trans = torch.zeros_like(log_trans) if trans is None else trans  # T = 1: no transition
    dtype = gamma.dtype
    emission = torch.zeros(v, k, dtype=dtype, device=device).index_add_(0, words[mask], gamma[mask]).t()
    # marginals are probabilities; the scaled kernel may leave a rounding-sized negative
    return ExpectedCounts(
        init.detach().clamp_min(0),
        trans.detach().clamp_min(0),
        emission.clamp_min(0),
        log_likelihood.detach(),
    )


def _normalise_rows(x: Tensor) -> Tensor:
    total = x.sum(-1, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, x / safe, torch.full_like(x, 1.0 / x.shape[-1]))


def m_step(
    counts: ExpectedCounts,
    smoothing: DirichletSmoothing | float | None = None,
    *,
    validate_args: bool | None = None,
) -> HMMParameters:
    """The closed-form update (the module's M-step equations): rows of ``counts + pseudo-counts``
    normalised; a row with zero total becomes uniform.

    Args:
        counts: :class:`ExpectedCounts` (``init [K]``, ``trans [K, K]``, ``emission [K, V]``), e.g.
            from :func:`e_step`, or summed over batches.
        smoothing: :class:`DirichletSmoothing` pseudo-counts, a float used for all three, or
            ``None`` (maximum likelihood).
        validate_args: check that counts and pseudo-counts are finite and ``>= 0``.
    """
    validating = is_validating(validate_args)
    if not isinstance(counts, ExpectedCounts):
        raise ValueError(f"counts must be ExpectedCounts, got {type(counts).__name__}")
    k = counts.trans.shape[-1]
    if counts.trans.shape != (k, k) or counts.init.shape != (k,) or counts.emission.dim() != 2:
        raise ValueError(
            f"counts must have init [K], trans [K, K], emission [K, V], got {describe(counts.init)}, "
            f"{describe(counts.trans)}, {describe(counts.emission)}"
        )
    if counts.emission.shape[0] != k:
        raise ValueError(f"counts.emission must have shape [K, V] = [{k}, V], got {describe(counts.emission)}")
    if validating:
        for name, x in (("init", counts.init), ("trans", counts.trans), ("emission", counts.emission)):
            if not bool(((x >= 0) & (x < float("inf"))).all()):
                raise ValueError(f"counts.{name} must be finite and >= 0")
    tables = counts.init, counts.trans, counts.emission
    pseudo = _pseudo_counts(smoothing, tables, validating)
    if pseudo is not None:
        tables = tuple(x + c for x, c in zip(tables, pseudo))
    return HMMParameters(*(_normalise_rows(x) for x in tables))


def log_prior(
    params: HMMParameters, smoothing: DirichletSmoothing | float | None, *, validate_args: bool | None = None
) -> Tensor:
    r"""``sum c log theta`` over the three tables: the log Dirichlet prior of :func:`m_step`'s
    smoothing, up to its normalising constant (``[]``; zero without smoothing).  A zero
    pseudo-count contributes zero even where the probability is zero."""
    validating = is_validating(validate_args)
    _check_parameters(params, False)
    pseudo = _pseudo_counts(smoothing, params, validating)
    if pseudo is None:
        return params.trans_probs.new_zeros(())
    total = params.trans_probs.new_zeros(())
    for c, x in zip(pseudo, params):
        terms = c * x.log()
        total = total + torch.where(c == 0, torch.zeros_like(terms), terms).sum()
    return total


def fit(
    params: HMMParameters,
    words: Tensor,
    lengths: Tensor | None = None,
    iterations: int = 100,
    tol: float = 1e-4,
    *,
    smoothing: DirichletSmoothing | float | None = None,
    method: str = "auto",
    validate_args: bool | None = None,
) -> FitResult:
    """Run Baum-Welch from ``params`` on one batch ``words [N, T]`` (``lengths [N]``).

    At most ``iterations`` rounds of :func:`e_step` then :func:`m_step`; stops early once the log
    posterior (the log-likelihood without smoothing) improves by less than ``tol`` in one
    iteration (``tol = -inf``: never), as hmmlearn does.  The inputs are checked once, here.

    Returns :class:`FitResult`: the final parameters and the per-iteration ``log_likelihood`` and
    ``log_posterior`` trajectories (``[I]``, float64, on the CPU; entry ``i`` belongs to the
    parameters after ``i`` updates).  Each iteration reads its log-likelihood back from the device.
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    validating = is_validating(validate_args)
    _check_parameters(params, validating)
    lengths = _check_batch(words, lengths, params.vocab_size, validating)
    _pseudo_counts(smoothing, params, validating)
    log_likelihoods, log_posteriors = [], []
    converged = False
    for i in range(iterations):
        # EM never lowers a sequence's probability: only the start can make one impossible
        counts = e_step(params, words, lengths, method=method, validate_args=validating and i == 0)
        objective = counts.log_likelihood + log_prior(params, smoothing, validate_args=False)
        params = m_step(counts, smoothing, validate_args=False)
        log_likelihoods.append(float(counts.log_likelihood))
        log_posteriors.append(float(objective))
        if len(log_posteriors) > 1 and log_posteriors[-1] - log_posteriors[-2] < tol:
            converged = True
            break
    trajectory = torch.tensor([log_likelihoods, log_posteriors], dtype=torch.float64)
    return FitResult(params, trajectory[0], trajectory[1], converged)
