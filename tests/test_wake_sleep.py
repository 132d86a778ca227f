"""Wake-sleep and reweighted wake-sleep (latentnlp.objectives.wake_sleep) on a tabular model.

The model: ``z ~ Cat(pi)`` over ``K`` values, ``x | z ~ Cat(phi_z)`` over ``V`` values, and a
tabular ``q(z | x) = softmax(table[x])``, which can equal the exact posterior
``p(z | x) = pi_z phi_z[x] / sum_k pi_k phi_k[x]`` (enumerated in float64 as the oracle).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical

from latentnlp import estimators
from latentnlp.families import MaskedCategorical
from latentnlp.objectives import iwae, wake_sleep

K, V = 3, 4


class Tabular(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.prior_logits = torch.nn.Parameter(torch.randn(K, generator=g, dtype=torch.float64))
        self.emit_logits = torch.nn.Parameter(1.5 * torch.randn(K, V, generator=g, dtype=torch.float64))
        self.table = torch.nn.Parameter(torch.zeros(V, K, dtype=torch.float64))

    def theta(self) -> list[torch.nn.Parameter]:
        return [self.prior_logits, self.emit_logits]

    def prior(self) -> Categorical:
        return Categorical(logits=self.prior_logits)

    def q(self, x: torch.Tensor) -> MaskedCategorical:
        return MaskedCategorical(self.table[x])

    def log_likelihood_fn(self, x: torch.Tensor):
        log_emit = F.log_softmax(self.emit_logits, -1)
        return lambda z: log_emit[z, x.expand_as(z)]

    def dream_fn(self, num: int, generator: torch.Generator):
        def dream():
            z = torch.multinomial(self.prior().probs, num, replacement=True, generator=generator)
            cdf = F.softmax(self.emit_logits, -1).cumsum(-1)[z]  # inverse-CDF draw of x | z
            u = torch.rand(num, 1, generator=generator, dtype=cdf.dtype)
            x = (u > cdf).sum(-1).clamp_max(V - 1)
            return x, z

        return dream

    def exact_posterior(self) -> torch.Tensor:
        """``p(z | x)`` for every ``x``: ``[V, K]``."""
        joint = F.log_softmax(self.prior_logits, -1)[:, None] + F.log_softmax(self.emit_logits, -1)  # [K, V]
        return F.softmax(joint, 0).t().detach()

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        joint = F.log_softmax(self.prior_logits, -1)[:, None] + F.log_softmax(self.emit_logits, -1)
        return torch.logsumexp(joint, 0)[x].detach()

    def run(self, x, *, num_dreams=64, generator=None, **kwargs):
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        return wake_sleep(
            self.log_likelihood_fn(x),
            self.q(x),
            self.prior(),
            dream_fn=self.dream_fn(num_dreams, g),
            encoder_fn=self.q,
            generator=g,
            **kwargs,
        )


X = torch.tensor([0, 1, 2, 3, 1, 2])


def test_sleep_fixed_point_is_the_exact_posterior():
    model = Tabular()
    posterior = model.exact_posterior()
    g = torch.Generator().manual_seed(1)
    m = 100_000
    # at q = p(z | x) the expected sleep gradient is zero: each dream's gradient for table[x] is
    # onehot(z) - q(. | x), whose components have variance <= 1/4, so the mean of m is within 5 sd
    with torch.no_grad():
        model.table.copy_(posterior.log())
    model.run(X, num_dreams=m, generator=g).sleep.mean().backward()
    tolerance = 5 * 0.5 / math.sqrt(m)
    assert model.table.grad.abs().max() < tolerance
    # ... and away from it, it is not
    model.table.grad = None
    with torch.no_grad():
        model.table.add_(torch.randn(V, K, generator=g, dtype=torch.float64))
    model.run(X, num_dreams=m, generator=g).sleep.mean().backward()
    assert model.table.grad.abs().max() > 10 * tolerance
    # sleep updates alone, from q uniform, reach the posterior
    with torch.no_grad():
        model.table.zero_()
    opt = torch.optim.Adam([model.table], lr=0.1)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t / 30))  # Robbins-Monro steps
    for _ in range(120):
        opt.zero_grad()
        (-model.run(X, num_dreams=10_000, generator=g).sleep.mean()).backward()
        opt.step()
        decay.step()
    assert torch.allclose(F.softmax(model.table.detach(), -1), posterior, atol=0.03)


def test_each_phase_reaches_only_its_parameters():
    model = Tabular()
    terms = model.run(X, num_samples=3)
    terms.wake.sum().backward()
    assert model.table.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.theta())
    model.zero_grad(set_to_none=True)
    model.run(X, num_samples=3).sleep.sum().backward()
    assert all(p.grad is None for p in model.theta())
    assert model.table.grad.abs().sum() > 0
    # the surrogate's one backward is the sum of the two: each of the N examples' wake terms plus
    # the sleep objective, the mean over the M = 64 dreams
    model.zero_grad(set_to_none=True)
    terms = model.run(X, num_samples=3)
    assert terms.sleep.shape == (64,)
    torch.testing.assert_close(terms.surrogate, terms.wake.sum() + len(X) * terms.sleep.sum() / 64)
    terms.surrogate.backward()
    both = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    terms = model.run(X, num_samples=3)
    terms.wake.sum().backward()
    (len(X) * terms.sleep.mean()).backward()
    for a, p in zip(both, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_wake_gradient_is_unbiased_for_the_expected_log_joint():
    """Plain wake: the mean gradient for theta is ``sum_z q(z | x) grad log p(x, z)`` (enumerated)."""
    model = Tabular()
    with torch.no_grad():
        model.table.copy_(torch.randn(V, K, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    log_lik = model.log_likelihood_fn(X)
    exact = estimators.exact(lambda z: log_lik(z) + model.prior().log_prob(z), model.q(X)).surrogate.sum()
    expected = torch.autograd.grad(exact, model.theta())
    g = torch.Generator().manual_seed(4)
    draws = []
    for _ in range(100):
        terms = model.run(X, num_samples=50, generator=g, num_dreams=1)
        grads = torch.autograd.grad(terms.wake.sum(), model.theta())
        draws.append(torch.cat([gr.flatten() for gr in grads]))
    draws = torch.stack(draws)
    target = torch.cat([e.flatten() for e in expected])
    assert ((draws.mean(0) - target).abs() <= 5 * draws.std(0) / math.sqrt(len(draws)) + 1e-12).all()


def test_reweighted_wake_gives_theta_the_iwae_gradient():
    model = Tabular()
    with torch.no_grad():
        model.table.copy_(torch.randn(V, K, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    terms = wake_sleep(
        model.log_likelihood_fn(X),
        model.q(X),
        model.prior(),
        num_samples=7,
        reweighted=True,
        generator=torch.Generator().manual_seed(6),
    )
    assert terms.sleep is None
    ws = torch.autograd.grad(terms.surrogate, model.theta())
    bound = iwae(model.log_likelihood_fn(X), model.q(X), model.prior(), 7, generator=torch.Generator().manual_seed(6))
    reference = torch.autograd.grad(bound.sum(), model.theta())
    for a, b in zip(ws, reference):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(terms.bound, bound.detach())


def test_reweighted_wake_phase_q_update_vanishes_at_the_posterior():
    """With ``q = p(z | x)`` every importance weight is ``p(x)``: the bound is exact for any ``S`` and
    the wake-phase q gradient is the mean score, zero in expectation."""
    model = Tabular()
    with torch.no_grad():
        model.table.copy_(model.exact_posterior().log())
    for s in (1, 5):
        torch.testing.assert_close(model.run(X, num_samples=s).bound, model.log_marginal(X))
    s = 200_000
    terms = model.run(X[:1], num_samples=s, reweighted=True, q_update="both", num_dreams=1)
    (grad,) = torch.autograd.grad(terms.wake.sum(), [model.table])
    assert grad.abs().max() < 5 * 0.5 / math.sqrt(s)


def test_bad_arguments():
    model = Tabular()
    with pytest.raises(ValueError, match="q_update must be one of"):
        model.run(X, q_update="dream")
    with pytest.raises(ValueError, match="needs reweighted=True"):
        model.run(X, q_update="wake")
    with pytest.raises(ValueError, match="dream_fn and encoder_fn"):
        wake_sleep(model.log_likelihood_fn(X), model.q(X), model.prior())
    with pytest.raises(ValueError, match="num_samples"):
        model.run(X, num_samples=0)
    with pytest.raises(ValueError, match="must return one log p"):
        wake_sleep(lambda z: z.sum(0).double(), model.q(X), model.prior(), reweighted=True)
