"""BinaryVAE: the Bernoulli decoder, and each objective against the marginal by quadrature (L = 1)."""

from __future__ import annotations

import math

import pytest
import torch

from latentnlp.models import BinaryVAE

S = 1000  # IWAE samples
GRID = torch.linspace(-8, 8, 4001, dtype=torch.float64)


def _model(num_pixels: int = 3, seed: int = 0) -> BinaryVAE:
    torch.manual_seed(seed)
    model = BinaryVAE(num_pixels, latent_size=1, hidden_size=16).double()
    with torch.no_grad():  # a decoder whose pixels depend strongly on z
        model.decoder[2].weight.mul_(4.0)
    return model


def _all_images(d: int) -> torch.Tensor:
    return torch.tensor([[(i >> j) & 1 for j in range(d)] for i in range(2**d)], dtype=torch.float64)


def _quadrature(model: BinaryVAE, x: torch.Tensor):
    """``log p(x)``, ``E[z | x]`` and ``Var[z | x]`` by the trapezoid rule over ``z in [-8, 8]``."""
    with torch.no_grad():
        log_lik = model.log_likelihood(x, GRID.view(-1, 1, 1))  # [G, B]
        log_joint = log_lik - 0.5 * GRID.view(-1, 1) ** 2 - 0.5 * math.log(2 * math.pi)
        step = float(GRID[1] - GRID[0])
        log_px = torch.logsumexp(log_joint, 0) + math.log(step)  # edges have negligible mass
        post = torch.softmax(log_joint, 0)
        mean = (post * GRID.view(-1, 1)).sum(0)
        var = (post * (GRID.view(-1, 1) - mean) ** 2).sum(0)
    return log_px, mean, var


def test_log_likelihood_is_the_bernoulli_density():
    model = _model(5)
    x = torch.bernoulli(torch.full((4, 5), 0.5, dtype=torch.float64))
    z = torch.randn(2, 4, 1, dtype=torch.float64)
    p = torch.sigmoid(model.decoder(z))
    expected = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    torch.testing.assert_close(model.log_likelihood(x, z), expected)


def test_bounds_against_the_marginal_by_quadrature():
    model = _model()
    x = _all_images(3)
    log_px, _, _ = _quadrature(model, x)
    torch.testing.assert_close(torch.logsumexp(log_px, 0), torch.zeros((), dtype=torch.float64), atol=1e-6, rtol=0)
    batch = {"pixels": x}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        elbos = torch.stack([model.elbo(batch, num_samples=200, generator=g).value for _ in range(20)])
        iwae = torch.stack([model.iwae(batch, S, generator=g) for _ in range(20)])  # [R, B]
        q = model.encode(x)
        z = q.sample((20000,), generator=g)
        log_w = model.log_likelihood(x, z) + model.prior().log_prob(z) - q.log_prob(z)
    elbo_se, iwae_se = elbos.std(0) / math.sqrt(20), iwae.std(0) / math.sqrt(20)
    assert (elbos.mean(0) <= log_px + 4 * elbo_se).all()
    assert (iwae.mean(0) >= elbos.mean(0) - 4 * (elbo_se + iwae_se)).all()
    assert (iwae.mean(0) <= log_px + 4 * iwae_se).all()  # E[L_S] <= log p(x)
    # tight: by the delta method log p(x) - E[L_S] ~ Var[w / p(x)] / (2S), the variance of the
    # normalised weights measured on the draws; allow twice that plus the draws' spread
    gap_bound = torch.exp(log_w - log_px).var(0) / S
    assert (log_px - iwae.mean(0) <= gap_bound + 4 * iwae_se).all(), (log_px - iwae.mean(0), gap_bound, iwae_se)


def test_sleep_phase_moment_matches_the_exact_posterior():
    """Sleep minimises ``E_p(x) KL(p(z | x) || q(z | x))``: for a Gaussian ``q`` its optimum has the
    posterior's mean and variance at every ``x`` (here the 8 images of 3 pixels)."""
    model = _model()
    for p in model.decoder.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.encoder.parameters(), lr=0.02)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t / 100))
    batch = {"pixels": torch.zeros(1024, 3, dtype=torch.float64)}  # only the dreams train the encoder
    torch.manual_seed(2)
    for _ in range(400):
        opt.zero_grad()
        model.loss(batch, "wake-sleep").value.backward()
        opt.step()
        decay.step()
    x = _all_images(3)
    _, mean, var = _quadrature(model, x)
    q = model.encode(x)
    torch.testing.assert_close(q.loc.squeeze(-1).detach(), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(q.scale.squeeze(-1).detach() ** 2, var, atol=0.05, rtol=0.1)


def test_wake_sleep_loss_and_metrics():
    model = _model(4)
    batch = {"pixels": torch.bernoulli(torch.full((6, 4), 0.5, dtype=torch.float64))}
    plain = model.loss(batch, "wake-sleep", generator=torch.Generator().manual_seed(3))
    # one wake sample: the bound is a one-sample ELBO estimate, neg_elbo (nll is kept for IW estimates)
    assert "nll" not in plain.metrics
    assert plain.metrics["neg_elbo"].shape == (6,) and not plain.metrics["neg_elbo"].requires_grad
    again = model.loss(batch, "wake-sleep", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(plain.metrics["neg_elbo"], again.metrics["neg_elbo"])
    one_sample = model.iwae(batch, 1, generator=torch.Generator().manual_seed(3))  # L_1 at the same z
    torch.testing.assert_close(plain.metrics["neg_elbo"], -one_sample.detach())
    assert torch.equal(plain.metrics["tokens"], torch.full((6,), 4.0, dtype=torch.float64))
    plain.value.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    reweighted = model.loss(batch, "wake-sleep", num_samples=5, reweighted=True)
    assert "neg_elbo" not in reweighted.metrics and reweighted.metrics["nll"].shape == (6,)
    reweighted.value.backward()
    # reweighted wake-phase q update only: the encoder learns from x's samples, not from dreams
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_generate_and_bad_input():
    model = BinaryVAE(6, 2, 4)
    out = model.generate(num_samples=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, model.generate(num_samples=3, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (3, 6) and bool(((out == 0) | (out == 1)).all())
    assert model.generate({"pixels": torch.zeros(2, 6)}).shape == (2, 6)
    with pytest.raises(ValueError, match=r"\[B, 6\], got \(2, 5\)"):
        model.loss({"pixels": torch.zeros(2, 5)}, "elbo")
    with pytest.raises(ValueError, match="zeros and ones"):
        model.loss({"pixels": torch.full((2, 6), 0.5)}, "elbo")
    with pytest.raises(ValueError, match="latent_size"):
        BinaryVAE(6, 0)
