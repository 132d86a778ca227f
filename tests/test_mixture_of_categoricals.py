"""MixtureOfCategoricals against brute force: the marginal, the posterior, the ELBO, every
estimator's gradient (Monte Carlo against the enumerated one), Gumbel-softmax's bias, and EM."""

import math
from itertools import product

import pytest
import torch
from gradient_draws import assert_unbiased, exact_gradient, gradient_draws, relative_variance, repeat_batch

from latentnlp.models import BernoulliFactorModel, MixtureOfCategoricals
from latentnlp.models.bag_of_words import BagOfWordsModel

pytestmark = pytest.mark.usefixtures("float64")

COUNTS = [[3, 0, 1, 0, 2, 0], [0, 1, 0, 4, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 5, 0, 0, 1]]


def _model(**kwargs):
    torch.manual_seed(0)
    model = MixtureOfCategoricals(6, 3, hidden_size=4, **kwargs)
    with torch.no_grad():  # well away from uniform, so the estimators have something to find
        model.emission_logits.mul_(10.0)
        model.prior_logits.copy_(torch.tensor([0.5, -0.3, 0.1]))
    return model


def _batch():
    return {"counts": torch.tensor(COUNTS, dtype=torch.float64)}


def _tokens(row):
    return [v for v, n in enumerate(row) for _ in range(n)]


def _brute_joint(model):
    """``p(x_d, z = k)`` as a product of probabilities over the document's tokens, ``[D, K]``."""
    pi = torch.softmax(model.prior_logits, -1).tolist()
    beta = torch.softmax(model.emission_logits, -1).tolist()
    return torch.tensor([[pi[k] * math.prod(beta[k][v] for v in _tokens(row)) for k in range(3)] for row in COUNTS])


def test_log_marginal_and_posterior_equal_brute_force():
    model = _model()
    joint = _brute_joint(model)
    torch.testing.assert_close(model.log_marginal(_batch()), joint.sum(-1).log())
    torch.testing.assert_close(model.posterior(_batch()).probs, joint / joint.sum(-1, keepdim=True))
    # loss(marginal) is per token, tokens = document lengths
    loss = model.loss(_batch(), "marginal")
    torch.testing.assert_close(loss.metrics["tokens"], torch.tensor([6.0, 6.0, 6.0, 6.0]))
    torch.testing.assert_close(loss.value, -joint.sum(-1).log().sum() / 24)


def test_exact_elbo_is_log_marginal_minus_kl_to_the_posterior():
    model = _model()
    q = model.q(_batch()).probs
    post = model.posterior(_batch()).probs
    bound = model.elbo(_batch(), estimator="exact")
    expected = model.log_marginal(_batch()) - (q * (q.log() - post.log())).sum(-1)
    torch.testing.assert_close(bound.value, expected.detach())
    torch.testing.assert_close(bound.surrogate, expected)
    kl = (q * (q.log() - torch.log_softmax(model.prior_logits, -1))).sum(-1)
    torch.testing.assert_close(bound.kl, kl.detach())


SCORE_FUNCTION_VARIANTS = [
    {},
    {"baseline": "running-mean"},
    {"baseline": "learned"},
    {"baseline": "leave-one-out", "num_samples": 2},
    {"control_variate": True},
    {"baseline": "learned", "control_variate": True},
]


@pytest.mark.parametrize("variant", SCORE_FUNCTION_VARIANTS, ids=lambda v: "-".join(map(str, v.values())) or "plain")
def test_score_function_gradient_is_unbiased(variant):
    model = _model(learned_baseline=True)
    exact = exact_gradient(model, _batch())
    draws = gradient_draws(model, _batch(), {"estimator": "score_function", **variant}, reps=100, copies=40)
    assert_unbiased(draws, exact)


def _train_baseline(model, steps=40):
    """Fit the learned baseline alone, at fixed model parameters, by its regression loss."""
    opt = torch.optim.Adam(model.baseline.parameters(), lr=0.05)
    big = repeat_batch(_batch(), 32)
    for _ in range(steps):
        bound = model.elbo(big, estimator="score_function", baseline="learned")
        opt.zero_grad()
        (-bound.surrogate.sum() / 32).backward()  # the baseline's gradient is that of -regression loss
        opt.step()


def test_baselines_reduce_variance():
    model = _model(learned_baseline=True)
    exact = exact_gradient(model, _batch(), ["encoder."])
    _train_baseline(model)
    variance = {
        name: relative_variance(
            gradient_draws(model, _batch(), kwargs, reps=60, copies=10, seed=3, names=["encoder."]), exact
        )
        for name, kwargs in {
            "none": {"estimator": "score_function"},
            "learned": {"estimator": "score_function", "baseline": "learned"},
            "learned+cv": {"estimator": "score_function", "baseline": "learned", "control_variate": True},
        }.items()
    }
    assert variance["learned"] < 0.05 * variance["none"], variance
    assert variance["learned+cv"] < 0.05 * variance["none"], variance


def test_running_mean_follows_the_per_token_signal_in_training_mode_only():
    model = _model()
    big = repeat_batch(_batch(), 50)
    model.eval()
    model.elbo(big, estimator="score_function", baseline="running-mean")
    assert int(model.running_updates) == 0
    model.train()
    for _ in range(60):
        model.elbo(big, estimator="score_function", baseline="running-mean")
    per_token = (model.elbo(big, estimator="exact").reconstruction / 6.0).mean()
    assert int(model.running_updates) == 60
    assert abs(float(model.running_mean()) - float(per_token)) < 0.05 * abs(float(per_token))


def test_gumbel_softmax_bias_shrinks_with_temperature():
    model = _model()
    exact_value = model.elbo(_batch(), estimator="exact").reconstruction
    big = repeat_batch(_batch(), 4000)
    torch.manual_seed(0)

    def value_bias(tau, hard):
        value = model.elbo(big, estimator="gumbel_softmax", tau=tau, hard=hard).reconstruction
        return float((value.view(4000, 4).mean(0) - exact_value).abs().max())

    biases = [value_bias(tau, False) for tau in (2.0, 1.0, 0.3, 0.1)]
    assert all(a > b for a, b in zip(biases, biases[1:])), biases
    # straight-through: exact one-hot samples, so an unbiased value: within 4 standard errors of
    # the 4000 draws per document, and far below the relaxed bias at the same temperature
    draws = model.elbo(big, estimator="gumbel_softmax", tau=1.0, hard=True).reconstruction.detach().view(4000, 4)
    standard_error = draws.std(0) / math.sqrt(4000)
    assert ((draws.mean(0) - exact_value).abs() < 4 * standard_error).all(), (draws.mean(0), exact_value)
    assert float(4 * standard_error.max()) < biases[1]

    exact = exact_gradient(model, _batch())
    grad_bias = []
    for tau in (1.0, 0.1):
        draws = gradient_draws(model, _batch(), {"estimator": "gumbel_softmax", "tau": tau}, reps=100, copies=40)
        grad_bias.append(float((draws.mean(0) - exact).pow(2).sum() / exact.pow(2).sum()))
    assert grad_bias[1] < 0.2 * grad_bias[0], grad_bias


def test_em_step_equals_the_closed_form():
    model = _model()
    joint = _brute_joint(model)
    r = joint / joint.sum(-1, keepdim=True)  # responsibilities [D, K]
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    smoothing = 0.5
    pi = (r.sum(0) + smoothing) / (r.sum() + 3 * smoothing)
    words = r.t() @ counts + smoothing
    beta = words / words.sum(-1, keepdim=True)
    before = model.em_step(_batch(), smoothing=smoothing)
    torch.testing.assert_close(before, joint.sum(-1).log().sum())
    torch.testing.assert_close(torch.softmax(model.prior_logits, -1), pi)
    torch.testing.assert_close(torch.softmax(model.emission_logits, -1), beta)
    # counts of two halves add up to those of the whole
    a = model.expected_counts({"counts": counts[:2]})
    b = model.expected_counts({"counts": counts[2:]})
    whole = model.expected_counts(_batch())
    for x, y in zip(a + b, whole):
        torch.testing.assert_close(x, y)


def test_em_never_decreases_the_log_likelihood():
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 4, (40, 10), generator=g).double()
    torch.manual_seed(1)
    model = MixtureOfCategoricals(10, 4, hidden_size=4)
    history = [float(model.em_step({"counts": counts})) for _ in range(30)]
    assert all(b >= a - 1e-9 for a, b in zip(history, history[1:])), history
    assert history[-1] > history[0] + 1.0
    # maximum likelihood leaves unseen words at probability 0: fine for the data itself
    assert torch.isfinite(model.log_marginal({"counts": counts})).all()


def test_brute_force_enumeration_of_assignments_agrees_with_em_objective():
    # log p(X) summed over documents equals the log of the sum over all K^D joint assignments
    model = _model()
    joint = _brute_joint(model)
    total = sum(math.prod(joint[d, k].item() for d, k in enumerate(ks)) for ks in product(range(3), repeat=4))
    assert model.log_marginal(_batch()).sum().item() == pytest.approx(math.log(total), rel=1e-10)


def test_bad_input_is_refused():
    model = _model()
    with pytest.raises(ValueError, match=r"counts.*\[B, V\] = \[B, 6\].*\(4, 5\)"):
        model.log_marginal({"counts": torch.zeros(4, 5)})
    with pytest.raises(ValueError, match="floating point"):
        model.log_marginal({"counts": torch.zeros(4, 6, dtype=torch.long)})
    with pytest.raises(ValueError, match=">= 0"):
        model.log_marginal({"counts": -torch.ones(4, 6)})
    with pytest.raises(ValueError, match="estimator must be one of"):
        model.elbo(_batch(), estimator="reinforce")
    with pytest.raises(ValueError, match="belong to estimator='score_function'"):
        model.elbo(_batch(), estimator="exact", baseline="running-mean")
    with pytest.raises(ValueError, match="learned_baseline=True"):
        model.elbo(_batch(), estimator="score_function", baseline="learned")
    with pytest.raises(ValueError, match="smoothing"):
        model.m_step(model.expected_counts(_batch()), smoothing=-1.0)


@pytest.mark.parametrize(
    "make", [lambda **kw: MixtureOfCategoricals(6, 3, 5, **kw), lambda **kw: BernoulliFactorModel(6, 3, 5, **kw)]
)
def test_the_learned_baseline_leaves_the_other_initial_values_alone(make):
    """Both bag models keep their baselines in one BagOfWordsModel; building the learned network
    last means a seed gives the same model with or without it."""
    torch.manual_seed(0)
    plain = make()
    torch.manual_seed(0)
    learned = make(learned_baseline=True)
    assert isinstance(plain, BagOfWordsModel) and plain.baseline is None and learned.baseline is not None
    extra = {k for k in learned.state_dict() if k.startswith("baseline.")}
    assert set(learned.state_dict()) - extra == set(plain.state_dict())
    for name, value in plain.state_dict().items():
        assert torch.equal(value, learned.state_dict()[name]), name
