"""The float32 log-space fallback and the entropy recursion where one shift per row loses paths.

:meth:`latentnlp.semirings.LogSemiring.matmul` (hence :func:`latentnlp.chain.log_space_forward`,
the fallback of every flagged chain) against a float64 per-entry logsumexp; the left-to-right chain
whose float32 log-space ``log Z`` was 3,000 nats off; :func:`latentnlp.chain.chain_entropy` in
float32 against float64 and enumeration (it was NaN, or negative, at scores of scale 20); and the
gradients of the log-space redo at ``-inf`` transition entries (0, never NaN) against enumeration.
"""

from __future__ import annotations

import pytest
import torch
from chain_oracle import F64, TRANS_KINDS, Enumeration, forward_log, random_chain
from hypothesis import given, settings
from hypothesis import strategies as st

from latentnlp import ChainPosterior, chain
from latentnlp.semirings import LogSemiring

NINF = float("-inf")


def left_to_right(steps: int = 2048):
    """0 -> 1 -> 2 only; state 2 (absorbing) emits best for 300 steps, then worst (float64)."""
    gen = torch.Generator().manual_seed(3)
    trans = torch.tensor([[-0.1, -3.0, -3.0], [NINF, -0.1, -3.0], [NINF, NINF, 0.0]], dtype=F64)
    init = torch.tensor([0.0, -1.0, -2.0], dtype=F64)
    emit = torch.randn(1, steps, 3, generator=gen, dtype=F64) * 0.5
    emit[:, :300, 2] += 1.0
    emit[:, 300:, 2] -= 2.0
    return init, trans, emit, torch.tensor([steps])


def sparse_chain(seed: int, trans_shape: tuple[int, ...], batch: int = 2, steps: int = 32, k: int = 3):
    """Scores ``20 * randn`` (init ``[K]``, emit ``[B, T, K]``, trans of ``trans_shape``), about 30% of the
    transition entries ``-inf`` with the first entry of each row kept finite where the row would have none."""
    torch.manual_seed(seed)
    init, emit, trans = 20 * torch.randn(k), 20 * torch.randn(batch, steps, k), 20 * torch.randn(*trans_shape)
    zero = torch.rand(trans_shape) < 0.3
    zero[..., 0] &= ~zero.all(-1)
    return init.double(), trans.masked_fill(zero, NINF).double(), emit.double(), torch.full((batch,), steps)


def test_left_to_right_chain_in_float32():
    """Float32 ``log Z`` (log space, and ``method="auto"``, which redoes the flagged chain there) and its
    gradient (the marginals) against float64: the log-space ``log Z`` was -3,198 against -169.6."""
    init, trans, emit, lengths = left_to_right()
    wide = ChainPosterior(init, trans, emit, lengths)
    reference, _ = chain.log_space_forward(wide.init, wide.transition, wide.emit, lengths)
    torch.testing.assert_close(reference, forward_log(init, trans, emit, lengths), rtol=1e-12, atol=0)
    emit32 = emit.float().requires_grad_()
    narrow = ChainPosterior(init.float(), trans.float(), emit32, lengths)
    log_z, _ = chain.log_space_forward(narrow.init, narrow.transition, narrow.emit, lengths)
    torch.testing.assert_close(log_z.double(), reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(narrow.log_partition, log_z)
    (marginals,) = torch.autograd.grad(log_z.sum(), emit32)
    emit64 = emit.clone().requires_grad_()
    (exact,) = torch.autograd.grad(
        chain.log_space_forward(wide.init, wide.transition, emit64, lengths)[0].sum(), emit64
    )
    torch.testing.assert_close(marginals.double(), exact, rtol=0, atol=1e-4)


def exact_log_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``logsumexp_k(a_ik + b_kj)`` in float64, ``-inf`` where every term is."""
    terms = a.double().unsqueeze(-1) + b.double().unsqueeze(-3)
    top = terms.amax(-2, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return torch.log(torch.exp(terms - top).sum(-2)) + top.squeeze(-2)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 4),
    k=st.integers(1, 12),
    n=st.integers(1, 6),
    spread=st.sampled_from([1.0, 50.0, 300.0]),
    zeros=st.floats(0.0, 0.6),
    seed=st.integers(0, 2**16),
)
def test_log_matmul_is_exact_per_entry(m, k, n, spread, zeros, seed):
    """Float32 products of operands spanning up to 300 nats, with ``-inf`` entries, against float64:
    every entry to rounding of its own size (one shift per row lost the entries far below the row's
    maximum), ``-inf`` exactly where no term is finite, and finite gradients (0 at ``-inf`` entries)."""
    gen = torch.Generator().manual_seed(seed)
    a = -spread * torch.rand(m, k, generator=gen)
    b = -spread * torch.rand(k, n, generator=gen)
    a = a.masked_fill(torch.rand(m, k, generator=gen) < zeros, NINF).requires_grad_()
    b = b.masked_fill(torch.rand(k, n, generator=gen) < zeros, NINF).requires_grad_()
    out = LogSemiring.matmul(a, b)
    exact = exact_log_matmul(a.detach(), b.detach())
    assert torch.equal(torch.isfinite(out), torch.isfinite(exact))
    finite = torch.isfinite(exact)
    torch.testing.assert_close(out.double()[finite], exact[finite], rtol=1e-6, atol=1e-5)
    grads = torch.autograd.grad(torch.where(finite, out, torch.zeros_like(out)).sum(), (a, b))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][a.detach() == NINF] == 0).all() and (grads[1][b.detach() == NINF] == 0).all()


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    steps=st.integers(1, 60),
    k=st.integers(1, 5),
    scale=st.sampled_from([1.0, 5.0, 20.0]),
    trans_kind=st.sampled_from(TRANS_KINDS),
    seed=st.integers(0, 2**16),
)
def test_log_space_forward_and_entropy_on_sparse_chains(batch, steps, k, scale, trans_kind, seed):
    """Random chains with structural zeros: the float32 log-space ``log Z`` and entropy against float64
    (the entropy finite and ``>= 0``; its error relative to the largest score times ``T``)."""
    gen = torch.Generator().manual_seed(seed)
    init, trans, emit, lengths = random_chain(gen, batch, steps, k, trans_kind=trans_kind, scale=scale, zeros=True)
    wide = ChainPosterior(init, trans, emit, lengths)
    narrow = ChainPosterior(init.float(), trans.float(), emit.float(), lengths)
    log_z, _ = chain.log_space_forward(narrow.init, narrow.transition, narrow.emit, lengths)
    reference = forward_log(init, trans, emit, lengths)
    budget = 4e-6 * steps * (1 + scale)
    torch.testing.assert_close(log_z.double(), reference, rtol=1e-6, atol=budget)
    entropy = chain.chain_entropy(narrow.init, narrow.transition, narrow.emit, lengths)
    assert torch.isfinite(entropy).all() and (entropy >= 0).all()
    exact = chain.chain_entropy(wide.init, wide.transition, wide.emit, lengths)
    torch.testing.assert_close(entropy.double(), exact, rtol=1e-4, atol=budget)
    torch.testing.assert_close(narrow.entropy().double(), exact, rtol=1e-4, atol=budget)


@pytest.mark.parametrize("loop", ["compiled", "arrays", "torch"])
def test_mass_lost_inside_the_product_is_flagged(loop, monkeypatch):
    """A float32 chain with structural zeros whose best paths leave the filter's dominant state through a
    state of mass ``1e-27`` and a transition entry ``57`` nats below the matrix's largest: their product
    underflows to 0 inside ``alpha P`` itself (the reached mass is 0, not merely below the smallest
    normal number).  The state's support is propagated beside the filter, so the chain is flagged and
    redone in log space (``log Z`` was 44 and 244 nats off, the entropy 0 against 0.16, unflagged)."""
    if loop != "compiled":
        monkeypatch.setattr(chain, "COMPILED_LOOP_MAX_WORK", -1)
    if loop == "torch":
        monkeypatch.setattr(chain, "ARRAY_LOOP_MAX_WORK", -1)
    gen = torch.Generator().manual_seed(6380)
    init, trans, emit, lengths = random_chain(gen, 2, 23, 5, trans_kind="shared", scale=20.0, zeros=True)
    wide = ChainPosterior(init, trans, emit, lengths)
    narrow = ChainPosterior(init.float(), trans.float(), emit.float(), lengths)
    assert chain.scaled_log_partition(narrow.init, narrow.transition, narrow.emit, lengths)[2].all()
    budget = 4e-6 * 23 * 21
    torch.testing.assert_close(narrow.log_partition.double(), wide.log_partition, rtol=1e-6, atol=budget)
    torch.testing.assert_close(narrow.entropy().double(), wide.entropy(), rtol=1e-4, atol=budget)
    torch.testing.assert_close(narrow.marginals.double(), wide.marginals, rtol=0, atol=1e-4)


def resolution_budget(init, trans, emit):
    """The float32 error allowed an entropy from the marginals, ``log Z - E_p[s]``: ``ENTROPY_RESOLUTION``
    ``eps`` times ``T`` times the largest finite score of each kind (a bound on the size of its terms)."""
    largest = sum(
        float(x[torch.isfinite(x)].abs().max()) if torch.isfinite(x).any() else 0.0 for x in (init, trans, emit)
    )
    return chain.ENTROPY_RESOLUTION * torch.finfo(torch.float32).eps * emit.shape[1] * largest


def test_entropy_at_scale_20_with_structural_zeros():
    """The chains of ``sparse_chain``, shared, per-row and time-varying transitions: float32 entropy
    (``chain_entropy``, and ``method="auto"``) finite, ``>= 0`` and equal to float64's within the
    resolution of ``log Z - E_p[s]`` (seed 23's shared chain was NaN; others were negative, -37 nats
    against 0.17, before the flagged rows were recomputed by the recursion)."""
    for seed in (0, 23, 36, 65, 82, 106, 124):
        for shape in ((3, 3), (2, 3, 3), (2, 31, 3, 3)):
            init, trans, emit, lengths = sparse_chain(seed, shape)
            wide = ChainPosterior(init, trans, emit, lengths)
            exact = chain.chain_entropy(wide.init, wide.transition, wide.emit, lengths)
            narrow = ChainPosterior(init.float(), trans.float(), emit.float(), lengths)
            budget = resolution_budget(init, trans, emit)
            for entropy in (
                chain.chain_entropy(narrow.init, narrow.transition, narrow.emit, lengths),
                narrow.entropy(),
            ):
                assert torch.isfinite(entropy).all() and (entropy >= 0).all(), (seed, shape, entropy)
                torch.testing.assert_close(entropy.double(), exact, rtol=1e-4, atol=budget, msg=f"{seed} {shape}")
            recursion = chain._entropy_recursion(narrow.init, narrow.transition.dense(), narrow.emit, lengths)
            torch.testing.assert_close(recursion.double(), exact, rtol=1e-4, atol=1e-5, msg=f"{seed} {shape}")


def test_entropy_and_its_gradient_against_enumeration():
    """Float64 and float32 entropy of short chains with structural zeros against enumeration, and the
    gradient of the float64 entropy (finite, 0 at ``-inf`` entries) against autograd through enumeration."""
    gen = torch.Generator().manual_seed(5)
    for trans_kind in TRANS_KINDS:
        for steps, k in ((1, 3), (4, 3), (5, 2), (3, 4)):
            init, trans, emit, lengths = random_chain(gen, 3, steps, k, trans_kind=trans_kind, scale=8.0, zeros=True)
            trans = trans.requires_grad_()
            ref = Enumeration(init, trans, emit, lengths)
            d = ChainPosterior(init, trans, emit, lengths)
            entropy = chain.chain_entropy(d.init, d.transition, d.emit, lengths)
            torch.testing.assert_close(entropy, ref.entropy(), rtol=1e-10, atol=1e-10)
            narrow = ChainPosterior(init.float(), trans.detach().float(), emit.float(), lengths)
            entropy32 = chain.chain_entropy(narrow.init, narrow.transition, narrow.emit, lengths)
            torch.testing.assert_close(entropy32.double(), ref.entropy(), rtol=1e-5, atol=1e-5)
            if steps == 1:  # no transition in the chain
                continue
            (grad,) = torch.autograd.grad(entropy.sum(), trans)
            (exact,) = torch.autograd.grad(ref.entropy().sum(), trans)
            assert torch.isfinite(grad).all() and (grad[trans.detach() == NINF] == 0).all()
            finite = trans.detach() > NINF
            torch.testing.assert_close(grad[finite], exact[finite], rtol=1e-8, atol=1e-8)


def test_redone_gradients_against_enumeration():
    """Short chains with ``-inf`` transitions and scores that underflow float32: the gradient of the
    log-space ``log Z``, of ``ChainPosterior.log_partition`` by the blocked kernel and ``"auto"`` (flagged
    chains redone in log space) and of the scaled and blocked kernels' unflagged chains is finite and
    equals the enumerated marginals, 0 at ``-inf`` entries."""
    gen = torch.Generator().manual_seed(9)
    for trans_kind in TRANS_KINDS:
        init, trans, emit, lengths = random_chain(gen, 3, 5, 3, trans_kind=trans_kind, scale=40.0, zeros=True)
        ref = Enumeration(init, trans, emit, lengths)
        for kernel in ("log", "blocked", "auto", chain.scaled_log_partition, chain.blocked_log_partition):
            emit32 = emit.float().requires_grad_()
            trans32 = trans.float().requires_grad_()
            if isinstance(kernel, str):
                d = ChainPosterior(init.float(), trans32, emit32, lengths, method=kernel)
                log_z, rows = d.log_partition, torch.ones(3, dtype=torch.bool)
            else:
                d = ChainPosterior(init.float(), trans32, emit32, lengths)
                log_z, _, flagged = kernel(d.init, d.transition, d.emit, lengths)
                rows = ~flagged
            grad_emit, grad_trans = torch.autograd.grad(log_z[rows].sum(), (emit32, trans32))
            msg = f"{trans_kind} {kernel}"
            assert torch.isfinite(grad_emit).all() and torch.isfinite(grad_trans).all(), msg
            assert (grad_trans[trans32.detach() == NINF] == 0).all(), msg
            edges = ref.edge_marginals * rows.view(3, 1, 1, 1)  # [B, T-1, K, K]
            exact_trans = {"shared": edges.sum((0, 1)), "batched": edges.sum(1), "time": edges}[trans_kind]
            marginals = ref.marginals * rows.view(3, 1, 1)
            torch.testing.assert_close(grad_emit.double(), marginals, rtol=0, atol=1e-5, msg=msg)
            torch.testing.assert_close(grad_trans.double(), exact_trans, rtol=0, atol=1e-5, msg=msg)


def test_long_sparse_chain_gradients_are_finite():
    """``(2, 4096, 4)`` with structural zeros: the scaled and blocked gradients, after their log-space
    redo, are finite and 0 at ``-inf`` transitions, and equal the float64 gradient."""
    gen = torch.Generator().manual_seed(0)
    init, trans, emit, lengths = random_chain(gen, 2, 4096, 4, zeros=True, scale=3.0, full=True)
    emit64, trans64 = emit.clone().requires_grad_(), trans.clone().requires_grad_()
    wide = ChainPosterior(init, trans64, emit64, lengths)
    log_z, _, underflowed = chain.scaled_log_partition(wide.init, wide.transition, wide.emit, lengths)
    assert not underflowed.any()
    exact = torch.autograd.grad(log_z.sum(), (emit64, trans64))
    for kernel in (chain.scaled_log_partition, chain.blocked_log_partition):
        emit32, trans32 = emit.float().requires_grad_(), trans.float().requires_grad_()
        d = ChainPosterior(init.float(), trans32, emit32, lengths)
        log_z32, _, _ = kernel(d.init, d.transition, d.emit, lengths)
        grads = torch.autograd.grad(log_z32.sum(), (emit32, trans32))
        assert all(torch.isfinite(g).all() for g in grads), kernel.__name__
        assert (grads[1][trans32.detach() == NINF] == 0).all()
        torch.testing.assert_close(grads[0].double(), exact[0], rtol=0, atol=5e-4)
        torch.testing.assert_close(grads[1].double(), exact[1], rtol=1e-4, atol=1e-2)
