"""ChainPosterior against a float64 brute-force enumeration (tests/chain_oracle.py).

Score of a state sequence z of length L (the contract in CHAIN_API.md)::

    score(z) = init[z_0] + sum_{t<L} emit[t, z_t] + sum_{1<=t<L} trans[t-1, z_{t-1}, z_t]

Every member is compared with the enumeration of all K**L sequences on small random
shapes, in every accepted layout of ``init`` and ``trans``, with and without
structural zeros (-inf scores), and for every ``method``.  Then: hypothesis property
tests, gradients (gradcheck, d log Z / d emit = marginals, zero gradients at
padding), exact sampling (frequencies against marginals and path probabilities),
long-sequence stability, half-precision inputs and argument validation.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
from chain_oracle import (
    F64,
    INIT_KINDS,
    TRANS_KINDS,
    Enumeration,
    expand_params,
    forward_log,
    padding_mask,
    random_chain,
    viterbi_lowest_index,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from latentnlp import ChainPosterior
from latentnlp import chain as latentnlp_chain

METHODS = ("scaled", "log", "scan", "blocked", "auto")
# (B, T, K): the corners (one state, one position, one batch element) and the largest enumerated size.
SHAPES = ((1, 1, 1), (2, 1, 3), (3, 2, 1), (2, 4, 3), (3, 5, 4))
RTOL64, ATOL64 = 1e-5, 1e-6  # the design's "1e-5 relative" against the float64 oracle

PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize="CI" in os.environ,  # reproducible in CI; exploratory on a developer's machine
    suppress_health_check=[HealthCheck.too_slow],
)


def assert_close(actual, expected, rtol=RTOL64, atol=ATOL64, msg=""):
    actual = torch.as_tensor(actual).detach().to(F64).cpu()
    expected = torch.as_tensor(expected).detach().to(F64).cpu()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


def seed_of(*key) -> int:
    """A stable seed for a parameter combination (``hash`` of a str is salted per process)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(repr(key))) % (2**31)


@functools.cache
def grid_case(trans_kind, zeros, shape_index):
    """Inputs and their enumeration for one cell of the layout grid (cached across tests).

    ``init`` alternates between ``[K]`` and ``[B, K]`` along the shapes, so that every
    ``trans`` layout meets both ``init`` layouts.
    """
    B, T, K = SHAPES[shape_index]
    init_kind = INIT_KINDS[(shape_index + TRANS_KINDS.index(trans_kind)) % 2]
    gen = torch.Generator().manual_seed(seed_of(trans_kind, init_kind, zeros, shape_index))
    init, trans, emit, lengths = random_chain(
        gen,
        B,
        T,
        K,
        trans_kind=trans_kind,
        init_kind=init_kind,
        zeros=zeros,
        scale=2.0,
        reach_T=shape_index % 2 == 0,
    )
    return (init, trans, emit, lengths), Enumeration(init, trans, emit, lengths)


def grid_cases(trans_kind, zeros):
    for i in range(len(SHAPES)):
        yield grid_case(trans_kind, zeros, i)


GRID = pytest.mark.parametrize("trans_kind,zeros", [(tk, z) for tk in TRANS_KINDS for z in (False, True)])
ALL_METHODS = pytest.mark.parametrize("method", METHODS)


def describe(args, method=None):
    init, trans, emit, lengths = args
    return (
        f"method={method} init{tuple(init.shape)} trans{tuple(trans.shape)} emit{tuple(emit.shape)} "
        f"lengths={lengths.tolist()}"
    )


def chain(args, method="auto"):
    init, trans, emit, lengths = args
    return ChainPosterior(init, trans, emit, lengths=lengths, method=method)


# =========================================================================== oracle grid


@ALL_METHODS
@GRID
def test_log_partition_matches_enumeration(method, trans_kind, zeros):
    for args, ref in grid_cases(trans_kind, zeros):
        d = chain(args, method)
        lz = d.log_partition
        assert lz.shape == (ref.B,), describe(args, method)
        assert lz.dtype == torch.float64
        assert_close(lz, ref.log_partition, msg=describe(args, method))


@ALL_METHODS
@GRID
def test_marginals_match_enumeration(method, trans_kind, zeros):
    for args, ref in grid_cases(trans_kind, zeros):
        m = chain(args, method).marginals
        assert m.shape == (ref.B, ref.T, ref.K), describe(args, method)
        assert_close(m, ref.marginals, msg=describe(args, method))
        pad = padding_mask(ref.lengths, ref.T)
        assert (m[pad] == 0).all(), "marginals must be exactly zero at padding: " + describe(args, method)


@ALL_METHODS
@GRID
def test_edge_marginals_match_enumeration(method, trans_kind, zeros):
    for args, ref in grid_cases(trans_kind, zeros):
        e = chain(args, method).edge_marginals
        assert e.shape == (ref.B, max(ref.T - 1, 0), ref.K, ref.K), describe(args, method)
        assert_close(e, ref.edge_marginals, msg=describe(args, method))
        # zero where t + 1 >= length
        pad = padding_mask(ref.lengths - 1, max(ref.T - 1, 0))
        assert (e[pad] == 0).all(), describe(args, method)


@ALL_METHODS
@GRID
def test_entropy_matches_enumeration(method, trans_kind, zeros):
    for args, ref in grid_cases(trans_kind, zeros):
        h = chain(args, method).entropy()
        assert h.shape == (ref.B,)
        assert_close(h, ref.entropy(), msg=describe(args, method))


@pytest.mark.parametrize("method", ["auto", "log"])  # Viterbi; the property tests draw every method
@GRID
def test_max_and_argmax_match_enumeration(method, trans_kind, zeros):
    for args, ref in grid_cases(trans_kind, zeros):
        d = chain(args, method)
        path, best = d.argmax, d.max
        assert path.shape == (ref.B, ref.T) and path.dtype == torch.long, describe(args, method)
        assert best.shape == (ref.B,)
        assert_close(best, ref.max, msg=describe(args, method))
        # the returned path has the best score; it is the enumerated argmax when the best is unique
        assert_close(ref.score(path), ref.max, msg="score(argmax) != max: " + describe(args, method))
        for b in range(ref.B):
            if ref.top_gap(b) > 1e-6:
                assert torch.equal(path[b], ref.argmax[b]), describe(args, method)
        assert (path[padding_mask(ref.lengths, ref.T)] == 0).all(), "argmax padding must be 0"


@pytest.mark.parametrize("trans_kind", TRANS_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_argmax_breaks_ties_towards_the_lowest_state(trans_kind, dtype):
    """Integer scores tie many paths: the path is the stored-pointer one with every tie to the lowest
    index, on the CPU (numpy backtracking) and through the torch backtracking other devices run;
    the k-best backtracking agrees between the two as well."""
    gen = torch.Generator().manual_seed(seed_of("ties", trans_kind, str(dtype)))
    for trial in range(40):
        B, T, K = 3, 1 + trial % 7, 1 + trial % 4
        shape = {"shared": (K, K), "batched": (B, K, K), "time": (B, T - 1, K, K)}[trans_kind]
        init, trans, emit = (torch.randint(-1, 2, s, generator=gen).to(dtype) for s in ((B, K), shape, (B, T, K)))
        if trial % 3 == 0:
            trans = torch.where(torch.rand(shape, generator=gen) < 0.3, float("-inf"), trans)
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        args = (init, trans, emit, lengths)
        expected = viterbi_lowest_index(*args)
        assert torch.equal(chain(args).argmax, expected), describe(args)
        d = chain(args)  # the kernel's inputs: padding zeroed
        dense = d.transition.dense()
        scores, mask, all_valid_until = latentnlp_chain._max_plus_forward(d.init, dense, d.emit, d.lengths)
        columns = dense if dense.dim() == 4 else dense.transpose(-1, -2).contiguous()
        path = torch.empty(T, B, dtype=torch.long)
        latentnlp_chain._backtrack(scores, columns, mask, all_valid_until, torch.arange(B), path, torch.where)
        assert torch.equal(path.T * mask, expected), describe(args)
        # k-best: the torch backtracking follows the same pointers as the numpy one
        kbest_scores, pointers, mask, all_valid_until = latentnlp_chain._kbest_forward(
            d.init, dense, d.emit, d.lengths, 3
        )
        _, flat = kbest_scores[-1].reshape(B, K * 3).topk(3, dim=-1)
        paths = torch.empty(T, B, 3, dtype=torch.long)
        latentnlp_chain._kbest_backtrack(
            pointers, flat, mask, all_valid_until, torch.arange(B)[:, None], 3, paths, torch.where
        )
        assert torch.equal(paths.permute(2, 1, 0) * mask, d.kbest(3)[0]), describe(args)


def test_argmax_of_an_empty_batch():
    d = ChainPosterior(torch.zeros(3), torch.zeros(3, 3), torch.zeros(0, 4, 3))
    assert d.argmax.shape == (0, 4) and d.kbest(2)[0].shape == (2, 0, 4)


def oracle_samples(ref, n, gen):
    """``n`` exact posterior samples ``[n, B, T]`` drawn from the enumeration; padding holds junk states."""
    z = torch.randint(ref.K, (n, ref.B, ref.T), generator=gen)
    for b in range(ref.B):
        idx = torch.multinomial(ref.probs(b), n, replacement=True, generator=gen)
        z[:, b, : int(ref.lengths[b])] = ref.paths[b][idx]
    return z


def embed(ref, b, paths):
    """Paths ``[N, L_b]`` of element ``b`` as a ``[N, B, T]`` batch (other elements all-zero)."""
    z = torch.zeros(paths.shape[0], ref.B, ref.T, dtype=torch.long)
    z[:, b, : paths.shape[1]] = paths
    return z


@ALL_METHODS
@GRID
def test_log_prob_matches_enumeration(method, trans_kind, zeros):
    for i, (args, ref) in enumerate(grid_cases(trans_kind, zeros)):
        d = chain(args, method)
        z = oracle_samples(ref, 6, torch.Generator().manual_seed(i)).reshape(2, 3, ref.B, ref.T)
        lp = d.log_prob(z)
        assert lp.shape == (2, 3, ref.B), describe(args, method)
        assert_close(lp, ref.log_prob(z), msg=describe(args, method))
        lp1 = d.log_prob(z[0, 0])
        assert lp1.shape == (ref.B,)
        assert_close(lp1, ref.log_prob(z[0, 0]), msg=describe(args, method))
        # uniformly drawn paths: with structural zeros some are impossible and get exactly -inf
        u = torch.randint(ref.K, (8, ref.B, ref.T), generator=torch.Generator().manual_seed(100 + i))
        assert_close(d.log_prob(u), ref.log_prob(u), msg=describe(args, method))
        # log_prob of every path: exp sums to one
        for b in range(ref.B):
            lp = d.log_prob(embed(ref, b, ref.paths[b]))[:, b]
            assert_close(torch.logsumexp(lp.to(F64), 0), torch.tensor(0.0, dtype=F64), msg=describe(args, method))
            assert_close(lp, ref.scores[b] - ref.log_partition[b], msg=describe(args, method))


@pytest.mark.parametrize("method", ["auto"])
@GRID
def test_kbest_matches_enumeration(method, trans_kind, zeros):
    for args, ref in grid_cases(trans_kind, zeros):
        d = chain(args, method)
        n_paths = min(ref.K ** int(L) for L in ref.lengths)
        for k in sorted({1, min(2, n_paths), min(5, n_paths), n_paths if n_paths <= 8 else 1}):
            paths, scores = d.kbest(k)
            assert paths.shape == (k, ref.B, ref.T) and paths.dtype == torch.long, describe(args, method)
            assert scores.shape == (k, ref.B)
            for b in range(ref.B):
                expected, _ = ref.sorted_scores(b)
                expected = expected[:k]
                finite = torch.isfinite(expected)
                assert torch.equal(torch.isfinite(scores[:, b].to(F64)), finite), describe(args, method)
                assert_close(scores[finite, b], expected[finite], msg=f"k={k} b={b} " + describe(args, method))
                # each returned path really has its returned score, and the finite ones are distinct
                L = int(ref.lengths[b])
                got = ref.score(paths)[:, b]
                assert_close(got[finite], expected[finite], msg=f"k={k} b={b} " + describe(args, method))
                distinct = {tuple(p[:L].tolist()) for p in paths[finite, b]}
                assert len(distinct) == int(finite.sum()), f"repeated path in kbest: k={k} b={b}"
        if all(ref.top_gap(b) > 1e-6 for b in range(ref.B)):
            paths, _ = d.kbest(1)
            valid = ~padding_mask(ref.lengths, ref.T)
            assert torch.equal(paths[0][valid], ref.argmax[valid])


@pytest.mark.parametrize("zeros", [False, True])
def test_from_edges_matches_enumeration(zeros):
    for args, _ in grid_cases("time", zeros):
        _, trans, emit, lengths = args
        B, T, K = emit.shape
        edges = trans.transpose(-1, -2).contiguous()  # torch-struct layout [B, T-1, c_next, c_prev]
        ref = Enumeration(torch.zeros(K, dtype=F64), trans, torch.zeros(B, T, K, dtype=F64), lengths)
        d = ChainPosterior.from_edges(edges, lengths=lengths)
        assert_close(d.log_partition, ref.log_partition)
        assert_close(d.marginals, ref.marginals)
        assert_close(d.edge_marginals, ref.edge_marginals)
        assert_close(d.max, ref.max)
        d_full = ChainPosterior.from_edges(edges)
        ref_full = Enumeration(torch.zeros(K, dtype=F64), trans, torch.zeros(B, T, K, dtype=F64))
        assert_close(d_full.log_partition, ref_full.log_partition)


# =========================================================================== hypothesis


@st.composite
def chains(draw, max_scale=30.0):
    """Specs of random chains: shapes, layouts, score scale, structural zeros, lengths, seed."""
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 5))
    K = draw(st.integers(1, 4))
    return dict(
        B=B,
        T=T,
        K=K,
        trans_kind=draw(st.sampled_from(TRANS_KINDS)),
        init_kind=draw(st.sampled_from(INIT_KINDS)),
        scale=draw(st.floats(0.01, max_scale)),
        zeros=draw(st.booleans()),
        reach_T=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(spec, dtype=F64):
    spec = dict(spec)
    gen = torch.Generator().manual_seed(spec.pop("seed"))
    B, T, K = spec.pop("B"), spec.pop("T"), spec.pop("K")
    return random_chain(gen, B, T, K, dtype=dtype, **spec)


@ALL_METHODS
@PROPERTY_SETTINGS
@given(spec=chains())
def test_property_sums_match_enumeration(method, spec):
    args = build(spec)
    ref = Enumeration(*args)
    d = chain(args, method)
    msg = f"{spec} " + describe(args, method)
    assert_close(d.log_partition, ref.log_partition, msg=msg)
    assert_close(d.marginals, ref.marginals, msg=msg)
    assert_close(d.edge_marginals, ref.edge_marginals, msg=msg)
    assert_close(d.entropy(), ref.entropy(), rtol=1e-5, atol=1e-5, msg=msg)


@PROPERTY_SETTINGS
@given(spec=chains(), method=st.sampled_from(METHODS))
def test_property_max_matches_enumeration(spec, method):
    args = build(spec)
    ref = Enumeration(*args)
    d = chain(args, method)
    msg = f"{spec} " + describe(args, method)
    assert_close(d.max, ref.max, msg=msg)
    assert_close(ref.score(d.argmax), ref.max, msg=msg)
    k = min(3, min(ref.K ** int(L) for L in ref.lengths))
    _, scores = d.kbest(k)
    for b in range(ref.B):
        expected = ref.sorted_scores(b)[0][:k]
        finite = torch.isfinite(expected)
        assert_close(scores[finite, b], expected[finite], msg=msg)


@PROPERTY_SETTINGS
@given(spec=chains(), method=st.sampled_from(METHODS))
def test_property_internal_consistency(spec, method):
    """Identities that hold whatever the inputs, checked without the oracle."""
    args = build(spec)
    _, _, emit, lengths = args
    B, T, K = emit.shape
    d = chain(args, method)
    valid = ~padding_mask(lengths, T)
    lz, m, e, h, best = d.log_partition, d.marginals, d.edge_marginals, d.entropy(), d.max
    msg = f"{spec} " + describe(args, method)
    assert torch.isfinite(lz).all(), msg
    assert ((m >= 0) & (m <= 1 + 1e-9)).all(), msg
    assert_close(m.sum(-1), valid.to(F64), msg=msg)
    if T > 1:
        ev = valid[:, 1:]  # edge t is valid iff t + 1 < length
        assert_close(e.sum(-1), m[:, :-1] * ev[..., None], msg=msg)
        assert_close(e.sum(-2), m[:, 1:], msg=msg)
    # max <= log Z <= max + log(#paths); 0 <= H <= L log K
    n_log = lengths.to(F64) * math.log(K)
    assert (best <= lz + 1e-9).all() and (lz <= best + n_log + 1e-9).all(), msg
    assert (h >= -1e-9).all() and (h <= n_log + 1e-6).all(), msg
    # all methods agree
    for other in METHODS:
        assert_close(chain(args, other).log_partition, lz, msg=f"{other} vs {msg}")


# the smoother puts its mass on a start state the filter gives ~1e-30: the scaled backward's
# beta_0 = gamma_0 / alpha_0 is beyond float32 although no step normaliser is small
SMOOTHER_AGAINST_FILTER = {
    "B": 2,
    "T": 4,
    "K": 3,
    "trans_kind": "time",
    "init_kind": "shared",
    "scale": 25.0,
    "zeros": True,
    "reach_T": False,
    "seed": 0,
}


# a reachable state's mass (1.8e-16 * 3e-30) rounds to 0 in float32 at t = 1, and with it the one path into
# the state with the largest score at t = 2 (log Z 44.02 instead of 45.91), though no step's normaliser
# is small: the scaled kernel must flag the row
PATH_ROUNDED_AWAY = {
    "B": 1,
    "T": 3,
    "K": 4,
    "trans_kind": "shared",
    "init_kind": "shared",
    "scale": 21.0,
    "zeros": True,
    "reach_T": False,
    "seed": 1167,
}


@PROPERTY_SETTINGS
@given(spec=chains(), method=st.sampled_from(["log", "scan", "auto"]))
@example(spec=SMOOTHER_AGAINST_FILTER, method="auto")
@example(spec=PATH_ROUNDED_AWAY, method="auto")
def test_property_float32_large_scores(spec, method):
    """float32 inputs with scores up to ~30x: the log-space methods (and auto) stay accurate."""
    args64 = build(spec)
    args32 = tuple(a.float() if a.is_floating_point() else a for a in args64)
    ref = Enumeration(*args32)  # oracle in float64 of the float32-rounded inputs
    d = chain(args32, method)
    lz = d.log_partition
    assert lz.dtype == torch.float32
    scale = float(ref.log_partition.abs().max()) + 1.0
    assert_close(lz, ref.log_partition, rtol=1e-5, atol=1e-5 * scale, msg=f"{spec} {method}")
    assert_close(d.marginals, ref.marginals, rtol=0, atol=1e-3, msg=f"{spec} {method}")
    assert_close(d.max, ref.max, rtol=1e-5, atol=1e-5 * scale, msg=f"{spec} {method}")


@PROPERTY_SETTINGS
@given(spec=chains(max_scale=5.0))
def test_property_float32_scaled(spec):
    args64 = build(spec)
    args32 = tuple(a.float() if a.is_floating_point() else a for a in args64)
    ref = Enumeration(*args32)
    d = chain(args32, "scaled")
    scale = float(ref.log_partition.abs().max()) + 1.0
    assert_close(d.log_partition, ref.log_partition, rtol=1e-5, atol=1e-5 * scale, msg=str(spec))
    assert_close(d.marginals, ref.marginals, rtol=0, atol=1e-4, msg=str(spec))


@pytest.mark.parametrize("method", ["auto", "scaled"])
def test_float32_marginals_when_the_smoother_overrules_the_filter(method):
    """The scaled backward's beta overflows float32 on one row: that row's marginals (the gradient
    of log Z) come from log space, the other row's from probability space, all finite and exact."""
    args64 = build(SMOOTHER_AGAINST_FILTER)
    args32 = tuple(a.float() if a.is_floating_point() else a for a in args64)
    ref = Enumeration(*args32)
    d = chain(args32, method)
    for name in ("marginals", "edge_marginals"):
        value = getattr(d, name)
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
        assert_close(value, getattr(ref, name), rtol=0, atol=1e-3, msg=name)
    init, trans, emit, lengths = (a.detach().clone().requires_grad_(a.is_floating_point()) for a in args32)
    log_z = chain((init, trans, emit, lengths), method).log_partition
    weights = torch.tensor([0.5, 2.0])
    grads = torch.autograd.grad((weights * log_z).sum(), (init, trans, emit))
    # init is shared [K], the transition time-varying [B, T-1, K, K]: the gradients are weighted
    # marginals, the init's summed over the batch
    w = weights.double()
    expected = (
        (w[:, None] * ref.marginals[:, 0]).sum(0),
        w[:, None, None, None] * ref.edge_marginals,
        w[:, None, None] * ref.marginals,
    )
    for got, want in zip(grads, expected):
        assert torch.isfinite(got).all()
        assert_close(got, want, rtol=0, atol=2e-3)


FLOAT32_SUBNORMAL_CASES = {
    # a step's best emission sits on a state the chain cannot be in: exp(0 - 100) is subnormal
    "unreachable state": ([0.0, -math.inf], [[0.0, -math.inf], [0.0, -math.inf]], [[0.0, 100.0], [0.0, 100.0]]),
    "unlikely start": ([0.0, -math.inf], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 100.0], [0.0, 100.0]]),
    # no structural zero: a -100 transition into a +100 emission (both paths have score 0)
    "compensated transition": ([0.0, 0.0], [[0.0, -100.0], [0.0, -100.0]], [[0.0, 0.0], [0.0, 100.0]]),
}


@pytest.mark.parametrize(
    "method,case",
    [
        (m, c)
        for c in FLOAT32_SUBNORMAL_CASES
        for m in METHODS
        # explicit "scaled" keeps exp(trans) in float32, so a -100 transition that matters is
        # beyond it by design; the other two cases only need the step's shift taken after the
        # product with the forward vector, not from the emissions alone
        if not (m == "scaled" and c == "compensated transition")
    ],
)
def test_float32_scores_a_hundred_nats_apart(method, case):
    """float32 scores ~100 apart, where probability space lands on subnormal numbers.

    exp(-100) ~ 3.7e-44 is representable only as a float32 subnormal (a few significant
    bits), so a probability-space step must either avoid it or fall back to log space;
    "auto" (the default) in particular must notice and still give the exact answer.
    """
    init, trans, emit = (torch.tensor(x, dtype=torch.float32) for x in FLOAT32_SUBNORMAL_CASES[case])
    emit = emit[None]
    d = ChainPosterior(init, trans, emit, method=method)
    ref = Enumeration(init, trans, emit)
    assert_close(d.log_partition, ref.log_partition, rtol=1e-6, atol=1e-5)
    assert_close(d.marginals, ref.marginals, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["log", "scan"])
def test_log_space_gradient_when_a_large_score_sits_on_a_dead_state(method):
    """State 0 has no successor and the largest start score: shifting by it would underflow the
    only live path to a float32 subnormal, whose log has an infinite gradient (NaN marginals)."""
    init = torch.tensor([40.0, -42.0])
    trans = torch.tensor([[-math.inf, -math.inf], [-25.0, 55.0]])
    emit = torch.tensor([[[0.0, -8.0], [-3.0, -35.0]]])
    d, ref = ChainPosterior(init, trans, emit, method=method), Enumeration(init, trans, emit)
    assert_close(d.log_partition, ref.log_partition, rtol=1e-6, atol=1e-5)
    assert_close(d.marginals, ref.marginals, rtol=0, atol=1e-5)


# =========================================================================== gradients


def grad_inputs(trans_kind, init_kind, B=3, T=4, K=3, seed=0, zeros=False):
    """Small float64 inputs with lengths ``T, 1, 2, 3, ...`` (every kind of padding)."""
    gen = torch.Generator().manual_seed(seed)
    init, trans, emit, _ = random_chain(gen, B, T, K, trans_kind=trans_kind, init_kind=init_kind, zeros=zeros)
    lengths = torch.tensor([T] + [min(b, T) for b in range(1, B)])
    return init, trans, emit, lengths


@ALL_METHODS
@pytest.mark.parametrize("trans_kind", TRANS_KINDS)
def test_gradcheck_log_partition(method, trans_kind):
    init_kind = "shared" if trans_kind == "shared" else "batched"
    init, trans, emit, lengths = grad_inputs(trans_kind, init_kind)
    params = [p.clone().requires_grad_() for p in (init, trans, emit)]

    def f(i, tr, e):
        return ChainPosterior(i, tr, e, lengths=lengths, method=method).log_partition

    assert torch.autograd.gradcheck(f, params)


@pytest.mark.parametrize("method", ["log", "scan"])
@pytest.mark.parametrize("trans_kind", TRANS_KINDS)
def test_gradgradcheck_log_partition(method, trans_kind):
    init, trans, emit, lengths = grad_inputs(trans_kind, "batched", B=2, T=3, K=2)
    params = [p.clone().requires_grad_() for p in (init, trans, emit)]

    def f(i, tr, e):
        return ChainPosterior(i, tr, e, lengths=lengths, method=method).log_partition

    assert torch.autograd.gradgradcheck(f, params)


@ALL_METHODS
@pytest.mark.parametrize("zeros", [False, True])
def test_gradients_are_marginals(method, zeros):
    """d log Z / d emit = marginals; d / d init = first marginals; d / d trans = edge marginals."""
    for trans_kind in TRANS_KINDS:
        init, trans, emit, lengths = grad_inputs(trans_kind, "batched", B=3, T=5, K=4, seed=1, zeros=zeros)
        params = [p.clone().requires_grad_() for p in (init, trans, emit)]
        d = ChainPosterior(*params, lengths=lengths, method=method)
        gi, gt, ge = torch.autograd.grad(d.log_partition.sum(), params)
        for g in (gi, gt, ge):
            assert torch.isfinite(g).all(), trans_kind
        ref = Enumeration(init, trans, emit, lengths)
        assert_close(ge, ref.marginals, msg=trans_kind)
        assert_close(ge, d.marginals, msg=trans_kind)
        assert_close(gi, ref.marginals[:, 0], msg=trans_kind)
        edges = ref.edge_marginals
        assert_close(
            gt, {"shared": edges.sum((0, 1)), "batched": edges.sum(1), "time": edges}[trans_kind], msg=trans_kind
        )


def with_junk_padding(args, junk, gen):
    """Copy of ``args`` whose padding entries (emit beyond length, unused trans) hold ``junk``."""
    init, trans, emit, lengths = (a.clone() for a in args)
    B, T, K = emit.shape

    def fill(shape):
        if junk == "huge":
            return torch.randn(shape, generator=gen, dtype=F64).sign() * 1e30
        if junk == "-inf":
            return torch.full(shape, float("-inf"), dtype=F64)
        x = torch.randn(shape, generator=gen, dtype=F64) * 1e6  # mixed: big, tiny, huge and -inf
        x[torch.rand(shape, generator=gen) < 0.3] = 1e30
        x[torch.rand(shape, generator=gen) < 0.3] = float("-inf")
        return x

    pad = padding_mask(lengths, T)
    emit[pad] = fill(emit[pad].shape).to(emit.dtype)
    if trans.dim() == 4 and T > 1:
        tpad = padding_mask(lengths - 1, T - 1)
        trans[tpad] = fill(trans[tpad].shape).to(trans.dtype)
    elif trans.dim() == 3:
        one = lengths == 1  # a length-1 element never uses its transition matrix
        trans[one] = fill(trans[one].shape).to(trans.dtype)
    return init, trans, emit, lengths


JUNK = pytest.mark.parametrize("junk", ["huge", "-inf", "mixed"])


@ALL_METHODS
@JUNK
@pytest.mark.parametrize("trans_kind", ["batched", "time"])
def test_padding_gets_exactly_zero_gradient(method, junk, trans_kind):
    gen = torch.Generator().manual_seed(3)
    init, trans, emit, _ = random_chain(gen, 4, 5, 3, trans_kind=trans_kind, init_kind="batched")
    lengths = torch.tensor([5, 1, 3, 2])
    init, trans, emit, lengths = with_junk_padding((init, trans, emit, lengths), junk, gen)
    init, trans, emit = (p.requires_grad_() for p in (init, trans, emit))
    lz = ChainPosterior(init, trans, emit, lengths=lengths, method=method).log_partition
    assert torch.isfinite(lz).all(), lz
    gi, gt, ge = torch.autograd.grad(lz.sum(), (init, trans, emit))
    for g in (gi, gt, ge):
        assert torch.isfinite(g).all(), f"non-finite gradient with {junk} padding"
    pad = padding_mask(lengths, 5)
    assert (ge[pad] == 0).all(), ge
    if trans_kind == "time":
        assert (gt[padding_mask(lengths - 1, 4)] == 0).all(), gt
    else:
        assert (gt[lengths == 1] == 0).all(), gt
    # and the gradient on the valid part is the marginals of the clean problem
    ref = Enumeration(init.detach(), trans.detach(), emit.detach().masked_fill(pad[..., None], 0.0), lengths)
    assert_close(ge.masked_fill(pad[..., None], 0.0), ref.marginals)


@ALL_METHODS
@JUNK
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padding_values_never_change_results(method, junk, dtype):
    for trans_kind in ("batched", "time"):  # the layouts that have padding besides emit's
        gen = torch.Generator().manual_seed(5)
        init, trans, emit, _ = random_chain(gen, 4, 5, 3, trans_kind=trans_kind, init_kind="batched", dtype=dtype)
        lengths = torch.tensor([5, 1, 3, 2])
        clean = (init, trans, emit, lengths)
        dirty = with_junk_padding(clean, junk, gen)
        a, b = chain(clean, method), chain(dirty, method)
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        assert_close(b.log_partition, a.log_partition, **tol, msg=trans_kind)
        assert_close(b.marginals, a.marginals, **tol, msg=trans_kind)
        assert_close(b.edge_marginals, a.edge_marginals, **tol, msg=trans_kind)
        assert_close(b.entropy(), a.entropy(), **tol, msg=trans_kind)
        assert_close(b.max, a.max, **tol, msg=trans_kind)
        assert torch.equal(b.argmax, a.argmax), trans_kind
        z = a.argmax
        assert_close(b.log_prob(z), a.log_prob(z), **tol, msg=trans_kind)
        if method == "auto":  # samples and kbest do not depend on method
            s = b.sample((50,), generator=torch.Generator().manual_seed(0))
            assert (s[:, padding_mask(lengths, 5)] == 0).all()
            assert torch.isfinite(a.log_prob(s)).all()
            assert_close(b.kbest(2)[1], a.kbest(2)[1], **tol, msg=trans_kind)


@ALL_METHODS
def test_entropy_gradient_matches_enumeration(method):
    init, trans, emit, lengths = grad_inputs("time", "batched", B=3, T=4, K=3, seed=7)
    params = [p.clone().requires_grad_() for p in (init, trans, emit)]
    h = ChainPosterior(*params, lengths=lengths, method=method).entropy()
    got = torch.autograd.grad(h.sum(), params)
    ref_params = [p.clone().requires_grad_() for p in (init, trans, emit)]
    expected = torch.autograd.grad(Enumeration(*ref_params, lengths).entropy().sum(), ref_params)
    for g, e in zip(got, expected):
        assert_close(g, e)


@ALL_METHODS
def test_log_prob_gradient_matches_enumeration(method):
    init, trans, emit, lengths = grad_inputs("batched", "shared", B=3, T=4, K=3, seed=8)
    emit = emit.clone().requires_grad_()
    d = ChainPosterior(init, trans, emit, lengths=lengths, method=method)
    z = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 0], [1, 0, 1, 2]])
    (g,) = torch.autograd.grad(d.log_prob(z).sum(), emit)
    onehot = torch.nn.functional.one_hot(z, 3).to(F64) * (~padding_mask(lengths, 4))[..., None]
    assert_close(g, onehot - Enumeration(init, trans, emit.detach(), lengths).marginals)


# =========================================================================== sampling


def sampling_case(seed=11, zeros=True):
    gen = torch.Generator().manual_seed(seed)
    init, trans, emit, _ = random_chain(gen, 3, 5, 3, trans_kind="time", init_kind="batched", zeros=zeros)
    return init, trans, emit, torch.tensor([5, 2, 4])


def test_sample_shapes_dtype_and_padding():
    args = sampling_case()
    d = chain(args)
    lengths = args[3]
    pad = padding_mask(lengths, 5)
    for shape, expected in [((), (3, 5)), ((7,), (7, 3, 5)), ((2, 4), (2, 4, 3, 5)), (torch.Size([3]), (3, 3, 5))]:
        s = d.sample(shape, generator=torch.Generator().manual_seed(0))
        assert s.shape == expected and s.dtype == torch.long
        assert ((s >= 0) & (s < 3)).all()
        assert (s[..., pad] == 0).all()
    assert d.sample().shape == (3, 5)


def test_sample_is_reproducible():
    d = chain(sampling_case(zeros=False))
    s1 = d.sample((100,), generator=torch.Generator().manual_seed(42))
    s2 = d.sample((100,), generator=torch.Generator().manual_seed(42))
    s3 = d.sample((100,), generator=torch.Generator().manual_seed(43))
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)
    torch.manual_seed(7)
    g1 = d.sample((100,))
    torch.manual_seed(7)
    g2 = d.sample((100,))
    assert torch.equal(g1, g2)


def five_se_bound(p, n):
    """5 binomial standard errors (floored at one count, so tiny probabilities don't fail on one hit)."""
    return 5 * torch.sqrt(torch.clamp(p * (1 - p), min=1.0 / n) / n)


@ALL_METHODS
def test_sample_frequencies_match_marginals(method):
    args = sampling_case()
    d = chain(args, method)
    n = 20000
    s = d.sample((n,), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(d.log_prob(s)).all(), "a sample has a structural-zero score"
    valid = ~padding_mask(args[3], 5)
    freq = torch.nn.functional.one_hot(s, 3).to(F64).mean(0)[valid]  # [valid positions, K]
    ref = Enumeration(*args).marginals[valid]
    err = (freq - ref).abs()
    bound = five_se_bound(ref, n)
    assert (err <= bound).all(), f"max |freq - marginal| / bound = {(err / bound).max():.2f}"
    assert (freq[ref == 0] == 0).all()


@pytest.mark.parametrize("method", ["scaled", "auto"])
def test_sample_path_frequencies_match_probabilities(method):
    gen = torch.Generator().manual_seed(13)
    init, trans, emit, _ = random_chain(gen, 2, 3, 2, trans_kind="batched", init_kind="batched")
    lengths = torch.tensor([3, 2])
    d = ChainPosterior(init, trans, emit, lengths=lengths, method=method)
    ref = Enumeration(init, trans, emit, lengths)
    n = 40000
    s = d.sample((n,), generator=torch.Generator().manual_seed(2))
    for b in range(2):
        counts = torch.bincount(ref.path_index(b, s[:, b]), minlength=ref.paths[b].shape[0]).to(F64)
        p = torch.exp(d.log_prob(embed(ref, b, ref.paths[b]))[:, b]).to(F64)
        assert_close(p.sum(), torch.tensor(1.0, dtype=F64))
        assert_close(p, ref.probs(b))
        err = (counts / n - p).abs()
        assert (err <= five_se_bound(p, n)).all(), (counts / n, p)


# =========================================================================== stability


@pytest.fixture(scope="module")
def long_chain():
    """T = 10,000, K = 16: peaked emissions (log-scores down to -50) and random transitions.

    Returns the inputs and the float64 log-space reference log-partition.
    """
    gen = torch.Generator().manual_seed(2024)
    B, T, K = 2, 10_000, 16
    emit = -50.0 * torch.rand(B, T, K, generator=gen, dtype=F64)
    peak = torch.randint(K, (B, T), generator=gen)
    emit.scatter_(-1, peak[..., None], 0.0)
    # 10% of the positions are improbable under every state
    low = torch.rand(B, T, generator=gen) < 0.1
    emit[low] = -50.0 + 5.0 * torch.rand(int(low.sum()), K, generator=gen, dtype=F64)
    trans = torch.log_softmax(3.0 * torch.randn(K, K, generator=gen, dtype=F64), -1)
    init = torch.log_softmax(torch.randn(K, generator=gen, dtype=F64), -1)
    lengths = torch.tensor([T, 7_321])
    return (init, trans, emit, lengths), forward_log(init, trans, emit, lengths)


@pytest.mark.parametrize(
    "method,dtype",
    [(m, dt) for m in ("scaled", "log", "blocked", "auto") for dt in (torch.float32, torch.float64)]
    + [("scan", torch.float32)],
)
def test_long_sequence_log_partition(long_chain, method, dtype):
    (init, trans, emit, lengths), ref = long_chain
    d = ChainPosterior(init.to(dtype), trans.to(dtype), emit.to(dtype), lengths=lengths, method=method)
    lz = d.log_partition
    assert lz.dtype == dtype and torch.isfinite(lz).all()
    assert_close(lz, ref, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0)


@pytest.mark.parametrize("method", ["auto", "blocked"])
def test_long_sequence_marginals(long_chain, method):
    """float32 marginals of the long chain: finite, normalised, zero at padding, close to float64."""
    (init, trans, emit, lengths), _ = long_chain
    m32 = ChainPosterior(init.float(), trans.float(), emit.float(), lengths=lengths, method=method).marginals
    m64 = ChainPosterior(init, trans, emit, lengths=lengths, method="scaled").marginals
    assert torch.isfinite(m32).all()
    valid = ~padding_mask(lengths, emit.shape[1])
    assert_close(m32.sum(-1), valid.float(), rtol=0, atol=1e-4)
    assert (m32[~valid] == 0).all()
    assert_close(m32, m64, rtol=0, atol=1e-3)


# =========================================================================== dtypes


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,T,K", [(m, 5, 4) for m in METHODS] + [("auto", 100, 8), ("scaled", 100, 8)])
def test_half_precision_inputs_are_upcast(half, method, T, K):
    gen = torch.Generator().manual_seed(17)
    init, trans, emit, lengths = random_chain(gen, 3, T, K, trans_kind="batched", init_kind="batched", scale=3.0)
    # scores that overflow half precision once exponentiated and summed (exp(12) > 65504)
    emit = emit + 12.0
    h = tuple(x.to(half) for x in (init, trans, emit))
    f = tuple(x.float() for x in h)  # the same (rounded) numbers in float32
    dh = ChainPosterior(*h, lengths=lengths, method=method)
    df = ChainPosterior(*f, lengths=lengths, method=method)
    for name in ("log_partition", "marginals", "max"):
        got, want = getattr(dh, name), getattr(df, name)
        assert torch.isfinite(got).all(), f"{name} not finite for {half}"
        assert got.dtype in (torch.float32, half), (name, got.dtype)
        tol = dict(rtol=1e-5, atol=1e-5) if got.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        assert_close(got, want, **tol, msg=name)
    assert torch.isfinite(dh.entropy()).all()
    assert torch.equal(dh.argmax, df.argmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_dtypes_are_kept(dtype):
    args = random_chain(torch.Generator().manual_seed(0), 2, 3, 2, dtype=dtype)
    d = chain(args)
    for value in (d.log_partition, d.marginals, d.edge_marginals, d.max, d.entropy(), d.log_prob(d.argmax)):
        assert value.dtype == dtype


# =========================================================================== validation

B0, T0, K0 = 2, 4, 3


def good():
    return dict(
        init=torch.zeros(K0),
        trans=torch.zeros(K0, K0),
        emit=torch.zeros(B0, T0, K0),
        lengths=torch.tensor([T0, 2]),
    )


def bad(name, value):
    kw = good()
    kw[name] = value
    return kw


def with_value(name, shape, index, value):
    x = torch.zeros(shape)
    x[index] = value
    return bad(name, x)


BAD_INPUTS = {
    "emit rank 2": ("emit", bad("emit", torch.zeros(T0, K0))),
    "emit rank 4": ("emit", bad("emit", torch.zeros(1, B0, T0, K0))),
    "init rank 3": ("init", bad("init", torch.zeros(1, B0, K0))),
    "init K mismatch": ("init", bad("init", torch.zeros(K0 + 1))),
    "init batch mismatch": ("init", bad("init", torch.zeros(B0 + 1, K0))),
    "trans rank 1": ("trans", bad("trans", torch.zeros(K0))),
    "trans rank 5": ("trans", bad("trans", torch.zeros(1, B0, T0 - 1, K0, K0))),
    "trans not square": ("trans", bad("trans", torch.zeros(K0, K0 + 1))),
    "trans K mismatch": ("trans", bad("trans", torch.zeros(K0 + 1, K0 + 1))),
    "trans batch mismatch": ("trans", bad("trans", torch.zeros(B0 + 1, K0, K0))),
    "trans time mismatch": ("trans", bad("trans", torch.zeros(B0, T0, K0, K0))),
    "lengths zero": ("lengths", bad("lengths", torch.tensor([T0, 0]))),
    "lengths negative": ("lengths", bad("lengths", torch.tensor([-1, 2]))),
    "lengths too long": ("lengths", bad("lengths", torch.tensor([T0 + 1, 2]))),
    "lengths wrong size": ("lengths", bad("lengths", torch.tensor([T0, 2, 1]))),
    "lengths wrong rank": ("lengths", bad("lengths", torch.tensor([[T0], [2]]))),
    "init NaN": ("init", with_value("init", (K0,), 1, float("nan"))),
    "init +inf": ("init", with_value("init", (K0,), 1, float("inf"))),
    "trans NaN": ("trans", with_value("trans", (K0, K0), (0, 1), float("nan"))),
    "trans +inf": ("trans", with_value("trans", (K0, K0), (2, 2), float("inf"))),
    "emit NaN": ("emit", with_value("emit", (B0, T0, K0), (1, 0, 2), float("nan"))),
    "emit +inf": ("emit", with_value("emit", (B0, T0, K0), (0, 3, 0), float("inf"))),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(case):
    name, kw = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=name) as info:
        d = ChainPosterior(**kw)
        d.log_partition  # validation may be lazy
    if "rank" in case or "mismatch" in case or "square" in case or "size" in case:
        # ... and the shape it was given, written any usual way: (4, 3), [4, 3], torch.Size([4, 3])
        seen = ", ".join(str(n) for n in kw[name].shape)
        assert seen in str(info.value), f"{seen!r} not in {str(info.value)!r}"


def test_unknown_method_raises_value_error():
    with pytest.raises(ValueError, match="method"):
        ChainPosterior(**good(), method="bogus").log_partition


def test_structural_zeros_are_accepted():
    kw = good()
    kw["trans"][0, 1] = float("-inf")
    kw["init"][2] = float("-inf")
    kw["emit"][0, 1, 0] = float("-inf")
    d = ChainPosterior(**kw)
    assert torch.isfinite(d.log_partition).all()
    assert (d.marginals[0, 0, 2] == 0) and (d.marginals[0, 1, 0] == 0)


def test_every_input_layout_against_expand_params():
    """The three trans layouts are one distribution when they hold the same numbers."""
    gen = torch.Generator().manual_seed(23)
    init, trans, emit, lengths = random_chain(gen, 3, 4, 3)
    _, trans_t, _ = expand_params(init, trans, emit)
    a = ChainPosterior(init, trans, emit, lengths=lengths)
    b = ChainPosterior(init.expand(3, 3), trans.expand(3, 3, 3), emit, lengths=lengths)
    c = ChainPosterior(init, trans_t.contiguous(), emit, lengths=lengths)
    for other in (b, c):
        assert_close(other.log_partition, a.log_partition, rtol=1e-12, atol=1e-12)
        assert_close(other.marginals, a.marginals, rtol=1e-12, atol=1e-12)


# =========================================================================== underflow flag and the validation switch


def test_scaled_kernel_flags_underflow_instead_of_returning_nan():
    """A peaked float32 chain whose probability-space steps underflow: the kernel flags the row,
    "auto" redoes only that row in log space and matches float64.  (The transition's small entries are
    e^-80, normal numbers: e^-100, subnormal in float32, would have every row flagged, as
    :func:`~latentnlp.chain.normaliser_floor` does for transitions it cannot represent.)"""
    from latentnlp.chain import scaled_log_partition
    from latentnlp.transitions import DenseTransition

    init = torch.tensor([0.0, 0.0])
    trans = torch.tensor([[0.0, -80.0], [0.0, -80.0]])
    emit = torch.tensor([[[0.0, 0.0], [0.0, 100.0]], [[0.0, 0.0], [0.0, 0.0]]])  # row 1 is benign
    log_z, final_filter, underflowed = scaled_log_partition(
        init.expand(2, 2), DenseTransition(trans), emit, torch.tensor([2, 2])
    )
    assert underflowed.tolist() == [True, False]
    assert not torch.isnan(log_z).any() and final_filter.shape == (2, 2)
    ref = Enumeration(init.double(), trans.double(), emit.double())
    auto = ChainPosterior(init, trans, emit)
    assert_close(auto.log_partition, ref.log_partition, rtol=1e-6, atol=1e-5)
    assert_close(auto.final_filter, ref.marginals[:, -1], rtol=0, atol=1e-5)
    assert torch.equal(auto.log_partition[1], log_z[1])  # the benign row keeps its scaled value


@pytest.mark.parametrize("method", METHODS)
def test_nan_propagates_when_not_validating(method):
    kw = good()
    kw["emit"][1, 1, 0] = float("nan")  # inside row 1 (length 2)
    d = ChainPosterior(**kw, method=method, validate_args=False)
    assert torch.isnan(d.log_partition[1]), "a NaN score must not be swallowed by the log-space fallback"
    assert torch.isfinite(d.log_partition[0])
    with pytest.raises(ValueError, match="emit"):
        ChainPosterior(**kw, method=method, validate_args=True)


def test_synchronising_checks_follow_validate_args():
    kw = bad("lengths", torch.tensor([T0, 0]))
    with pytest.raises(ValueError, match="lengths"):
        ChainPosterior(**kw, validate_args=True)
    ChainPosterior(**kw, validate_args=False)  # no check, no synchronisation
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        ChainPosterior(**kw)  # validate_args=None follows torch's global default
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)
    with pytest.raises(ValueError, match="states outside"):
        ChainPosterior(**good()).log_prob(torch.full((B0, T0), K0 + 5))
    with pytest.raises(ValueError, match="value"):  # shapes are always checked
        ChainPosterior(**good(), validate_args=False).log_prob(torch.zeros(B0, T0 + 1, dtype=torch.long))


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_gives_empty_results(method):
    d = ChainPosterior(torch.zeros(3), torch.zeros(3, 3), torch.zeros(0, 4, 3), method=method)
    assert d.log_partition.shape == (0,)
    assert d.marginals.shape == (0, 4, 3)
    assert d.edge_marginals.shape == (0, 3, 3, 3)
    assert d.argmax.shape == (0, 4) and d.max.shape == (0,)
    assert d.kbest(2)[0].shape == (2, 0, 4)
    assert d.sample((5,)).shape == (5, 0, 4)
    assert d.entropy().shape == (0,)
    assert d.log_prob(torch.zeros(0, 4, dtype=torch.long)).shape == (0,)


def test_no_samples_gives_an_empty_tensor():
    d = ChainPosterior(torch.zeros(3), torch.zeros(3, 3), torch.zeros(2, 4, 3))
    samples = d.sample((0,))
    assert samples.shape == (0, 2, 4) and samples.dtype == torch.long
    assert d.sample((2, 0)).shape == (2, 0, 2, 4)


def test_float_lengths_are_refused_by_dtype():
    with pytest.raises(ValueError, match="lengths.*float32"):
        ChainPosterior(torch.zeros(3), torch.zeros(3, 3), torch.zeros(2, 4, 3), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("method", METHODS)
def test_nan_in_init_stays_nan_without_validation(method):
    init = torch.tensor([0.0, float("nan"), 0.0])
    d = ChainPosterior(init, torch.zeros(3, 3), torch.zeros(1, 3, 3), method=method, validate_args=False)
    assert torch.isnan(d.log_partition).all()
