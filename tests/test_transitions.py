"""Transition objects: every operation the kernels use, against the dense log matrix it stands for.

Dense transitions are checked in their three layouts, low-rank ones against the brute-force
``logsumexp_c(log_left[i, c] + log_right[c, j])`` of tests/chain_oracle.py; shapes are drawn by
hypothesis.  Sampling through the rank is compared with the exact conditional distribution.
"""

from __future__ import annotations

import os

import pytest
import torch
from chain_oracle import F64, low_rank_dense, random_low_rank
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentnlp.transitions import DenseTransition, LowRankTransition

SETTINGS = settings(
    max_examples=25, deadline=None, derandomize="CI" in os.environ, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def transitions(draw):
    """``(transition, dense [B, T-1, K, K] reference, B, T, K)`` of every kind."""
    B, T, K = draw(st.integers(1, 3)), draw(st.integers(2, 5)), draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["shared", "batched", "time", "low-rank"]))
    zeros = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "low-rank":
        log_left, log_right = random_low_rank(gen, K, draw(st.integers(1, 4)), zeros=zeros)
        dense = low_rank_dense(log_left, log_right)
        return LowRankTransition(log_left, log_right), dense.expand(B, T - 1, K, K), B, T, K
    shape = {"shared": (K, K), "batched": (B, K, K), "time": (B, T - 1, K, K)}[kind]
    log = torch.randn(shape, generator=gen, dtype=F64)
    if zeros:
        log = log.masked_fill(torch.rand(shape, generator=gen) < 0.3, float("-inf"))
    reference = {
        "shared": lambda x: x.expand(B, T - 1, K, K),
        "batched": lambda x: x[:, None].expand(B, T - 1, K, K),
        "time": lambda x: x,
    }[kind](log)
    return DenseTransition(log), reference, B, T, K


@SETTINGS
@given(case=transitions())
def test_probability_space_steps_match_the_dense_matrix(case):
    transition, dense, B, T, K = case
    probs = transition.probabilities()
    gen = torch.Generator().manual_seed(0)
    vector = torch.rand(B, K, generator=gen, dtype=F64)
    edges = torch.rand(B, T - 1, generator=gen) < 0.7
    assert probs.log_shift_total(edges.double()).shape == (B,)
    for t in range(1, T):
        # P_t = exp(trans_t - s_t): recover exp(trans_t) with the shift of this step
        one = torch.zeros(B, T - 1, dtype=F64)
        one[:, t - 1] = 1.0
        scale = torch.exp(probs.log_shift_total(one))[:, None, None]
        matrix = torch.exp(dense[:, t - 1])
        out = torch.empty(B, K, dtype=F64)
        probs.forward(vector, t, out)
        torch.testing.assert_close(out * scale[..., 0], torch.einsum("bi,bij->bj", vector, matrix))
        probs.backward(vector, t, out)
        torch.testing.assert_close(out * scale[..., 0], torch.einsum("bij,bj->bi", matrix, vector))


@SETTINGS
@given(case=transitions())
def test_log_propagation_edge_scores_and_dense(case):
    transition, dense, B, T, K = case
    gen = torch.Generator().manual_seed(1)
    belief = torch.randn(B, K, generator=gen, dtype=F64)
    step = transition.log_propagator()
    for t in range(1, T):
        expected = torch.logsumexp(belief.unsqueeze(-1) + dense[:, t - 1], 1)
        torch.testing.assert_close(step(belief, t), expected)
    previous = torch.randint(K, (2, B, T - 1), generator=gen)
    following = torch.randint(K, (2, B, T - 1), generator=gen)
    times = torch.arange(T - 1)
    rows = torch.arange(B)[:, None]
    expected = dense[rows, times, previous, following]
    torch.testing.assert_close(transition.edge_scores(previous, following), expected)
    layout = transition.dense()
    assert layout.dim() in (2, 3, 4)
    full = {2: lambda x: x.expand(B, T - 1, K, K), 3: lambda x: x[:, None].expand(B, T - 1, K, K), 4: lambda x: x}[
        layout.dim()
    ](layout)
    torch.testing.assert_close(full, dense)
    assert transition.num_states == K and transition.rank >= 1


@SETTINGS
@given(case=transitions())
def test_parameter_gradients_are_the_gradient_of_the_log_space_forward(case):
    """``parameter_gradients(alpha, u)`` is the gradient of ``sum_t alpha_{t-1} P_t u_t`` (the edge
    marginals ``xi_t`` pulled back to the parameters), ``P_t`` the shifted probabilities."""
    transition, _, B, T, K = case
    params = [p.detach().clone().requires_grad_() for p in transition.parameters]
    probs = transition.with_parameters(*params).probabilities()
    gen = torch.Generator().manual_seed(2)
    alpha = torch.rand(T - 1, B, K, generator=gen, dtype=F64)
    u = torch.rand(T - 1, B, K, generator=gen, dtype=F64)
    got = probs.parameter_gradients(alpha, u)
    # autograd of sum_t alpha_{t-1} P_t u_t through the same shifted probabilities
    total = sum(
        (_differentiable_forward(transition.with_parameters(*params), alpha[t - 1], t) * u[t - 1]).sum()
        for t in range(1, T)
    )
    expected = torch.autograd.grad(total, params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def _differentiable_forward(transition, vector, t):
    """``vector @ P_t`` with ``P_t`` the transition's shifted probabilities, differentiable."""
    if isinstance(transition, LowRankTransition):
        left = torch.exp(transition.log_left - transition.log_left.detach().max())
        right = torch.exp(transition.log_right - transition.log_right.detach().max())
        return vector @ left @ right
    log = transition.dense()
    matrix = log[:, t - 1] if log.dim() == 4 else log
    shift = matrix.detach().flatten(-2).max(-1).values
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    probs = torch.exp(matrix - shift[..., None, None])
    return vector @ probs if probs.dim() == 2 else torch.einsum("bi,bij->bj", vector, probs)


@pytest.mark.parametrize("zeros", [False, True])
def test_low_rank_samples_through_the_rank_match_the_exact_conditional(zeros):
    """``p(z_{t-1} = i | z_t = j) ∝ alpha(i) P(i, j)`` and ``p(z' = j | z = i) = P(i, j) / sum_j P(i, j)``."""
    gen = torch.Generator().manual_seed(3)
    K, r, n = 4, 3, 40000
    log_left, log_right = random_low_rank(gen, K, r, zeros=zeros)
    log_left = log_left.log_softmax(-1)
    log_right = log_right.log_softmax(-1)  # rows of both factors distributions: P is row-stochastic
    transition = LowRankTransition(log_left, log_right)
    dense = low_rank_dense(log_left, log_right)
    log_alpha = torch.randn(2, K, generator=gen, dtype=F64).log_softmax(-1)
    following = torch.tensor([1, 3]).expand(n, 2)
    draws = transition.sample_previous(log_alpha, following, 1, torch.Generator().manual_seed(4))
    for b, j in enumerate([1, 3]):
        expected = torch.softmax(log_alpha[b] + dense[:, j], 0)
        freq = torch.bincount(draws[:, b], minlength=K).double() / n
        bound = 5 * torch.sqrt(torch.clamp(expected * (1 - expected), min=1.0 / n) / n)
        assert ((freq - expected).abs() <= bound).all(), (freq, expected)
    nexts = transition.sample_next(torch.full((n,), 2), torch.Generator().manual_seed(5))
    expected = torch.exp(dense[2])
    freq = torch.bincount(nexts, minlength=K).double() / n
    bound = 5 * torch.sqrt(torch.clamp(expected * (1 - expected), min=1.0 / n) / n)
    assert ((freq - expected).abs() <= bound).all(), (freq, expected)


def test_detach_to_select_rows_and_padding():
    gen = torch.Generator().manual_seed(6)
    log_left, log_right = (x.requires_grad_() for x in random_low_rank(gen, 3, 2))
    low_rank = LowRankTransition(log_left, log_right)
    assert low_rank.requires_grad and not low_rank.detach().requires_grad
    assert low_rank.to(torch.float32).dtype == torch.float32 and low_rank.to(F64) is low_rank
    assert low_rank.select_rows(torch.tensor([0])) is low_rank
    time_varying = DenseTransition(torch.randn(2, 3, 3, 3, generator=gen))
    edges = torch.tensor([[True, False, False], [True, True, True]])
    cleared = time_varying.without_padding(edges).log
    assert (cleared[0, 1:] == 0).all() and torch.equal(cleared[1], time_varying.log[1])
    assert torch.equal(time_varying.select_rows(torch.tensor([1])).log, time_varying.log[1:])
    shared = DenseTransition(torch.zeros(3, 3))
    assert shared.without_padding(edges) is shared


def test_bad_transitions_raise_value_error_naming_the_shapes():
    with pytest.raises(ValueError, match="share r"):
        LowRankTransition(torch.zeros(3, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="log_left"):
        LowRankTransition(torch.zeros(3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"K=4.*\(3, 2\)"):
        LowRankTransition(torch.zeros(3, 2), torch.zeros(2, 3)).check_shape(1, 2, 4)
    with pytest.raises(ValueError, match="trans"):
        DenseTransition(torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        LowRankTransition(torch.full((3, 2), float("nan")), torch.zeros(2, 3)).check_finite()
