"""Baum-Welch (``latentnlp.baum_welch``): EM never decreases its objective; one step equals the
closed form computed from expected counts by enumerating every state path; the trajectory and the
final parameters agree with hmmlearn's ``CategoricalHMM`` from the same start; bad input is a
``ValueError`` naming the argument."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

from latentnlp import baum_welch as bw
from latentnlp.structures import ChainPosterior

pytestmark = pytest.mark.usefixtures("float64")


def random_batch(seed: int, k: int, v: int, n: int, steps: int, dtype=torch.float64):
    """Parameters from a flat Dirichlet, ``n`` sequences of random words with lengths in ``1..steps``
    (one of full length), and padding holding ids outside the vocabulary (it must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    params = bw.random_parameters(k, v, generator=g, dtype=dtype)
    lengths = torch.randint(1, steps + 1, (n,), generator=g)
    lengths[0] = steps
    words = torch.randint(0, v, (n, steps), generator=g)
    words[torch.arange(steps) >= lengths[:, None]] = v + 3
    return params, words, lengths


# ---- the objective never decreases ---------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_log_likelihood_never_decreases(seed):
    params, words, lengths = random_batch(seed, k=5, v=12, n=20, steps=15)
    result = bw.fit(params, words, lengths, iterations=30, tol=float("-inf"))
    ll = result.log_likelihood
    assert ll.shape == (30,) and not result.converged
    assert torch.equal(result.log_posterior, ll)
    assert (ll.diff() >= -1e-9 * ll.abs()[1:]).all(), ll.diff()
    assert ll[-1] > ll[0]


@pytest.mark.parametrize("seed", range(3))
def test_log_posterior_never_decreases_with_smoothing(seed):
    params, words, lengths = random_batch(seed, k=4, v=10, n=15, steps=12)
    smoothing = bw.DirichletSmoothing(init=0.5, trans=1.0, emission=torch.linspace(0.1, 2.0, 10))
    result = bw.fit(params, words, lengths, iterations=25, tol=float("-inf"), smoothing=smoothing)
    lp = result.log_posterior
    assert (lp.diff() >= -1e-9 * lp.abs()[1:]).all(), lp.diff()
    prior = bw.log_prior(params, smoothing)
    assert lp[0] == pytest.approx(float(result.log_likelihood[0] + prior), rel=1e-12)


def test_float32_trajectory_follows_float64():
    params, words, lengths = random_batch(0, k=6, v=20, n=30, steps=25)
    exact = bw.fit(params, words, lengths, iterations=15, tol=float("-inf"))
    single = bw.fit(bw.HMMParameters(*(p.float() for p in params)), words, lengths, 15, float("-inf"))
    assert single.params.trans_probs.dtype == torch.float32
    torch.testing.assert_close(single.log_likelihood, exact.log_likelihood, rtol=1e-5, atol=0)


def test_fit_stops_when_improvement_is_below_tol():
    params, words, lengths = random_batch(1, k=3, v=6, n=10, steps=8)
    result = bw.fit(params, words, lengths, iterations=500, tol=1e-3)
    assert result.converged and len(result.log_likelihood) < 500
    assert result.log_likelihood[-1] - result.log_likelihood[-2] < 1e-3


# ---- one step equals the closed form by enumeration ----------------------------------------------
def enumerated_counts(params, words, lengths):
    """Expected counts and log-likelihood by listing all ``K**L`` paths of each sequence (float64)."""
    init, trans, emission = (p.double() for p in params)
    k, v = emission.shape
    counts = [torch.zeros(k), torch.zeros(k, k), torch.zeros(k, v)]
    log_likelihood = 0.0
    for x, length in zip(words.tolist(), lengths.tolist()):
        x = x[:length]
        paths = list(itertools.product(range(k), repeat=length))
        joint = torch.tensor(
            [
                float(init[z[0]])
                * float(np.prod([float(trans[z[t - 1], z[t]]) for t in range(1, length)]))
                * float(np.prod([float(emission[z[t], x[t]]) for t in range(length)]))
                for z in paths
            ]
        )
        evidence = joint.sum()
        log_likelihood += float(evidence.log())
        for z, weight in zip(paths, (joint / evidence).tolist()):
            counts[0][z[0]] += weight
            for t in range(1, length):
                counts[1][z[t - 1], z[t]] += weight
            for t in range(length):
                counts[2][z[t], x[t]] += weight
    return counts, log_likelihood


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("smoothing", [None, 0.3])
def test_one_step_equals_enumeration(seed, smoothing):
    params, words, lengths = random_batch(seed, k=3, v=4, n=4, steps=5)
    (init, trans, emission), log_likelihood = enumerated_counts(params, words, lengths)
    counts = bw.e_step(params, words, lengths)
    torch.testing.assert_close(counts.init, init)
    torch.testing.assert_close(counts.trans, trans)
    torch.testing.assert_close(counts.emission, emission)
    assert float(counts.log_likelihood) == pytest.approx(log_likelihood, rel=1e-12)
    assert float(counts.init.sum()) == pytest.approx(len(lengths))
    assert float(counts.trans.sum()) == pytest.approx(float((lengths - 1).sum()))
    assert float(counts.emission.sum()) == pytest.approx(float(lengths.sum()))

    c = 0.0 if smoothing is None else smoothing
    expected = [(x + c) / (x + c).sum(-1, keepdim=True) for x in (init, trans, emission)]
    updated = bw.m_step(counts, smoothing)
    for got, want in zip(updated, expected):
        torch.testing.assert_close(got, want)
    first = bw.fit(params, words, lengths, iterations=1, smoothing=smoothing)
    for got, want in zip(first.params, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", ["scaled", "log"])
def test_counts_agree_across_chain_algorithms(method):
    params, words, lengths = random_batch(6, k=5, v=8, n=7, steps=10)
    auto, other = bw.e_step(params, words, lengths), bw.e_step(params, words, lengths, method=method)
    for name in ("init", "trans", "emission", "log_likelihood"):
        torch.testing.assert_close(getattr(other, name), getattr(auto, name))


def test_counts_of_batches_add_up():
    params, words, lengths = random_batch(2, k=4, v=9, n=10, steps=11)
    whole = bw.e_step(params, words, lengths)
    parts = bw.e_step(params, words[:6], lengths[:6]) + bw.e_step(params, words[6:], lengths[6:])
    for got, want in zip(
        (parts.init, parts.trans, parts.emission, parts.log_likelihood),
        (whole.init, whole.trans, whole.emission, whole.log_likelihood),
    ):
        torch.testing.assert_close(got, want)


def test_padding_is_ignored():
    params, words, lengths = random_batch(3, k=3, v=5, n=6, steps=7)
    padded = torch.cat([words, torch.full((6, 4), -7)], 1)
    a, b = bw.e_step(params, words, lengths), bw.e_step(params, padded, lengths)
    torch.testing.assert_close(a.emission, b.emission)
    torch.testing.assert_close(a.trans, b.trans)
    torch.testing.assert_close(a.log_likelihood, b.log_likelihood)


def test_transition_counts_never_build_edge_marginals(monkeypatch):
    def refuse(self):
        raise AssertionError("edge_marginals was built")

    monkeypatch.setattr(ChainPosterior, "edge_marginals", property(refuse))
    params, words, lengths = random_batch(4, k=4, v=6, n=5, steps=9)
    with torch.no_grad():  # the E-step needs no gradient mode from its caller
        counts = bw.e_step(params, words, lengths)
    assert float(counts.trans.sum()) == pytest.approx(float((lengths - 1).sum()))


def test_single_position_sequences_and_unvisited_states():
    params, _, _ = random_batch(5, k=3, v=4, n=1, steps=1)
    words = torch.tensor([[0], [2]])
    counts = bw.e_step(params, words)
    assert torch.equal(counts.trans, torch.zeros(3, 3))
    updated = bw.m_step(counts)  # no transition was observed: every row of trans_probs is uniform
    torch.testing.assert_close(updated.trans_probs, torch.full((3, 3), 1 / 3))
    # a state the posterior never visits keeps normalised (uniform) rows, and EM goes on from there
    params = bw.HMMParameters(torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 0.0], [0.5, 0.5]]), params[2][:2])
    result = bw.fit(params, torch.tensor([[0, 1, 3]]), iterations=3, tol=float("-inf"))
    torch.testing.assert_close(result.params.emission_probs[1], torch.full((4,), 0.25))
    assert torch.isfinite(result.log_likelihood).all()


# ---- hmmlearn, from the same start ---------------------------------------------------------------
def hmmlearn_fit(params, words, lengths, iterations, smoothing=0.0):
    hmm = pytest.importorskip("hmmlearn.hmm")
    k, v = params.emission_probs.shape
    model = hmm.CategoricalHMM(
        n_components=k,
        n_features=v,
        init_params="",
        params="ste",
        n_iter=iterations,
        tol=-np.inf,
        startprob_prior=1.0 + smoothing,
        transmat_prior=1.0 + smoothing,
        emissionprob_prior=1.0 + smoothing,
    )
    model.startprob_, model.transmat_, model.emissionprob_ = (p.numpy().copy() for p in params)
    x = np.concatenate([words[i, :length].numpy() for i, length in enumerate(lengths.tolist())])[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hmmlearn's note on few data points per parameter
        model.fit(x, lengths.numpy())
    return model


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("smoothing", [0.0, 0.5])
def test_agrees_with_hmmlearn(seed, smoothing):
    params, words, lengths = random_batch(seed, k=6, v=15, n=25, steps=20)
    model = hmmlearn_fit(params, words, lengths, iterations=20, smoothing=smoothing)
    result = bw.fit(params, words, lengths, iterations=20, tol=float("-inf"), smoothing=smoothing or None)
    # hmmlearn's history is the log-likelihood of the parameters before each update
    np.testing.assert_allclose(result.log_likelihood.numpy(), model.monitor_.history, rtol=1e-10)
    np.testing.assert_allclose(result.params.init_probs.numpy(), model.startprob_, atol=1e-9)
    np.testing.assert_allclose(result.params.trans_probs.numpy(), model.transmat_, atol=1e-9)
    np.testing.assert_allclose(result.params.emission_probs.numpy(), model.emissionprob_, atol=1e-9)


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    params, words, lengths = random_batch(0, k=3, v=5, n=4, steps=6)
    with pytest.raises(ValueError, match="words must hold ids in 0..V-1"):
        bw.e_step(params, torch.where(words < 5, words, 0).index_fill(1, torch.tensor([0]), 5), lengths)
    with pytest.raises(ValueError, match="words must be an integer tensor"):
        bw.e_step(params, words.double(), lengths)
    with pytest.raises(ValueError, match="lengths must lie in 1..T"):
        bw.fit(params, words, torch.tensor([6, 7, 1, 1]))
    with pytest.raises(ValueError, match="lengths must lie in 1..T"):
        bw.e_step(params, words, torch.tensor([0, 6, 1, 1]))
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor of shape \[N\]"):
        bw.e_step(params, words, lengths[:3])
    with pytest.raises(ValueError, match="params.trans_probs must be normalised"):
        bw.e_step(params._replace(trans_probs=params.trans_probs * 1.1), words, lengths)
    with pytest.raises(ValueError, match="params.emission_probs must hold probabilities"):
        bw.fit(params._replace(emission_probs=params.emission_probs - 0.5), words, lengths)
    with pytest.raises(ValueError, match="params.init_probs must have shape"):
        bw.e_step(params._replace(init_probs=params.init_probs[:2]), words, lengths)
    with pytest.raises(ValueError, match="params.emission_probs must have shape"):
        bw.e_step(params._replace(emission_probs=params.emission_probs[:2]), words, lengths)
    with pytest.raises(ValueError, match="smoothing.trans must be finite pseudo-counts"):
        bw.fit(params, words, lengths, smoothing=bw.DirichletSmoothing(trans=-1.0))
    with pytest.raises(ValueError, match="smoothing.emission must broadcast"):
        bw.m_step(bw.e_step(params, words, lengths), bw.DirichletSmoothing(emission=torch.ones(7)))
    with pytest.raises(ValueError, match="iterations must be"):
        bw.fit(params, words, lengths, iterations=0)
    impossible = params._replace(emission_probs=torch.cat([params.emission_probs[:, :4], torch.zeros(3, 1)], 1))
    impossible = impossible._replace(emission_probs=impossible.emission_probs / impossible.emission_probs.sum(-1, True))
    words = torch.where(words == 4, 0, words)
    words[1, 0] = 4  # the one word no state emits, in one sequence
    with pytest.raises(ValueError, match=r"words: sequences \[1\] have probability zero"):
        bw.fit(impossible, words, lengths)
    counts = bw.e_step(params, words, lengths)
    with pytest.raises(ValueError, match="counts.init must be finite and >= 0"):
        bw.m_step(bw.ExpectedCounts(-counts.init, counts.trans, counts.emission, counts.log_likelihood))


def test_without_validation_only_shapes_are_checked():
    params, words, lengths = random_batch(0, k=3, v=5, n=4, steps=6)
    unnormalised = params._replace(trans_probs=params.trans_probs * 1.1)
    bw.e_step(unnormalised, words, lengths, validate_args=False)  # no value check, no error
    with pytest.raises(ValueError, match="params.trans_probs must have shape"):
        bw.e_step(params._replace(trans_probs=params.trans_probs[:2]), words, lengths, validate_args=False)
