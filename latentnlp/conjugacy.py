r"""Conjugate inference in closed form: the Dirichlet-multinomial, and mean-field CAVI for a Bayesian mixture.

The tutorial's third strategy: where the prior is conjugate to the likelihood, the posterior (or
each coordinate of a mean-field posterior) is in the prior's family and is computed, not learned.

- :func:`dirichlet_posterior`: ``theta ~ Dir(alpha)``, ``x_1..x_N | theta ~ Cat(theta)`` i.i.d.
  with counts ``n``; the posterior is ``Dir(alpha + n)``.
- :func:`dirichlet_multinomial_log_evidence`: the marginal ``log p(x_1..x_N)`` of that model,

  .. math::

      \log p(x_{1:N}) = \log\Gamma(\alpha_0) - \log\Gamma(\alpha_0 + N)
          + \sum_k [\log\Gamma(\alpha_k + n_k) - \log\Gamma(\alpha_k)]

  (of the *sequence*; the counts' multinomial coefficient is not included).
- :class:`BayesianCategoricalMixture`: the mixture of categoricals for documents with Dirichlet
  priors on both levels, ``pi ~ Dir(alpha)``, ``beta_k ~ Dir(eta)``, ``z_d ~ Cat(pi)``,
  ``w_dn | z_d ~ Cat(beta_{z_d})``, and its coordinate-ascent mean-field posterior (CAVI; Bishop
  2006, Sec. 10.2; Blei et al. 2017) ``q(pi) q(beta) prod_d q(z_d)`` = ``Dir(a) prod_k Dir(b_k)
  prod_d Cat(r_d)``, each coordinate updated to its optimum given the others, so the ELBO never
  decreases.

Shapes: concentrations ``[*batch, K]``; document-word counts ``[D, V]``; ``a [K]``,
``b [K, V]``, responsibilities ``r [D, K]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.distributions import Dirichlet, kl_divergence

from latentnlp.validation import is_validating

__all__ = [
    "dirichlet_posterior",
    "dirichlet_multinomial_log_evidence",
    "MixturePosterior",
    "BayesianCategoricalMixture",
]


def _check_concentration(name: str, value: Tensor) -> None:
    if not isinstance(value, Tensor) or value.dim() < 1 or not value.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor [*batch, K], got {getattr(value, 'shape', type(value))}")
    if not bool((value > 0).all()):
        raise ValueError(f"{name} must be positive, got minimum {float(value.min())}")


def _check_counts(name: str, counts: Tensor, last: int | None = None) -> None:
    if not isinstance(counts, Tensor) or counts.dim() < 1:
        raise ValueError(f"{name} must be a tensor of counts, got {type(counts).__name__}")
    if last is not None and counts.shape[-1] != last:
        raise ValueError(f"{name} must have {last} columns, got shape {tuple(counts.shape)}")
    if not bool((counts >= 0).all()):
        raise ValueError(f"{name} must be non-negative, got minimum {float(counts.min())}")


def dirichlet_posterior(alpha: Tensor, counts: Tensor) -> Dirichlet:
    """The conjugate update ``Dir(alpha) -> Dir(alpha + counts)``.

    Args:
        alpha: prior concentration ``[*batch, K]``, positive.
        counts: category counts ``[*batch, K]`` (broadcasting with ``alpha``), non-negative (real
            counts are allowed: expected counts from an E-step).
    """
    _check_concentration("alpha", alpha)
    _check_counts("counts", counts, alpha.shape[-1])
    return Dirichlet(alpha + counts.to(alpha.dtype))


def dirichlet_multinomial_log_evidence(alpha: Tensor, counts: Tensor) -> Tensor:
    """``log p(x_{1:N}) = log int Dir(theta; alpha) prod_n theta_{x_n} d theta`` from the counts, ``[*batch]``."""
    _check_concentration("alpha", alpha)
    _check_counts("counts", counts, alpha.shape[-1])
    counts = counts.to(alpha.dtype)
    total = alpha.sum(-1)
    return (
        torch.lgamma(total)
        - torch.lgamma(total + counts.sum(-1))
        + (torch.lgamma(alpha + counts) - torch.lgamma(alpha)).sum(-1)
    )


def _expected_log(concentration: Tensor) -> Tensor:
    """``E_{Dir(c)}[log theta_k] = digamma(c_k) - digamma(sum_j c_j)``."""
    return torch.digamma(concentration) - torch.digamma(concentration.sum(-1, keepdim=True))


@dataclass
class MixturePosterior:
    """The mean-field posterior of :class:`BayesianCategoricalMixture` and its ELBO trajectory.

    Attributes:
        a: ``q(pi) = Dir(a)``, ``[K]``.
        b: ``q(beta_k) = Dir(b_k)``, ``[K, V]``.
        r: ``q(z_d = k) = r[d, k]``, ``[D, K]``.
        elbos: the ELBO after each iteration of :meth:`BayesianCategoricalMixture.fit`.
    """

    a: Tensor
    b: Tensor
    r: Tensor
    elbos: list[float] = field(default_factory=list)


class BayesianCategoricalMixture:
    r"""Mixture of categoricals for documents with Dirichlet priors, fitted by CAVI.

    Coordinate updates (each the exact optimum of the ELBO in its factor, the others fixed):

    .. math::

        r_{dk} \propto \exp\Big(E[\log \pi_k] + \sum_v n_{dv} E[\log \beta_{kv}]\Big), \qquad
        a = \alpha + \sum_d r_d, \qquad
        b_k = \eta + \sum_d r_{dk} n_d

    with ``E[log theta_k] = digamma(c_k) - digamma(sum_j c_j)`` under ``Dir(c)``, and

    .. math::

        \mathrm{ELBO} = \sum_{d,k} r_{dk} \Big(E[\log\pi_k] + \sum_v n_{dv} E[\log\beta_{kv}]\Big)
          + \sum_d H(r_d) - \mathrm{KL}(\mathrm{Dir}(a) \| \mathrm{Dir}(\alpha))
          - \sum_k \mathrm{KL}(\mathrm{Dir}(b_k) \| \mathrm{Dir}(\eta)) \le \log p(w).

    Args:
        vocab_size: ``V``.
        num_components: ``K`` (the order of :class:`~latentnlp.models.MixtureOfCategoricals`).
        alpha: symmetric prior concentration on ``pi`` (positive).
        eta: symmetric prior concentration on each ``beta_k`` (positive).
    """

    def __init__(self, vocab_size: int, num_components: int, alpha: float = 1.0, eta: float = 0.1) -> None:
        for name, value in (("vocab_size", vocab_size), ("num_components", num_components)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, value in (("alpha", alpha), ("eta", eta)):
            if not float(value) > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        self.num_components, self.vocab_size = num_components, vocab_size
        self.alpha, self.eta = float(alpha), float(eta)

    def _counts(self, counts: Tensor) -> Tensor:
        if not isinstance(counts, Tensor) or counts.dim() != 2:
            raise ValueError(f"counts must be a tensor [D, V], got {getattr(counts, 'shape', type(counts))}")
        _check_counts("counts", counts, self.vocab_size)
        return counts if counts.is_floating_point() else counts.to(torch.get_default_dtype())

    def _globals(self, a: Tensor, b: Tensor) -> None:
        """``ValueError`` naming ``a`` or ``b`` unless they are ``[K]`` and ``[K, V]`` concentrations
        (positive, checked when validating)."""
        k, v = self.num_components, self.vocab_size
        for name, value, shape, names in (("a", a, (k,), "[K]"), ("b", b, (k, v), "[K, V]")):
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                seen = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must be {names} = {list(shape)} (K = {k}, V = {v}), got {seen}")
            if is_validating() and not bool((value > 0).all()):
                raise ValueError(f"{name} must hold positive Dirichlet concentrations, got min {float(value.min())}")

    def update_assignments(self, counts: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """The optimal ``q(z_d)`` given ``q(pi) = Dir(a)`` and ``q(beta) = Dir(b)``: ``r [D, K]``."""
        counts = self._counts(counts)
        self._globals(a, b)
        logits = _expected_log(a) + counts @ _expected_log(b).t()
        return torch.softmax(logits, dim=-1)

    def update_globals(self, counts: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        """The optimal ``q(pi)`` and ``q(beta)`` given ``q(z) = r``: ``(a [K], b [K, V])``."""
        counts = self._counts(counts)
        if r.shape != (counts.shape[0], self.num_components):
            raise ValueError(f"r must be [D, K] = {(counts.shape[0], self.num_components)}, got {tuple(r.shape)}")
        return self.alpha + r.sum(0), self.eta + r.t() @ counts

    def elbo(self, counts: Tensor, a: Tensor, b: Tensor, r: Tensor) -> Tensor:
        """The evidence lower bound of ``q = Dir(a) prod_k Dir(b_k) prod_d Cat(r_d)`` (a scalar)."""
        counts = self._counts(counts)
        self._globals(a, b)
        if not isinstance(r, Tensor) or r.shape != (counts.shape[0], self.num_components):
            raise ValueError(
                f"r must be [D, K] = {(counts.shape[0], self.num_components)}, got {tuple(getattr(r, 'shape', ()))}"
            )
        e_log_pi, e_log_beta = _expected_log(a), _expected_log(b)
        expected = (r * (e_log_pi + counts @ e_log_beta.t())).sum()
        entropy = -(r * torch.log(r.clamp_min(torch.finfo(r.dtype).tiny))).sum()
        prior_pi = Dirichlet(torch.full_like(a, self.alpha))
        prior_beta = Dirichlet(torch.full_like(b, self.eta))
        return (
            expected + entropy - kl_divergence(Dirichlet(a), prior_pi) - kl_divergence(Dirichlet(b), prior_beta).sum()
        )

    def fit(
        self,
        counts: Tensor,
        *,
        iterations: int = 100,
        tol: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> MixturePosterior:
        """CAVI from random responsibilities (``r_d ~ Dir(1)``, from ``generator``): each iteration
        updates ``q(pi), q(beta)`` then ``q(z)``; stops after ``iterations`` or when the ELBO rises
        by less than ``tol``."""
        counts = self._counts(counts)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        shape = (counts.shape[0], self.num_components)
        r = -torch.log(torch.rand(shape, dtype=counts.dtype, device=counts.device, generator=generator))
        r = r / r.sum(-1, keepdim=True)
        result = MixturePosterior(*self.update_globals(counts, r), r)
        for _ in range(iterations):
            result.a, result.b = self.update_globals(counts, result.r)
            result.r = self.update_assignments(counts, result.a, result.b)
            result.elbos.append(float(self.elbo(counts, result.a, result.b, result.r)))
            if len(result.elbos) > 1 and result.elbos[-1] - result.elbos[-2] < tol:
                break
        return result
