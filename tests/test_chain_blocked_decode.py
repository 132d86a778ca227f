"""Blocked Viterbi, blocked filters for FFBS and blocked entropy against float64 enumeration.

:func:`latentnlp.chain.blocked_viterbi`, :func:`~latentnlp.chain.blocked_forward_filter` (with
:func:`~latentnlp.chain.backward_sample`) and :func:`~latentnlp.chain.blocked_entropy` at block
sizes 1, 2, 3 and the default, every transition layout, variable lengths (1 included), ``T = 1``
and structural zeros; and the routing of :class:`~latentnlp.ChainPosterior` to them.
"""

from __future__ import annotations

import math

import pytest
import torch
from chain_oracle import F64, TRANS_KINDS, Enumeration, low_rank_dense, random_chain, random_low_rank
from hypothesis import given, settings
from hypothesis import strategies as st

from latentnlp import ChainPosterior, LowRankTransition, chain

BLOCKS = (1, 2, 3, None)
SHAPES = [(T, K) for T in range(1, 8) for K in (2, 3, 4) if K**T <= 4096]


def chains(trans_kind, zeros, seed):
    """``(d, ref)``: a float64 ChainPosterior and its enumeration at every size of :data:`SHAPES`."""
    gen = torch.Generator().manual_seed(seed)
    for T, K in SHAPES:
        init, trans, emit, lengths = random_chain(gen, 4, T, K, trans_kind=trans_kind, zeros=zeros)
        lengths[-1] = 1  # one chain of length 1 in every batch
        yield ChainPosterior(init, trans, emit, lengths), Enumeration(init, trans, emit, lengths)


def assert_optimal(d, ref, path, msg):
    """``path`` scores the brute-force max, equals its argmax where the max is unique, is 0 at padding."""
    torch.testing.assert_close(d.score(path), ref.max, rtol=1e-12, atol=1e-12, msg=msg)
    padding = torch.arange(ref.T) >= ref.lengths.unsqueeze(-1)
    assert not path[padding].any(), msg
    unique = torch.tensor([ref.top_gap(b) > 1e-9 for b in range(ref.B)])
    assert torch.equal(path[unique], ref.argmax[unique]), msg


# ---------------------------------------------------------------------------------------------- Viterbi
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("trans_kind", TRANS_KINDS)
def test_blocked_viterbi_is_a_brute_force_maximiser(trans_kind, zeros):
    for d, ref in chains(trans_kind, zeros, seed=TRANS_KINDS.index(trans_kind) + 10 * zeros):
        for block in BLOCKS + (ref.T + 1,):
            path = chain.blocked_viterbi(d.init, d.transition, d.emit, d.lengths, block)
            assert path.shape == (ref.B, ref.T) and path.dtype == torch.long
            assert_optimal(d, ref, path, f"{trans_kind} zeros={zeros} T={ref.T} K={ref.K} block={block}")


def test_blocked_viterbi_in_chunks_of_the_summed_index(monkeypatch):
    monkeypatch.setattr(chain, "MAX_PLUS_CHUNK", 1)  # every max-plus product one summed-over state at a time
    for d, ref in chains("time", True, seed=3):
        for block in (2, 3):
            path = chain.blocked_viterbi(d.init, d.transition, d.emit, d.lengths, block)
            assert_optimal(d, ref, path, f"chunks T={ref.T} K={ref.K} block={block}")


def test_blocked_viterbi_through_a_low_rank_transition():
    gen = torch.Generator().manual_seed(4)
    init, _, emit, lengths = random_chain(gen, 3, 6, 3, init_kind="batched")
    log_left, log_right = random_low_rank(gen, 3, 2, zeros=True)
    ref = Enumeration(init, low_rank_dense(log_left, log_right), emit, lengths)
    d = ChainPosterior(init, LowRankTransition(log_left, log_right), emit, lengths, method="blocked")
    assert_optimal(d, ref, d.argmax, "low rank")
    torch.testing.assert_close(d.max, ref.max)


# ---------------------------------------------------------------------------------------------- sampling
def chi_square_bound(cells: int) -> float:
    """Five standard deviations above the chi-square statistic's mean ``cells - 1`` (variance ``2 (cells - 1)``)."""
    return cells - 1 + 5 * math.sqrt(2 * (cells - 1))


@pytest.mark.parametrize("trans_kind", TRANS_KINDS)
def test_blocked_sampling_is_exact(trans_kind):
    """Path frequencies of 20000 draws against the enumerated probabilities: a chi-square statistic over
    the paths (a fixed seed; bound five standard deviations above its mean), and no draw of an
    impossible path (structural zeros)."""
    gen = torch.Generator().manual_seed(20 + TRANS_KINDS.index(trans_kind))
    init, trans, emit, lengths = random_chain(gen, 3, 4, 3, trans_kind=trans_kind, zeros=True)
    lengths = torch.tensor([4, 3, 1])
    ref = Enumeration(init, trans, emit, lengths)
    draws = 20000
    samples = ChainPosterior(init, trans, emit, lengths, method="blocked").sample((draws,), generator=gen)
    assert samples.shape == (draws, 3, 4)
    for b in range(3):
        counts = torch.bincount(ref.path_index(b, samples[:, b]), minlength=ref.paths[b].shape[0]).to(F64)
        expected = ref.probs(b) * draws
        assert not counts[expected == 0].any(), f"an impossible path was drawn (row {b})"
        possible = expected > 0
        statistic = ((counts[possible] - expected[possible]) ** 2 / expected[possible]).sum()
        assert statistic <= chi_square_bound(int(possible.sum())), f"row {b}: chi-square {float(statistic):.1f}"


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("trans_kind", TRANS_KINDS)
def test_blocked_filters_give_the_scaled_samples(trans_kind, zeros):
    """The blocked filters equal the scaled ones to rounding, so the same generator draws the same paths."""
    for d, ref in chains(trans_kind, zeros, seed=30 + TRANS_KINDS.index(trans_kind) + 10 * zeros):
        scaled = chain.forward_filter(d.init, d.transition, d.emit, d.lengths)
        for block in BLOCKS:
            blocked = chain.blocked_forward_filter(d.init, d.transition, d.emit, d.lengths, block)
            torch.testing.assert_close(blocked.exp(), scaled.exp(), rtol=1e-10, atol=1e-12)
            draws = [
                chain.backward_sample(f, d.transition, d.lengths, 50, torch.Generator().manual_seed(1))
                for f in (blocked, scaled)
            ]
            assert torch.equal(*draws), f"{trans_kind} T={ref.T} K={ref.K} block={block}"


# ---------------------------------------------------------------------------------------------- entropy
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("trans_kind", TRANS_KINDS)
def test_blocked_entropy_matches_enumeration_and_the_recursion(trans_kind, zeros):
    for d, ref in chains(trans_kind, zeros, seed=40 + TRANS_KINDS.index(trans_kind) + 10 * zeros):
        expected = ref.entropy()
        recursion = chain.chain_entropy(d.init, d.transition, d.emit, d.lengths)
        torch.testing.assert_close(recursion, expected, rtol=1e-9, atol=1e-10)
        for block in BLOCKS:
            entropy, flagged = chain.blocked_entropy(d.init, d.transition, d.emit, d.lengths, block)
            msg = f"{trans_kind} zeros={zeros} T={ref.T} K={ref.K} block={block}"
            assert entropy.dtype == F64 and not flagged.any(), msg
            torch.testing.assert_close(entropy, expected, rtol=1e-9, atol=1e-10, msg=msg)


def test_blocked_entropy_of_a_low_rank_chain_and_its_gradient():
    gen = torch.Generator().manual_seed(5)
    init, _, emit, lengths = random_chain(gen, 3, 5, 3)
    log_left, log_right = random_low_rank(gen, 3, 2, zeros=True)
    dense = low_rank_dense(log_left, log_right)
    transition = LowRankTransition(log_left, log_right)
    torch.testing.assert_close(
        ChainPosterior(init, transition, emit, lengths, method="blocked").entropy(),
        Enumeration(init, dense, emit, lengths).entropy(),
    )
    # when a gradient is needed the differentiable recursion answers: its gradient is the enumeration's
    leaf, leaf_ref = emit.clone().requires_grad_(), emit.clone().requires_grad_()
    entropy = ChainPosterior(init, transition, leaf, lengths, method="blocked").entropy()
    (grad,) = torch.autograd.grad(entropy.sum(), leaf)
    (grad_ref,) = torch.autograd.grad(Enumeration(init, dense, leaf_ref, lengths).entropy().sum(), leaf_ref)
    torch.testing.assert_close(grad, grad_ref)


# ---------------------------------------------------------------------------------------------- underflow
def test_flagged_chains_are_recomputed():
    """A chain whose only path runs through a state with a tiny emission, beside a state it cannot reach
    with emission 0: float32 probabilities underflow (every step normaliser 0), the recursions do not."""
    trans = torch.tensor([[0.0, 0.0], [float("-inf"), 0.0]])  # state 1 never reaches state 0
    init = torch.tensor([float("-inf"), 0.0])
    emit = torch.tensor([0.0, -120.0]).expand(2, 40, 2).clone()
    lengths = torch.tensor([40, 7])
    d = ChainPosterior(init, trans, emit, lengths, method="blocked")
    _, flagged = chain.blocked_entropy(d.init, d.transition, d.emit, d.lengths)
    assert flagged.all()
    torch.testing.assert_close(d.entropy(), torch.zeros(2))
    ones = (torch.arange(40) < lengths.unsqueeze(-1)).long()
    assert torch.equal(d.argmax, ones)
    assert torch.equal(d.sample((3,))[0], ones)
    torch.testing.assert_close(d.log_partition, -120.0 * lengths.float())


# ---------------------------------------------------------------------------------------------- precision
def test_float32_agrees_with_float64_on_a_long_peaked_chain():
    gen = torch.Generator().manual_seed(6)
    init, trans, emit, lengths = random_chain(gen, 4, 2000, 8, trans_kind="batched", full=True)
    emit = emit * 6  # peaked emissions: a low entropy, far below log Z
    wide = ChainPosterior(init, trans, emit, lengths, method="blocked")
    narrow = ChainPosterior(init.float(), trans.float(), emit.float(), lengths, method="blocked")
    entropy = wide.entropy()
    torch.testing.assert_close(entropy, chain.chain_entropy(wide.init, wide.transition, wide.emit, lengths))
    torch.testing.assert_close(narrow.entropy().double(), entropy, rtol=1e-5, atol=0.0)
    # the float32 path is optimal in float64 up to float32's rounding of the scores
    best = wide.max
    torch.testing.assert_close(wide.score(narrow.argmax), best, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(
        wide.score(wide.argmax), wide.score(chain.viterbi(wide.init, wide.transition, wide.emit, lengths))
    )
    filters = chain.blocked_forward_filter(narrow.init, narrow.transition, narrow.emit, lengths).exp().double()
    torch.testing.assert_close(
        filters, chain.forward_filter(wide.init, wide.transition, wide.emit, lengths).exp(), rtol=0, atol=1e-4
    )


# ---------------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(
    "steps,k,decode,entropy",
    [
        (4096, 4, True, True),
        (2048, 4, True, False),
        (2047, 4, False, False),
        (4096, 16, False, True),
        (8, 128, False, False),
    ],
)
def test_auto_takes_the_blocked_kernels_by_the_rules(monkeypatch, steps, k, decode, entropy, compiled):
    """Viterbi by prefers_blocked_viterbi, the sampler's filters by prefers_blocked, the entropy by
    prefers_blocked_entropy; where the loops run compiled (every size here, one shared matrix) all three
    stay sequential.  The kernels are replaced by recorders (returning outputs of the
    right shapes): only the routing is tested."""
    if compiled and chain._chain_loops is None:
        pytest.skip("latentnlp._chain_loops was not built by this install")
    if not compiled:
        monkeypatch.setattr(chain, "COMPILED_LOOP_MAX_WORK", -1)
    decode, filters, entropy = decode and not compiled, decode and not compiled, entropy and not compiled
    called = []

    def recorder(name, output):
        def kernel(init, transition, emit, lengths):
            called.append(name)
            return output(*emit.shape)

        monkeypatch.setattr(chain, name, kernel)

    def paths(batch, steps, k):
        return torch.zeros(batch, steps, dtype=torch.long)

    def uniform(batch, steps, k):
        return torch.full((batch, steps, k), -math.log(k))

    recorder("blocked_viterbi", paths)
    recorder("viterbi", paths)
    recorder("blocked_forward_filter", uniform)
    recorder("forward_filter", uniform)
    recorder("blocked_entropy", lambda batch, steps, k: (torch.zeros(batch), torch.zeros(batch, dtype=torch.bool)))
    recorder("chain_entropy", lambda batch, steps, k: torch.zeros(batch))
    gen = torch.Generator().manual_seed(7)
    d = ChainPosterior(*random_chain(gen, 2, steps, k, dtype=torch.float32, full=True))
    assert chain.prefers_blocked_viterbi(d.transition, d.emit) is decode
    assert chain.prefers_blocked(d.transition, d.emit) is filters
    assert chain.prefers_blocked_entropy(d.transition, d.emit) is entropy
    d.argmax, d.sample(), d.entropy()
    assert called == [
        "blocked_viterbi" if decode else "viterbi",
        "blocked_forward_filter" if filters else "forward_filter",
        "blocked_entropy" if entropy else "chain_entropy",
    ]
    # a gradient asks for the differentiable recursion whatever the rule
    called.clear()
    ChainPosterior(d.init, d.transition, d.emit.requires_grad_(), method="blocked").entropy()
    assert called == ["chain_entropy"]


def test_bad_block_sizes_are_refused():
    gen = torch.Generator().manual_seed(8)
    d = ChainPosterior(*random_chain(gen, 2, 5, 3))
    for kernel in (
        chain.blocked_viterbi,
        chain.blocked_forward_filter,
        chain.blocked_entropy,
        chain.blocked_log_partition,
    ):
        for block in (0, -1, 1.5):
            with pytest.raises(ValueError, match="block must be a positive integer"):
                kernel(d.init, d.transition, d.emit, d.lengths, block)


# ---------------------------------------------------------------------------------------------- hypothesis
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    steps=st.integers(1, 6),
    k=st.integers(1, 3),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    trans_kind=st.sampled_from(TRANS_KINDS),
    zeros=st.booleans(),
    block=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_blocked_kernels_on_drawn_chains(batch, steps, k, scale, trans_kind, zeros, block, seed):
    gen = torch.Generator().manual_seed(seed)
    init, trans, emit, lengths = random_chain(gen, batch, steps, k, trans_kind=trans_kind, scale=scale, zeros=zeros)
    d, ref = ChainPosterior(init, trans, emit, lengths), Enumeration(init, trans, emit, lengths)
    path = chain.blocked_viterbi(d.init, d.transition, d.emit, d.lengths, block)
    torch.testing.assert_close(d.score(path), ref.max, rtol=1e-12, atol=1e-12)
    entropy, flagged = chain.blocked_entropy(d.init, d.transition, d.emit, d.lengths, block)
    assert not flagged.any()
    torch.testing.assert_close(entropy, ref.entropy(), rtol=1e-9, atol=1e-9)
    filters = chain.blocked_forward_filter(d.init, d.transition, d.emit, d.lengths, block)
    torch.testing.assert_close(filters.exp(), chain.forward_filter(d.init, d.transition, d.emit, d.lengths).exp())
