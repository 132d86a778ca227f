"""Dirichlet-multinomial conjugacy and CAVI for the Bayesian mixture of categoricals, against
quadrature, enumeration and Monte Carlo (float64)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributions import Beta, Categorical, Dirichlet

from latentnlp.conjugacy import BayesianCategoricalMixture, dirichlet_multinomial_log_evidence, dirichlet_posterior

F64 = torch.float64


def test_beta_posterior_and_evidence_by_quadrature():
    """K = 2: prior x likelihood normalised on a grid is the Beta(alpha + n) density, and its
    integral is the closed-form evidence."""
    alpha = torch.tensor([0.7, 2.5], dtype=F64)
    counts = torch.tensor([3.0, 5.0], dtype=F64)
    grid = torch.linspace(1e-6, 1 - 1e-6, 200_001, dtype=F64)  # theta_0
    step = float(grid[1] - grid[0])
    log_unnorm = Beta(alpha[0], alpha[1]).log_prob(grid) + counts[0] * grid.log() + counts[1] * (1 - grid).log()
    evidence = torch.logsumexp(log_unnorm, 0) + math.log(step)
    torch.testing.assert_close(dirichlet_multinomial_log_evidence(alpha, counts), evidence, atol=1e-4, rtol=0)
    posterior = dirichlet_posterior(alpha, counts)
    density = (log_unnorm - evidence).exp()
    inner = grid[1000:-1000]
    expected = Dirichlet(posterior.concentration).log_prob(torch.stack([inner, 1 - inner], -1)).exp()
    torch.testing.assert_close(density[1000:-1000], expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(posterior.concentration, alpha + counts)


def test_sequential_updates_and_evidence_chain_rule():
    """Updating one observation at a time ends at the batch posterior, and the evidence is the
    product of the posterior predictives ``(alpha_k + n_k) / (alpha_0 + n)``."""
    alpha = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    xs = [2, 0, 2, 1, 2, 2, 0]
    conc, log_pred = alpha.clone(), 0.0
    for x in xs:
        log_pred += math.log(float(conc[x] / conc.sum()))
        conc = dirichlet_posterior(conc, torch.nn.functional.one_hot(torch.tensor(x), 3).to(F64)).concentration
    counts = torch.bincount(torch.tensor(xs), minlength=3).to(F64)
    torch.testing.assert_close(conc, dirichlet_posterior(alpha, counts).concentration)
    assert math.isclose(float(dirichlet_multinomial_log_evidence(alpha, counts)), log_pred, rel_tol=1e-12)


def _data(seed: int = 0, docs: int = 5, vocab: int = 4, length: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    topics = torch.softmax(2.5 * torch.randn(2, vocab, generator=g, dtype=F64), -1)
    z = torch.randint(0, 2, (docs,), generator=g)
    words = torch.multinomial(topics[z], length, replacement=True, generator=g)
    return torch.stack([torch.bincount(w, minlength=vocab) for w in words]).to(F64)


def _log_evidence_by_enumeration(counts: torch.Tensor, k: int, alpha: float, eta: float) -> float:
    """``log sum_z p(z) p(w | z)`` over all ``K^D`` assignments, each factor a Dirichlet-multinomial."""
    terms = []
    for z in itertools.product(range(k), repeat=counts.shape[0]):
        z = torch.tensor(z)
        z_counts = torch.bincount(z, minlength=k).to(F64)
        term = dirichlet_multinomial_log_evidence(torch.full((k,), alpha, dtype=F64), z_counts)
        for j in range(k):
            words = counts[z == j].sum(0)
            term = term + dirichlet_multinomial_log_evidence(torch.full((counts.shape[1],), eta, dtype=F64), words)
        terms.append(term)
    return float(torch.logsumexp(torch.stack(terms), 0))


def test_elbo_equals_its_monte_carlo_definition():
    """``E_q[log p(w, z, pi, beta) - log q(z, pi, beta)]`` by sampling ``q``."""
    counts = _data()
    mix = BayesianCategoricalMixture(4, 2, alpha=1.3, eta=0.4)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, generator=g, dtype=F64) + 0.5
    b = torch.rand(2, 4, generator=g, dtype=F64) * 3 + 0.5
    r = torch.softmax(torch.randn(5, 2, generator=g, dtype=F64), -1)
    torch.manual_seed(2)
    n = 200_000
    pi, beta, z = Dirichlet(a).sample((n,)), Dirichlet(b).sample((n,)), Categorical(r).sample((n,))  # [n, D]
    log_p = (
        Dirichlet(torch.full((2,), 1.3, dtype=F64)).log_prob(pi)
        + Dirichlet(torch.full((4,), 0.4, dtype=F64)).log_prob(beta).sum(-1)
        + pi.log().gather(1, z).sum(-1)
        + (counts * beta.log().gather(1, z.unsqueeze(-1).expand(n, 5, 4))).sum((-1, -2))
    )
    log_q = Dirichlet(a).log_prob(pi) + Dirichlet(b).log_prob(beta).sum(-1) + Categorical(r).log_prob(z).sum(-1)
    samples = log_p - log_q
    tol = 5 * float(samples.std()) / math.sqrt(n)
    assert abs(float(mix.elbo(counts, a, b, r)) - float(samples.mean())) < tol


def test_each_update_is_the_coordinate_optimum():
    """At each update the ELBO's gradient in that factor's parameters is zero (``log a``, ``log b``,
    and the logits of ``r``), and a random move lowers it."""
    counts = _data(3)
    mix = BayesianCategoricalMixture(4, 2, alpha=0.8, eta=0.3)
    g = torch.Generator().manual_seed(4)
    r = torch.softmax(torch.randn(5, 2, generator=g, dtype=F64), -1)
    a, b = mix.update_globals(counts, r)
    log_a, log_b = a.log().requires_grad_(), b.log().requires_grad_()
    grads = torch.autograd.grad(mix.elbo(counts, log_a.exp(), log_b.exp(), r), [log_a, log_b])
    assert max(float(gr.abs().max()) for gr in grads) < 1e-9
    r = mix.update_assignments(counts, a + 0.3, b * 1.5)
    logits = r.log().requires_grad_()
    (grad,) = torch.autograd.grad(mix.elbo(counts, a + 0.3, b * 1.5, torch.softmax(logits, -1)), [logits])
    assert float(grad.abs().max()) < 1e-9
    best = float(mix.elbo(counts, a + 0.3, b * 1.5, r))
    for _ in range(20):
        other = torch.softmax(logits.detach() + 0.3 * torch.randn(5, 2, generator=g, dtype=F64), -1)
        assert float(mix.elbo(counts, a + 0.3, b * 1.5, other)) < best


def test_cavi_is_monotone_and_bounds_the_enumerated_evidence():
    counts = _data(5, docs=6)
    mix = BayesianCategoricalMixture(4, 2, alpha=1.0, eta=0.5)
    exact = _log_evidence_by_enumeration(counts, 2, 1.0, 0.5)
    for seed in range(3):
        fit = mix.fit(counts, iterations=50, generator=torch.Generator().manual_seed(seed))
        steps = torch.tensor(fit.elbos, dtype=F64)
        assert bool((steps.diff() >= -1e-9).all()), fit.elbos
        assert fit.elbos[-1] <= exact + 1e-9
        assert fit.elbos[-1] >= exact - 2.0  # the mean-field gap on well-separated documents is small
        torch.testing.assert_close(fit.r.sum(-1), torch.ones(6, dtype=F64))


def test_one_component_is_exact():
    """K = 1: every z is known, the mean field is the exact posterior Dir(eta + total counts), and the
    ELBO is the evidence."""
    counts = _data(6)
    mix = BayesianCategoricalMixture(4, 1, alpha=1.0, eta=0.7)
    fit = mix.fit(counts, iterations=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fit.b[0], 0.7 + counts.sum(0))
    evidence = dirichlet_multinomial_log_evidence(torch.full((4,), 0.7, dtype=F64), counts.sum(0))
    assert math.isclose(fit.elbos[-1], float(evidence), rel_tol=1e-10)


def test_bad_input():
    with pytest.raises(ValueError, match="alpha must be positive"):
        dirichlet_posterior(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"counts must have 2 columns, got shape \(3,\)"):
        dirichlet_posterior(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="non-negative"):
        dirichlet_multinomial_log_evidence(torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 2.0]))
    mix = BayesianCategoricalMixture(3, 2)
    with pytest.raises(ValueError, match=r"counts must be a tensor \[D, V\]"):
        mix.fit(torch.ones(3))
    with pytest.raises(ValueError, match="r must be"):
        mix.update_globals(torch.ones(4, 3), torch.ones(4, 3))
    with pytest.raises(ValueError, match="eta"):
        BayesianCategoricalMixture(3, 2, eta=-1.0)


def test_bad_globals_name_a_and_b():
    mix = BayesianCategoricalMixture(3, 2)  # (vocab_size, num_components), as MixtureOfCategoricals
    assert (mix.vocab_size, mix.num_components) == (3, 2)
    counts, a, b = torch.ones(4, 3), torch.ones(2), torch.ones(2, 3)
    r = torch.full((4, 2), 0.5)
    with pytest.raises(ValueError, match=r"a must be \[K\] = \[2\] \(K = 2, V = 3\), got \(3,\)"):
        mix.update_assignments(counts, torch.ones(3), b)
    with pytest.raises(ValueError, match=r"b must be \[K, V\] = \[2, 3\] \(K = 2, V = 3\), got \(3, 2\)"):
        mix.update_assignments(counts, a, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"b must be \[K, V\] = \[2, 3\] .* got list"):
        mix.elbo(counts, a, [[1.0] * 3] * 2, r)
    with pytest.raises(ValueError, match=r"a must hold positive Dirichlet concentrations, got min 0.0"):
        mix.elbo(counts, torch.tensor([1.0, 0.0]), b, r)
    with pytest.raises(ValueError, match=r"r must be \[D, K\] = \(4, 2\), got \(4, 3\)"):
        mix.elbo(counts, a, b, torch.ones(4, 3))
    assert mix.update_assignments(counts, a, b).shape == (4, 2)
