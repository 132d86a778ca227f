"""Gradient estimators for ``E_{q(z)}[f(z)]``.

Each estimator returns an :class:`Estimate` whose ``surrogate`` has the
estimate as its *value* and the estimator's gradient as its *gradient*
(w.r.t. the parameters of ``q`` and of ``f``), so a model maximises
``surrogate`` and reports ``surrogate.detach()``:

- :func:`exact`: enumerate the support, ``sum_z q(z) f(z)``; exact value and gradient.
- :func:`reparam`: ``z = g(eps, theta)`` from ``q.rsample``; ``1/S sum_s f(z_s)``.
- :func:`score_function`: REINFORCE / likelihood ratio,
  ``grad E_q[f] = E_q[grad f(z) + (f(z) - b - c(z)) grad log q(z)] + grad E_q[c]``
  with a baseline ``b`` (a learned, input-dependent prediction, or the
  leave-one-out mean of the other samples) and an optional control variate
  ``c`` of known expectation.  The surrogate is
  ``f(z) + stop(f(z) - b - c(z)) (log q(z) - stop(log q(z))) + (E_q[c] - stop(E_q[c]))``:
  its value is ``f(z)``.  A learned baseline is trained by regression on what it is subtracted
  from, ``baseline_loss = (stop(f(z) - c(z)) - b)^2`` (``c = 0`` without a control variate), and
  the leave-one-out baseline averages the other samples' ``f - c``.
- :func:`gumbel_softmax`: a relaxed (``hard=False``) or straight-through
  (``hard=True``) one-hot sample of a categorical.
- :func:`relaxed`: ``1/S sum_s f(z_s)`` over such samples, ``z_s = gumbel_softmax(logits, tau, hard)``;
  biased for ``hard=False`` (``f`` sees relaxed points); with ``hard=True`` the value is an
  unbiased estimate (exact one-hot samples) and the gradient the straight-through one.

Randomness comes from the global seed or an explicit ``generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution

from latentnlp.gumbel import gumbel_noise

__all__ = ["Estimate", "exact", "reparam", "score_function", "gumbel_softmax", "relaxed"]

Function = Callable[[Tensor], Tensor]


@dataclass
class Estimate:
    """An estimate of ``E_q[f(z)]`` per batch element.

    ``surrogate``: value = the estimate, gradient = the estimator's gradient (to maximise).
    ``baseline_loss``: the learned baseline's squared regression error (to minimise), or None.
    """

    surrogate: Tensor
    baseline_loss: Tensor | None = None

    @property
    def value(self) -> Tensor:
        return self.surrogate.detach()

    @property
    def objective(self) -> Tensor:
        """``surrogate`` with the baseline's regression loss added as a zero-valued term.

        Same value as ``surrogate``; maximising it follows the estimator's gradient
        and, at the same time, minimises ``baseline_loss`` (one backward pass).
        """
        if self.baseline_loss is None:
            return self.surrogate
        return self.surrogate - (self.baseline_loss - self.baseline_loss.detach())


def _sample(q: Distribution, n: int, generator: torch.Generator | None, reparameterised: bool) -> Tensor:
    method = q.rsample if reparameterised else q.sample
    if generator is None:
        return method(torch.Size((n,)))
    return method(torch.Size((n,)), generator=generator)


def exact(f: Function | Tensor, q: Distribution) -> Estimate:
    """``sum_z q(z) f(z)`` by enumerating the support of ``q``.

    ``f`` is either a callable taking ``q.enumerate_support()`` (shape
    ``[K, *batch, *event]``) to values ``[K, *batch]``, or, for a categorical
    ``q``, the tensor of values ``[*batch, K]`` (one per category).  Zero-probability
    values (masked categories) are ignored even when ``f`` is ``-inf`` or NaN there.
    """
    if isinstance(f, Tensor):
        if not isinstance(q, Categorical):
            raise ValueError(f"a tensor of values needs a Categorical q, got {type(q).__name__}")
        if f.shape[-1] != q.probs.shape[-1]:
            raise ValueError(f"values of shape {tuple(f.shape)} do not match q with {q.probs.shape[-1]} categories")
        weights, values = q.probs, f
        dim = -1
    else:
        support = q.enumerate_support(expand=True)
        values = f(support)
        weights = q.log_prob(support).exp()
        if values.shape != weights.shape:
            raise ValueError(
                f"f(support) has shape {tuple(values.shape)}, expected "
                f"{tuple(weights.shape)} (one value per support point and batch element)"
            )
        dim = 0
    values = values.masked_fill(weights == 0, 0.0)
    return Estimate((weights * values).sum(dim))


def reparam(f: Function, q: Distribution, num_samples: int = 1, generator: torch.Generator | None = None) -> Estimate:
    """``1/S sum_s f(z_s)`` with ``z_s = q.rsample()`` (pathwise gradient)."""
    if not q.has_rsample:
        raise ValueError(f"{type(q).__name__} has no reparameterised sampler (rsample)")
    z = _sample(q, num_samples, generator, reparameterised=True)
    return Estimate(f(z).mean(0))


def score_function(
    f: Function,
    q: Distribution,
    *,
    baseline: Tensor | str | None = None,
    control_variate: tuple[Function, Tensor] | None = None,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Estimate:
    """REINFORCE estimate of ``E_q[f(z)]`` from ``num_samples`` samples.

    Args:
        f: ``z [S, *batch, *event] -> [S, *batch]``, one value per factor of ``q``
            (the shape of ``q.log_prob(z)``); wrap ``q`` in
            :class:`torch.distributions.Independent` for a joint learning signal.
            ``f`` may depend on trained parameters (its own pathwise gradient is kept).
        baseline: ``None``; a tensor broadcastable to ``[*batch]`` predicted from the
            input (not from ``z``): it is subtracted from the learning signal and its
            regression loss ``(f - c - b)^2`` is returned as ``baseline_loss``; or
            ``"leave-one-out"``: each sample's baseline is the mean ``f - c`` of the
            other samples (``num_samples >= 2``).  A running mean of the signal is such a
            tensor too (held by the caller; it has no gradient, so no regression).
        control_variate: ``(c, mean_c)``: ``c(z)`` is subtracted from the learning
            signal and ``mean_c = E_q[c(z)]`` (a differentiable function of ``q``'s
            parameters) adds back its exact gradient.  ``c`` itself is not trained.
        num_samples: samples averaged in the estimate.

    Returns an :class:`Estimate`; ``surrogate`` (and ``baseline_loss``) are ``[*batch]``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    z = _sample(q, num_samples, generator, reparameterised=False).detach()
    log_q = q.log_prob(z)
    fz = f(z)
    if fz.shape != log_q.shape:
        raise ValueError(
            f"f(z) has shape {tuple(fz.shape)} but q.log_prob(z) has shape "
            f"{tuple(log_q.shape)}; f must give one value per factor of q"
        )
    signal = fz.detach()
    extra = 0.0
    if control_variate is not None:  # the baselines below then predict the residual f - c
        c, mean_c = control_variate
        signal = signal - c(z).detach()
        extra = mean_c - mean_c.detach()
    baseline_loss = None
    if isinstance(baseline, str):
        if baseline != "leave-one-out":
            raise ValueError(f"baseline must be a tensor, None or 'leave-one-out', got {baseline!r}")
        if num_samples < 2:
            raise ValueError("the leave-one-out baseline needs num_samples >= 2")
        signal = signal - (signal.sum(0, keepdim=True) - signal) / (num_samples - 1)
    elif baseline is not None:
        baseline_loss = (signal - baseline).pow(2).mean(0)
        signal = signal - baseline.detach()
    surrogate = fz + signal * (log_q - log_q.detach())
    return Estimate(surrogate.mean(0) + extra, baseline_loss)


def gumbel_softmax(
    logits: Tensor,
    tau: float = 1.0,
    hard: bool = False,
    *,
    mask: Tensor | None = None,
    dim: int = -1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A Gumbel-softmax sample ``softmax((logits + g) / tau)``, ``g ~ Gumbel(0, 1)``.

    With ``hard=True`` the value is the one-hot ``argmax`` (an exact sample of
    ``Categorical(logits)``) and the gradient is that of the relaxed sample
    (straight-through).  ``mask`` (bool, broadcastable; False = excluded category)
    gives excluded categories weight exactly 0.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    y_soft = torch.softmax((logits + gumbel_noise(logits, generator)) / tau, dim=dim)
    if not hard:
        return y_soft
    index = y_soft.argmax(dim, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def relaxed(
    f: Function,
    logits: Tensor,
    tau: float = 1.0,
    *,
    hard: bool = True,
    num_samples: int = 1,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Estimate:
    """Gumbel-softmax estimate of ``E_{Categorical(logits)}[f(z)]`` for one-hot ``z``.

    ``z_s = gumbel_softmax(logits, tau, hard, mask=mask)`` over the last dimension of
    ``logits [*batch, K]``, drawn ``num_samples`` at a time as ``[S, *batch, K]``;
    ``f: [S, *batch, K] -> [S, *batch]``; the estimate is ``1/S sum_s f(z_s)`` ``[*batch]``,
    differentiable through ``z`` (pathwise, straight-through when ``hard``).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    z = gumbel_softmax(logits.expand(num_samples, *logits.shape), tau, hard, mask=mask, generator=generator)
    return Estimate(f(z).mean(0))
