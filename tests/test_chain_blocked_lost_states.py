"""The blocked kernels where one normaliser per vector or matrix loses the states that matter.

Float32 chains whose filter sits on states that score far below another state's paths (a closed
class beside a state it cannot reach, whose emissions are far higher; a left-to-right chain whose
filter, not knowing the future, lingers in an absorbing state): :func:`latentnlp.chain.blocked_log_partition`
(and its gradient), :func:`~latentnlp.chain.blocked_entropy` and
:func:`~latentnlp.chain.blocked_forward_filter` against float64 log-space oracles; the
``method="auto"`` entropy against :func:`~latentnlp.chain.chain_entropy` on drawn chains; and
time-varying transitions with whole ``-inf`` rows against enumeration.
"""

from __future__ import annotations

import pytest
import torch
from chain_oracle import F64, TRANS_KINDS, Enumeration, forward_log, random_chain
from hypothesis import given, settings
from hypothesis import strategies as st

from latentnlp import ChainPosterior, chain

NINF = float("-inf")


def closed_class(trans_kind: str, gap: float, steps: int = 101):
    """States 0 and 1 start the chain and never leave each other; state 2, never reached, emits ``gap``
    above them at every step (float64 ``init [3]``, ``trans``, ``emit [2, T, 3]``, ``lengths``)."""
    gen = torch.Generator().manual_seed(int(gap * 10))
    base = torch.tensor([[-0.3, -1.2, NINF], [-0.7, -0.1, NINF], [0.0, 0.0, 0.0]], dtype=F64)
    trans = {
        "shared": base,
        "batched": base + torch.rand(2, 1, 1, generator=gen, dtype=F64),
        "time": base + torch.rand(2, steps - 1, 3, 3, generator=gen, dtype=F64),
    }[trans_kind]
    emit = torch.randn(2, steps, 3, generator=gen, dtype=F64)
    emit[..., 2] += gap
    return torch.tensor([0.0, NINF, NINF], dtype=F64), trans, emit, torch.tensor([steps, steps // 2])


def log_space_marginals(init, trans, emit, lengths):
    """``(log Z [B], marginals [B, T, K])`` in float64: the log-space forward of the test oracle, and the
    gradient of the sequential scaled algorithm (autograd through a log-space loop gives NaN at ``-inf``)."""
    d = ChainPosterior(init, trans, emit, lengths)
    emit = d.emit.detach().clone().requires_grad_()
    scaled_log_z, _, underflowed = chain.scaled_log_partition(d.init, d.transition, emit, lengths)
    (marginals,) = torch.autograd.grad(scaled_log_z.sum(), emit)
    assert not underflowed.any()
    return forward_log(init, trans, emit.detach(), lengths), marginals


def check_float32_blocked(init, trans, emit, lengths):
    """The float32 blocked kernels, unflagged, against the float64 oracles of the same chain."""
    wide = ChainPosterior(init, trans, emit, lengths)
    narrow = ChainPosterior(init.float(), trans.float(), emit.float(), lengths)
    log_z, marginals = log_space_marginals(init, trans, emit, lengths)
    emit32 = narrow.emit.clone().requires_grad_()
    blocked_log_z, _, underflowed = chain.blocked_log_partition(narrow.init, narrow.transition, emit32, lengths)
    (blocked_marginals,) = torch.autograd.grad(blocked_log_z.sum(), emit32)
    assert not underflowed.any()
    torch.testing.assert_close(blocked_log_z.double(), log_z, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(blocked_marginals.double(), marginals, rtol=0, atol=1e-4)
    entropy, flagged = chain.blocked_entropy(narrow.init, narrow.transition, narrow.emit, lengths)
    assert not flagged.any()
    reference = chain.chain_entropy(wide.init, wide.transition, wide.emit, lengths)
    torch.testing.assert_close(entropy.double(), reference, rtol=1e-5, atol=1e-4)
    filters = chain.blocked_forward_filter(narrow.init, narrow.transition, narrow.emit, lengths).exp()
    exact = chain.forward_filter(wide.init, wide.transition, wide.emit, lengths).exp()
    torch.testing.assert_close(filters.double(), exact, rtol=0, atol=1e-4)


@pytest.mark.parametrize("gap", [3.0, 9.0])
@pytest.mark.parametrize("trans_kind", TRANS_KINDS)
def test_a_closed_class_beside_an_unreachable_peak(trans_kind, gap):
    """With one normaliser per block product the closed class's rows fell below the smallest normal
    number beside the unreachable state's (log Z off by several nats at ``gap = 9``, unflagged), and
    with one per backward vector its entries vanished beside that state's (a NaN gradient, every
    entropy flagged, from ``gap = 2``)."""
    check_float32_blocked(*closed_class(trans_kind, gap))


def test_mass_a_left_to_right_chain_loses_is_flagged(monkeypatch):
    """0 -> 1 -> 2 only: state 2 (absorbing) emits best for 300 steps, then worst.  The float32 filter
    of state 0, the one the best paths stay in, falls below the smallest normal number beside state 2's
    and is rounded away, with no step normaliser small (the blocked log Z was 3,000 nats off,
    unflagged): the blocked kernels flag it as the scaled algorithm does, and ``method="auto"``, which
    takes them here, gives what the scaled algorithm and its fallbacks give.  (The float32 log-space
    fallback now gets it right too: tests/test_chain_float32_fallback.py.)"""
    steps = 2048
    gen = torch.Generator().manual_seed(3)
    trans = torch.tensor([[-0.1, -3.0, -3.0], [NINF, -0.1, -3.0], [NINF, NINF, 0.0]], dtype=F64)
    init = torch.tensor([0.0, -1.0, -2.0], dtype=F64)
    emit = torch.randn(1, steps, 3, generator=gen, dtype=F64) * 0.5
    emit[:, :300, 2] += 1.0
    emit[:, 300:, 2] -= 2.0
    lengths = torch.tensor([steps])
    d = ChainPosterior(init.float(), trans.float(), emit.float(), lengths)
    monkeypatch.setattr(chain, "COMPILED_LOOP_MAX_WORK", -1)  # "auto" takes the blocked kernels
    assert chain.prefers_blocked(d.transition, d.emit)
    assert chain.scaled_log_partition(d.init, d.transition, d.emit, lengths)[2].all()
    assert chain.blocked_log_partition(d.init, d.transition, d.emit, lengths)[2].all()
    assert chain.blocked_entropy(d.init, d.transition, d.emit, lengths)[1].all()
    scaled = ChainPosterior(d.init, d.transition, d.emit, lengths, method="scaled")
    torch.testing.assert_close(d.log_partition, chain.log_space_forward(d.init, d.transition, d.emit, lengths)[0])
    blocked = ChainPosterior(d.init, d.transition, d.emit, lengths, method="blocked")
    torch.testing.assert_close(blocked.entropy(), chain.chain_entropy(d.init, d.transition, d.emit, lengths))
    filters = chain.blocked_forward_filter(d.init, d.transition, d.emit, lengths)
    torch.testing.assert_close(filters, chain.forward_filter(d.init, d.transition, d.emit, lengths))
    torch.testing.assert_close(d.entropy(), scaled.entropy())


@pytest.mark.parametrize("trans_kind", TRANS_KINDS)
def test_time_varying_rows_of_minus_infinity(trans_kind):
    """Whole ``-inf`` rows (states that cannot be left at some steps) and ``-inf`` init entries: the
    blocked Viterbi, entropy and filters at every block size against enumeration."""
    gen = torch.Generator().manual_seed(11)
    for steps, k in ((5, 3), (6, 2), (4, 4)):
        init, trans, emit, lengths = random_chain(gen, 3, steps, k, trans_kind=trans_kind)
        dead = torch.rand(trans.shape[:-1], generator=gen) < 0.3  # [.., K_prev]: the row leaves nowhere
        dead[..., 0] = False  # state 0 can always move on, and starts
        trans = trans.masked_fill(dead.unsqueeze(-1), NINF)
        init = init.masked_fill(torch.rand(init.shape, generator=gen) < 0.4, NINF)
        init[..., 0] = 0.0
        lengths[0] = 1
        d, ref = ChainPosterior(init, trans, emit, lengths), Enumeration(init, trans, emit, lengths)
        for block in (1, 2, 3, None):
            msg = f"{trans_kind} T={steps} K={k} block={block}"
            path = chain.blocked_viterbi(d.init, d.transition, d.emit, d.lengths, block)
            torch.testing.assert_close(d.score(path), ref.max, rtol=1e-12, atol=1e-12, msg=msg)
            entropy, flagged = chain.blocked_entropy(d.init, d.transition, d.emit, d.lengths, block)
            assert not flagged.any(), msg
            torch.testing.assert_close(entropy, ref.entropy(), rtol=1e-9, atol=1e-9, msg=msg)
            filters = chain.blocked_forward_filter(d.init, d.transition, d.emit, d.lengths, block).exp()
            exact = chain.forward_filter(d.init, d.transition, d.emit, d.lengths).exp()
            torch.testing.assert_close(filters, exact, msg=msg)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 4),
    steps=st.integers(1, 40),
    k=st.integers(1, 5),
    scale=st.sampled_from([0.5, 3.0, 20.0]),
    trans_kind=st.sampled_from(TRANS_KINDS),
    zeros=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_blocked_entropy_is_chain_entropys(batch, steps, k, scale, trans_kind, zeros, seed):
    """``method="blocked"`` (the blocked entropy, flagged chains redone) against :func:`chain_entropy`
    in float64, lengths 1 to ``T`` mixed; in float32 too where not flagged."""
    gen = torch.Generator().manual_seed(seed)
    init, trans, emit, lengths = random_chain(gen, batch, steps, k, trans_kind=trans_kind, scale=scale, zeros=zeros)
    lengths[0] = 1
    wide = ChainPosterior(init, trans, emit, lengths, method="blocked")
    reference = chain.chain_entropy(wide.init, wide.transition, wide.emit, wide.lengths)
    torch.testing.assert_close(wide.entropy(), reference, rtol=1e-9, atol=1e-9)
    # float32: the chains the blocked kernel does not flag are right; the flagged ones are the recursion's
    narrow = ChainPosterior(init.float(), trans.float(), emit.float(), lengths, method="blocked")
    _, flagged = chain.blocked_entropy(narrow.init, narrow.transition, narrow.emit, narrow.lengths)
    entropy = narrow.entropy()
    torch.testing.assert_close(entropy[~flagged].double(), reference[~flagged], rtol=1e-4, atol=1e-3)
    # flagged: chain_entropy's value over those chains (over them alone: with structural zeros in another
    # chain's matrix the whole batch takes the reachable-states path, whose flags may differ)
    rows = flagged.nonzero().squeeze(-1)
    redone = chain.chain_entropy(
        narrow.init[rows], narrow.transition.select_rows(rows), narrow.emit[rows], narrow.lengths[rows]
    )
    torch.testing.assert_close(entropy[flagged], redone, equal_nan=True)


def test_a_deterministic_chain_is_not_flagged():
    """One path only (state 1 throughout: state 0 leads nowhere and cannot emit at step 1), its shifted
    scores all 0: the entropy's terms are all about 0, and a difference of -1e-16 was below minus the
    resolution of terms that small, which flagged the chain (the redo was right, the flag needless)."""
    init = torch.tensor([-9.0814, -6.0110], dtype=F64)
    trans = torch.tensor([[NINF, NINF], [NINF, 2.4269]], dtype=F64)
    emit = torch.tensor([[[-1.4797, 2.2336], [NINF, 6.1649]]], dtype=F64)
    d = ChainPosterior(init, trans, emit, torch.tensor([2]))
    for block in (1, 2):
        entropy, flagged = chain.blocked_entropy(d.init, d.transition, d.emit, d.lengths, block)
        assert not flagged.any() and entropy.item() == 0.0
    assert not chain._scaled_entropy(d.init, d.transition.log, d.emit, d.lengths)[1].any()
