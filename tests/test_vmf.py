"""The von Mises-Fisher family and its uniform prior against oracles: log I_v against mpmath and the
closed forms of half-integer orders, the density's integral by quadrature (and C_3's closed form),
Wood's sampler against the moments A_d(kappa) and E[w^2], the KL and entropy against Monte Carlo,
the reparameterised gradient by gradcheck and against the analytic gradient of E[a^T z]; then the
vMF SentenceVAE (the KL constant in the direction, the bounds, generation and interpolation on the
sphere, refusing free bits)."""

import math

import pytest
import torch
import torch.nn.functional as F
from contract import lm_batch
from torch.distributions import kl_divergence

from latentnlp.families import (
    HypersphericalUniform,
    VonMisesFisher,
    log_bessel_iv,
    log_sphere_area,
    vmf_log_normalizer,
    vmf_mean_resultant_length,
)
from latentnlp.models import SentenceVAE
from latentnlp.models.sentence_vae import slerp

# ---- log I_v ----------------------------------------------------------------------------------------


def test_log_bessel_matches_mpmath_in_both_regimes():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 30
    orders = [0.0, 0.5, 1.0, 2.5, 15.0, 49.0, 150.0]
    args = [1e-3, 0.7, 12.0, 80.0, 99.0, 101.0, 400.0, 5e3, 1e5]
    v = torch.tensor(orders, dtype=torch.float64).view(-1, 1)
    x = torch.tensor(args, dtype=torch.float64).view(1, -1)
    got = log_bessel_iv(v, x)
    want = torch.tensor([[float(mpmath.log(mpmath.besseli(a, b))) for b in args] for a in orders], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-11, atol=1e-11), (got - want).abs().max()


def _log_sinh(x):
    return x + torch.log1p(-torch.exp(-2 * x)) - math.log(2)


def test_log_bessel_matches_the_half_integer_closed_forms():
    """``I_1/2(x) = sqrt(2 / (pi x)) sinh x``, ``I_3/2(x) = sqrt(2 / (pi x)) (cosh x - sinh x / x)``,
    across the switch from the series to the Debye expansion (``sqrt(v^2 + x^2) = 100``)."""
    x = torch.cat([torch.logspace(-2, 1.9, 40, dtype=torch.float64), torch.linspace(99, 101, 9).double(),
                   torch.logspace(2.1, 5, 20, dtype=torch.float64)])  # fmt: skip
    front = 0.5 * torch.log(2 / (math.pi * x))
    half = front + _log_sinh(x)
    # cosh x - sinh x / x = e^x / 2 (1 - 1/x) + e^-x / 2 (1 + 1/x)
    three_halves = front + x - math.log(2) + torch.log((1 - 1 / x) + torch.exp(-2 * x) * (1 + 1 / x))
    keep = x > 0.05  # below, cosh x - sinh x / x cancels in float64; the series is the accurate one there
    assert torch.allclose(log_bessel_iv(0.5, x), half, rtol=1e-12, atol=1e-12)
    assert torch.allclose(log_bessel_iv(1.5, x)[keep], three_halves[keep], rtol=1e-10, atol=1e-10)


def test_log_bessel_keeps_the_dtype_and_the_large_argument_asymptotics():
    x = torch.tensor([1e6, 1e8], dtype=torch.float32)
    out = log_bessel_iv(4.0, x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    leading = x.double() - 0.5 * torch.log(2 * math.pi * x.double())  # I_v(x) ~ e^x / sqrt(2 pi x)
    assert torch.allclose(out.double(), leading, rtol=1e-7)


# ---- the density -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kappa", [0.3, 4.0, 60.0, 700.0])
def test_density_integrates_to_one_on_the_circle(kappa):
    theta = torch.linspace(-math.pi, math.pi, 200_001, dtype=torch.float64)[:-1]
    z = torch.stack([torch.cos(theta), torch.sin(theta)], -1)
    mu = torch.tensor([0.6, -0.8], dtype=torch.float64)
    density = VonMisesFisher(mu, kappa).log_prob(z).exp()
    assert float(density.sum() * (2 * math.pi / theta.numel())) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("kappa", [0.01, 1.0, 30.0, 600.0])
def test_three_dimensional_normalizer_is_the_closed_form(kappa):
    k = torch.tensor(kappa, dtype=torch.float64)
    closed = torch.log(k) - math.log(4 * math.pi) - _log_sinh(k)  # C_3 = kappa / (4 pi sinh kappa)
    assert torch.allclose(vmf_log_normalizer(3, k), closed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", [3, 4, 10, 32])
@pytest.mark.parametrize("kappa", [0.5, 20.0, 150.0])
def test_density_integrates_to_one_on_higher_spheres(d, kappa):
    """``int q = |S^(d-2)| int_-1^1 C_d e^(kappa w) (1 - w^2)^((d-3)/2) dw`` by the trapezoidal rule in
    ``w = cos theta`` (so the integrand is smooth at the poles)."""
    theta = torch.linspace(0, math.pi, 400_001, dtype=torch.float64)
    w = torch.cos(theta)
    log_f = vmf_log_normalizer(d, torch.tensor(kappa, dtype=torch.float64)) + kappa * w
    log_f = log_f + (d - 2) * torch.log(torch.sin(theta).clamp_min(1e-300))  # (1 - w^2)^((d-3)/2) dw
    total = torch.trapezoid(torch.exp(log_f + log_sphere_area(d - 1)), theta)
    assert float(total) == pytest.approx(1.0, abs=1e-8)


def test_uniform_prior_is_the_inverse_area():
    p = HypersphericalUniform(3, (2,), dtype=torch.float64)
    z = p.sample((5,), generator=torch.Generator().manual_seed(0))
    assert z.shape == (5, 2, 3) and torch.allclose(z.norm(dim=-1), torch.ones(5, 2, dtype=torch.float64))
    assert torch.allclose(p.log_prob(z), torch.full((5, 2), -math.log(4 * math.pi), dtype=torch.float64))
    assert torch.allclose(p.entropy(), torch.full((2,), math.log(4 * math.pi), dtype=torch.float64))


def test_log_prob_entropy_and_bessel_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    special = pytest.importorskip("scipy.special")
    for d, kappa in ((3, 0.4), (5, 12.0), (32, 80.0), (64, 300.0)):
        g = torch.Generator().manual_seed(d)
        mu = F.normalize(torch.randn(d, dtype=torch.float64, generator=g), dim=0)
        q = VonMisesFisher(mu, kappa)
        z = q.sample((7,), generator=g)
        peer = stats.vonmises_fisher(mu.numpy(), kappa)
        assert torch.allclose(q.log_prob(z), torch.from_numpy(peer.logpdf(z.numpy())), rtol=1e-9, atol=1e-9)
        assert float(q.entropy()) == pytest.approx(float(peer.entropy()), rel=1e-9, abs=1e-9)
    v, x = torch.tensor([0.0, 3.5, 30.0]).double().view(-1, 1), torch.tensor([0.5, 99.5, 100.5, 2e3]).double()
    scaled = torch.from_numpy(special.ive(v.numpy(), x.numpy()))  # I_v(x) e^-x
    assert torch.allclose(log_bessel_iv(v, x), torch.log(scaled) + x, rtol=1e-12, atol=1e-12)


# ---- Wood's sampler ---------------------------------------------------------------------------------


def _se(x, dim=0):
    return x.std(dim) / math.sqrt(x.shape[dim])


@pytest.mark.parametrize("d", [2, 3, 5, 32])
@pytest.mark.parametrize("kappa", [0.5, 6.0, 80.0])
def test_samples_have_the_mean_resultant_length_and_second_moment(d, kappa):
    """``E[w] = A_d(kappa)`` and ``E[w^2] = 1 - (d - 1) A_d(kappa) / kappa`` for ``w = mu^T z``."""
    mu = F.normalize(torch.randn(d, generator=torch.Generator().manual_seed(d), dtype=torch.float64), dim=0)
    q = VonMisesFisher(mu, kappa)
    z = q.sample((40_000,), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(z.norm(dim=-1), torch.ones(z.shape[0], dtype=torch.float64))
    w = z @ mu
    a = float(vmf_mean_resultant_length(d, torch.tensor(kappa, dtype=torch.float64)))
    assert abs(float(w.mean()) - a) <= 4 * float(_se(w)) + 1e-12, (float(w.mean()), a)
    second = 1 - (d - 1) * a / kappa
    assert abs(float((w * w).mean()) - second) <= 4 * float(_se(w * w)) + 1e-12
    # the sample mean is A_d mu: the mean direction is mu
    assert torch.all((z.mean(0) - a * mu).abs() <= 4 * _se(z) + 1e-12)


def test_samples_around_e1_need_no_reflection():
    """``mu = e_1`` is the sampler's own axis: the reflection is the identity there, and the draws stay finite."""
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    z = VonMisesFisher(e1, 7.0).sample((20_000,), generator=torch.Generator().manual_seed(4))
    assert torch.isfinite(z).all()
    a = float(vmf_mean_resultant_length(4, 7.0))
    assert torch.all((z.mean(0) - a * e1).abs() <= 4 * _se(z))


def test_rsample_shapes_and_batched_concentrations():
    g = torch.Generator().manual_seed(0)
    loc = F.normalize(torch.randn(3, 2, 6, generator=g), dim=-1)
    kappa = torch.tensor([1.0, 50.0])
    q = VonMisesFisher(loc, kappa)
    assert q.batch_shape == (3, 2) and q.event_shape == (6,)
    z = q.rsample((4, 5), generator=g)
    assert z.shape == (4, 5, 3, 2, 6) and q.log_prob(z).shape == (4, 5, 3, 2)
    w = (z * loc).sum(-1).reshape(-1, 3, 2)
    assert float(w[..., 1].mean()) > float(w[..., 0].mean())  # the concentrated column stays near mu
    assert q.expand((7, 3, 2)).rsample(generator=g).shape == (7, 3, 2, 6)


def test_the_same_generator_gives_the_same_draws():
    loc = F.normalize(torch.randn(4, 5), dim=-1)
    a = VonMisesFisher(loc, 3.0).sample((6,), generator=torch.Generator().manual_seed(3))
    b = VonMisesFisher(loc, 3.0).sample((6,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("d, kappa", [(3, 2.0), (8, 25.0), (32, 80.0)])
def test_kl_and_entropy_match_monte_carlo(d, kappa):
    mu = F.normalize(torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=0)
    q, p = VonMisesFisher(mu, kappa), HypersphericalUniform(d, dtype=torch.float64)
    z = q.sample((20_000,), generator=torch.Generator().manual_seed(2))
    log_q = q.log_prob(z)
    samples = log_q - p.log_prob(z)
    kl = kl_divergence(q, p)
    assert abs(float(samples.mean() - kl)) <= 4 * float(_se(samples)), (float(samples.mean()), float(kl))
    assert abs(float(-log_q.mean() - q.entropy())) <= 4 * float(_se(log_q))
    assert torch.allclose(kl, log_sphere_area(d) - q.entropy())


def test_kl_does_not_depend_on_the_direction():
    loc = F.normalize(torch.randn(5, 16, dtype=torch.float64), dim=-1).requires_grad_()
    kl = kl_divergence(VonMisesFisher(loc, 80.0), HypersphericalUniform(16))
    assert kl.shape == (5,) and torch.allclose(kl, kl[0].expand(5))
    assert not kl.requires_grad or torch.autograd.grad(kl.sum(), loc, allow_unused=True)[0] is None


# ---- the reparameterised gradient -------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3, 7])
def test_rsample_gradient_in_loc_by_gradcheck(d):
    v = torch.randn(2, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d), requires_grad=True)

    def draw(v):  # the same rejection draws on every call: w does not depend on mu
        return VonMisesFisher(F.normalize(v, dim=-1), 5.0).rsample((3,), generator=torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(draw, (v,))


@pytest.mark.parametrize("d, kappa", [(3, 4.0), (10, 40.0)])
def test_monte_carlo_gradient_of_a_linear_function_is_the_analytic_one(d, kappa):
    """``E[a^T z] = A_d a^T mu``: with ``mu = v / |v|`` its gradient in ``v`` is
    ``A_d (I - mu mu^T) a / |v|``; the pathwise estimate over repeats matches it."""
    g = torch.Generator().manual_seed(5)
    v = torch.randn(d, dtype=torch.float64, generator=g)
    a = torch.randn(d, dtype=torch.float64, generator=g)
    mu = F.normalize(v, dim=0)
    A = vmf_mean_resultant_length(d, torch.tensor(kappa, dtype=torch.float64))
    want = A * (a - mu * (mu @ a)) / v.norm()
    grads = []
    for r in range(10):
        leaf = v.clone().requires_grad_()
        z = VonMisesFisher(F.normalize(leaf, dim=0), kappa).rsample((4000,), generator=g.manual_seed(100 + r))
        (grad,) = torch.autograd.grad((z @ a).mean(), leaf)
        grads.append(grad)
    grads = torch.stack(grads)
    assert torch.all((grads.mean(0) - want).abs() <= 4 * _se(grads) + 1e-12), (grads.mean(0), want)


# ---- bad input ----------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="loc must hold unit vectors.*norms"):
        VonMisesFisher(torch.tensor([[1.0, 1.0]]), 2.0)
    with pytest.raises(ValueError, match="concentration must be positive"):
        VonMisesFisher(torch.tensor([1.0, 0.0]), 0.0)
    with pytest.raises(ValueError, match="concentration must be positive"):
        VonMisesFisher(torch.tensor([1.0, 0.0]), -3.0)
    with pytest.raises(ValueError, match=r"loc must be \[\*batch, d\] with d >= 2"):
        VonMisesFisher(torch.tensor([1.0]), 2.0)
    with pytest.raises(ValueError, match="concentration of shape"):
        VonMisesFisher(F.normalize(torch.randn(3, 4), dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="d must be an integer >= 2"):
        HypersphericalUniform(1)
    with pytest.raises(ValueError, match="one sphere"):
        kl_divergence(VonMisesFisher(torch.tensor([1.0, 0.0]), 1.0), HypersphericalUniform(3))
    with pytest.raises(ValueError):  # a point off the sphere
        VonMisesFisher(torch.tensor([1.0, 0.0]), 1.0).log_prob(torch.tensor([2.0, 0.0]))
    # with validation off the checks that read values are skipped
    VonMisesFisher(torch.tensor([1.0, 1.0]), 2.0, validate_args=False)


# ---- the vMF SentenceVAE ------------------------------------------------------------------------------

V = 12


def vmf_vae(latent_size=3, concentration=10.0, **kwargs):
    torch.manual_seed(0)
    return SentenceVAE(
        V, 8, 10, latent_size, latent="vmf", concentration=concentration, bos_id=0, eos_id=1, **kwargs
    ).double()


def batch(seed=0, **kwargs):
    return lm_batch(torch.Generator().manual_seed(seed), vocab_size=V, **kwargs)


def test_vmf_posterior_and_the_constant_kl():
    model, data = vmf_vae(), batch()
    q = model.posterior(data)
    assert isinstance(q, VonMisesFisher) and q.batch_shape == (5,) and q.event_shape == (3,)
    assert torch.allclose(q.loc.norm(dim=-1), torch.ones(5, dtype=torch.float64))
    bound = model.elbo(data, generator=torch.Generator().manual_seed(0))
    expected = kl_divergence(VonMisesFisher(q.loc, 10.0), HypersphericalUniform(3))
    assert torch.allclose(bound.kl, expected) and torch.allclose(bound.kl, bound.kl[0].expand(5))
    assert torch.allclose(bound.value, bound.reconstruction - bound.kl)
    # the KL weight changes the surrogate's value, not one gradient: the KL is constant in the encoder
    grads = []
    for weight in (0.0, 1.0):
        model.zero_grad()
        model.elbo(data, kl_weight=weight, generator=torch.Generator().manual_seed(0)).surrogate.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1])


def _circle_model():
    """A 2-d vMF latent whose decoder leans on z, and log p(x) by quadrature over the circle."""
    model = vmf_vae(latent_size=2, concentration=3.0).eval()
    with torch.no_grad():
        model.initial_cell.weight.mul_(4.0)
        model.decoder.weight_ih_l0[:, -2:].mul_(6.0)
    data = batch(3, batch_size=3, max_len=4)
    inputs, targets, _, mask = model._check_batch(data)
    theta = torch.linspace(-math.pi, math.pi, 2001, dtype=torch.float64)[:-1]
    z = torch.stack([torch.cos(theta), torch.sin(theta)], -1)
    with torch.no_grad():
        log_lik = model._log_likelihood(z.view(-1, 1, 2).expand(-1, 3, 2), inputs, targets, mask)  # [Z, B]
    log_px = torch.logsumexp(log_lik, 0) - math.log(theta.numel())  # the uniform prior: a plain average
    return model, data, log_px


def test_vmf_bounds_against_the_quadrature_marginal():
    model, data, log_px = _circle_model()
    repeats = 40
    copies = {k: v.repeat(repeats, *([1] * (v.dim() - 1))) for k, v in data.items()}
    torch.manual_seed(1)
    with torch.no_grad():
        elbo = model.elbo(copies).value.view(repeats, -1)
        iw = {s: model.iwae(copies, s).view(repeats, -1) for s in (1, 256)}
    for draws in (elbo, iw[1], iw[256]):
        assert torch.all(draws.mean(0) <= log_px + 4 * _se(draws) + 1e-9), (draws.mean(0), log_px)
    gap_elbo, gap_iw = float((log_px - elbo.mean(0)).sum()), float((log_px - iw[256].mean(0)).sum())
    assert gap_elbo > 0.2 and gap_iw < 0.2 * gap_elbo, (gap_elbo, gap_iw)
    se = (_se(iw[1]) ** 2 + _se(elbo) ** 2).sqrt()
    assert torch.all((iw[1].mean(0) - elbo.mean(0)).abs() <= 4 * se)  # one-sample IWAE = ELBO in expectation


def test_vmf_generation_from_the_uniform_prior_and_the_posterior_directions():
    model, data = vmf_vae().eval(), batch()
    drawn = model.generate(num_samples=4, generator=torch.Generator().manual_seed(7), max_length=6)
    z = HypersphericalUniform(3, dtype=torch.float64).sample((4,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(drawn.tokens, model.generate(z=z, max_length=6).tokens)
    from_batch = model.generate(data, max_length=6)
    assert torch.equal(from_batch.tokens, model.generate(z=model.posterior(data).loc, max_length=6).tokens)


def test_vmf_interpolation_follows_the_great_circle():
    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(2, 5, dtype=torch.float64, generator=g), dim=-1)
    t = torch.linspace(0, 1, 6, dtype=torch.float64).view(-1, 1)
    path = slerp(a, b, t)
    assert torch.allclose(path.norm(dim=-1), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(path[0], a) and torch.allclose(path[-1], b)
    steps = torch.arccos((path[1:] * path[:-1]).sum(-1).clamp(-1, 1))
    assert torch.allclose(steps, steps[0].expand(5))  # equal angles: constant speed along the circle
    assert torch.allclose(slerp(a, a, t), a.expand(6, 5))
    model = vmf_vae().eval()
    one, two = batch(1, batch_size=2), batch(2, batch_size=2)
    out = model.interpolate(one, two, steps=3, max_length=6)
    assert out.tokens.shape[:2] == (3, 2)
    assert torch.equal(out.tokens[0], model.generate(one, max_length=6).tokens[:, : out.tokens.shape[2]])


def test_vmf_option_errors():
    with pytest.raises(ValueError, match="free_bits.*vmf"):
        vmf_vae().elbo(batch(), free_bits=0.5)
    with pytest.raises(ValueError, match="latent must be"):
        SentenceVAE(V, 8, 10, 3, latent="spherical")
    with pytest.raises(ValueError, match="latent_size >= 2"):
        SentenceVAE(V, 8, 10, 1, latent="vmf")
    with pytest.raises(ValueError, match="concentration must be"):
        SentenceVAE(V, 8, 10, 3, latent="vmf", concentration=0.0)
