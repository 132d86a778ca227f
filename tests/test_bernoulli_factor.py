"""BernoulliFactorModel against brute force over the 2^k configurations: the marginal, the ELBO,
the score-function gradients (Monte Carlo against the enumerated one), IWAE, and refusals."""

import math
from itertools import product

import pytest
import torch
from gradient_draws import assert_unbiased, exact_gradient, gradient_draws, relative_variance, repeat_batch

from latentnlp.models import BernoulliFactorModel, IntractableError

pytestmark = pytest.mark.usefixtures("float64")

COUNTS = [[3, 0, 1, 0, 2, 0], [0, 1, 0, 4, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 5, 0, 0, 1]]
K = 3


def _model(**kwargs):
    torch.manual_seed(0)
    model = BernoulliFactorModel(6, K, hidden_size=5, chunk_size=3, **kwargs)  # chunks of 3 of the 8 configurations
    with torch.no_grad():
        model.decoder[2].weight.mul_(6.0)
        model.prior_logits.copy_(torch.tensor([0.8, -0.5, 0.2]))
    return model


def _batch():
    return {"counts": torch.tensor(COUNTS, dtype=torch.float64)}


def _brute_joint(model):
    """``p(x_d, z)`` for every configuration, as products of probabilities: ``[D, 2^k]``."""
    phi = torch.sigmoid(model.prior_logits).tolist()
    rows = []
    for row in COUNTS:
        values = []
        for z in product((0, 1), repeat=K):
            p_z = math.prod(p if bit else 1 - p for p, bit in zip(phi, z))
            words = torch.softmax(model.decoder(torch.tensor(z, dtype=torch.float64)), -1).tolist()
            values.append(p_z * math.prod(words[v] ** n for v, n in enumerate(row)))
        rows.append(values)
    return torch.tensor(rows)


def test_log_marginal_and_posterior_equal_brute_force():
    model = _model()
    joint = _brute_joint(model)  # configurations in product((0, 1), repeat=k) order: z_1 the top bit
    torch.testing.assert_close(model.log_marginal(_batch()), joint.sum(-1).log())
    torch.testing.assert_close(model.posterior(_batch()).probs, joint / joint.sum(-1, keepdim=True))


def test_exact_elbo_is_log_marginal_minus_kl_to_the_posterior():
    model = _model()
    joint = _brute_joint(model)
    posterior = joint / joint.sum(-1, keepdim=True)
    q = model.q(_batch())
    configs = torch.tensor(list(product((0.0, 1.0), repeat=K)))
    q_table = q.log_prob(configs.unsqueeze(1)).exp().t()  # [D, 2^k]
    expected = joint.sum(-1).log() - (q_table * (q_table.log() - posterior.log())).sum(-1)
    bound = model.elbo(_batch(), estimator="exact")
    torch.testing.assert_close(bound.value, expected.detach())
    torch.testing.assert_close(bound.surrogate, expected)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"baseline": "running-mean"},
        {"baseline": "learned"},
        {"baseline": "leave-one-out", "num_samples": 2},
        {"control_variate": True},
        {"baseline": "learned", "control_variate": True},
    ],
    ids=lambda v: "-".join(map(str, v.values())) or "plain",
)
def test_score_function_gradient_is_unbiased(variant):
    model = _model(learned_baseline=True)
    exact = exact_gradient(model, _batch())
    draws = gradient_draws(model, _batch(), {"estimator": "score_function", **variant}, reps=100, copies=40)
    assert_unbiased(draws, exact)


def test_learned_baseline_reduces_variance():
    model = _model(learned_baseline=True)
    exact = exact_gradient(model, _batch(), ["encoder."])
    opt = torch.optim.Adam(model.baseline.parameters(), lr=0.05)
    big = repeat_batch(_batch(), 32)
    for _ in range(40):  # the baseline alone, at fixed model parameters
        bound = model.elbo(big, estimator="score_function", baseline="learned")
        opt.zero_grad()
        (-bound.surrogate.sum() / 32).backward()
        opt.step()
    plain, learned = (
        relative_variance(
            gradient_draws(model, _batch(), kwargs, reps=60, copies=10, seed=3, names=["encoder."]), exact
        )
        for kwargs in (
            {"estimator": "score_function"},
            {"estimator": "score_function", "baseline": "learned", "control_variate": True},
        )
    )
    assert learned < 0.05 * plain, (learned, plain)


def test_iwae_lower_bounds_and_approaches_the_marginal():
    model = _model()
    log_px = model.log_marginal(_batch())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([model.iwae(_batch(), 1, generator=g) for _ in range(400)])  # [R, B]
        many = model.iwae(_batch(), 4000, generator=g)
        elbo = model.elbo(_batch(), estimator="exact").value
    few, standard_error = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert (few <= log_px).all()
    assert ((few - elbo).abs() < 4 * standard_error).all()  # E[L_1] is the ELBO
    assert ((log_px - many) < 0.1 * (log_px - elbo) + 1e-3).all()
    # the loss is -sum L_S / tokens, L_S from the same draws
    loss = model.loss(_batch(), "iwae", num_samples=8, generator=torch.Generator().manual_seed(5))
    bound = model.iwae(_batch(), 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss.value, -bound.sum() / model.num_tokens(_batch()).sum())
    torch.testing.assert_close(loss.metrics["nll"], -bound.detach())


def test_many_factors_are_sampled_not_enumerated():
    torch.manual_seed(0)
    model = BernoulliFactorModel(6, 20, hidden_size=4)
    assert model.q(_batch()).event_shape == (20,)  # the amortised q
    with pytest.raises(IntractableError, match="k = 20"):
        model.posterior(_batch())  # the exact posterior only, never q in its place
    with pytest.raises(IntractableError, match="k = 20"):
        model.log_marginal(_batch())
    with pytest.raises(IntractableError):
        model.elbo(_batch(), estimator="exact")
    bound = model.elbo(_batch(), estimator="score_function", baseline="leave-one-out", num_samples=3)
    assert torch.isfinite(bound.value).all() and bound.value.shape == (4,)
    assert torch.isfinite(model.iwae(_batch(), 5)).all()


def test_bad_input_is_refused():
    model = _model()
    with pytest.raises(ValueError, match=r"counts.*\(2, 6, 1\)"):
        model.log_marginal({"counts": torch.zeros(2, 6, 1)})
    with pytest.raises(ValueError, match="estimator must be one of"):
        model.elbo(_batch(), estimator="gumbel_softmax")
    with pytest.raises(ValueError, match="baseline must be one of"):
        model.elbo(_batch(), estimator="score_function", baseline="mean")
    with pytest.raises(ValueError, match="num_factors"):
        BernoulliFactorModel(6, 0)
