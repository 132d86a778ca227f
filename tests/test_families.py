"""Variational families against enumeration and closed forms (float64)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Categorical, Independent, Normal, kl_divergence

from latentnlp.families import DiagonalGaussian, LogisticNormal, MaskedCategorical, MeanFieldBernoulli
from latentnlp.masks import lengths_to_mask

pytestmark = pytest.mark.usefixtures("float64")  # every test computes in float64


def _masked_pair(B=3, T=4, S=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 2, 1])[:B]
    q = MaskedCategorical.from_lengths(torch.randn(B, T, S, generator=g, requires_grad=True), lengths)
    p = MaskedCategorical.from_lengths(torch.randn(B, T, S, generator=g, requires_grad=True), lengths)
    return q, p, lengths


def test_lengths_to_mask():
    m = lengths_to_mask(torch.tensor([3, 1]), 4)
    assert m.tolist() == [[True, True, True, False], [True, False, False, False]]
    with pytest.raises(ValueError, match="lengths"):
        lengths_to_mask(torch.ones(2, 2, dtype=torch.long))


def test_masked_categorical_normalised_and_masked():
    q, _, lengths = _masked_pair()
    assert q.batch_shape == (3, 4)
    torch.testing.assert_close(q.probs.sum(-1), torch.ones(3, 4))
    mask = lengths_to_mask(lengths, 5)[:, None, :].expand(3, 4, 5)
    assert (q.probs[~mask] == 0).all()
    assert torch.isneginf(q.logits[~mask]).all()
    # log_prob of every category sums (in prob space) to one
    support = q.enumerate_support()  # [S, B, T]
    torch.testing.assert_close(q.log_prob(support).exp().sum(0), torch.ones(3, 4))
    s = q.sample((2000,), generator=torch.Generator().manual_seed(1))
    assert s.shape == (2000, 3, 4)
    assert (s < lengths[None, :, None]).all()


def test_masked_categorical_entropy_and_kl_match_enumeration():
    q, p, lengths = _masked_pair()
    mask = lengths_to_mask(lengths, 5)[:, None, :].expand(3, 4, 5)
    qp, pp = q.probs, p.probs
    ent = torch.zeros(3, 4)
    kl = torch.zeros(3, 4)
    for b in range(3):
        for t in range(4):
            for m in range(5):
                if mask[b, t, m]:
                    ent[b, t] -= qp[b, t, m] * qp[b, t, m].log()
                    kl[b, t] += qp[b, t, m] * (qp[b, t, m].log() - pp[b, t, m].log())
    torch.testing.assert_close(q.entropy(), ent)
    torch.testing.assert_close(kl_divergence(q, p), kl)
    torch.testing.assert_close(kl_divergence(q, q), torch.zeros(3, 4))
    # gradients are finite despite -inf logits
    (kl_divergence(q, p).sum() + q.entropy().sum()).backward()


def test_masked_categorical_gradients_finite_and_zero_at_masked():
    lengths = torch.tensor([3, 1])
    a = torch.randn(2, 2, 4, requires_grad=True)
    b = torch.randn(2, 2, 4, requires_grad=True)
    q = MaskedCategorical.from_lengths(a, lengths)
    p = MaskedCategorical.from_lengths(b, lengths)
    (kl_divergence(q, p).sum() - q.entropy().sum()).backward()
    for g in (a.grad, b.grad):
        assert torch.isfinite(g).all()
        assert (g[0, :, 3:] == 0).all() and (g[1, :, 1:] == 0).all()


def test_kl_infinite_when_prior_misses_support_and_mixed_types():
    q = MaskedCategorical(torch.zeros(3))
    p = MaskedCategorical(torch.zeros(3), torch.tensor([True, True, False]))
    assert math.isinf(kl_divergence(q, p).item())
    assert kl_divergence(p, q).item() == pytest.approx(math.log(3 / 2))
    plain = Categorical(logits=torch.zeros(3))
    assert kl_divergence(p, plain).item() == pytest.approx(math.log(3 / 2))
    assert math.isinf(kl_divergence(plain, p).item())


def test_masked_categorical_validation_and_expand():
    with pytest.raises(ValueError, match="mask"):
        MaskedCategorical(torch.zeros(2, 3), torch.tensor([[True, False, False], [False] * 3]))
    with pytest.raises(ValueError, match="broadcast"):
        MaskedCategorical(torch.zeros(2, 3), torch.ones(4, dtype=torch.bool))
    q = MaskedCategorical(torch.randn(3), torch.tensor([True, False, True]))
    e = q.expand((2, 5))
    assert e.batch_shape == (2, 5) and e.mask.shape == (2, 5, 3)
    torch.testing.assert_close(e.entropy(), q.entropy().expand(2, 5))


def test_diagonal_gaussian_closed_forms():
    g = torch.Generator().manual_seed(0)
    q = DiagonalGaussian(torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g) + 0.5)
    p = DiagonalGaussian(torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g) + 0.5)
    ref_q, ref_p = Normal(q.loc, q.scale), Normal(p.loc, p.scale)
    assert q.batch_shape == (4,) and q.event_shape == (3,)
    torch.testing.assert_close(kl_divergence(q, p), kl_divergence(ref_q, ref_p).sum(-1))
    x = torch.randn(7, 4, 3, generator=g)
    torch.testing.assert_close(q.log_prob(x), ref_q.log_prob(x).sum(-1))
    torch.testing.assert_close(q.entropy(), ref_q.entropy().sum(-1))
    prior = DiagonalGaussian.standard((4,), 3)
    torch.testing.assert_close(kl_divergence(q, prior), kl_divergence(ref_q, Normal(0.0, 1.0)).sum(-1))


def test_diagonal_gaussian_rsample_and_parameterisations():
    params = torch.randn(2, 6, requires_grad=True)
    q = DiagonalGaussian.from_params(params)
    z = q.rsample((3,), generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, 2, 3)
    z.sum().backward()
    assert params.grad is not None and torch.isfinite(params.grad).all()
    loc, logvar = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(DiagonalGaussian.from_logvar(loc, logvar).variance, logvar.exp())
    # Monte-Carlo mean / variance
    s = DiagonalGaussian(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])).sample(
        (200000,), generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(s.mean(0), torch.tensor([1.0, -2.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(s.std(0), torch.tensor([0.5, 2.0]), atol=0.02, rtol=0)
    e = DiagonalGaussian(torch.zeros(3), torch.ones(3)).expand((4,))
    assert e.batch_shape == (4,) and e.event_shape == (3,)
    with pytest.raises(ValueError, match="even"):
        DiagonalGaussian.from_params(torch.zeros(2, 3))


def test_mean_field_bernoulli_enumeration():
    g = torch.Generator().manual_seed(0)
    q = MeanFieldBernoulli(torch.randn(2, 4, generator=g) * 3)
    p = MeanFieldBernoulli(torch.randn(2, 4, generator=g) * 3)
    support = q.enumerate_support()  # [16, 2, 4]
    assert support.shape == (16, 2, 4)
    lq, lp = q.log_prob(support), p.log_prob(support)
    torch.testing.assert_close(lq.exp().sum(0), torch.ones(2))
    torch.testing.assert_close(q.entropy(), -(lq.exp() * lq).sum(0))
    torch.testing.assert_close(kl_divergence(q, p), (lq.exp() * (lq - lp)).sum(0))
    ref = Bernoulli(logits=q.logits)
    torch.testing.assert_close(kl_divergence(q, p), kl_divergence(ref, Bernoulli(logits=p.logits)).sum(-1))
    s = q.sample((50000,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(s.mean(0), q.probs, atol=0.015, rtol=0)


def test_mean_field_bernoulli_extreme_logits_stay_finite():
    a = torch.tensor([[60.0, -60.0, 0.0]], requires_grad=True)
    q, p = MeanFieldBernoulli(a), MeanFieldBernoulli(torch.zeros(1, 3))
    v = kl_divergence(q, p) + q.entropy() + q.log_prob(torch.tensor([[1.0, 0.0, 1.0]]))
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(a.grad).all()


# ---- the families are torch's Independent(Normal) / Independent(Bernoulli) -----------------------


def _mc_kl_bound(q, p, n, seed):
    """Monte Carlo ``KL(q || p) = E_q[log q(z) - log p(z)]`` and 5 standard errors of the mean."""
    z = q.sample((n,), generator=torch.Generator().manual_seed(seed))
    f = q.log_prob(z) - p.log_prob(z)  # [n, *batch]
    return f.mean(0), 5 * f.std(0) / math.sqrt(n)


def test_diagonal_gaussian_is_independent_normal():
    g = torch.Generator().manual_seed(2)
    loc, scale = torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g) + 0.3
    q = DiagonalGaussian(loc, scale)
    ref = Independent(Normal(loc, scale), 1)
    assert isinstance(q, Independent) and q.has_rsample and q.reinterpreted_batch_ndims == 1
    assert (q.batch_shape, q.event_shape) == (ref.batch_shape, ref.event_shape)
    x = torch.randn(5, 4, 3, generator=g)
    torch.testing.assert_close(q.log_prob(x), ref.log_prob(x))
    torch.testing.assert_close(q.entropy(), ref.entropy())
    for name in ("mean", "mode", "variance", "stddev"):
        torch.testing.assert_close(getattr(q, name), getattr(ref, name))
    torch.testing.assert_close(q.log_scale, scale.log())
    # the generator gives today's draws: loc + scale * randn(generator)
    z = q.rsample((2,), generator=torch.Generator().manual_seed(5))
    eps = torch.randn((2, 4, 3), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, loc + scale * eps)
    torch.manual_seed(9)
    a = q.sample((2,))
    torch.manual_seed(9)
    torch.testing.assert_close(a, q.sample((2,)))
    e = q.expand((2, 4))
    assert type(e) is DiagonalGaussian and e.batch_shape == (2, 4)
    torch.testing.assert_close(e.log_prob(x[:1]), q.log_prob(x[:1]).expand(2, 4))
    with pytest.raises(ValueError):
        DiagonalGaussian(torch.zeros(2), -torch.ones(2), validate_args=True)
    with pytest.raises(ValueError, match="broadcast"):
        DiagonalGaussian(torch.zeros(2, 3), torch.ones(4))


def test_diagonal_gaussian_kl_is_torchs_closed_form_and_matches_monte_carlo():
    from torch.distributions.kl import _KL_REGISTRY, _dispatch_kl

    g = torch.Generator().manual_seed(3)
    q = DiagonalGaussian(torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g) + 0.5)
    p = DiagonalGaussian(torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g) + 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ambiguous-dispatch warning
        # the (Independent, Independent) registration: torch's, or whichever library replaced it (Pyro's)
        assert _dispatch_kl(DiagonalGaussian, DiagonalGaussian) is _KL_REGISTRY[Independent, Independent]
        kl = kl_divergence(q, p)
    # the closed form of the module docstring, by hand
    m_q, s_q, m_p, s_p = q.loc, q.scale, p.loc, p.scale
    by_hand = (torch.log(s_p / s_q) + (s_q**2 + (m_q - m_p) ** 2) / (2 * s_p**2) - 0.5).sum(-1)
    torch.testing.assert_close(kl, by_hand)
    # mixed with a plain Independent(Normal) prior
    torch.testing.assert_close(kl_divergence(q, Independent(Normal(p.loc, p.scale), 1)), kl)
    estimate, tolerance = _mc_kl_bound(q, p, 20000, seed=4)
    assert ((estimate - kl).abs() < tolerance).all(), (estimate, kl, tolerance)


def test_mean_field_bernoulli_is_independent_bernoulli():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, generator=g) * 2
    q = MeanFieldBernoulli(logits)
    ref = Independent(Bernoulli(logits=logits), 1)
    assert isinstance(q, Independent) and not q.has_rsample and q.has_enumerate_support
    assert (q.batch_shape, q.event_shape) == (ref.batch_shape, ref.event_shape)
    x = (torch.rand(7, 2, 5, generator=g) < 0.5).double()
    torch.testing.assert_close(q.log_prob(x), ref.log_prob(x))
    torch.testing.assert_close(q.log_prob(x.bool()), ref.log_prob(x))
    torch.testing.assert_close(q.entropy(), ref.entropy())
    torch.testing.assert_close(q.mean, ref.mean)
    torch.testing.assert_close(q.variance, ref.variance)
    torch.testing.assert_close(q.probs, torch.sigmoid(logits))
    # the generator gives today's draws: [u < sigmoid(logits)], u = rand(generator)
    s = q.sample((3,), generator=torch.Generator().manual_seed(8))
    u = torch.rand((3, 2, 5), generator=torch.Generator().manual_seed(8))
    assert torch.equal(s, (u < q.probs).double())
    assert q.enumerate_support(expand=False).shape == (32, 1, 5)
    e = q.expand((3, 2))
    assert type(e) is MeanFieldBernoulli and e.batch_shape == (3, 2)
    assert e.enumerate_support().shape == (32, 3, 2, 5)
    with pytest.raises(ValueError, match="too large"):
        MeanFieldBernoulli(torch.zeros(21)).enumerate_support()


def test_mean_field_bernoulli_kl_matches_torch_and_monte_carlo():
    g = torch.Generator().manual_seed(7)
    q = MeanFieldBernoulli(torch.randn(3, 4, generator=g))
    p = MeanFieldBernoulli(torch.randn(3, 4, generator=g))
    kl = kl_divergence(q, p)
    torch.testing.assert_close(
        kl, kl_divergence(Independent(Bernoulli(logits=q.logits), 1), Independent(Bernoulli(logits=p.logits), 1))
    )
    estimate, tolerance = _mc_kl_bound(q, p, 20000, seed=10)
    assert ((estimate - kl).abs() < tolerance).all(), (estimate, kl, tolerance)


def test_mean_field_bernoulli_kl_finite_against_a_saturated_prior():
    # sigmoid(20.) rounds to 1 in float32: torch's Bernoulli KL says +inf, the exact value is finite
    q = MeanFieldBernoulli(torch.zeros(1, 1, dtype=torch.float32))
    p = MeanFieldBernoulli(torch.full((1, 1), 20.0, dtype=torch.float32))
    exact = 0.5 * (math.log(0.5) - F.logsigmoid(torch.tensor(20.0, dtype=torch.float64)).item()) + 0.5 * (
        math.log(0.5) - F.logsigmoid(torch.tensor(-20.0, dtype=torch.float64)).item()
    )
    assert kl_divergence(q, p).item() == pytest.approx(exact, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# logistic normal (softmax basis) and its Laplace approximation of a Dirichlet
# ------------------------------------------------------------------------------------------------
def test_logistic_normal_laplace_is_the_mode_and_curvature_of_the_dirichlet_in_the_softmax_basis():
    alpha = torch.tensor([0.7, 2.0, 5.0, 11.0])
    K = alpha.shape[0]
    approx = LogisticNormal.from_dirichlet(alpha)
    # the formulas of Srivastava & Sutton (2017), eq. (4)
    torch.testing.assert_close(approx.loc, alpha.log() - alpha.log().mean())
    expected_var = (1 / alpha) * (1 - 2 / K) + (1 / alpha).sum() / K**2
    torch.testing.assert_close(approx.scale**2, expected_var)

    # oracle: log p(z) = sum_k alpha_k log softmax(z)_k + const in the softmax basis
    def log_density(z):
        return (alpha * torch.log_softmax(z, -1)).sum(-1)

    mode = approx.loc.clone().requires_grad_()
    (grad,) = torch.autograd.grad(log_density(mode), mode)
    torch.testing.assert_close(grad, torch.zeros(K), atol=1e-12, rtol=0)  # a stationary point
    torch.testing.assert_close(approx.loc.sum(), torch.tensor(0.0), atol=1e-12, rtol=0)  # on sum z = 0
    neg_hessian = -torch.autograd.functional.hessian(log_density, approx.loc)
    P = torch.eye(K) - torch.full((K, K), 1.0 / K)
    covariance = P @ torch.diag(1 / alpha) @ P
    # the covariance inverts the curvature on the plane sum z = 0 (the hessian is singular along 1)
    torch.testing.assert_close(neg_hessian @ covariance, P)
    torch.testing.assert_close(torch.diagonal(covariance), approx.scale**2)


def test_logistic_normal_matches_the_dirichlet_mean():
    g = torch.Generator().manual_seed(0)
    S = 200_000
    # symmetric: E[softmax(z)] = 1/K exactly, by symmetry
    theta = LogisticNormal.from_dirichlet(torch.full((5,), 0.3)).rsample_simplex((S,), generator=g)
    torch.testing.assert_close(theta.sum(-1), torch.ones(S))
    stderr = theta.std(0) / math.sqrt(S)
    assert ((theta.mean(0) - 0.2).abs() < 4 * stderr).all()
    # concentrated: the approximation's mean tends to alpha / alpha_0 (here within 1%)
    alpha = torch.tensor([50.0, 100.0, 150.0])
    theta = LogisticNormal.from_dirichlet(alpha).rsample_simplex((S,), generator=g)
    torch.testing.assert_close(theta.mean(0), alpha / alpha.sum(), rtol=0.01, atol=0)


def test_logistic_normal_kl_to_the_laplace_prior_is_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(1)
    prior = LogisticNormal.from_dirichlet(torch.full((6,), 0.02))  # ProdLDA's alpha = 0.02, K = 6
    loc = torch.randn(3, 6, generator=g, requires_grad=True)
    scale = torch.rand(3, 6, generator=g) + 0.2
    q = LogisticNormal(loc, scale)
    kl = kl_divergence(q, prior)
    m1, v1 = prior.loc, prior.scale**2
    expected = 0.5 * ((scale**2 / v1) + (m1 - loc) ** 2 / v1 - 1 + (v1 / scale**2).log()).sum(-1)
    torch.testing.assert_close(kl, expected)
    z = q.rsample((50_000,), generator=g)
    log_ratio = q.log_prob(z) - prior.log_prob(z)
    assert ((log_ratio.mean(0) - kl).abs() < 4 * log_ratio.std(0) / math.sqrt(50_000)).all()
    assert type(q.expand((2, 3))) is LogisticNormal
    (grad,) = torch.autograd.grad(kl.sum(), loc)
    torch.testing.assert_close(grad, (loc - m1) / v1)


def test_logistic_normal_from_dirichlet_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        LogisticNormal.from_dirichlet(torch.ones(3, 1))
    with pytest.raises(ValueError, match="alpha"):
        LogisticNormal.from_dirichlet(torch.tensor([1.0, -1.0]))
