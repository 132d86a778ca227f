"""ELBO, IWAE, free bits and word dropout against closed forms and enumeration (float64).

Two oracle models:

- a discrete latent ``z in {0..K-1}``: prior ``Categorical(pi)``, a table ``log p(x | z)``, so
  ``log p(x) = logsumexp_z(log pi_z + log p(x | z))`` and the ELBO of any categorical ``q`` are sums;
- a linear-Gaussian model ``z ~ N(0, I_D)``, ``x | z ~ N(W z + b, sigma^2 I_n)`` with orthogonal
  columns of ``W``, so ``log p(x) = log N(x; b, W W^T + sigma^2 I)``, the posterior is a diagonal
  Gaussian in closed form, and the ELBO of a diagonal ``q`` is closed form too.

Monte Carlo checks replicate one example over ``R`` batch rows, so each row is an independent
estimate, and compare the mean with the oracle within ``4`` standard errors estimated from the rows.
"""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal, kl_divergence

from latentnlp.families import DiagonalGaussian, MaskedCategorical, MeanFieldBernoulli
from latentnlp.objectives import elbo, free_bits, iwae, word_dropout

pytestmark = pytest.mark.usefixtures("float64")  # every test computes in float64

Z_SCORE = 4.0


def _assert_mean_close(samples: torch.Tensor, expected: torch.Tensor, *, atol: float = 1e-9) -> None:
    """The mean over dim 0 of independent ``samples`` is within 4 standard errors of ``expected``."""
    mean = samples.mean(0)
    stderr = samples.std(0) / math.sqrt(samples.shape[0])
    bad = (mean - expected).abs() > Z_SCORE * stderr + atol
    assert not bad.any(), f"mean {mean} vs expected {expected} (stderr {stderr})"


# ------------------------------------------------------------------------------------------------
# oracle models
# ------------------------------------------------------------------------------------------------
class DiscreteModel:
    """``z in {0..K-1}``; ``log p(x | z)`` a fixed table for one observed ``x``."""

    def __init__(self, K=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.prior_logits = torch.log_softmax(torch.randn(K, generator=g), -1)
        self.log_lik = -3.0 * torch.rand(K, generator=g) - torch.arange(K) * 1.5  # peaked posterior
        self.K = K

    def prior(self):
        return Categorical(logits=self.prior_logits)

    def ll(self, z):
        return self.log_lik[z]

    def log_px(self):
        return torch.logsumexp(self.prior_logits + self.log_lik, -1)

    def exact_elbo(self, q_logits):
        q = Categorical(logits=q_logits)
        return (q.probs * (self.log_lik + self.prior_logits - q.logits)).sum(-1)


class LinearGaussian:
    """``z ~ N(0, I_D)``, ``x | z ~ N(W z + b, sigma^2 I_n)``, ``W = Q diag(c)`` with ``Q^T Q = I``."""

    def __init__(self, D=3, n=5, sigma=0.7, seed=0):
        g = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(n, D, generator=g))
        self.c = torch.tensor([2.0, 1.0, 0.5])[:D]
        self.W = Q * self.c
        self.b = torch.randn(n, generator=g)
        self.x = torch.randn(n, generator=g)
        self.sigma, self.D, self.n = sigma, D, n

    def ll(self, z, b=None):
        b = self.b if b is None else b
        mean = z @ self.W.T + b
        return Independent(Normal(mean, self.sigma), 1).log_prob(self.x)

    def prior(self):
        return DiagonalGaussian.standard((), self.D)

    def log_px(self, b=None):
        b = self.b if b is None else b
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.n)
        return MultivariateNormal(b, cov).log_prob(self.x)

    def posterior(self, R=1):
        precision = 1.0 + self.c**2 / self.sigma**2
        var = 1.0 / precision
        mean = var * (self.W.T @ (self.x - self.b)) / self.sigma**2
        return DiagonalGaussian(mean.expand(R, self.D), var.sqrt().expand(R, self.D))

    def exact_elbo(self, loc, scale):
        resid = self.x - loc @ self.W.T - self.b
        expected_sq = resid.pow(2).sum(-1) + (scale**2 * self.W.pow(2).sum(0)).sum(-1)
        recon = -0.5 * self.n * math.log(2 * math.pi * self.sigma**2) - expected_sq / (2 * self.sigma**2)
        kl = kl_divergence(DiagonalGaussian(loc, scale), DiagonalGaussian.standard(loc.shape[:-1], self.D))
        return recon - kl


# ------------------------------------------------------------------------------------------------
# IWAE
# ------------------------------------------------------------------------------------------------
def test_iwae_rises_with_samples_towards_log_likelihood():
    model = DiscreteModel()
    R = 4000
    q = MaskedCategorical(torch.zeros(R, model.K))  # uniform: far from the peaked posterior
    g = torch.Generator().manual_seed(1)
    bounds = {S: iwae(model.ll, q, model.prior(), S, generator=g) for S in (1, 10, 100)}
    means = {S: b.mean() for S, b in bounds.items()}
    se = {S: b.std() / math.sqrt(R) for S, b in bounds.items()}
    exact = model.log_px()
    # S = 1 is the ELBO in expectation
    _assert_mean_close(bounds[1], model.exact_elbo(torch.zeros(model.K)))
    # strictly rising (the gaps are many standard errors wide for this q) and never above log p(x)
    assert means[10] - means[1] > Z_SCORE * (se[10] + se[1])
    assert means[100] - means[10] > Z_SCORE * (se[100] + se[10])
    assert means[100] <= exact + Z_SCORE * se[100]
    assert exact - means[100] < exact - means[10]


def test_iwae_is_exact_with_the_true_posterior():
    # w_s = p(x, z_s) / p(z_s | x) = p(x) for every sample: the bound is tight at any S and chunk size
    model = LinearGaussian()
    q = model.posterior(R=2)
    for S, chunk in ((1, None), (7, 3), (50, 50)):
        value = iwae(model.ll, q, model.prior(), S, chunk_size=chunk, generator=torch.Generator().manual_seed(S))
        torch.testing.assert_close(value, model.log_px().expand(2))


def test_iwae_one_sample_is_the_monte_carlo_elbo_on_the_same_draw():
    model = LinearGaussian()
    q = DiagonalGaussian(torch.zeros(3, 3), torch.ones(3, 3))
    bound = iwae(model.ll, q, model.prior(), 1, generator=torch.Generator().manual_seed(5))
    mc = elbo(model.ll, q, model.prior(), kl="mc", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(bound, mc.value)


def test_iwae_chunked_equals_unchunked_values_and_gradients():
    model = LinearGaussian()
    loc = torch.randn(4, 3, generator=torch.Generator().manual_seed(2)).requires_grad_()
    log_scale = torch.zeros(4, 3, requires_grad=True)
    seen = []

    def ll(z):
        seen.append(z.shape[0])
        return model.ll(z)

    results = []
    for chunk in (None, 64, 7):
        seen.clear()
        q = DiagonalGaussian(loc, log_scale.exp())
        value = iwae(ll, q, model.prior(), 500, chunk_size=chunk, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad(value.sum(), (loc, log_scale))
        results.append((value, grads))
        assert sum(seen) == 500 and max(seen) == (chunk or 500)
    for value, grads in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert all(torch.isfinite(a).all() and a.abs().sum() > 0 for a in grads)


def test_iwae_gradient_at_the_posterior_is_the_log_likelihood_gradient():
    # Fisher's identity: E_{p(z|x)}[grad_b log p(x, z)] = grad_b log p(x), and at the posterior
    # the normalised weights are all 1/S
    model = LinearGaussian()
    R = 3000
    b = model.b.clone().expand(R, model.n).contiguous().requires_grad_()
    value = iwae(lambda z: model.ll(z, b), model.posterior(R), model.prior(), 5, generator=torch.Generator())
    (grad,) = torch.autograd.grad(value.sum(), b)
    b0 = model.b.clone().requires_grad_()
    (exact,) = torch.autograd.grad(model.log_px(b0), b0)
    _assert_mean_close(grad, exact)


def test_iwae_bad_arguments():
    model = LinearGaussian()
    q = model.posterior(R=2)
    with pytest.raises(ValueError, match="num_samples"):
        iwae(model.ll, q, model.prior(), 0)
    with pytest.raises(ValueError, match="chunk_size"):
        iwae(model.ll, q, model.prior(), 5, chunk_size=0)
    with pytest.raises(ValueError, match="log_likelihood_fn"):
        iwae(lambda z: model.ll(z).sum(0), q, model.prior(), 5)
    with pytest.raises(ValueError, match="prior"):
        iwae(model.ll, q, DiagonalGaussian.standard((), 4), 5)


# ------------------------------------------------------------------------------------------------
# ELBO
# ------------------------------------------------------------------------------------------------
def test_elbo_analytic_kl_matches_monte_carlo_for_every_family():
    g = torch.Generator().manual_seed(0)
    S = 20000
    cases = [
        (
            DiagonalGaussian(torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g) + 0.3),
            DiagonalGaussian(torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g) + 0.5),
        ),
        (MeanFieldBernoulli(torch.randn(3, 4, generator=g)), MeanFieldBernoulli(torch.randn(3, 4, generator=g))),
        (
            MaskedCategorical(torch.randn(3, 5, generator=g), torch.tensor([True, True, False, True, True])),
            Categorical(logits=torch.randn(3, 5, generator=g)),
        ),
    ]
    for q, p in cases:
        ll = lambda z: torch.zeros(z.shape[: 1 + len(q.batch_shape)])
        analytic = elbo(ll, q, p, kl="analytic")
        torch.testing.assert_close(analytic.kl, kl_divergence(q, p))
        mc = elbo(ll, q, p, kl="mc", num_samples=S, generator=g)
        z = q.sample((S,))
        spread = (q.log_prob(z) - p.log_prob(z)).std(0)
        assert ((mc.kl - analytic.kl).abs() <= Z_SCORE * spread / math.sqrt(S)).all(), (type(q).__name__, mc.kl)


def test_elbo_kl_auto_is_analytic_when_registered_and_monte_carlo_otherwise():
    model = LinearGaussian()
    q = DiagonalGaussian(torch.randn(2, 3), torch.ones(2, 3))
    auto = elbo(model.ll, q, model.prior(), num_samples=1)
    torch.testing.assert_close(auto.kl, kl_divergence(q, model.prior()).expand(2))
    # a mixture prior has no closed-form KL: the Monte Carlo estimate on the same draws
    mixture = MixtureSameFamily(
        Categorical(logits=torch.zeros(2)), DiagonalGaussian(torch.randn(2, 3), torch.ones(2, 3))
    )
    bound = elbo(model.ll, q, mixture, num_samples=8, generator=torch.Generator().manual_seed(4))
    z = q.rsample((8,), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(bound.kl, (q.log_prob(z) - mixture.log_prob(z)).mean(0))
    torch.testing.assert_close(bound.reconstruction, model.ll(z).mean(0))
    torch.testing.assert_close(bound.value, bound.reconstruction - bound.kl)
    with pytest.raises(ValueError, match="kl='analytic'"):
        elbo(model.ll, q, mixture, kl="analytic")


@pytest.mark.parametrize("kl", ["analytic", "mc"])
def test_elbo_reparameterised_gradient_is_unbiased(kl):
    model = LinearGaussian()
    R = 4000
    loc0, log_scale0 = torch.tensor([0.3, -0.2, 0.5]), torch.tensor([-0.5, 0.1, -1.0])
    loc = loc0.expand(R, 3).clone().requires_grad_()
    log_scale = log_scale0.expand(R, 3).clone().requires_grad_()
    bound = elbo(model.ll, DiagonalGaussian(loc, log_scale.exp()), model.prior(), kl=kl, generator=torch.Generator())
    _assert_mean_close(bound.value.detach(), model.exact_elbo(loc0, log_scale0.exp()))
    grads = torch.autograd.grad(bound.surrogate.sum(), (loc, log_scale))
    l0, s0 = loc0.clone().requires_grad_(), log_scale0.clone().requires_grad_()
    exact = torch.autograd.grad(model.exact_elbo(l0, s0.exp()), (l0, s0))
    for estimate, truth in zip(grads, exact):
        _assert_mean_close(estimate, truth)


@pytest.mark.parametrize(("kl", "baseline", "S"), [("analytic", None, 1), ("mc", None, 1), ("mc", "leave-one-out", 3)])
def test_elbo_score_function_gradient_is_unbiased_on_an_enumerable_model(kl, baseline, S):
    model = DiscreteModel()
    R = 20000
    logits0 = torch.tensor([0.5, -0.3, 0.2, 1.0])
    logits = logits0.expand(R, model.K).clone().requires_grad_()
    q = MaskedCategorical(logits)
    assert not q.has_rsample
    bound = elbo(model.ll, q, model.prior(), kl=kl, num_samples=S, baseline=baseline, generator=torch.Generator())
    torch.testing.assert_close(bound.surrogate.detach(), bound.value)  # kl_weight 1: same value
    _assert_mean_close(bound.value, model.exact_elbo(logits0))
    (grad,) = torch.autograd.grad(bound.surrogate.sum(), logits)
    l0 = logits0.clone().requires_grad_()
    (exact,) = torch.autograd.grad(model.exact_elbo(l0), l0)
    _assert_mean_close(grad, exact)


def test_elbo_kl_weight_scales_the_surrogate_not_the_bound():
    model = LinearGaussian()
    q = DiagonalGaussian(torch.randn(2, 3), torch.ones(2, 3))
    for kl in ("analytic", "mc"):
        bound = elbo(model.ll, q, model.prior(), kl=kl, kl_weight=0.25, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(bound.value, bound.reconstruction - bound.kl)
        torch.testing.assert_close(bound.surrogate, bound.reconstruction - 0.25 * bound.kl)
    discrete = DiscreteModel()
    qc = MaskedCategorical(torch.zeros(3, discrete.K))
    for kl in ("analytic", "mc"):
        bound = elbo(discrete.ll, qc, discrete.prior(), kl=kl, kl_weight=0.5, generator=torch.Generator())
        torch.testing.assert_close(bound.surrogate.detach(), bound.reconstruction - 0.5 * bound.kl)


def test_elbo_learned_baseline_adds_its_regression_loss_at_zero_value():
    model = DiscreteModel()
    logits = torch.zeros(5, model.K, requires_grad=True)
    b = torch.zeros(5, requires_grad=True)
    bound = elbo(model.ll, MaskedCategorical(logits), model.prior(), baseline=b, generator=torch.Generator())
    torch.testing.assert_close(bound.surrogate.detach(), bound.value)
    (grad_b,) = torch.autograd.grad(bound.surrogate.sum(), b)
    # maximising the surrogate minimises (f - b)^2: d/db -(f - b)^2 = 2 (f - b)
    torch.testing.assert_close(grad_b, 2 * bound.reconstruction.detach())


def test_elbo_bad_arguments():
    model = LinearGaussian()
    q = DiagonalGaussian(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="num_samples"):
        elbo(model.ll, q, model.prior(), num_samples=0)
    with pytest.raises(ValueError, match="kl must be"):
        elbo(model.ll, q, model.prior(), kl="exact")
    with pytest.raises(ValueError, match="kl_weight"):
        elbo(model.ll, q, model.prior(), kl_weight=-1.0)
    with pytest.raises(ValueError, match="log_likelihood_fn"):
        elbo(lambda z: model.ll(z)[0], q, model.prior())
    with pytest.raises(ValueError, match="prior"):
        elbo(model.ll, q, DiagonalGaussian.standard((), 2))
    with pytest.raises(ValueError, match="prior"):
        elbo(model.ll, q, DiagonalGaussian.standard((3,), 3))
    with pytest.raises(ValueError, match="prior"):  # a prior with more batch rows than q
        elbo(model.ll, q, DiagonalGaussian.standard((4, 2), 3))
    with pytest.raises(ValueError, match="generator"):  # torch's Normal samples from the global seed only
        elbo(model.ll, Independent(Normal(torch.zeros(2, 3), 1.0), 1), model.prior(), generator=torch.Generator())
    discrete = DiscreteModel()
    with pytest.raises(ValueError, match="generator"):  # the score-function path samples from q too
        elbo(discrete.ll, Categorical(logits=torch.zeros(2, 4)), discrete.prior(), generator=torch.Generator())
    with pytest.raises(ValueError, match="estimator"):
        elbo(discrete.ll, Categorical(logits=torch.zeros(2, 4)), discrete.prior(), estimator="reparam")
    with pytest.raises(ValueError, match="baseline"):
        elbo(model.ll, q, model.prior(), baseline="leave-one-out")


# ------------------------------------------------------------------------------------------------
# free bits
# ------------------------------------------------------------------------------------------------
def test_free_bits_per_dimension_clamps_the_batch_mean_of_each_dimension():
    kl = torch.tensor([[0.1, 2.0, 0.4], [0.3, 1.0, 0.8]], requires_grad=True)  # means 0.2, 1.5, 0.6
    term = free_bits(kl, 0.5)
    assert term.shape == (2,)
    # batch mean of the term = sum_d max(lambda, mean_b KL_bd)
    torch.testing.assert_close(term.mean(), torch.tensor(0.5 + 1.5 + 0.6))
    (grad,) = torch.autograd.grad(term.mean(), kl)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]))  # zero below the floor
    # no floor: the summed KL itself
    torch.testing.assert_close(free_bits(kl, 0.0), kl.sum(-1))
    # a [B] KL is one group
    total = kl.sum(-1)
    torch.testing.assert_close(free_bits(total, 10.0), torch.full((2,), 10.0))
    torch.testing.assert_close(free_bits(total, 1.0), total)


def test_free_bits_per_sentence_is_a_target_rate():
    kl = torch.tensor([[0.1, 0.2], [1.0, 2.0], [0.5, 0.4]], requires_grad=True)  # totals 0.3, 3.0, 0.9
    term = free_bits(kl, 1.0, per="sentence")
    torch.testing.assert_close(term, torch.tensor([1.0, 3.0, 1.0]))
    (grad,) = torch.autograd.grad(term.sum(), kl)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(free_bits(kl.sum(-1), 1.0, per="sentence"), term)
    # exactly at the floor: no gradient either (both variants)
    at = torch.tensor([[0.25, 0.75], [0.75, 0.25]], requires_grad=True)  # row sums 1, column means 1/2
    for per, floor in (("sentence", 1.0), ("dimension", 0.5)):
        (grad,) = torch.autograd.grad(free_bits(at, floor, per=per).sum(), at)
        assert (grad == 0).all(), per


def test_free_bits_bad_arguments():
    with pytest.raises(ValueError, match="per"):
        free_bits(torch.ones(2, 3), 0.5, per="batch")
    with pytest.raises(ValueError, match="lambda_"):
        free_bits(torch.ones(2, 3), -0.1)
    with pytest.raises(ValueError, match="kl"):
        free_bits(torch.ones(2, 3, 4), 0.5)


# ------------------------------------------------------------------------------------------------
# word dropout
# ------------------------------------------------------------------------------------------------
PAD, BOS, EOS, UNK = 0, 1, 2, 3


def _sentences(B=200, T=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 1000, (B, T), generator=g)
    tokens[:, 0] = BOS
    tokens[:, T // 2] = EOS
    tokens[:, T // 2 + 1 :] = PAD
    return tokens


def test_word_dropout_rate_within_binomial_tolerance_and_specials_kept():
    tokens = _sentences()
    rate = 0.3
    out = word_dropout(tokens, rate, UNK, keep=(BOS, EOS, PAD), generator=torch.Generator().manual_seed(1))
    special = (tokens == BOS) | (tokens == EOS) | (tokens == PAD)
    assert torch.equal(out[special], tokens[special])
    dropped = out != tokens
    assert (out[dropped] == UNK).all()
    n = int((~special).sum())
    fraction = dropped.sum().item() / n
    assert abs(fraction - rate) < Z_SCORE * math.sqrt(rate * (1 - rate) / n)
    assert out.dtype == tokens.dtype and out.shape == tokens.shape
    # reproducible from the generator
    again = word_dropout(tokens, rate, UNK, keep=(BOS, EOS, PAD), generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_word_dropout_rate_one_is_the_inputless_decoder_and_a_mask_keeps_positions():
    tokens = _sentences(B=4, T=10)
    out = word_dropout(tokens, 1.0, UNK, keep=(BOS, EOS, PAD))
    special = (tokens == BOS) | (tokens == EOS) | (tokens == PAD)
    assert torch.equal(out[special], tokens[special]) and (out[~special] == UNK).all()
    mask = torch.zeros(10, dtype=torch.bool)
    mask[3] = True  # broadcast over the batch
    out = word_dropout(tokens, 1.0, UNK, keep=mask)
    assert torch.equal(out[:, 3], tokens[:, 3]) and (out[:, :3] == UNK).all()
    # ids as an integer tensor are ids, not a mask
    by_tensor = word_dropout(tokens, 1.0, UNK, keep=torch.tensor([BOS, EOS, PAD]))
    assert torch.equal(by_tensor, word_dropout(tokens, 1.0, UNK, keep=(BOS, EOS, PAD)))


def test_word_dropout_identity_at_rate_zero_and_in_evaluation():
    tokens = _sentences(B=3, T=8)
    assert word_dropout(tokens, 0.0, UNK, keep=(PAD,)) is tokens
    assert word_dropout(tokens, 0.9, UNK, keep=(PAD,), training=False) is tokens


def test_word_dropout_bad_arguments():
    tokens = _sentences(B=2, T=6)
    for rate in (-0.1, 1.5):
        with pytest.raises(ValueError, match="rate"):
            word_dropout(tokens, rate, UNK)
    with pytest.raises(ValueError, match="tokens"):
        word_dropout(tokens.double(), 0.1, UNK)
    with pytest.raises(ValueError, match="keep"):
        word_dropout(tokens, 0.1, UNK, keep=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep"):
        word_dropout(tokens, 0.1, UNK, keep=(0.5,))
    with pytest.raises(ValueError, match="unk_id"):
        word_dropout(tokens, 0.1, 3.0)


def test_objectives_define_the_bound_and_loss_records_without_importing_models():
    import subprocess
    import sys

    code = (
        "import sys, latentnlp.objectives as o; "
        "assert not any(m.startswith('latentnlp.models') for m in sys.modules), sorted(sys.modules); "
        "from latentnlp.models.base import ELBO, Loss; assert ELBO is o.ELBO and Loss is o.Loss"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
