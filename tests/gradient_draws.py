"""Monte Carlo checks of gradient estimators on small models: many independent estimates of one
gradient at fixed parameters, against the exact one.

Each draw runs the model's ``elbo`` surrogate on ``copies`` copies of the batch (independent
samples for every copy) and backpropagates once, so a draw is the mean of ``copies`` estimates and
``reps`` draws give the mean and its standard error.
"""

from __future__ import annotations

import torch
from torch import Tensor


def parameters(model: torch.nn.Module, skip: str = "baseline.") -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters whose ELBO gradient is estimated (the learned baseline's are its own)."""
    return [(n, p) for n, p in model.named_parameters() if not n.startswith(skip)]


def flat_gradient(model: torch.nn.Module, surrogate: Tensor, names: list[str] | None = None) -> Tensor:
    params = [p for n, p in parameters(model) if names is None or any(n.startswith(m) for m in names)]
    grads = torch.autograd.grad(surrogate, params, allow_unused=True)
    return torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten() for p, g in zip(params, grads)])


def repeat_batch(batch: dict, copies: int) -> dict:
    return {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in batch.items()}


def exact_gradient(model, batch: dict, names: list[str] | None = None) -> Tensor:
    """The gradient of ``sum_b ELBO_b`` (enumerated) w.r.t. the estimated parameters."""
    return flat_gradient(model, model.elbo(batch, estimator="exact").surrogate.sum(), names)


def gradient_draws(
    model, batch: dict, kwargs: dict, *, reps: int, copies: int, seed: int = 0, names: list[str] | None = None
) -> Tensor:
    """``[reps, P]``: each row the mean of ``copies`` estimates of :func:`exact_gradient`."""
    big = repeat_batch(batch, copies)
    torch.manual_seed(seed)
    rows = [flat_gradient(model, model.elbo(big, **kwargs).surrogate.sum(), names) / copies for _ in range(reps)]
    return torch.stack(rows)


def assert_unbiased(draws: Tensor, exact: Tensor, sigmas: float = 4.5) -> None:
    """Every coordinate's mean within ``sigmas`` standard errors of the exact gradient."""
    mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    err = (mean - exact).abs()
    bad = err > sigmas * se + 1e-9 * (1 + exact.abs())
    assert not bad.any(), (err[bad], se[bad], exact[bad])


def relative_variance(draws: Tensor, exact: Tensor) -> float:
    """Trace of the draws' covariance over the exact gradient's squared norm."""
    return float(draws.var(0).sum() / exact.pow(2).sum())
