"""The chain entropy's scaled value and hand-written gradient (:class:`latentnlp.chain._ChainEntropy`).

``dH / d theta = -Cov_p(f, s)``, computed as the derivative of the marginals along the scores by
tangent recursions of the scaled algorithm (on numpy views and with torch), against autograd
through the brute-force enumeration (float64; every transition layout, shared and per-row ``init``,
structural zeros, lengths below ``T``, a weighted sum over rows); against ``gradcheck``; through a
low-rank transition to its factors; and the rows the scaled algorithm flags, redone by autograd
through the recursion, equal to the rows that were not.
"""

from __future__ import annotations

import pytest
import torch
from chain_oracle import F64, INIT_KINDS, TRANS_KINDS, Enumeration, low_rank_dense, random_chain, random_low_rank
from hypothesis import given, settings
from hypothesis import strategies as st

from latentnlp import ChainPosterior, LowRankTransition, chain

TOLERANCE = dict(rtol=1e-9, atol=1e-10)


def entropy_gradients(init, trans, emit, lengths, weights):
    """``d sum_b weights[b] H_b / d (init, trans, emit)`` through :func:`latentnlp.chain.chain_entropy`."""
    leaves = [x.clone().requires_grad_() for x in (init, trans, emit)]
    posterior = ChainPosterior(leaves[0], leaves[1], leaves[2], lengths)
    entropy = chain.chain_entropy(posterior.init, posterior.transition, posterior.emit, lengths)
    return entropy, torch.autograd.grad((entropy * weights).sum(), leaves, allow_unused=True)


def enumerated_gradients(init, trans, emit, lengths, weights):
    leaves = [x.clone().requires_grad_() for x in (init, trans, emit)]
    entropy = Enumeration(*leaves, lengths).entropy()
    return entropy, torch.autograd.grad((entropy * weights).sum(), leaves, allow_unused=True)


def assert_gradients_close(got, expected, msg):
    for name, a, b in zip(("init", "trans", "emit"), got, expected):
        b = torch.zeros_like(a) if b is None else b
        assert a is not None and torch.isfinite(a).all(), f"{msg}: {name}"
        torch.testing.assert_close(a, b, **TOLERANCE, msg=f"{msg}: {name}")


@pytest.fixture(params=["arrays", "torch"])
def loop(request, monkeypatch):
    """The tangent recursions on numpy views (small ``B K^2`` on the CPU) or with torch (elsewhere)."""
    if request.param == "torch":
        monkeypatch.setattr(chain, "ARRAY_LOOP_MAX_WORK", -1)
    return request.param


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("init_kind", INIT_KINDS)
@pytest.mark.parametrize("trans_kind", TRANS_KINDS)
def test_gradient_matches_enumeration(loop, trans_kind, init_kind, zeros):
    gen = torch.Generator().manual_seed(11 + TRANS_KINDS.index(trans_kind) + 3 * zeros + 7 * (init_kind == "batched"))
    for steps, k in ((1, 3), (2, 2), (4, 3), (5, 2)):
        init, trans, emit, lengths = random_chain(
            gen, 3, steps, k, trans_kind=trans_kind, init_kind=init_kind, zeros=zeros, scale=2.0
        )
        weights = torch.randn(3, generator=gen, dtype=F64)
        value, got = entropy_gradients(init, trans, emit, lengths, weights)
        reference, expected = enumerated_gradients(init, trans, emit, lengths, weights)
        msg = f"{loop} {trans_kind} init={init_kind} zeros={zeros} T={steps} K={k} lengths={lengths.tolist()}"
        torch.testing.assert_close(value, reference, **TOLERANCE, msg=msg)
        assert_gradients_close(got, expected, msg)
        if zeros:  # a -inf score never occurs: its gradient is 0
            for x, grad in zip((init, trans, emit), got):
                assert (grad[x == float("-inf")] == 0).all(), msg


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    steps=st.integers(1, 6),
    k=st.integers(1, 4),
    scale=st.sampled_from([0.1, 1.0, 4.0]),
    trans_kind=st.sampled_from(TRANS_KINDS),
    seed=st.integers(0, 2**16),
)
def test_gradient_matches_the_recursions_autograd(batch, steps, k, scale, trans_kind, seed):
    """Over shapes, lengths and scales: the tangent recursions against autograd through the entropy
    recursion itself (the gradient the library computed before)."""
    gen = torch.Generator().manual_seed(seed)
    init, trans, emit, lengths = random_chain(gen, batch, steps, k, trans_kind=trans_kind, scale=scale)
    weights = torch.randn(batch, generator=gen, dtype=F64)
    _, got = entropy_gradients(init, trans, emit, lengths, weights)
    leaves = [x.clone().requires_grad_() for x in (init, trans, emit)]
    value = chain._entropy_recursion(leaves[0], leaves[1], leaves[2], lengths)
    expected = torch.autograd.grad((value * weights).sum(), leaves, allow_unused=True)
    assert_gradients_close(got, expected, f"B={batch} T={steps} K={k} scale={scale} {trans_kind}")


def test_gradcheck():
    gen = torch.Generator().manual_seed(3)
    init, trans, emit, lengths = random_chain(gen, 2, 4, 3, trans_kind="time", init_kind="batched")

    def entropy(init, trans, emit):
        return chain.chain_entropy(init, ChainPosterior(init, trans, emit, lengths).transition, emit, lengths)

    assert torch.autograd.gradcheck(entropy, [x.clone().requires_grad_() for x in (init, trans, emit)])


def test_gradient_reaches_low_rank_factors():
    """A low-rank transition is densified inside autograd: its factors get the gradient of the
    entropy of the dense chain."""
    gen = torch.Generator().manual_seed(4)
    init, _, emit, lengths = random_chain(gen, 3, 5, 4)
    log_left, log_right = (x.requires_grad_() for x in random_low_rank(gen, 4, 2, zeros=True))
    weights = torch.randn(3, generator=gen, dtype=F64)
    entropy = ChainPosterior(init, LowRankTransition(log_left, log_right), emit, lengths).entropy()
    got = torch.autograd.grad((entropy * weights).sum(), (log_left, log_right))
    reference = Enumeration(init, low_rank_dense(log_left, log_right), emit, lengths).entropy()
    expected = torch.autograd.grad((reference * weights).sum(), (log_left, log_right))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOLERANCE)


@pytest.mark.parametrize("trans_kind", TRANS_KINDS)
@pytest.mark.parametrize("init_kind", INIT_KINDS)
def test_flagged_rows_are_redone_by_autograd(monkeypatch, trans_kind, init_kind):
    """Rows flagged as underflowed get their gradient from autograd through the recursion; the
    result equals the unflagged computation (here every second row is flagged by force)."""
    gen = torch.Generator().manual_seed(5)
    init, trans, emit, lengths = random_chain(gen, 4, 5, 3, trans_kind=trans_kind, init_kind=init_kind, zeros=True)
    weights = torch.randn(4, generator=gen, dtype=F64)
    _, unflagged = entropy_gradients(init, trans, emit, lengths, weights)
    flagged_rows = torch.tensor([True, False, True, False])
    monkeypatch.setattr(chain, "_underflowed", lambda scale, mask, floor=None: flagged_rows.clone())
    _, redone = entropy_gradients(init, trans, emit, lengths, weights)
    assert_gradients_close(redone, unflagged, f"{trans_kind} init={init_kind}")


def test_float32_peaked_chain_is_redone_and_finite():
    """Float32 scores far apart (the scaled algorithm underflows): finite gradients, close to the
    float64 ones of the same chain."""
    gen = torch.Generator().manual_seed(6)
    init, trans, emit, lengths = random_chain(gen, 3, 6, 3, trans_kind="batched", scale=60.0)
    weights = torch.ones(3, dtype=F64)
    _, wide = entropy_gradients(init, trans, emit, lengths, weights)
    narrow_inputs = [x.float() for x in (init, trans, emit)]
    narrow_chain = ChainPosterior(*narrow_inputs, lengths)
    _, flagged, _ = chain._scaled_entropy(
        narrow_chain.init, narrow_chain.transition.dense(), narrow_chain.emit, lengths
    )
    assert flagged.any(), "the chain was meant to underflow in float32"
    _, narrow = entropy_gradients(*narrow_inputs, lengths, weights.float())
    for a, b in zip(narrow, wide):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)
