"""Gradient estimators: unbiasedness against enumeration, variance reduction, Gumbel-softmax."""

import pytest
import torch
from torch.distributions import Categorical, Independent

from latentnlp.estimators import Estimate, exact, gumbel_softmax, reparam, score_function
from latentnlp.families import DiagonalGaussian, MaskedCategorical, MeanFieldBernoulli

pytestmark = pytest.mark.usefixtures("float64")  # every test computes in float64


THETA = torch.tensor([0.3, -1.0, 0.8, 0.1], dtype=torch.float64)
VALUES = torch.tensor([6.0, 3.0, 8.0, 5.5], dtype=torch.float64)  # offset: a baseline matters


def _exact_gradients():
    theta = THETA.clone().requires_grad_()
    w = VALUES.clone().requires_grad_()
    est = exact(lambda z: w[z], Categorical(logits=theta))
    est.surrogate.backward()
    return est.value, theta.grad, w.grad


def _per_sample_gradients(n, baseline=None, seed=0):
    """n independent one-sample score-function gradients (rows), w.r.t. logits and f's weights."""
    theta = THETA.repeat(n, 1).requires_grad_()
    w = VALUES.clone().requires_grad_()
    q = Categorical(logits=theta)  # batch of n identical problems: one sample each
    torch.manual_seed(seed)
    est = score_function(lambda z: w[z], q, baseline=baseline)
    est.surrogate.sum().backward()
    return est, theta.grad, w.grad / n


def test_exact_matches_manual_sum_and_tensor_form():
    value, g_theta, g_w = _exact_gradients()
    p = torch.softmax(THETA, 0)
    assert value.item() == pytest.approx((p * VALUES).sum().item())
    torch.testing.assert_close(g_theta, p * (VALUES - (p * VALUES).sum()))
    torch.testing.assert_close(g_w, p)
    # tensor form over the last dimension, masked categories ignored even when f = -inf there
    q = MaskedCategorical(THETA, torch.tensor([True, False, True, True]))
    vals = VALUES.clone()
    vals[1] = float("-inf")
    est = exact(vals, q)
    assert torch.isfinite(est.surrogate)
    assert est.value.item() == pytest.approx((q.probs * VALUES).sum().item())


def test_exact_over_bernoulli_support():
    q = MeanFieldBernoulli(torch.tensor([[0.2, -0.4, 1.0]]))
    est = exact(lambda z: z.sum(-1) ** 2, q)  # E[(sum z)^2] = var + mean^2
    p = q.probs
    assert est.value.item() == pytest.approx((p * (1 - p)).sum().item() + p.sum().item() ** 2)


def test_score_function_unbiased():
    value, g_theta, g_w = _exact_gradients()
    n = 40000
    est, rows, g_w_mc = _per_sample_gradients(n)
    mean, se = rows.mean(0), rows.std(0) / n**0.5
    assert ((mean - g_theta).abs() <= 4 * se + 1e-12).all(), (mean, g_theta, se)
    # value: the mean of f(z); pathwise part: w's gradient is the empirical frequency
    assert abs(est.value.mean() - value) <= 4 * est.value.std() / n**0.5
    torch.testing.assert_close(g_w_mc, g_w, atol=0.02, rtol=0)


def test_learned_baseline_trains_and_reduces_variance():
    # fit an input-independent baseline b by its own regression loss
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([b], lr=0.1)
    q = Categorical(logits=THETA.repeat(256, 1))
    torch.manual_seed(0)
    for _ in range(100):
        est = score_function(lambda z: VALUES[z], q, baseline=b.expand(256))
        opt.zero_grad()
        (-est.objective.sum() / 256).backward()  # maximise the surrogate = minimise the loss
        opt.step()
    expected = (torch.softmax(THETA, 0) * VALUES).sum()
    assert abs(b.item() - expected.item()) < 0.1

    _, g_theta, _ = _exact_gradients()
    n = 40000
    _, plain, _ = _per_sample_gradients(n, seed=1)
    _, based, _ = _per_sample_gradients(n, baseline=b.detach().expand(n), seed=1)
    assert based.var(0).sum() < 0.2 * plain.var(0).sum()  # total variance (trace)
    se = based.std(0) / n**0.5
    assert ((based.mean(0) - g_theta).abs() <= 4 * se + 1e-12).all()


def test_objective_has_surrogate_value_and_baseline_gradient():
    b = torch.tensor(0.5, requires_grad=True)
    theta = THETA.clone().requires_grad_()
    torch.manual_seed(0)
    est = score_function(lambda z: VALUES[z], Categorical(logits=theta), baseline=b, num_samples=3)
    assert isinstance(est, Estimate)
    torch.testing.assert_close(est.objective, est.surrogate)
    (g_b,) = torch.autograd.grad(est.objective, b, retain_graph=True)
    (g_b_loss,) = torch.autograd.grad(-est.baseline_loss, b)
    torch.testing.assert_close(g_b, g_b_loss)


def test_leave_one_out_and_control_variate_unbiased():
    _, g_theta, _ = _exact_gradients()
    for kind in ("loo", "cv"):
        reps, n_per = 4000, 4
        theta = THETA.repeat(reps, 1).requires_grad_()
        q = Categorical(logits=theta)
        torch.manual_seed(2)
        if kind == "loo":
            est = score_function(lambda z: VALUES[z], q, baseline="leave-one-out", num_samples=n_per)
        else:
            c_values = 0.9 * VALUES  # a control variate correlated with f, known mean
            est = score_function(
                lambda z: VALUES[z],
                q,
                num_samples=n_per,
                control_variate=(lambda z: c_values[z], (q.probs * c_values).sum(-1)),
            )
        est.surrogate.sum().backward()
        rows = theta.grad
        se = rows.std(0) / reps**0.5
        assert ((rows.mean(0) - g_theta).abs() <= 4 * se + 1e-12).all(), kind


def test_score_function_checks_shapes_and_arguments():
    q = Categorical(logits=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one value per factor"):
        score_function(lambda z: z.sum(-1).double(), q)
    with pytest.raises(ValueError, match="leave-one-out"):
        score_function(lambda z: z.double(), q, baseline="leave-one-out")
    # Independent turns per-position factors into one joint latent
    joint = score_function(lambda z: z.double().sum(-1), Independent(q, 1), num_samples=2)
    assert joint.surrogate.shape == ()


def test_reparam_unbiased_gaussian():
    loc = torch.tensor([0.5, -1.0], requires_grad=True)
    scale = torch.tensor([1.5, 0.3], requires_grad=True)
    q = DiagonalGaussian(loc, scale)
    est = reparam(lambda z: z.pow(2).sum(-1), q, num_samples=100000, generator=torch.Generator().manual_seed(0))
    est.surrogate.backward()
    exact_value = (loc**2 + scale**2).sum()
    assert est.value.item() == pytest.approx(exact_value.item(), rel=0.02)
    torch.testing.assert_close(loc.grad, 2 * loc.detach(), atol=0.03, rtol=0)
    torch.testing.assert_close(scale.grad, 2 * scale.detach(), atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="rsample"):
        reparam(lambda z: z, Categorical(logits=torch.zeros(3)))


def test_gumbel_softmax_argmax_frequencies_match_categorical():
    logits = torch.tensor([0.5, -0.3, 1.2, 0.0, -2.0])
    mask = torch.tensor([True, True, True, True, False])
    n = 50000
    y = gumbel_softmax(logits.expand(n, 5), tau=0.7, hard=True, mask=mask, generator=torch.Generator().manual_seed(0))
    assert ((y == 0) | (y == 1)).all() and (y.sum(-1) == 1).all()
    freq = y.mean(0)
    p = MaskedCategorical(logits, mask).probs
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * se + 1e-12).all(), (freq, p)
    assert freq[4] == 0


def test_gumbel_softmax_straight_through_gradient():
    logits = torch.randn(3, 4, requires_grad=True)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    w = torch.randn(4)
    hard = gumbel_softmax(logits, tau=0.5, hard=True, generator=g1)
    soft = gumbel_softmax(logits, tau=0.5, hard=False, generator=g2)
    torch.testing.assert_close(hard.argmax(-1), soft.argmax(-1))
    torch.testing.assert_close(soft.sum(-1), torch.ones(3))
    (ga,) = torch.autograd.grad((hard * w).sum(), logits)
    (gb,) = torch.autograd.grad((soft * w).sum(), logits)
    torch.testing.assert_close(ga, gb)
    with pytest.raises(ValueError, match="tau"):
        gumbel_softmax(logits, tau=0.0)


def test_baselines_predict_the_residual_of_a_control_variate():
    q = Categorical(logits=THETA)
    c_values = 0.9 * VALUES
    cv = (lambda z: c_values[z], (q.probs * c_values).sum(-1))
    b = torch.tensor(0.2, requires_grad=True)
    torch.manual_seed(0)
    est = score_function(lambda z: VALUES[z], q, baseline=b, control_variate=cv, num_samples=5)
    torch.manual_seed(0)
    z = q.sample((5,))
    torch.testing.assert_close(est.baseline_loss, (0.1 * VALUES[z] - 0.2).pow(2).mean(0).detach(), check_dtype=False)
    # leave-one-out over f - c: with f = c + const the signal, and so the gradient, vanish
    theta = THETA.clone().requires_grad_()
    q = Categorical(logits=theta)
    shifted = (lambda z: VALUES[z] - 3.0, (q.probs * (VALUES - 3.0)).sum(-1))
    est = score_function(lambda z: VALUES[z], q, baseline="leave-one-out", control_variate=shifted, num_samples=4)
    est.surrogate.backward()
    p = torch.softmax(THETA, 0)
    torch.testing.assert_close(theta.grad, p * (VALUES - (p * VALUES).sum()))  # the exact gradient, from mean_c
