"""The product transition's step paths and gradient buffers, against each other and float64 references.

On the CPU a step of :class:`~latentnlp.factorial.ProductTransition` runs its ``L`` products on numpy
views while one chain's product ``B K^L K`` is at most ``ARRAY_LOOP_MAX_WORK``, else one
``torch.bmm`` per chain (the path on other devices); the chain kernels' own numpy loop, chosen by the
same ``B K^L K`` (the product's step work), takes the same numpy steps.  Each path is forced by
setting its bound to 0 and compared with the dense Kronecker product (one step), and with the
``K^L``-state ``ChainPosterior`` in log space (``log Z`` and its gradients, shared, per-row and
time-varying chains, variable lengths).  The parameter gradients, which step through chunks of
``ceil((T-1) / L)`` steps in reused buffers, are checked against autograd on chunkings that do not
divide the steps.
"""

from __future__ import annotations

import pytest
import torch
from factorial_oracle import product_chain

import latentnlp.chain
import latentnlp.factorial
from latentnlp import ChainPosterior, DenseTransition, FactorialChainPosterior
from latentnlp.factorial import ProductTransition, _ProductProbabilities

pytestmark = pytest.mark.usefixtures("float64")

LAYOUTS = ("shared", "batched", "time", "mixed")


def close(actual, expected):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-7, atol=1e-9)


def chain_logs(layout, batch, steps, num_chains, k, gen):
    """Per chain a log matrix ``[K, K]``, ``[B, K, K]`` or ``[B, T-1, K, K]`` after ``layout``."""
    shapes = {
        "shared": [(k, k)] * num_chains,
        "batched": [(batch, k, k)] * num_chains,
        "time": [(batch, steps - 1, k, k)] * num_chains,
        "mixed": [(batch, k, k), (batch, steps - 1, k, k), (k, k)][:num_chains],
    }[layout]
    return [torch.randn(shape, generator=gen).log_softmax(-1) for shape in shapes]


def per_step(x, batch, steps):
    """``[.., N, N]``, ``[B, N, N]`` or ``[B, T-1, N, N]`` laid out as ``[B, T-1, N, N]``."""
    x = x[:, None] if x.dim() == 3 else x
    return x.expand(batch, steps - 1, *x.shape[-2:])


def step_paths(monkeypatch, path):
    """Force ``path``: the chain kernels' numpy loop ("arrays"), the torch loop with numpy steps
    ("numpy steps") or the torch loop with torch steps ("torch")."""
    if path != "arrays":
        monkeypatch.setattr(latentnlp.chain, "ARRAY_LOOP_MAX_WORK", 0)
    if path == "torch":
        monkeypatch.setattr(latentnlp.factorial, "ARRAY_LOOP_MAX_WORK", 0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ("numpy steps", "torch"))
def test_steps_equal_the_dense_product(monkeypatch, layout, path):
    """Forward ``x P_t`` and backward ``P_t x`` of one step against the dense ``K^L x K^L`` product, on
    both paths, for every step and, for shared chains, two batch sizes (buffers are kept per size)."""
    step_paths(monkeypatch, path)
    gen = torch.Generator().manual_seed(0)
    batch, steps, k = 3, 4, 3
    num_chains = 3 if layout == "mixed" else 2
    probs = ProductTransition(chain_logs(layout, batch, steps, num_chains, k, gen)).probabilities()
    states = k**num_chains
    dense = per_step(probs.dense(), batch, steps)
    for rows in (batch, 1) if layout == "shared" else (batch,):
        for t in range(1, steps):
            vector = torch.rand(rows, states, generator=gen)
            out = torch.empty_like(vector)
            assert probs._on_arrays(vector, out) == (path == "numpy steps")
            close(probs.forward(vector, t, out), torch.einsum("bi,bij->bj", vector, dense[:rows, t - 1]))
            close(probs.backward(vector, t, out), torch.einsum("bij,bj->bi", dense[:rows, t - 1], vector))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ("arrays", "numpy steps", "torch"))
def test_log_partition_and_gradients_equal_the_product_state_chain(monkeypatch, layout, path):
    """``log Z`` and its gradients w.r.t. ``init``, ``emit`` and every chain's ``trans`` (the scaled
    forward-backward with the hand-written backward) against autograd through the log-space forward
    of the ``K^L``-state chain with the Kronecker-sum transition, with lengths below ``T``."""
    step_paths(monkeypatch, path)
    gen = torch.Generator().manual_seed(1)
    batch, steps, k = 4, 7, 2
    num_chains = 3
    init = torch.randn(batch, num_chains, k, generator=gen).log_softmax(-1).requires_grad_()
    logs = [log.requires_grad_() for log in chain_logs(layout, batch, steps, num_chains, k, gen)]
    emit = torch.randn(batch, steps, *(k,) * num_chains, generator=gen).requires_grad_()
    lengths = torch.tensor([steps, 1, 4, steps - 1])
    weights = torch.randn(batch, generator=gen)
    leaves = [init, emit, *logs]

    p = FactorialChainPosterior(init, logs, emit, lengths, method="scaled")
    grads = torch.autograd.grad((p.log_partition * weights).sum(), leaves)

    stacked = torch.stack([per_step(log, batch, steps) for log in logs], 2)  # [B, T-1, L, K, K]
    flat_init, flat_trans, flat_emit = product_chain(init, stacked, emit)
    q = ChainPosterior(flat_init, DenseTransition(flat_trans), flat_emit, lengths, method="log")
    expected = torch.autograd.grad((q.log_partition * weights).sum(), leaves)
    close(p.log_partition, q.log_partition)
    for grad, reference in zip(grads, expected):
        close(grad, reference)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_chains,steps", ((2, 6), (3, 8), (3, 2)))
@pytest.mark.parametrize("chunk_steps", (None, 2, 0.5))
def test_parameter_gradients_over_uneven_chunks(monkeypatch, layout, num_chains, steps, chunk_steps):
    """``parameter_gradients(alpha, u)`` is the gradient of ``sum_t alpha_{t-1} P_t u_t`` w.r.t. each
    chain's ``P^l`` times ``P^l``, for ``T - 1`` steps that the chunks do not divide: chunks of
    ``ceil((T-1) / L)`` steps (5 = 3 + 2, 7 = 3 + 3 + 1), of 2 steps (``GRADIENT_CHUNK_STATES`` set to
    two steps' joint states) and of 1 (set to half a step's), and a single step."""
    gen = torch.Generator().manual_seed(2)
    batch, k = 3, 2
    if chunk_steps is not None:
        monkeypatch.setattr(latentnlp.factorial, "GRADIENT_CHUNK_STATES", int(chunk_steps * batch * k**num_chains))
    logs = chain_logs(layout, batch, steps, num_chains, k, gen)
    if layout == "mixed":
        logs = logs + [torch.randn(k, k, generator=gen).log_softmax(-1)] * (num_chains - len(logs))
    probs = ProductTransition(logs).probabilities()
    states = k**num_chains
    alpha = torch.rand(steps - 1, batch, states, generator=gen)
    u = torch.rand(steps - 1, batch, states, generator=gen)
    leaves = [p.clone().requires_grad_() for p in probs.probs]
    product = per_step(
        _ProductProbabilities([(p, torch.zeros(())) for p in leaves], k, [p.log() for p in leaves]).dense(),
        batch,
        steps,
    )
    total = torch.einsum("tbi,btij,tbj->", alpha, product, u)
    expected = torch.autograd.grad(total, leaves)
    for grad, p, reference in zip(probs.parameter_gradients(alpha, u), probs.probs, expected):
        close(grad, p * reference)


def test_chain_kernels_step_on_arrays_by_one_chains_product(monkeypatch):
    """The chain kernels' numpy loop is chosen by the product transition's step work ``B K^L K`` (one
    chain's product), not by the ``B (K^L)^2`` of a dense matrix over the joint states: with the bound
    between the two, the loop steps on arrays, and the values equal the torch loop's."""
    from latentnlp.chain import _array_steps

    gen = torch.Generator().manual_seed(4)
    batch, steps, k, num_chains = 2, 5, 3, 2
    states = k**num_chains
    probs = ProductTransition(chain_logs("shared", batch, steps, num_chains, k, gen)).probabilities()
    assert probs.step_work(batch, states) == batch * states * k
    beliefs = torch.empty(steps, batch, states)
    monkeypatch.setattr(latentnlp.chain, "ARRAY_LOOP_MAX_WORK", batch * states * k)
    assert _array_steps(probs, beliefs) is not None
    assert DenseTransition(torch.zeros(states, states)).probabilities().step_work(batch, states) > batch * states * k
    init = torch.randn(num_chains, k, generator=gen).log_softmax(-1)
    trans = torch.randn(num_chains, k, k, generator=gen).log_softmax(-1).requires_grad_()
    emit = torch.randn(batch, steps, k, k, generator=gen).requires_grad_()
    on_arrays = FactorialChainPosterior(init, trans, emit).log_partition
    grads = torch.autograd.grad(on_arrays.sum(), (trans, emit))
    monkeypatch.setattr(latentnlp.chain, "ARRAY_LOOP_MAX_WORK", batch * states * k - 1)
    assert _array_steps(probs, beliefs) is None
    on_torch = FactorialChainPosterior(init, trans, emit).log_partition
    close(on_arrays, on_torch)
    for grad, reference in zip(grads, torch.autograd.grad(on_torch.sum(), (trans, emit))):
        close(grad, reference)


def test_finiteness_check_flags_nan_and_inf_but_not_minus_inf():
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(2, 2, generator=gen).log_softmax(-1)
    trans = torch.randn(2, 2, 2, generator=gen).log_softmax(-1)
    emit = torch.randn(2, 3, 2, 2, generator=gen)
    for bad in (float("nan"), float("inf")):
        broken = emit.clone()
        broken[1, 2, 0, 1] = bad
        with pytest.raises(ValueError, match="emit .* contains NaN or \\+inf at 1 positions"):
            FactorialChainPosterior(init, trans, broken, validate_args=True)
    allowed = emit.clone()
    allowed[1, 2, 0, 1] = float("-inf")
    assert torch.isfinite(FactorialChainPosterior(init, trans, allowed, validate_args=True).log_partition).all()
