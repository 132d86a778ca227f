"""FeatureHMM (``latentnlp.models.feature_hmm``): the features of a word are those documented;
``log p(x)`` and its gradient equal a float64 enumeration of every state path; with identity
features only, one EM step's initial and transition probabilities equal Baum-Welch's closed form
and its emissions converge to Baum-Welch's; EM never lowers the log-likelihood; bad input is a
``ValueError`` naming the argument."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from latentnlp import baum_welch
from latentnlp.models import FeatureHMM
from latentnlp.models.feature_hmm import features_of, word_features, word_shape

pytestmark = pytest.mark.usefixtures("float64")

WORDS = ["the", "cat", "cats", "dog", "dogs", "ran", "running", "1990s", "well-known", "U.S.", "<eos>"]


def random_batch(seed: int, v: int, n: int, steps: int) -> dict:
    """``n`` random sequences with lengths in ``1..steps`` (one full), padding holding id 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (n,), generator=g)
    lengths[0] = steps
    targets = torch.randint(0, v, (n, steps), generator=g).masked_fill(torch.arange(steps) >= lengths[:, None], 0)
    return {"targets": targets, "lengths": lengths}


# ---- features ------------------------------------------------------------------------------------
def test_features_of_a_word_as_documented():
    assert word_shape("McDonald's") == "XxXx'x" and word_shape("1990s") == "dx" and word_shape("U.S.") == "X.X."
    assert features_of("1990s") == [
        "word=1990s",
        "suffix=s",
        "suffix=0s",
        "suffix=90s",
        "shape=dx",
        "has-digit",
    ]
    assert features_of("well-known") == [
        "word=well-known",
        "suffix=n",
        "suffix=wn",
        "suffix=own",
        "shape=x-x",
        "has-hyphen",
    ]
    assert features_of("ran") == ["word=ran", "suffix=n", "suffix=an", "shape=x"]  # not its own suffix
    assert features_of("<eos>") == ["word=<eos>"]  # a special token: identity only
    assert features_of("cats", kinds=("identity",)) == ["word=cats"]
    assert features_of("cats", kinds=("suffix",), suffix_lengths=(2,)) == ["suffix=ts"]
    with pytest.raises(ValueError, match="kinds"):
        features_of("cats", kinds=("prefix",))


def test_feature_matrix_rows_are_the_words_features():
    names, matrix = word_features(WORDS)
    dense = matrix.to_dense()
    assert dense.shape == (len(WORDS), len(names)) and set(dense.unique().tolist()) == {0.0, 1.0}
    for v, word in enumerate(WORDS):
        assert sorted(names[f] for f in dense[v].nonzero().flatten().tolist()) == sorted(features_of(word))
    assert names.index("suffix=s") < names.index("suffix=ts")  # first appearance order
    with pytest.raises(ValueError, match="no feature"):
        word_features(["<eos>"], kinds=("suffix",))


# ---- the exact marginal ----------------------------------------------------------------------------
def brute_force_log_marginal(log_params: dict, targets, lengths):
    """``log sum_z p(x, z)`` by enumerating every state path of each row, float64: ``[B]``."""
    init, trans, emission = log_params["init"], log_params["trans"], log_params["emission"]
    k = init.shape[0]
    out = []
    for row, length in zip(targets, lengths.tolist()):
        scores = []
        for path in itertools.product(range(k), repeat=length):
            s = init[path[0]] + emission[path[0], row[0]]
            for t in range(1, length):
                s = s + trans[path[t - 1], path[t]] + emission[path[t], row[t]]
            scores.append(s)
        out.append(torch.logsumexp(torch.stack(scores), 0))
    return torch.stack(out)


def test_log_marginal_and_its_gradient_equal_enumeration():
    torch.manual_seed(0)
    model = FeatureHMM(WORDS, num_states=3)
    batch = random_batch(1, len(WORDS), n=4, steps=5)
    exact = model.log_marginal(batch)
    oracle = brute_force_log_marginal(model.log_parameters(), batch["targets"], batch["lengths"])
    torch.testing.assert_close(exact, oracle, rtol=1e-10, atol=1e-10)
    params = list(model.parameters())
    ours = torch.autograd.grad(exact.sum(), params)
    theirs = torch.autograd.grad(oracle.sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # padding contents never matter
    other = dict(batch, targets=batch["targets"].masked_fill(torch.arange(5) >= batch["lengths"][:, None], 7))
    torch.testing.assert_close(model.log_marginal(other), exact, rtol=0, atol=0)


# ---- EM ----------------------------------------------------------------------------------------------
def test_identity_features_em_step_is_baum_welch():
    """Identity features only: the model is the categorical HMM, so the E-step counts are Baum-Welch's,
    the closed-form part of the M-step is Baum-Welch's update, and the L-BFGS emission M-step
    converges to Baum-Welch's normalised counts."""
    torch.manual_seed(2)
    words = [f"w{i}" for i in range(8)]
    batch = random_batch(3, len(words), n=12, steps=6)
    model = FeatureHMM(words, num_states=3, kinds=("identity",))
    start = model.hmm_parameters()
    expected = baum_welch.m_step(baum_welch.e_step(start, batch["targets"], batch["lengths"]))
    step = model.em_step(batch, max_iterations=200, tolerance=1e-14)
    after = model.hmm_parameters()
    assert step.log_likelihood == pytest.approx(float(baum_welch.e_step(start, **_words(batch)).log_likelihood))
    torch.testing.assert_close(after.init_probs, expected.init_probs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after.trans_probs, expected.trans_probs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after.emission_probs, expected.emission_probs, rtol=0, atol=1e-6)
    # fewer L-BFGS iterations land further from the closed form: the emissions converge to it
    gaps = []
    for iterations in (1, 3, 200):
        again = FeatureHMM(words, num_states=3, kinds=("identity",))
        again.load_state_dict(_start_state(start))
        again.em_step(batch, max_iterations=iterations, tolerance=1e-14)
        gaps.append(float((again.hmm_parameters().emission_probs - expected.emission_probs).abs().max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-6, gaps


def _words(batch: dict) -> dict:
    return {"words": batch["targets"], "lengths": batch["lengths"]}


def _start_state(params: baum_welch.HMMParameters) -> dict:
    """A state dict whose probabilities are ``params`` (identity features: the weights are the log
    emission probabilities)."""
    return {
        "init_logits": params.init_probs.log(),
        "trans_logits": params.trans_probs.log(),
        "emission_weights": params.emission_probs.log(),
    }


@pytest.mark.parametrize("seed", range(3))
def test_em_never_decreases_the_log_likelihood(seed):
    """Every feature kind, a short M-step (5 L-BFGS iterations): each step is a generalised EM step,
    so ``log p(x)`` never falls by more than float64 rounding (relative 1e-12)."""
    torch.manual_seed(seed)
    model = FeatureHMM(WORDS, num_states=4)
    batch = random_batch(seed, len(WORDS), n=15, steps=8)
    trajectory = []
    for _ in range(8):
        step = model.em_step(batch, max_iterations=5)
        assert step.emission_objective[1] >= step.emission_objective[0]
        trajectory.append(step.log_likelihood)
    trajectory.append(float(model.log_marginal(batch).sum().detach()))
    for before, after in zip(trajectory, trajectory[1:]):
        assert after >= before - 1e-12 * abs(before), trajectory
    assert trajectory[-1] > trajectory[0] + 1.0


def test_em_with_priors_never_decreases_the_log_posterior():
    """With transition pseudo-counts ``c`` and a weight penalty ``l2`` the objective EM climbs is
    ``log p(x) + c (sum log pi + sum log A) - l2 / 2 ||w||^2``."""
    torch.manual_seed(3)
    model = FeatureHMM(WORDS, num_states=3)
    batch = random_batch(7, len(WORDS), n=10, steps=6)

    l2, smoothing = 0.5, 0.3
    transition_prior = baum_welch.DirichletSmoothing(smoothing, smoothing, 0.0)

    def log_posterior() -> float:
        penalty = 0.5 * l2 * model.emission_weights.pow(2).sum()
        prior = baum_welch.log_prior(model.hmm_parameters(), transition_prior)
        return float((model.log_marginal(batch).sum() + prior - penalty).detach())

    trajectory = [log_posterior()]
    for _ in range(6):
        model.em_step(batch, l2=l2, smoothing=smoothing, max_iterations=5)
        trajectory.append(log_posterior())
    for before, after in zip(trajectory, trajectory[1:]):
        assert after >= before - 1e-12 * abs(before), trajectory


def test_em_over_batches_sums_their_counts():
    torch.manual_seed(4)
    batch = random_batch(5, len(WORDS), n=6, steps=5)
    halves = [{name: x[:3] for name, x in batch.items()}, {name: x[3:] for name, x in batch.items()}]
    one, two = FeatureHMM(WORDS, num_states=2), FeatureHMM(WORDS, num_states=2)
    two.load_state_dict(one.state_dict())
    a, b = one.em_step(batch), two.em_step(halves)
    assert a.log_likelihood == pytest.approx(b.log_likelihood, rel=1e-12)
    for p, q in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    model = FeatureHMM(WORDS, num_states=2)
    batch = random_batch(0, len(WORDS), n=3, steps=4)
    with pytest.raises(ValueError, match=r"batch\['targets'\] must lie in 0..V-1"):
        model.log_marginal(dict(batch, targets=batch["targets"] + len(WORDS)))
    with pytest.raises(ValueError, match=r"batch\['lengths'\] must lie in 1..T"):
        model.log_marginal(dict(batch, lengths=batch["lengths"] * 0))
    with pytest.raises(ValueError, match=r"batch\['lengths'\] must be an integer tensor of shape \[B\]"):
        model.log_marginal(dict(batch, lengths=batch["lengths"][:2]))
    with pytest.raises(ValueError, match="num_states"):
        FeatureHMM(WORDS, num_states=0)
    counts = model.expected_counts(batch)
    with pytest.raises(ValueError, match=r"counts must have .* K = 2, V = 11"):
        model.m_step(dataclasses.replace(counts, emission=counts.emission[:, :3]))
    with pytest.raises(ValueError, match="smoothing and l2"):
        model.m_step(counts, smoothing=-1.0)
    with pytest.raises(ValueError, match="smoothing and l2"):
        model.m_step(counts, l2=-1.0)
    with pytest.raises(ValueError, match="at least one batch"):
        model.em_step([])
