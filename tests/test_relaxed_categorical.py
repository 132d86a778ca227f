"""RelaxedCategorical: its sampler against the concrete density (K = 2, by quadrature) and the
Gumbel-max law of its argmax, the straight-through gradient, and its Monte Carlo KL in an ELBO."""

import math

import pytest
import torch

from latentnlp.families import RelaxedCategorical
from latentnlp.objectives import elbo


def test_draws_follow_the_concrete_density():
    d = RelaxedCategorical(0.7, logits=torch.tensor([0.3, -0.5], dtype=torch.float64))
    c = torch.linspace(1e-6, 1 - 1e-6, 100001, dtype=torch.float64)
    density = d.log_prob(torch.stack([c, 1 - c], -1)).exp()  # torch's concrete density on the simplex
    assert float(torch.trapezoid(density, c)) == pytest.approx(1.0, abs=1e-3)
    n = 100_000
    first = d.sample((n,), generator=torch.Generator().manual_seed(0))[:, 0]
    for q in (0.2, 0.5, 0.8):
        below = c <= q
        cdf = float(torch.trapezoid(density[below], c[below]))
        assert abs(float((first <= q).double().mean()) - cdf) <= 4 * math.sqrt(cdf * (1 - cdf) / n) + 1e-3


def test_argmax_is_an_exact_categorical_draw():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 3.0]])
    d = RelaxedCategorical(2.0, logits=logits)  # any temperature: Gumbel-max
    n = 40_000
    counts = torch.nn.functional.one_hot(d.sample((n,), generator=torch.Generator().manual_seed(1)).argmax(-1), 4)
    freq, p = counts.double().mean(0), torch.softmax(logits.double(), -1)
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9), (freq, p)
    assert torch.equal(d.categorical.probs, torch.softmax(logits, -1))


def test_generator_and_straight_through():
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    soft = RelaxedCategorical(0.5, logits=logits)
    hard = RelaxedCategorical(0.5, logits=logits, hard=True)
    y = soft.rsample((4,), generator=torch.Generator().manual_seed(2))
    h = hard.rsample((4,), generator=torch.Generator().manual_seed(2))
    assert torch.equal(y, soft.rsample((4,), generator=torch.Generator().manual_seed(2)))
    assert torch.equal(h.detach(), torch.nn.functional.one_hot(y.argmax(-1), 5).float())
    weights = torch.randn(4, 3, 5)
    (g_soft,) = torch.autograd.grad((weights * y).sum(), logits)
    (g_hard,) = torch.autograd.grad((weights * h).sum(), logits)
    assert torch.allclose(g_soft, g_hard)
    assert hard.expand((2, 3)).hard and hard.expand((2, 3)).batch_shape == (2, 3)


def test_elbo_over_it_uses_the_monte_carlo_kl():
    q = RelaxedCategorical(0.5, logits=torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64))
    prior = RelaxedCategorical(0.5, logits=torch.zeros(1, 3, dtype=torch.float64))
    n = 20_000
    g = torch.Generator().manual_seed(3)
    bound = elbo(lambda z: z[..., 0], q, prior, num_samples=n, generator=g)
    z = q.sample((n,), generator=torch.Generator().manual_seed(3))
    samples = q.log_prob(z) - prior.log_prob(z)
    assert torch.allclose(bound.kl, samples.mean(0))  # the same draws: no closed form is registered
    assert torch.isfinite(bound.value).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        RelaxedCategorical(1.0)
    with pytest.raises(ValueError, match="K >= 2"):
        RelaxedCategorical(1.0, logits=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="temperature"):
        RelaxedCategorical(0.0, logits=torch.zeros(3))
