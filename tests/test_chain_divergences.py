"""Cross-entropy and KL between two ChainPosteriors, by DP, against float64 enumeration.

Every pair of transition kinds (shared, batched, time-varying, low rank) on each side, variable
lengths, structural zeros in ``p`` only (so that ``q`` keeps every path ``p`` can take);
``torch.distributions.kl_divergence`` dispatches to the registered KL, which is 0 for
``p == q``, and gradients w.r.t. both chains' parameters match autograd of the enumeration.
"""

from __future__ import annotations

import pytest
import torch
from chain_oracle import (
    F64,
    Enumeration,
    enumerated_cross_entropy,
    low_rank_dense,
    random_chain,
    random_low_rank,
)
from torch.distributions import kl_divergence

from latentnlp import ChainPosterior, LowRankTransition, cross_entropy

KINDS = ("shared", "batched", "time", "low-rank")
B, T, K = 3, 4, 3
LENGTHS = torch.tensor([4, 1, 3])


def chain_params(kind, seed, zeros=False):
    """``(init, trans, emit)`` with ``trans`` a tensor, or ``(log_left, log_right)`` for low rank."""
    gen = torch.Generator().manual_seed(seed)
    dense_kind = "shared" if kind == "low-rank" else kind
    init, trans, emit, _ = random_chain(gen, B, T, K, trans_kind=dense_kind, init_kind="batched", zeros=zeros)
    if kind == "low-rank":
        trans = random_low_rank(gen, K, 2, zeros=zeros)
    return init, trans, emit


def posterior(init, trans, emit):
    transition = LowRankTransition(*trans) if isinstance(trans, tuple) else trans
    return ChainPosterior(init, transition, emit, LENGTHS)


def enumeration(init, trans, emit):
    dense = low_rank_dense(*trans) if isinstance(trans, tuple) else trans
    return Enumeration(init, dense, emit, LENGTHS)


@pytest.mark.parametrize("p_kind", KINDS)
@pytest.mark.parametrize("q_kind", KINDS)
def test_cross_entropy_and_kl_match_enumeration(p_kind, q_kind):
    p_params = chain_params(p_kind, 1, zeros=True)
    q_params = chain_params(q_kind, 2)
    p, q = posterior(*p_params), posterior(*q_params)
    p_ref, q_ref = enumeration(*p_params), enumeration(*q_params)
    expected = enumerated_cross_entropy(p_ref, q_ref)
    torch.testing.assert_close(cross_entropy(p, q), expected)
    torch.testing.assert_close(p.cross_entropy(q), expected)
    torch.testing.assert_close(kl_divergence(p, q), expected - p_ref.entropy())
    assert (kl_divergence(p, q) >= -1e-9).all()


@pytest.mark.parametrize("kind", KINDS)
def test_kl_of_a_chain_with_itself_is_zero(kind):
    p = posterior(*chain_params(kind, 3, zeros=True))
    torch.testing.assert_close(kl_divergence(p, p), torch.zeros(B, dtype=F64), atol=1e-10, rtol=0)
    same = posterior(*chain_params(kind, 3, zeros=True))
    torch.testing.assert_close(kl_divergence(p, same), torch.zeros(B, dtype=F64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("p_kind,q_kind", [("shared", "low-rank"), ("time", "batched"), ("low-rank", "shared")])
def test_kl_gradients_match_enumeration(p_kind, q_kind):
    def leaves(params):
        init, trans, emit = params
        trans = (
            tuple(x.clone().requires_grad_() for x in trans)
            if isinstance(trans, tuple)
            else trans.clone().requires_grad_()
        )
        return init.clone().requires_grad_(), trans, emit.clone().requires_grad_()

    def flat(params):
        init, trans, emit = params
        return [init, *(trans if isinstance(trans, tuple) else (trans,)), emit]

    p_params, q_params = chain_params(p_kind, 4), chain_params(q_kind, 5)
    got_p, got_q = leaves(p_params), leaves(q_params)
    kl = kl_divergence(posterior(*got_p), posterior(*got_q))
    got = torch.autograd.grad(kl.sum(), flat(got_p) + flat(got_q))
    ref_p, ref_q = leaves(p_params), leaves(q_params)
    p_ref, q_ref = enumeration(*ref_p), enumeration(*ref_q)
    ref_kl = enumerated_cross_entropy(p_ref, q_ref) - p_ref.entropy()
    torch.testing.assert_close(kl, ref_kl)
    expected = torch.autograd.grad(ref_kl.sum(), flat(ref_p) + flat(ref_q))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_single_position_chains():
    gen = torch.Generator().manual_seed(6)
    p_args = random_chain(gen, 2, 1, 3)[:3]
    q_args = random_chain(gen, 2, 1, 3)[:3]
    p, q = ChainPosterior(*p_args), ChainPosterior(*q_args)
    p_ref, q_ref = Enumeration(*p_args), Enumeration(*q_args)
    torch.testing.assert_close(kl_divergence(p, q), enumerated_cross_entropy(p_ref, q_ref) - p_ref.entropy())


def test_mismatched_chains_raise_value_error():
    init, trans, emit = chain_params("shared", 7)
    p = ChainPosterior(init, trans, emit, LENGTHS)
    with pytest.raises(ValueError, match="lengths"):
        cross_entropy(p, ChainPosterior(init, trans, emit, torch.tensor([4, 2, 3])))
    with pytest.raises(ValueError, match="emit shapes"):
        cross_entropy(p, ChainPosterior(init[:2], trans, emit[:2], LENGTHS[:2]))
    with pytest.raises(ValueError, match="emit shapes"):
        kl_divergence(p, ChainPosterior(init[..., :2], trans[:2, :2], emit[..., :2], LENGTHS))
