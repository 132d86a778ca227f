"""ChainPosterior over a LowRankTransition: every member against the dense equivalent and enumeration.

The low-rank chain ``trans[i, j] = log sum_c exp(log_left[i, c] + log_right[c, j])`` must be the
same distribution as the dense chain of that matrix, and the members that promise not to
densify (log_partition, marginals, final_filter, sample, log_prob) must run with
``LowRankTransition.dense`` disabled.
"""

from __future__ import annotations

import pytest
import torch
from chain_oracle import F64, Enumeration, low_rank_dense, padding_mask, random_chain, random_low_rank

from latentnlp import ChainPosterior, LowRankTransition

METHODS = ("scaled", "log", "auto")  # "scan" is dense by design


def low_rank_case(seed, B=3, T=4, K=3, r=2, zeros=False):
    gen = torch.Generator().manual_seed(seed)
    init, _, emit, _ = random_chain(gen, B, T, K, init_kind="batched", zeros=zeros)
    log_left, log_right = random_low_rank(gen, K, r, zeros=zeros)
    lengths = torch.tensor([T] + [min(b, T) for b in range(1, B)])
    return init, log_left, log_right, emit, lengths


@pytest.fixture
def no_densify(monkeypatch):
    def refuse(self):
        raise AssertionError("LowRankTransition.dense called")

    monkeypatch.setattr(LowRankTransition, "dense", refuse)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_low_rank_members_match_enumeration_without_densifying(method, zeros, seed, monkeypatch):
    init, log_left, log_right, emit, lengths = low_rank_case(seed, zeros=zeros)
    ref = Enumeration(init, low_rank_dense(log_left, log_right), emit, lengths)
    d = ChainPosterior(init, LowRankTransition(log_left, log_right), emit, lengths, method=method)
    expected_entropy = ref.entropy()
    paths = torch.randint(3, (5, 3, 4), generator=torch.Generator().manual_seed(seed))
    expected_log_prob = ref.log_prob(paths)

    def refuse(self):
        raise AssertionError("LowRankTransition.dense called")

    with monkeypatch.context() as patch:
        patch.setattr(LowRankTransition, "dense", refuse)
        torch.testing.assert_close(d.log_partition, ref.log_partition)
        torch.testing.assert_close(d.marginals, ref.marginals)
        torch.testing.assert_close(d.log_prob(paths), expected_log_prob)
        last = ref.marginals[torch.arange(3), lengths - 1]  # p(z_{L-1} | x) = the last filter
        torch.testing.assert_close(d.final_filter, last)
        d.sample((3,), generator=torch.Generator().manual_seed(0))
    # the members that densify, documented as such
    torch.testing.assert_close(d.entropy(), expected_entropy)
    torch.testing.assert_close(d.edge_marginals, ref.edge_marginals)
    torch.testing.assert_close(d.max, ref.max)


@pytest.mark.parametrize("method", METHODS)
def test_low_rank_gradients_match_the_dense_chain(method):
    init, log_left, log_right, emit, lengths = low_rank_case(2, B=3, T=5, K=4, r=3)
    params = [p.clone().requires_grad_() for p in (init, log_left, log_right, emit)]
    d = ChainPosterior(params[0], LowRankTransition(params[1], params[2]), params[3], lengths, method=method)
    got = torch.autograd.grad(d.log_partition.sum(), params)
    ref_params = [p.clone().requires_grad_() for p in (init, log_left, log_right, emit)]
    ref = Enumeration(ref_params[0], low_rank_dense(ref_params[1], ref_params[2]), ref_params[3], lengths)
    expected = torch.autograd.grad(ref.log_partition.sum(), ref_params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert torch.autograd.gradcheck(
        lambda a, b, c, e: ChainPosterior(a, LowRankTransition(b, c), e, lengths, method=method).log_partition,
        [p.clone().requires_grad_() for p in (init, log_left, log_right, emit)],
    )


def test_low_rank_samples_match_enumeration(no_densify):
    """FFBS through the rank: path frequencies within 5 binomial standard errors (fixed seed)."""
    init, log_left, log_right, emit, _ = low_rank_case(3, B=2, T=3, K=3, r=2)
    lengths = torch.tensor([3, 2])
    d = ChainPosterior(init, LowRankTransition(log_left, log_right), emit, lengths)
    n = 40000
    samples = d.sample((n,), generator=torch.Generator().manual_seed(7))
    assert (samples[:, padding_mask(lengths, 3)] == 0).all()
    ref = Enumeration(init, low_rank_dense(log_left, log_right), emit, lengths)
    for b in range(2):
        p = ref.probs(b)
        counts = torch.bincount(ref.path_index(b, samples[:, b]), minlength=p.shape[0]).to(F64)
        bound = 5 * torch.sqrt(torch.clamp(p * (1 - p), min=1.0 / n) / n)
        assert ((counts / n - p).abs() <= bound).all()


def test_low_rank_equals_the_dense_chain_of_its_matrix():
    init, log_left, log_right, emit, lengths = low_rank_case(4, B=4, T=6, K=5, r=2)
    low = ChainPosterior(init, LowRankTransition(log_left, log_right), emit, lengths)
    dense = ChainPosterior(init, low_rank_dense(log_left, log_right), emit, lengths)
    for name in ("log_partition", "marginals", "final_filter", "argmax"):
        torch.testing.assert_close(getattr(low, name), getattr(dense, name), msg=name)
    torch.testing.assert_close(low.kbest(3)[1], dense.kbest(3)[1])
    torch.testing.assert_close(low.log_prob(dense.argmax), dense.log_prob(dense.argmax))
    assert "LowRankTransition((5, 2), (2, 5))" in repr(low)
