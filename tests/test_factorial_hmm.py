"""FactorialHMM against float64 references written here.

The exact ``log p(x)`` (and its gradient) against the enumeration of every joint path of the
product-state model, scored from the model's definition alone (torch distributions of the
emission, no library DP); the structured mean-field ELBO below it (equal to it for one Gaussian
chain); ``L = 1`` against a plain HMM assembled by hand for ``ChainPosterior``; Gaussian EM
monotone; ancestral samples against their expectation; every refused input.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from latentnlp import ChainPosterior
from latentnlp.models import FactorialHMM, IntractableError

pytestmark = pytest.mark.usefixtures("float64")

EMISSIONS = ("bernoulli", "categorical", "gaussian")
LENGTHS = torch.tensor([3, 1, 2])


def make_batch(emission: str, size: int, seed: int = 0, steps: int = 3, lengths: torch.Tensor = LENGTHS) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch_size = lengths.shape[0]
    if emission == "categorical":
        return {"targets": torch.randint(0, size, (batch_size, steps), generator=g), "lengths": lengths}
    if emission == "bernoulli":
        return {"observations": (torch.rand(batch_size, steps, size, generator=g) < 0.4).double(), "lengths": lengths}
    return {"observations": torch.randn(batch_size, steps, size, generator=g), "lengths": lengths}


def emission_log_prob(emission: str, params: dict, eta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log p(x_t | eta)`` for ``eta [P, N, D]`` and one sequence's ``x``: ``[P, N]``, from torch distributions."""
    if emission == "bernoulli":
        return torch.distributions.Bernoulli(logits=eta).log_prob(x.expand_as(eta)).sum(-1)
    if emission == "categorical":
        return torch.distributions.Categorical(logits=eta).log_prob(x.expand(eta.shape[:2]))
    scale = params["variance"].sqrt()
    return torch.distributions.Normal(eta, scale).log_prob(x.expand_as(eta)).sum(-1)


def brute_force_log_px(model: FactorialHMM, batch: dict) -> torch.Tensor:
    """``log sum_z p(x, z)`` over all ``(K^L)^N`` joint paths of each sequence: ``[B]``."""
    params = model.log_parameters()
    chains, k = model.num_chains, model.num_states
    x_all = batch["targets"] if model.emission == "categorical" else batch["observations"]
    out = []
    for b, length in enumerate(batch["lengths"].tolist()):
        paths = torch.tensor(list(itertools.product(range(k), repeat=length * chains))).reshape(-1, length, chains)
        ell = torch.arange(chains)
        prior = params["init"][ell, paths[:, 0]].sum(-1)
        for t in range(1, length):
            prior = prior + params["trans"][ell, paths[:, t - 1], paths[:, t]].sum(-1)
        eta = params["weights"][ell, paths].sum(-2) + params.get("bias", 0.0)  # [P, N, D]
        emit = emission_log_prob(model.emission, params, eta, x_all[b, :length]).sum(-1)
        out.append(torch.logsumexp(prior + emit, 0))
    return torch.stack(out)


@pytest.mark.parametrize("emission", EMISSIONS)
@pytest.mark.parametrize("chains, states", [(1, 3), (2, 2), (2, 3), (3, 2)])
def test_exact_log_marginal_and_gradient_match_enumeration(emission, chains, states):
    torch.manual_seed(chains * 10 + states)
    model = FactorialHMM(chains, states, 4, emission=emission)
    batch = make_batch(emission, 4, seed=states)
    exact = model.log_marginal(batch)
    reference = brute_force_log_px(model, batch)
    torch.testing.assert_close(exact, reference, rtol=1e-9, atol=1e-9)
    grads = torch.autograd.grad(exact.sum(), list(model.parameters()))
    expected = torch.autograd.grad(reference.sum(), list(model.parameters()))
    for (name, _), got, want in zip(model.named_parameters(), grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize("emission", EMISSIONS)
def test_neural_parameterization_matches_enumeration(emission):
    torch.manual_seed(1)
    model = FactorialHMM(2, 2, 5, emission=emission, parameterization="neural", embedding_size=8)
    batch = make_batch(emission, 5, seed=2)
    torch.testing.assert_close(model.log_marginal(batch), brute_force_log_px(model, batch), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("emission", EMISSIONS)
@pytest.mark.parametrize("chains, states", [(2, 3), (3, 2)])
def test_elbo_is_below_the_exact_marginal(emission, chains, states):
    torch.manual_seed(3)
    model = FactorialHMM(chains, states, 4, emission=emission, mean_field_iterations=5)
    batch = make_batch(emission, 4, seed=4)
    exact = brute_force_log_px(model, batch)
    bound = model.elbo(batch)
    assert torch.all(bound.value <= exact + 1e-9), (bound.value, exact)
    torch.testing.assert_close(bound.value, bound.reconstruction - bound.kl)
    assert torch.all(bound.kl >= -1e-9)  # a KL between the chains q_l and the prior chains
    loss = model.loss(batch, "elbo")
    torch.testing.assert_close(loss.metrics["neg_elbo"], -bound.value)


def test_one_gaussian_chain_elbo_is_exact():
    """With one chain the structured approximation is the exact posterior for a Gaussian emission."""
    torch.manual_seed(5)
    model = FactorialHMM(1, 3, 2, emission="gaussian", mean_field_iterations=1)
    batch = make_batch("gaussian", 2, seed=6)
    torch.testing.assert_close(model.elbo(batch).value, brute_force_log_px(model, batch), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("emission", EMISSIONS)
def test_one_chain_is_an_hmm_computed_by_hand(emission):
    torch.manual_seed(7)
    model = FactorialHMM(1, 4, 3, emission=emission)
    batch = make_batch(emission, 3, seed=8, steps=5, lengths=torch.tensor([5, 2, 4]))
    params = model.log_parameters()
    eta = (params["weights"][0] + params.get("bias", 0.0))[None, None]  # [1, 1, K, D]
    x = batch["targets"] if emission == "categorical" else batch["observations"]
    if emission == "bernoulli":
        emit = torch.distributions.Bernoulli(logits=eta).log_prob(x[:, :, None].expand(-1, -1, 4, -1)).sum(-1)
    elif emission == "categorical":
        emit = eta.squeeze(0).squeeze(0).log_softmax(-1).T[x]
    else:
        emit = torch.distributions.Normal(eta, params["variance"].sqrt()).log_prob(x[:, :, None]).sum(-1)
    hmm = ChainPosterior(params["init"][0], params["trans"][0], emit, batch["lengths"])
    torch.testing.assert_close(model.log_marginal(batch), hmm.log_partition)
    torch.testing.assert_close(model.posterior(batch).marginals[:, :, 0], hmm.marginals)


@pytest.mark.parametrize("parameterization", ["direct", "neural"])
@pytest.mark.parametrize("objective", ["marginal", "elbo"])
def test_gradients_reach_every_parameter(parameterization, objective):
    torch.manual_seed(9)
    model = FactorialHMM(2, 3, 4, parameterization=parameterization, embedding_size=8)
    model.loss(make_batch("bernoulli", 4, seed=10), objective).value.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_mean_field_beyond_the_exact_limit():
    """K^L past max_joint_states: the marginal is refused, the bound still trains."""
    torch.manual_seed(11)
    model = FactorialHMM(6, 8, 5, max_joint_states=4096)
    batch = make_batch("bernoulli", 5, seed=12)
    with pytest.raises(IntractableError, match="262144 joint states exceed max_joint_states = 4096"):
        model.log_marginal(batch)
    loss = model.loss(batch, "elbo")
    loss.value.backward()
    assert torch.isfinite(loss.value) and torch.isfinite(model.weights.grad).all()
    fit = model.mean_field(batch)
    assert fit.marginals.shape == (3, 3, 6, 8)
    assert torch.all(fit.elbo_trace[1:] >= fit.elbo_trace[:-1] - 1e-9)


def test_gaussian_em_never_lowers_the_likelihood():
    torch.manual_seed(13)
    truth = FactorialHMM(2, 2, 3, emission="gaussian")
    with torch.no_grad():
        truth.weights.mul_(3.0)
    x, _ = truth.generate(num_samples=6, length=12, generator=torch.Generator().manual_seed(14))
    batch = {"observations": x, "lengths": torch.tensor([12, 12, 9, 12, 5, 12])}
    model = FactorialHMM(2, 2, 3, emission="gaussian")
    trace = [model.em_step(batch).sum() for _ in range(6)] + [model.log_marginal(batch).detach().sum()]
    assert all(b >= a - 1e-8 for a, b in zip(trace, trace[1:])), trace
    assert trace[-1] > trace[0] + 1.0, trace
    with pytest.raises(ValueError, match="em_step needs emission='gaussian'"):
        FactorialHMM(2, 2, 3).em_step(make_batch("bernoulli", 3))


def test_samples_match_their_expectation():
    """The first-step key frequencies of ancestral samples against ``E_{p(z_0)}[sigmoid(eta(z_0))]``."""
    torch.manual_seed(15)
    model = FactorialHMM(2, 3, 4)
    num = 4000
    x, z = model.generate(num_samples=num, length=2, generator=torch.Generator().manual_seed(16))
    assert x.shape == (num, 2, 4) and z.shape == (num, 2, 2)
    with torch.no_grad():
        params = model.log_parameters()
        prior = (params["init"][0][:, None] + params["init"][1][None]).exp()  # [K, K]
        expected = (prior[..., None] * torch.sigmoid(model.joint_means(params))).sum((0, 1))
    tolerance = 4 * (expected * (1 - expected) / num).sqrt()
    assert torch.all((x[:, 0].mean(0) - expected).abs() <= tolerance), (x[:, 0].mean(0), expected)


@pytest.mark.parametrize(
    "emission, batch, message",
    [
        ("bernoulli", {"lengths": torch.tensor([2])}, "needs 'observations' and 'lengths'"),
        ("bernoulli", {"observations": torch.zeros(2, 3, 5), "lengths": torch.tensor([3, 3])}, "D = output_size = 4"),
        ("bernoulli", {"observations": torch.zeros(2, 3, 4), "lengths": torch.tensor([3])}, r"shape \[B\] = \[2\]"),
        ("bernoulli", {"observations": torch.zeros(2, 3, 4), "lengths": torch.tensor([3, 4])}, "lie in 1..T = 1..3"),
        ("bernoulli", {"observations": torch.full((1, 2, 4), 0.5), "lengths": torch.tensor([2])}, "must be 0 or 1"),
        ("gaussian", {"observations": torch.full((1, 2, 4), math.nan), "lengths": torch.tensor([1])}, "finite"),
        ("categorical", {"targets": torch.tensor([[0, 4]]), "lengths": torch.tensor([2])}, r"in 0\.\.3"),
        ("categorical", {"targets": torch.zeros(1, 2), "lengths": torch.tensor([2])}, "integer tensor of shape"),
        (
            "categorical",
            {"targets": torch.zeros(1, 2, dtype=torch.long), "lengths": torch.tensor([2]), "stream": True},
            "carries no state",
        ),
    ],
)
def test_bad_batches_are_refused(emission, batch, message):
    with pytest.raises(ValueError, match=message):
        FactorialHMM(2, 2, 4, emission=emission).log_marginal(batch)


def test_values_past_the_lengths_are_not_checked():
    batch = {"observations": torch.tensor([[[1.0, 0.0], [0.5, 7.0]]]), "lengths": torch.tensor([1])}
    assert torch.isfinite(FactorialHMM(2, 2, 2).log_marginal(batch)).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_chains": 0}, "num_chains must be an integer >= 1"),
        ({"emission": "poisson"}, "emission must be one of"),
        ({"parameterization": "tabular"}, "parameterization must be one of"),
        ({"max_joint_states": 0}, "max_joint_states must be"),
        ({"mean_field_iterations": 0}, "mean_field_iterations must be"),
    ],
)
def test_bad_construction_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FactorialHMM(**{"num_chains": 2, "num_states": 2, "output_size": 3, **kwargs})


def test_sampled_elbo_estimators_are_refused():
    with pytest.raises(ValueError, match="estimator must be None or 'exact'"):
        FactorialHMM(2, 2, 4).elbo(make_batch("bernoulli", 4), estimator="sample")
