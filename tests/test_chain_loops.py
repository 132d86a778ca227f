"""The scaled recursion's three loops and ``method="auto"``'s choice of kernel.

On the CPU the scaled forward and backward run compiled (``latentnlp._chain_loops``) when one dense
matrix serves every step and ``B K^2 <= latentnlp.chain.COMPILED_LOOP_MAX_WORK``, else step on numpy
views of their buffers when ``B K^2 <= latentnlp.chain.ARRAY_LOOP_MAX_WORK``, elsewhere (larger
sizes, other devices, transitions without an array form) with torch.  Each loop is checked here
against the float64 enumeration on CPU tensors, the numpy and torch loops by lowering the bounds;
and ``"auto"`` is checked to take the blocked kernel exactly where
:func:`latentnlp.chain.prefers_blocked` says, with the same results.
"""

from __future__ import annotations

import math
import shutil

import numpy
import pytest
import torch
from chain_oracle import F64, TRANS_KINDS, Enumeration, forward_log, low_rank_dense, random_chain, random_low_rank
from test_chain import PATH_ROUNDED_AWAY, build

from latentnlp import ChainPosterior, FactorialChainPosterior, LowRankTransition, chain
from latentnlp.factorial import ProductTransition

TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.fixture(params=["compiled", "compiled-threads", "compiled-plain", "arrays", "torch"])
def loop(request, monkeypatch):
    compiled = request.param.startswith("compiled")
    if compiled and chain._chain_loops is None:
        pytest.skip("latentnlp._chain_loops was not built by this install")
    if not compiled:
        monkeypatch.setattr(chain, "COMPILED_LOOP_MAX_WORK", -1)
    if request.param == "compiled-threads":  # rows shared among threads at every size (two rows or more each)
        monkeypatch.setattr(chain, "COMPILED_LOOP_THREAD_MIN_WORK", 0)
        monkeypatch.setattr(chain, "COMPILED_LOOP_THREAD_MIN_WORK_ONE_MATRIX", 0)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    if request.param == "torch":
        monkeypatch.setattr(chain, "ARRAY_LOOP_MAX_WORK", -1)
    if request.param == "compiled-plain":  # the product without AVX2 (the tiled one is the default where it runs)
        previous = chain._chain_loops.product()
        chain._chain_loops.set_product("plain")
        yield request.param
        chain._chain_loops.set_product(previous)
        return
    yield request.param


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_the_install_built_the_compiled_loops():
    assert chain._chain_loops is not None, "setup.py's optional extension latentnlp._chain_loops failed to build"


@pytest.mark.skipif(chain._chain_loops is None, reason="latentnlp._chain_loops was not built by this install")
def test_the_compiled_forward_checks_its_arguments_and_declines_unreachable_states():
    loops = chain._chain_loops
    emit, init, probs, padding = (
        numpy.zeros((2, 4, 3)),
        numpy.zeros(3),
        numpy.full((3, 3), 0.5),
        numpy.zeros((2, 4), bool),
    )

    def forward(
        *stored, emit=emit, init=init, probs=probs, padding=padding, log_z=None, flagged=None, threads=1, final=None
    ):
        log_z = numpy.zeros(2) if log_z is None else log_z
        flagged = numpy.zeros(2, bool) if flagged is None else flagged
        return loops.scaled_forward(
            emit, init, probs, padding, 4, log_z, flagged, threads, final, *(stored or (None,) * 4)
        )

    log_z, final = numpy.zeros(2), numpy.zeros((2, 3))
    assert forward(log_z=log_z, final=final) is True  # the well-formed call: Z = 3 (3 x 0.5)^3
    numpy.testing.assert_allclose(log_z, math.log(3) + 3 * math.log(1.5), rtol=1e-14)
    numpy.testing.assert_allclose(final, 1 / 3, rtol=1e-14)
    # a state not reachable at every step: declined, nothing written
    log_z[:] = 7.0
    assert forward(init=numpy.array([0.0, -numpy.inf, 0.0]), log_z=log_z) is False
    assert forward(probs=numpy.array([[0.5, 0.0, 0.5]] * 3), log_z=log_z) is False
    assert forward(probs=numpy.full((3, 3), numpy.nan), log_z=log_z) is False and log_z.tolist() == [7.0, 7.0]
    with pytest.raises(ValueError, match="init: expected the item format of emit"):
        forward(init=init.astype(numpy.float32))
    with pytest.raises(ValueError, match=r"init: expected \[S=3\] or \[B=2, S\]"):
        forward(init=numpy.zeros(4))
    with pytest.raises(ValueError, match=r"probs: 1 factor\(s\) of k=4 states do not make the S=3 states"):
        forward(probs=numpy.full((4, 4), 0.5))
    with pytest.raises(ValueError, match=r"probs: 2 factor\(s\) of k=3 states do not make the S=3 states"):
        forward(probs=(probs, probs))
    with pytest.raises(ValueError, match=r"probs: factor 1: expected 'd' items, \[k, k\] or \[B=2, k, k\]"):
        joint = numpy.zeros((2, 4, 4)), numpy.zeros(4)  # S = 4 = 2 x 2 joint states
        forward(emit=joint[0], init=joint[1], probs=(numpy.full((2, 2), 0.5), numpy.ones((3, 2, 2))))  # B = 3, not 2
    with pytest.raises(ValueError, match=r"padding: expected \[B=2, T=4\]"):
        forward(padding=padding.T.copy())
    with pytest.raises(ValueError, match="threads: expected at least 1, got 0"):
        forward(threads=0)
    with pytest.raises(ValueError, match="padding: None needs all_valid_until >= T = 4, got 3"):
        loops.scaled_forward(emit, init, probs, None, 3, log_z, numpy.zeros(2, bool), 1, None, None, None, None, None)
    assert loops.scaled_forward(
        emit, init, probs, None, 4, log_z, numpy.zeros(2, bool), 1, None, None, None, None, None
    )
    with pytest.raises(ValueError, match=r"flagged: expected \[B=2\] of one-byte booleans"):
        forward(flagged=numpy.zeros(3, bool))
    with pytest.raises(ValueError, match=r"log_z: expected \[B=2\] of float64"):
        forward(log_z=numpy.zeros(2, numpy.float32))
    with pytest.raises(ValueError, match=r"final_filter: expected \[B=2, S=3\]"):
        forward(final=numpy.zeros((2, 4)))
    with pytest.raises(ValueError, match="alpha, scale, weights, shifts: expected all four or none"):
        loops.scaled_forward(
            emit,
            init,
            probs,
            padding,
            4,
            log_z,
            numpy.zeros(2, bool),
            1,
            None,
            numpy.zeros((4, 2, 3)),
            None,
            None,
            None,
        )
    with pytest.raises(ValueError, match=r"alpha, scale, weights, shifts: expected \[T=4, B=2, S=3\], \[T, B\]"):
        forward(numpy.zeros((4, 2, 3)), numpy.zeros((4, 2)), numpy.zeros((4, 2, 3)), numpy.zeros((2, 4)))
    with pytest.raises(ValueError, match="expected float32 or float64 items"):
        forward(emit=numpy.zeros((2, 4, 3), numpy.int64))
    # a normaliser below tiny / eps inside the length flags its chain, one at a padding step does not
    tiny = numpy.finfo(numpy.float64).tiny
    alpha, scale, weights, shifts = (
        numpy.zeros((4, 2, 3)),
        numpy.zeros((4, 2)),
        numpy.zeros((4, 2, 3)),
        numpy.zeros((4, 2)),
    )
    flagged, padding = numpy.zeros(2, bool), padding.copy()
    padding[1, 1:] = True
    assert loops.scaled_forward(
        emit, init, numpy.full((3, 3), tiny), padding, 1, log_z, flagged, 1, None, alpha, scale, weights, shifts
    )
    assert flagged.tolist() == [True, False] and scale[1:, 0].max() < 4 * tiny and scale[1:, 1].tolist() == [1.0] * 3


@pytest.mark.skipif(chain._chain_loops is None, reason="latentnlp._chain_loops was not built by this install")
def test_the_compiled_backward_checks_its_arguments():
    loops = chain._chain_loops
    alpha, weights, probs, padding = (
        numpy.zeros((4, 2, 3)),
        numpy.ones((4, 2, 3)),
        numpy.eye(3),
        numpy.zeros((2, 4), bool),
    )
    gamma = numpy.zeros((2, 4, 3))  # the backward writes the marginals batch-major, [B, T, S]
    with pytest.raises(ValueError, match=r"statistics: expected 'd' items \[B=2, F=1, k=3, k\]"):
        loops.scaled_backward(gamma, None, weights, probs, padding, 4, alpha, 1, probs, numpy.zeros((2, 2, 3, 3)))
    with pytest.raises(ValueError, match="probs: expected the layout of probs_t's 1 factor"):
        loops.scaled_backward(gamma, None, weights, probs, padding, 4, alpha, 1, numpy.ones((2, 3, 3)), alpha)
    with pytest.raises(ValueError, match="gamma: expected a C-contiguous writable array"):
        loops.scaled_backward(gamma.transpose(0, 2, 1), alpha, weights, probs, padding, 4, alpha)
    with pytest.raises(ValueError, match=r"gamma \[B, T, S\], u, weights: shapes do not match alpha \[T=4, B=2, S=3\]"):
        loops.scaled_backward(alpha.copy(), alpha.copy(), weights, probs, padding, 4, alpha)
    with pytest.raises(ValueError, match="weights: expected the item format of gamma"):
        loops.scaled_backward(gamma, alpha.copy(), weights.astype(numpy.float32), probs, padding, 4, alpha)
    with pytest.raises(ValueError, match="threads: expected at least 1, got 0"):
        loops.scaled_backward(gamma, alpha.copy(), weights, probs, padding, 4, alpha, 0)
    u = numpy.zeros((4, 2, 3))
    assert loops.scaled_backward(gamma, u, weights, probs, padding, 4, numpy.full((4, 2, 3), 0.5)) is True
    numpy.testing.assert_array_equal(gamma, 0.5)  # gamma = alpha * beta, beta = 1 throughout
    assert loops.scaled_backward(gamma, u, weights * 1e308, probs, padding, 4, numpy.ones((4, 2, 3))) is False
    with pytest.raises(ValueError, match="product: expected 'plain' or 'avx2-fma tiles', got 'fast'"):
        loops.set_product("fast")


@pytest.mark.skipif(chain._chain_loops is None, reason="latentnlp._chain_loops was not built by this install")
@pytest.mark.parametrize("product", ["avx2-fma tiles", "plain"])
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_the_compiled_forward_takes_the_exponentials_of_the_shifted_scores(product, dtype):
    """The loop's ``e_t = exp(emit_t - m_t)`` (its own vector exponential where AVX2 runs, libm's otherwise),
    read back as ``weights * scale``, against numpy's ``exp`` of the scores less the loop's shifts, over
    the whole range: shifted scores from 0 down past where exp underflows (subnormal results included),
    ``-inf`` (0), and a NaN score (NaN, a NaN log Z, no flag); ``m_t`` is the largest finite score."""
    loops = chain._chain_loops
    if product not in ("plain", loops.product()):
        pytest.skip("this CPU has no AVX2 and FMA")
    previous = loops.product()
    loops.set_product(product)
    try:
        finfo = numpy.finfo(dtype)
        low = math.log(finfo.smallest_subnormal) - 2  # below: exp underflows to 0
        rng = numpy.random.default_rng(3)
        B, T, S = 3, 64, 21  # S: two vectors of float32, five of float64, and a tail
        emit = rng.uniform(low, 0, size=(B, T, S)).astype(dtype)
        emit[:, :, 0] = 0.0  # the shift m_t = 0 (and a score 0, exp 1)
        emit[0, 5, 3:9] = -numpy.inf
        emit[2, 7, :] = numpy.linspace(low, 0, S)  # evenly over the range
        emit[2, 9, 4] = low / 2 + 0.5  # subnormal in float32 and float64
        emit[1, 11, 2] = numpy.nan
        init, probs = numpy.zeros(S, dtype), numpy.full((S, S), 1.0 / S, dtype)
        alpha, scale, weights, shifts = (numpy.zeros(shape, dtype) for shape in ((T, B, S), (T, B), (T, B, S), (T, B)))
        log_z, flagged = numpy.zeros(B), numpy.zeros(B, bool)
        padding = numpy.zeros((B, T), bool)
        assert loops.scaled_forward(
            emit, init, probs, padding, T, log_z, flagged, 1, None, alpha, scale, weights, shifts
        )
        exponentials = (weights * scale[..., None]).astype(numpy.float64)  # e_t / c_t * c_t
        rows = [b for b in range(B) if b != 1]
        expected = numpy.exp(emit.astype(numpy.float64) - shifts.T[..., None].astype(numpy.float64)).transpose(1, 0, 2)
        numpy.testing.assert_array_equal(shifts[1:, rows], 0.0)
        numpy.testing.assert_allclose(
            exponentials[1:, rows], expected[1:, rows], rtol=4 * finfo.eps, atol=4 * finfo.smallest_subnormal
        )
        assert (exponentials[1:, rows][expected[1:, rows] == 0] == 0).all() and exponentials[5, 0, 3:9].tolist() == [
            0.0
        ] * 6
        assert numpy.isnan(log_z[1]) and not flagged.any() and numpy.isfinite(log_z[rows]).all()
    finally:
        loops.set_product(previous)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("init_kind", ["shared", "batched"])
def test_log_z_without_a_gradient_is_the_log_z_with_one(loop, init_kind, dtype):
    """Without a gradient to take the compiled forward keeps two steps of the filter (nothing stored for a
    backward pass); its ``log Z``, last filter and flags are the stored forward's, bit for bit (the same
    arithmetic: a model's log-likelihood does not depend on whether a gradient is taken), and its
    ``log Z`` the float64 forward's, for shared and per-row matrices, uneven lengths, chains longer than a chunk of
    exponentials (``T = 150``), and underflowing chains (flagged, redone in log space by ``auto``)."""
    gen = torch.Generator().manual_seed(41 + (init_kind == "batched"))
    cases = [
        random_chain(gen, 5, T, K, trans_kind=kind, init_kind=init_kind, scale=2.0)
        for T, K, kind in ((1, 3, "shared"), (7, 4, "batched"), (150, 5, "shared"), (40, 9, "batched"))
    ]
    for init, trans, emit, lengths in cases:
        args = init.to(dtype), trans.to(dtype), emit.to(dtype), lengths
        with torch.no_grad():
            lean = chain.scaled_log_partition(args[0], chain.DenseTransition(args[1]), args[2], lengths)
        emit_leaf = args[2].clone().requires_grad_()
        stored = chain.scaled_log_partition(args[0], chain.DenseTransition(args[1]), emit_leaf, lengths)
        reference = forward_log(init, trans, emit, lengths)
        torch.testing.assert_close(lean[0].to(F64), reference, **TOLERANCE[dtype])
        assert torch.equal(lean[0], stored[0].detach()) and torch.equal(lean[1], stored[1])
        assert lean[2].tolist() == stored[2].tolist() == [False] * 5
    # an underflowing chain: a transition entry near the smallest normal number
    init, trans, emit, lengths = random_chain(gen, 3, 30, 3, scale=1.0)
    trans = trans.clone()
    trans[1:, :] = math.log(torch.finfo(dtype).tiny) - 5  # rows 1 and 2 lead anywhere with ~e^-750 (-92)
    trans[0, 1:] = math.log(torch.finfo(dtype).tiny) - 5
    emit = emit.clone()
    emit[:, 1:, 0] = -1000.0  # state 0 is all but excluded after step 0: every step's normaliser is tiny
    args = init.to(dtype), trans.to(dtype), emit.to(dtype)
    with torch.no_grad():
        lean = chain.scaled_log_partition(args[0], chain.DenseTransition(args[1]), args[2], lengths)
        redone = ChainPosterior(*args, lengths).log_partition
    stored = chain.scaled_log_partition(args[0], chain.DenseTransition(args[1]), args[2].requires_grad_(), lengths)
    assert lean[2].tolist() == stored[2].tolist() and lean[2].any()
    torch.testing.assert_close(redone.to(F64), forward_log(init, trans, emit, lengths), **TOLERANCE[dtype])


def test_log_z_survives_normalisers_far_below_the_float32_range(loop):
    """float64 leaves a step's normaliser unflagged down to ``tiny / eps`` (about ``2^-970``): the compiled
    loop's running product of the normalisers takes such a one's log apart (multiplied in, the product
    fell to 0 and ``log Z`` to ``-inf``, unflagged; nearer the bound it lost digits to subnormals).  Two
    normalisers of about ``e^-170`` and ``e^-600`` here, and ``init`` in the layouts a caller may pass
    (``[K]``, ``[1, K]``, another dtype), with and without a gradient, against the log-space forward.  (Scores
    this far apart also put the normalisers below :func:`~latentnlp.chain.normaliser_floor`, so ``auto``
    redoes the chain in log space; the kernel's own value must be right all the same.)"""
    inf = float("inf")
    for gap in (560.0, 575.0, 600.0):
        trans = torch.tensor([[0.0, -gap], [-gap, 0.0]], dtype=F64)
        emit = torch.tensor([[[0.0, -1000.0], [-170.0, 0.0], [-170.0, -inf], [-1000.0, 0.0]]], dtype=F64)
        lengths = torch.tensor([4])
        reference = chain.log_space_forward(
            torch.tensor([0.0, -1000.0], dtype=F64), chain.DenseTransition(trans), emit, lengths
        )[0]
        for init in (
            torch.tensor([0.0, -1000.0], dtype=F64),
            torch.tensor([[0.0, -1000.0]], dtype=F64),
            torch.tensor([0.0, -1000.0]),
        ):
            with torch.no_grad():
                lean = chain.scaled_log_partition(init, chain.DenseTransition(trans), emit, lengths)
            stored = chain.scaled_log_partition(
                init, chain.DenseTransition(trans), emit.clone().requires_grad_(), lengths
            )
            for log_z, _, _ in (lean, stored):
                torch.testing.assert_close(log_z.detach(), reference, rtol=1e-13, atol=0)
            redone = ChainPosterior(init, trans, emit, lengths).log_partition
            torch.testing.assert_close(redone, reference, rtol=1e-13, atol=0)


@pytest.mark.parametrize("method", ["auto", "blocked"])
@pytest.mark.parametrize("kind", TRANS_KINDS)
@pytest.mark.parametrize(
    "dtype, scale, seeds", [(torch.float64, 120.0, (1, 8, 16)), (torch.float32, 20.0, (6, 12, 19))]
)
def test_a_mass_rounded_away_that_later_dominates_is_flagged(loop, method, kind, dtype, scale, seeds):
    """Scores hundreds of nats apart (float64; tens in float32): a state's share of the filter rounded away
    at one step (its unnormalised mass below the smallest normal number while the step's normaliser is
    small but above ``tiny / eps``) was later the likeliest, and ``log Z`` came out up to 262 nats (float64)
    or 2e-3 relative (float32) off, unflagged, every state being reachable.  The normaliser floor
    (:func:`~latentnlp.chain.normaliser_floor`, from the transition's smallest entry) flags those chains;
    ``log Z`` with and without a gradient, and the gradient, against the float64 log-space forward, for
    the seeds of the random chains where it failed."""
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        k, batch, steps = (5, 9)[seed % 2], 3, 120
        init = torch.randn(k, generator=gen, dtype=F64) * scale
        shape = {"shared": (k, k), "batched": (batch, k, k), "time": (batch, steps - 1, k, k)}[kind]
        trans = torch.randn(*shape, generator=gen, dtype=F64) * scale
        emit = torch.randn(batch, steps, k, generator=gen, dtype=F64) * 2 * scale
        leaf = emit.clone().requires_grad_()
        reference = chain.log_space_forward(init, chain.DenseTransition(trans), leaf, torch.full((batch,), steps))[0]
        (expected,) = torch.autograd.grad(reference.sum(), leaf)
        narrow = emit.to(dtype).requires_grad_()
        log_z = ChainPosterior(init.to(dtype), trans.to(dtype), narrow, method=method).log_partition
        (marginals,) = torch.autograd.grad(log_z.sum(), narrow)
        with torch.no_grad():
            lean = ChainPosterior(init.to(dtype), trans.to(dtype), emit.to(dtype), method=method).log_partition
        tolerance = dict(rtol=1e-12, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-3)
        for value in (log_z.detach(), lean):
            torch.testing.assert_close(value.to(F64), reference.detach(), **tolerance, msg=f"seed {seed}")
        # float32: scores of some hundreds of nats leave the log-space redo's marginals about 1e-4 off
        torch.testing.assert_close(marginals.to(F64), expected, rtol=0, atol=1e-9 if dtype == F64 else 1e-3)


def check(d, ref, dtype, msg):
    emit = d.emit.detach().clone().requires_grad_()
    posterior = ChainPosterior(d.init, d.transition, emit, d.lengths, method="scaled")
    (marginals,) = torch.autograd.grad(posterior.log_partition.sum(), emit)
    torch.testing.assert_close(posterior.log_partition.to(F64), ref.log_partition, **TOLERANCE[dtype], msg=msg)
    torch.testing.assert_close(marginals.to(F64), ref.marginals, **TOLERANCE[dtype], msg=msg)
    torch.testing.assert_close(posterior.edge_marginals.to(F64), ref.edge_marginals, **TOLERANCE[dtype], msg=msg)
    torch.testing.assert_close(posterior.entropy().to(F64), ref.entropy(), **TOLERANCE[dtype], msg=msg)
    log_filter = chain.forward_filter(d.init, d.transition, d.emit, d.lengths)
    last = (ref.lengths - 1).view(-1, 1, 1).expand(-1, 1, ref.K)
    filtered = log_filter.exp().gather(1, last).squeeze(1).to(F64)
    torch.testing.assert_close(filtered, ref.marginals.gather(1, last).squeeze(1), **TOLERANCE[dtype], msg=msg)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("trans_kind", TRANS_KINDS)
def test_both_loops_match_enumeration(loop, trans_kind, zeros, dtype):
    gen = torch.Generator().manual_seed(7 + TRANS_KINDS.index(trans_kind) + 10 * zeros)
    for T, K in ((1, 3), (2, 2), (5, 3), (6, 2)):
        init, trans, emit, lengths = random_chain(gen, 3, T, K, trans_kind=trans_kind, zeros=zeros, scale=2.0)
        ref = Enumeration(init, trans, emit, lengths)
        d = ChainPosterior(init.to(dtype), trans.to(dtype), emit.to(dtype), lengths)
        check(d, ref, dtype, f"{loop} {trans_kind} zeros={zeros} T={T} K={K} lengths={lengths.tolist()}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["shared", "mixed"])
def test_the_loops_of_a_product_of_chains_agree_with_the_product_state_chain(loop, layout, dtype):
    """Factorial chains (``ProductTransition``: the compiled loops' Kronecker steps, the numpy and torch
    rotations) with every edge of the compiled axis products: ``L`` chains of ``K`` states whose axes are
    ``K^(L-1-l)`` wide (vectors of 8 float or 4 double, half ones, single columns), shared factors or a
    shared one beside one per row, uneven lengths; log Z and the gradients against the float64 log-space
    forward over the ``K^L`` states with the Kronecker-sum transition."""
    gen = torch.Generator().manual_seed(23 + (layout == "mixed"))
    batch, steps = 5, 9
    for num_chains, k in ((2, 3), (3, 2), (2, 4), (2, 5), (2, 9), (2, 12), (3, 4)):
        trans = [torch.randn(k, k, generator=gen, dtype=F64).log_softmax(-1) for _ in range(num_chains)]
        if layout == "mixed":
            trans[1] = torch.randn(batch, k, k, generator=gen, dtype=F64).log_softmax(-1)
        init = torch.randn(num_chains, k, generator=gen, dtype=F64).log_softmax(-1)
        emit = 2 * torch.randn(batch, steps, *(k,) * num_chains, generator=gen, dtype=F64)
        lengths = torch.tensor([steps, 1, 4, steps - 1, 6])
        leaves = [x.clone().requires_grad_() for x in (emit, *trans)]
        dense = ProductTransition(leaves[1:]).dense()
        flat_init = sum(
            init[ell].reshape((1,) * ell + (k,) + (1,) * (num_chains - 1 - ell)) for ell in range(num_chains)
        )
        flat_init = flat_init.reshape(1, -1).expand(batch, -1)
        log_z, _ = chain.log_space_forward(flat_init, chain.DenseTransition(dense), leaves[0].flatten(2), lengths)
        expected = torch.autograd.grad(log_z.sum(), leaves)
        narrow = [x.detach().to(dtype).requires_grad_() for x in leaves]
        found = FactorialChainPosterior(init.to(dtype), narrow[1:], narrow[0], lengths, method="scaled").log_partition
        grads = torch.autograd.grad(found.sum(), narrow)
        msg = f"{loop} {layout} L={num_chains} K={k}"
        torch.testing.assert_close(found.to(F64), log_z, **TOLERANCE[dtype], msg=msg)
        for grad, reference in zip(grads, expected):
            torch.testing.assert_close(grad.to(F64), reference, **TOLERANCE[dtype], msg=msg)


@pytest.mark.skipif(chain._chain_loops is None, reason="latentnlp._chain_loops was not built by this install")
def test_a_row_whose_edge_statistics_overflow_is_redone_in_log_space():
    """The compiled backward of a product of chains sums each row's edge statistics (no ``u`` buffer); a
    row whose statistics are not finite gets all its gradients from the log-space recursion, the other
    rows keep theirs: against the log-space gradient of every row."""
    gen = torch.Generator().manual_seed(31)
    batch, steps, num_chains, k = 3, 6, 2, 3
    trans = ProductTransition(list(torch.randn(num_chains, k, k, generator=gen, dtype=F64).log_softmax(-1)))
    init = torch.randn(batch, k**num_chains, generator=gen, dtype=F64).log_softmax(-1)
    emit = torch.randn(batch, steps, k**num_chains, generator=gen, dtype=F64)
    lengths = torch.tensor([steps, 4, steps])
    mask = chain.lengths_to_mask(lengths, steps)
    probs = trans.probabilities()
    forward = chain._scaled_forward(init, probs, emit, mask)
    alpha, weights = forward.alpha, forward.weights
    gamma, u, finite, statistics = chain._scaled_backward(alpha, probs, weights, mask, statistics=True)
    assert u is None and statistics.shape == (batch, num_chains, k, k) and finite
    statistics[1, 0, 0, 0] = float("inf")
    grad = torch.tensor([0.5, 2.0, 1.0], dtype=F64)
    found = chain._smoother_gradients(
        grad, alpha, gamma, u, mask, probs, trans, init, emit, lengths, finite=False, statistics=statistics
    )
    expected = chain._log_space_gradient(init, emit, lengths, trans, grad, torch.arange(batch))
    for got, want in zip((found[0], found[1], *found[2]), expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("trans_kind", ["shared", "batched"])
def test_the_loops_agree_with_log_space_past_the_compiled_tiles(loop, trans_kind, dtype):
    """Sizes whose products the compiled loops tile (4 rows of the batch, 16 float or 8 double columns)
    with every kind of edge: batches of 1, 3, 4, 6 and 9 rows, K of 8, 16, 20, 24, 33 and 64, uneven lengths;
    log Z against the float64 log-space forward and the marginals against its autograd."""
    gen = torch.Generator().manual_seed(17 + (trans_kind == "batched"))
    for batch, k in ((1, 16), (3, 20), (4, 8), (4, 16), (6, 24), (9, 33), (5, 64)):
        init, trans, emit, lengths = random_chain(gen, batch, 12, k, trans_kind=trans_kind, scale=2.0)
        emit64 = emit.clone().requires_grad_()
        log_z, _ = chain.log_space_forward(init, chain.DenseTransition(trans), emit64, lengths)
        (marginals,) = torch.autograd.grad(log_z.sum(), emit64)
        narrow = emit.to(dtype).requires_grad_()
        posterior = ChainPosterior(init.to(dtype), trans.to(dtype), narrow, lengths, method="scaled")
        (found,) = torch.autograd.grad(posterior.log_partition.sum(), narrow)
        msg = f"{loop} {trans_kind} B={batch} K={k} lengths={lengths.tolist()}"
        torch.testing.assert_close(posterior.log_partition.to(F64), log_z, **TOLERANCE[dtype], msg=msg)
        torch.testing.assert_close(found.to(F64), marginals, **TOLERANCE[dtype], msg=msg)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("trans_kind", ["shared", "batched"])
@pytest.mark.parametrize("zeros", [False, True])
def test_compiled_viterbi_equals_the_torch_loops(trans_kind, zeros, dtype, monkeypatch):
    """The compiled Viterbi loops (max-plus forward and backtracking) against the torch forward and the
    numpy backtracking, which tests/test_chain.py checks against enumeration: the same sums in the same
    order, so the same paths (ties to the lowest index in both), with uneven lengths and structural zeros;
    and the path's score is the optimum of the float64 enumeration on a small chain."""
    if chain._chain_loops is None:
        pytest.skip("latentnlp._chain_loops was not built by this install")
    gen = torch.Generator().manual_seed(23 + 2 * zeros + (trans_kind == "batched"))
    for batch, steps, k in ((1, 1, 3), (3, 9, 5), (4, 30, 16), (2, 17, 33)):
        init, trans, emit, lengths = random_chain(gen, batch, steps, k, trans_kind=trans_kind, zeros=zeros, scale=3.0)
        d = ChainPosterior(init.to(dtype), trans.to(dtype), emit.to(dtype), lengths)
        assert chain.compiled_loops_apply(d.transition, d.emit)
        compiled = chain.viterbi(d.init, d.transition, d.emit, d.lengths)
        with monkeypatch.context() as patch:
            patch.setattr(chain, "COMPILED_LOOP_MAX_WORK", -1)
            looped = chain.viterbi(d.init, d.transition, d.emit, d.lengths)
        assert torch.equal(compiled, looped), (batch, steps, k)
        if steps * k <= 27:
            best = Enumeration(init, trans, emit, lengths).max
            torch.testing.assert_close(ChainPosterior(init, trans, emit, lengths).score(compiled), best)


@pytest.mark.parametrize("zeros", [False, True])
def test_both_loops_through_a_low_rank_transition(loop, zeros):
    gen = torch.Generator().manual_seed(11 + zeros)
    init, _, emit, lengths = random_chain(gen, 3, 5, 3, init_kind="batched", zeros=zeros)
    log_left, log_right = random_low_rank(gen, 3, 2, zeros=zeros)
    ref = Enumeration(init, low_rank_dense(log_left, log_right), emit, lengths)
    check(ChainPosterior(init, LowRankTransition(log_left, log_right), emit, lengths), ref, F64, f"{loop} low rank")


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("steps,k,expected", [(2048, 4, True), (2048, 16, False), (2047, 4, False)])
def test_auto_takes_the_blocked_kernel_where_the_rule_says(steps, k, expected, compiled, monkeypatch):
    """Where the scaled loops run compiled (one shared matrix, a small step) the blocked kernel is never taken."""
    if compiled and chain._chain_loops is None:
        pytest.skip("latentnlp._chain_loops was not built by this install")
    if not compiled:
        monkeypatch.setattr(chain, "COMPILED_LOOP_MAX_WORK", -1)
    expected = expected and not compiled
    gen = torch.Generator().manual_seed(steps + k)
    init, trans, emit, lengths = random_chain(gen, 2, steps, k, scale=3.0, full=True)
    assert chain.prefers_blocked(ChainPosterior(init, trans, emit).transition, emit) == expected
    taken = []
    blocked = chain.blocked_log_partition
    monkeypatch.setattr(chain, "blocked_log_partition", lambda *a, **kw: taken.append(1) or blocked(*a, **kw))
    emit32 = emit.float().requires_grad_()
    log_z = ChainPosterior(init.float(), trans.float(), emit32, lengths).log_partition
    (marginals,) = torch.autograd.grad(log_z.sum(), emit32)
    assert bool(taken) == expected
    torch.testing.assert_close(log_z.to(F64), forward_log(init, trans, emit, lengths), rtol=1e-5, atol=0)
    reference = ChainPosterior(init, trans, emit, lengths, method="scaled").marginals
    torch.testing.assert_close(marginals.to(F64), reference, rtol=0, atol=1e-4)
    # the same rule on low-rank transitions is never blocked
    assert not chain.prefers_blocked(LowRankTransition(*random_low_rank(gen, k, 2)), emit)


def test_a_path_rounded_away_is_flagged_by_both_loops(loop):
    """float32: a reachable state's mass rounds to 0 though no normaliser is small (tests/test_chain.py's
    PATH_ROUNDED_AWAY); the scaled kernel flags the row and ``"auto"`` redoes it in log space."""
    args = tuple(a.float() if a.is_floating_point() else a for a in build(PATH_ROUNDED_AWAY))
    ref = Enumeration(*args)
    d = ChainPosterior(*args[:3], lengths=args[3])
    _, _, underflowed = chain.scaled_log_partition(d.init, d.transition, d.emit, d.lengths)
    assert underflowed.all()
    torch.testing.assert_close(d.log_partition.to(F64), ref.log_partition, rtol=1e-6, atol=0)
    log_filter = chain.forward_filter(d.init, d.transition, d.emit, d.lengths)
    torch.testing.assert_close(log_filter[:, -1].exp().to(F64), ref.marginals[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("trans_kind", ["shared", "batched", "time", "factorial"])
def test_a_transition_entry_rounded_to_zero_is_flagged(loop, trans_kind):
    """float32: ``trans[0, 1] = -110`` is finite but its shifted probability ``exp(-110)`` rounds to 0, and
    the only path into the state it leads to meets a score of +200 (log Z = 90): the probability-space
    kernels (scaled and blocked; sums, entropy, marginals) flag the chains whose matrices hold such an
    entry, and ``"auto"`` gives the float64 values."""
    log = torch.tensor([[0.0, -110.0], [0.0, 0.0]], dtype=F64)
    init, emit = torch.tensor([0.0, -math.inf], dtype=F64), torch.zeros(2, 3, 2, dtype=F64)
    emit[0, 1, 1] = 200.0  # the second chain sees no large score: only a rounded entry flags it
    # batched: the second chain's matrix has nothing to round (it is not flagged)
    trans = {
        "shared": log,
        "batched": torch.stack([log, torch.zeros_like(log)]),
        "time": log.expand(2, 2, 2, 2).clone(),
    }
    if trans_kind == "time":
        trans["time"][1] = log.T  # the second chain's entries are 0 and -110 from state 1: also rounded
    if trans_kind == "factorial":  # and a second chain of two states that the scores do not see
        joint = emit[..., None].expand(2, 3, 2, 2).contiguous()
        chains = torch.stack([init, torch.zeros(2, dtype=F64)])
        cases = [(FactorialChainPosterior, (chains, [log, torch.zeros(2, 2, dtype=F64)], joint))]
    else:
        cases = [(ChainPosterior, (init, trans[trans_kind], emit))]
    for build_posterior, args in cases:
        expected = build_posterior(*args, method="log")
        narrow = [[t.float() for t in a] if isinstance(a, list) else a.float() for a in args]
        for method in ("auto",) + (("blocked",) if build_posterior is ChainPosterior else ()):
            found = build_posterior(*narrow, method=method)
            msg = f"{loop} {trans_kind} {method}"
            torch.testing.assert_close(found.log_partition.double(), expected.log_partition, rtol=1e-6, atol=0, msg=msg)
            # the entropy, log Z - E_p[s], cancels terms of about 200: float32 resolves it to about 1e-4 here
            torch.testing.assert_close(found.entropy().double(), expected.entropy(), rtol=0, atol=1e-3, msg=msg)
            torch.testing.assert_close(found.marginals.double(), expected.marginals, rtol=0, atol=1e-5, msg=msg)
    if trans_kind != "factorial":
        d = ChainPosterior(*[a.float() for a in cases[0][1]])
        _, _, underflowed = chain.scaled_log_partition(d.init, d.transition, d.emit, d.lengths)
        assert underflowed.tolist() == ([True, False] if trans_kind == "batched" else [True, True])


@pytest.mark.skipif(chain._chain_loops is None, reason="latentnlp._chain_loops was not built by this install")
def test_compiled_backward_sampling_checks_its_buffers_and_follows_the_support():
    loops = chain._chain_loops
    log_filter = numpy.log(numpy.full((1, 3, 2), 0.5))
    columns = numpy.array([[0.0, -numpy.inf], [-numpy.inf, 0.0]])  # z_{t-1} = z_t: the identity, in log space
    padding, last = numpy.zeros((1, 3), bool), numpy.array([[1], [0]])
    uniform, path = numpy.full((2, 2, 1), 0.999), numpy.zeros((2, 1, 3), numpy.int64)
    loops.backward_sample(log_filter, columns, padding, uniform, last, path)
    assert path[:, 0].tolist() == [[1, 1, 1], [0, 0, 0]]  # every draw kept on the only state leading in
    with pytest.raises(ValueError, match=r"uniform: expected \[T-1=2, S=2, B=1\]"):
        loops.backward_sample(log_filter, columns, padding, uniform[:1], last, path)
    with pytest.raises(ValueError, match=r"path: expected int64 \[S=2, B=1, T\]"):
        loops.backward_sample(log_filter, columns, padding, uniform, last, path.astype(numpy.int32))
