"""Amortised mean-field variational families ``q(z | x) = prod_i q_i(z_i | x)``.

Each family is a :class:`torch.distributions.Distribution` whose parameters are
the outputs of an encoder (an inference network), built on ``torch.distributions``
wherever it already does the job, and each has a closed-form KL divergence to a
prior of the same family reachable through ``kl_divergence(q, p)``, exact and
differentiable.

- :class:`MaskedCategorical`: one categorical per batch position over ``K``
  categories of which only those with ``mask`` set are allowed, e.g. the
  alignment ``q(z_t = m | x, y)`` over the ``S`` positions of a padded source
  sentence (Deng et al. 2018).  Masked categories have probability exactly 0
  and log-probability ``-inf``; entropies, KLs and their gradients stay finite.
- :class:`DiagonalGaussian`: ``N(mu, diag(sigma^2))`` over ``R^D``, reparameterised
  (``rsample``); an ``Independent(Normal(loc, scale), 1)``.
- :class:`MeanFieldBernoulli`: ``D`` independent bits, ``q(z_d = 1) = sigmoid(logits_d)``;
  an ``Independent(Bernoulli(logits=logits), 1)``.
- :class:`LogisticNormal`: topic proportions ``theta = softmax(z)`` with ``z`` a diagonal Gaussian
  over ``R^K`` (the softmax basis), and its Laplace approximation of a Dirichlet prior
  (:meth:`LogisticNormal.from_dirichlet`, Srivastava & Sutton 2017), for neural topic models.
- :class:`RelaxedCategorical`: the concrete / Gumbel-softmax relaxation of a categorical
  (Maddison et al. 2017; Jang et al. 2017), reparameterised, optionally straight-through (``hard``).
  No closed-form KL exists between two of them, so an ELBO over one uses the Monte Carlo KL
  (:func:`latentnlp.objectives.elbo` with ``kl="auto"``).
- :class:`VonMisesFisher`: ``C_d(kappa) exp(kappa mu^T z)`` on the unit sphere ``S^(d-1)``, of fixed
  concentration, reparameterised in ``mu`` (Wood's sampler), with :class:`HypersphericalUniform` as
  its prior (Xu & Durrett 2018); the KL between them depends on ``kappa`` and ``d`` only.

Closed forms (summed over the event dimension where there is one)::

    KL(q || p) categorical   = sum_{k: mask_q[k]} q_k (log q_k - log p_k)   (+inf if p_k = 0 < q_k)
    KL(q || p) gaussian      = sum_d log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2
    KL(q || p) bernoulli     = sum_d q_d (log q_d - log p_d) + (1 - q_d) (log(1 - q_d) - log(1 - p_d))
    KL(vMF || uniform)       = kappa A_d(kappa) + log C_d(kappa) + log |S^(d-1)|

The categorical and Bernoulli KLs are registered here (masked support; finite at saturated
logits); the Gaussian one is torch's ``Independent``/``Normal`` registration, and is the one
place the library computes a Gaussian KL (:func:`latentnlp.metrics.gaussian_kl` calls it).

Every ``sample``/``rsample`` accepts an optional ``generator`` (a
:class:`torch.Generator`) so randomness can be made explicit; without one they draw from the
global seed.
"""

from __future__ import annotations

import math
from itertools import product

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Bernoulli, Categorical, Independent, Normal, RelaxedOneHotCategorical
from torch.distributions.kl import register_kl
from torch.distributions.utils import lazy_property

from latentnlp.gumbel import gumbel_noise
from latentnlp.masks import lengths_to_mask
from latentnlp.validation import is_validating

__all__ = [
    "MaskedCategorical",
    "DiagonalGaussian",
    "MeanFieldBernoulli",
    "LogisticNormal",
    "RelaxedCategorical",
    "VonMisesFisher",
    "HypersphericalUniform",
    "log_bessel_iv",
    "log_sphere_area",
    "vmf_log_normalizer",
    "vmf_mean_resultant_length",
]


# ------------------------------------------------------------------------------------------------
# categorical with a support mask
# ------------------------------------------------------------------------------------------------
class MaskedCategorical(Categorical):
    """Categorical over ``K`` categories restricted to those where ``mask`` is True.

    ``q(z = k) = mask_k exp(logits_k) / sum_j mask_j exp(logits_j)``.

    Args:
        logits: ``[*batch, K]`` unnormalised log-scores (e.g. attention scores of
            target position t against source positions m).  Values at masked
            positions are ignored (they get no gradient).
        mask: bool, broadcastable to ``logits``; True = allowed category.  ``None``
            allows every category.  Every row must allow at least one category (checked when
            validation is on, :mod:`latentnlp.validation`; off, the check's device sync is skipped).

    ``logits`` (normalised) holds ``-inf`` at masked categories and ``probs``
    holds exact zeros there; ``sample`` never returns a masked category.
    """

    def __init__(self, logits: Tensor, mask: Tensor | None = None, validate_args: bool | None = None) -> None:
        if not isinstance(logits, Tensor) or logits.dim() < 1:
            raise ValueError(f"logits must be a tensor [*batch, K], got {getattr(logits, 'shape', type(logits))}")
        if mask is None:
            mask = torch.ones((), dtype=torch.bool, device=logits.device)
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        try:
            mask = mask.expand(logits.shape)
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to logits of shape {tuple(logits.shape)}"
            ) from None
        if is_validating(validate_args) and not bool(mask.any(-1).all()):
            raise ValueError(
                "mask allows no category in some row: every row needs one "
                f"(logits {tuple(logits.shape)}, mask {tuple(mask.shape)})"
            )
        self.mask = mask
        super().__init__(logits=logits.masked_fill(~mask, -math.inf), validate_args=validate_args)

    @classmethod
    def from_lengths(cls, logits: Tensor, lengths: Tensor, **kwargs) -> MaskedCategorical:
        """Categorical over the first ``lengths[b]`` of ``K`` positions.

        ``logits`` is ``[B, ..., K]``, ``lengths`` ``[B]``: the mask is broadcast
        over the middle dimensions (``[B, T, S]`` scores of a padded source).
        """
        mask = lengths_to_mask(lengths, logits.shape[-1])
        mask = mask.view(mask.shape[0], *([1] * (logits.dim() - 2)), mask.shape[-1])
        return cls(logits, mask, **kwargs)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MaskedCategorical, _instance)
        new.mask = self.mask.expand(torch.Size(batch_shape) + (self._num_events,))
        return super().expand(batch_shape, _instance=new)

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        sample_shape = torch.Size(sample_shape)
        probs = self.probs.reshape(-1, self._num_events)
        n = max(1, math.prod(sample_shape))
        with torch.no_grad():
            draws = torch.multinomial(probs, n, replacement=True, generator=generator)
        return draws.T.reshape(sample_shape + self.batch_shape)

    def entropy(self) -> Tensor:
        # masked entries: probs = 0 and the filled log-prob is 0, so neither the value nor the
        # gradient sees -inf
        log_p = self.logits.masked_fill(~self.mask, 0.0)
        return -(self.probs * log_p).sum(-1)


def _support_mask(d: Categorical) -> Tensor:
    if isinstance(d, MaskedCategorical):
        return d.mask
    return d.logits > -math.inf


@register_kl(MaskedCategorical, MaskedCategorical)
@register_kl(MaskedCategorical, Categorical)
@register_kl(Categorical, MaskedCategorical)
def _kl_masked_categorical(q: Categorical, p: Categorical) -> Tensor:
    """``sum_{k in supp q} q_k (log q_k - log p_k)``; ``+inf`` where ``p`` misses part of ``supp q``."""
    support = _support_mask(q)
    log_q = q.logits.masked_fill(~support, 0.0)
    log_p = p.logits.masked_fill(~support, 0.0)
    return (q.probs * (log_q - log_p)).sum(-1)


# ------------------------------------------------------------------------------------------------
# diagonal Gaussian
# ------------------------------------------------------------------------------------------------
class DiagonalGaussian(Independent):
    """``N(loc, diag(scale^2))`` over ``R^D``: ``Independent(Normal(loc, scale), 1)``, reparameterised.

    Batch shape ``[*batch]``, event shape ``[D]``.  Densities, entropy, moments, ``expand`` and the
    KL to any other ``Independent(Normal)`` with one reinterpreted dimension (torch's registered
    ``Independent``/``Normal`` closed form) are torch's; this class adds the encoder-facing
    constructors (:meth:`from_params`, :meth:`from_logvar`, :meth:`standard`), ``log_scale``, and
    a ``generator`` argument to ``rsample``/``sample``:  ``z = loc + scale * eps`` with
    ``eps = torch.randn(shape, generator=generator)``.

    Args:
        loc: ``[*batch, D]``.
        scale: ``[*batch, D]`` (broadcastable to ``loc``), positive.
    """

    def __init__(self, loc: Tensor, scale: Tensor, validate_args: bool | None = None) -> None:
        if loc.dim() < 1:
            raise ValueError(f"loc must be [*batch, D], got shape {tuple(loc.shape)}")
        try:
            loc, scale = torch.broadcast_tensors(loc, scale)
        except RuntimeError:
            raise ValueError(
                f"scale of shape {tuple(scale.shape)} does not broadcast with loc of shape {tuple(loc.shape)}"
            ) from None
        super().__init__(Normal(loc, scale, validate_args=validate_args), 1, validate_args=validate_args)

    @classmethod
    def from_params(cls, params: Tensor, min_scale: float = 0.0, **kwargs) -> DiagonalGaussian:
        """From an encoder output ``[*batch, 2D]``: ``loc, raw = params.chunk(2)``,
        ``scale = softplus(raw) + min_scale``."""
        if params.shape[-1] % 2:
            raise ValueError(f"params must have an even last dimension [*batch, 2D], got {tuple(params.shape)}")
        loc, raw = params.chunk(2, dim=-1)
        return cls(loc, F.softplus(raw) + min_scale, **kwargs)

    @classmethod
    def from_logvar(cls, loc: Tensor, logvar: Tensor, **kwargs) -> DiagonalGaussian:
        """``scale = exp(logvar / 2)`` (the usual VAE parameterisation); ``loc``, ``logvar`` ``[*batch, D]``."""
        return cls(loc, torch.exp(0.5 * logvar), **kwargs)

    @classmethod
    def standard(cls, batch_shape, dim: int, *, dtype=None, device=None) -> DiagonalGaussian:
        """The prior ``N(0, I_D)`` with the given batch shape."""
        shape = torch.Size(batch_shape) + (dim,)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.ones(shape, dtype=dtype, device=device))

    @property
    def loc(self) -> Tensor:
        return self.base_dist.loc

    @property
    def scale(self) -> Tensor:
        return self.base_dist.scale

    @lazy_property
    def log_scale(self) -> Tensor:
        """``log scale``, ``[*batch, D]``."""
        return self.scale.log()

    def expand(self, batch_shape, _instance=None) -> DiagonalGaussian:
        new = self._get_checked_instance(DiagonalGaussian, _instance)
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        """``loc + scale * eps`` with ``eps ~ N(0, I)`` drawn from ``generator`` (else the global seed).

        Returns ``sample_shape + [*batch, D]``; differentiable in ``loc`` and ``scale``.
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device, generator=generator)
        return self.loc + self.scale * eps

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)


# ------------------------------------------------------------------------------------------------
# factorised Bernoulli
# ------------------------------------------------------------------------------------------------
class MeanFieldBernoulli(Independent):
    """``D`` independent bits: ``Independent(Bernoulli(logits=logits), 1)``, ``q(z_d = 1) = sigmoid(logits_d)``.

    Batch shape ``[*batch]``, event shape ``[D]``.  ``log_prob`` and ``entropy`` are torch's (in
    logit space, no ``log(p + eps)``); ``log_prob`` also accepts bool or integer bit vectors.  This
    class adds ``enumerate_support`` over the ``2^D`` joint configurations (``D <= 20``; torch's
    ``Independent`` cannot enumerate), for exact enumeration in estimators, tests and small
    models, and a ``generator`` argument to ``sample``: ``z_d = [u_d < sigmoid(logits_d)]`` with
    ``u = torch.rand(shape, generator=generator)``.

    Args:
        logits: ``[*batch, D]``.
    """

    has_enumerate_support = True

    def __init__(self, logits: Tensor, validate_args: bool | None = None) -> None:
        if logits.dim() < 1:
            raise ValueError(f"logits must be [*batch, D], got shape {tuple(logits.shape)}")
        super().__init__(Bernoulli(logits=logits, validate_args=validate_args), 1, validate_args=validate_args)

    @property
    def logits(self) -> Tensor:
        return self.base_dist.logits

    @property
    def probs(self) -> Tensor:
        return self.base_dist.probs

    def expand(self, batch_shape, _instance=None) -> MeanFieldBernoulli:
        new = self._get_checked_instance(MeanFieldBernoulli, _instance)
        return super().expand(batch_shape, _instance=new)

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        """Bit vectors ``sample_shape + [*batch, D]`` in the dtype of ``logits``."""
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            u = torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device, generator=generator)
            return (u < self.probs).to(self.logits.dtype)

    def log_prob(self, value: Tensor) -> Tensor:
        return super().log_prob(value.to(self.logits.dtype))

    def enumerate_support(self, expand: bool = True) -> Tensor:
        """All ``2^D`` bit vectors, ``[2^D, *batch, D]`` (``[2^D, 1.., D]`` unless ``expand``)."""
        d = self.event_shape[0]
        if d > 20:
            raise ValueError(f"enumerate_support lists 2^D vectors; D = {d} is too large")
        values = torch.tensor(
            list(product((0.0, 1.0), repeat=d)), dtype=self.logits.dtype, device=self.logits.device
        )  # [2^D, D]
        values = values.view((values.shape[0],) + (1,) * len(self.batch_shape) + (d,))
        if expand:
            values = values.expand((values.shape[0],) + self.batch_shape + (d,))
        return values


@register_kl(MeanFieldBernoulli, MeanFieldBernoulli)
def _kl_mean_field_bernoulli(q: MeanFieldBernoulli, p: MeanFieldBernoulli) -> Tensor:
    """The Bernoulli KL from logits alone, ``[*batch]``.

    torch's ``Bernoulli`` KL sets a term to ``+inf`` wherever ``p``'s probability *rounds* to 0 or 1
    (``sigmoid(17.) == 1`` in float32), so a finite KL to a saturated prior comes out infinite;
    with ``log sigmoid`` of the logits every term stays finite.
    """
    a, b = q.logits, p.logits
    return (
        q.probs * (F.logsigmoid(a) - F.logsigmoid(b)) + torch.sigmoid(-a) * (F.logsigmoid(-a) - F.logsigmoid(-b))
    ).sum(-1)


# ------------------------------------------------------------------------------------------------
# logistic normal in the softmax basis (topic proportions)
# ------------------------------------------------------------------------------------------------
class LogisticNormal(DiagonalGaussian):
    r"""Topic proportions ``theta = softmax(z)`` on the ``K``-simplex, ``z ~ N(loc, diag(scale^2))`` over ``R^K``.

    The variational family and prior of neural topic models (Srivastava & Sutton 2017, *Autoencoding
    variational inference for topic models*): a :class:`DiagonalGaussian` over the *softmax basis*
    ``z`` (MacKay 1998), so ``rsample``, ``log_prob``, ``entropy`` and the KL are those of ``z``
    (``log_prob`` takes ``z``, not ``theta``; the map ``z -> theta`` is many-to-one, ``z + c 1``
    giving the same ``theta``), and :meth:`rsample_simplex` maps a reparameterised draw onto the
    simplex.  The KL to another ``LogisticNormal`` (or any diagonal Gaussian over the same ``K``) is
    the Gaussian one of torch's ``Independent``/``Normal`` registration::

        KL(q || p) = 1/2 sum_k [ s_q,k^2 / s_p,k^2 + (m_p,k - m_q,k)^2 / s_p,k^2 - 1 + log(s_p,k^2 / s_q,k^2) ]

    the KL term of Srivastava & Sutton's eq. (7) with their Laplace prior (:meth:`from_dirichlet`).

    Not :class:`torch.distributions.LogisticNormal`, which is a density on the simplex through a
    ``K - 1``-dimensional stick-breaking map; here ``z`` has ``K`` coordinates, as in ProdLDA.

    Args:
        loc: ``[*batch, K]``.
        scale: ``[*batch, K]`` (broadcastable to ``loc``), positive.
    """

    @classmethod
    def from_dirichlet(cls, alpha: Tensor, **kwargs) -> LogisticNormal:
        r"""The Laplace approximation in the softmax basis of ``Dirichlet(alpha)`` (MacKay 1998; Hennig et al.
        2012; Srivastava & Sutton 2017, eq. (4)), for ``alpha`` ``[*batch, K]`` (positive, ``K >= 2``)::

            loc_k     = log alpha_k - 1/K sum_l log alpha_l
            scale_k^2 = (1/alpha_k) (1 - 2/K) + 1/K^2 sum_l 1/alpha_l

        In the softmax basis the Dirichlet density is ``p(z) prop. prod_k theta_k^alpha_k`` with
        ``theta = softmax(z)``; its mode on the plane ``sum_k z_k = 0`` is ``loc``, and
        ``scale^2`` is the diagonal of ``P diag(1/alpha) P`` (``P = I - 1 1^T / K``), the inverse of the
        negative Hessian ``diag(alpha) - alpha alpha^T / alpha_0`` on that plane; the off-diagonal
        terms are dropped.  For a symmetric ``alpha = a 1`` the approximation has mean ``theta``
        exactly ``1/K``; it sharpens as ``alpha`` grows.
        """
        if not isinstance(alpha, Tensor) or alpha.dim() < 1 or alpha.shape[-1] < 2:
            raise ValueError(
                f"alpha must be a tensor [*batch, K] with K >= 2, got {tuple(getattr(alpha, 'shape', ()))}"
            )
        if is_validating(kwargs.get("validate_args")) and not bool((alpha > 0).all()):
            raise ValueError(f"alpha must be positive, got minimum {float(alpha.min())}")
        k = alpha.shape[-1]
        log_alpha = alpha.log()
        loc = log_alpha - log_alpha.mean(-1, keepdim=True)
        inv = alpha.reciprocal()
        var = inv * (1.0 - 2.0 / k) + inv.sum(-1, keepdim=True) / k**2
        return cls(loc, var.sqrt(), **kwargs)

    @staticmethod
    def to_simplex(z: Tensor) -> Tensor:
        """``theta = softmax(z)`` over the last dimension, ``[..., K]``."""
        return torch.softmax(z, dim=-1)

    def rsample_simplex(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        """``softmax(loc + scale * eps)``, ``sample_shape + [*batch, K]`` on the simplex, reparameterised."""
        return self.to_simplex(self.rsample(sample_shape, generator=generator))

    def expand(self, batch_shape, _instance=None) -> LogisticNormal:
        new = self._get_checked_instance(LogisticNormal, _instance)
        return super().expand(batch_shape, _instance=new)


# ------------------------------------------------------------------------------------------------
# concrete / Gumbel-softmax relaxation of a categorical
# ------------------------------------------------------------------------------------------------
class RelaxedCategorical(RelaxedOneHotCategorical):
    r"""The concrete distribution over the ``K``-simplex (Maddison et al. 2017; Jang et al. 2017).

    ``y = softmax((logits + g) / tau)`` with ``g_k ~ Gumbel(0, 1)`` (:mod:`latentnlp.gumbel`), so
    ``argmax_k y_k ~ Categorical(logits)`` exactly and ``y`` tends to that one-hot as ``tau -> 0``.
    Densities, ``log_prob`` of a relaxed point, moments and ``expand`` are torch's
    ``RelaxedOneHotCategorical``; this class draws from the library's one Gumbel sampler, with an
    optional ``generator``, and adds the straight-through estimator: with ``hard=True``,
    :meth:`rsample` returns the one-hot ``argmax`` whose gradient is that of the relaxed ``y``
    (``y_hard - y.detach() + y``).  ``log_prob`` is the concrete density, defined for relaxed
    points only; score a hard sample under :attr:`categorical`.

    Args:
        temperature: ``tau > 0`` (a float or a tensor broadcastable to the batch).
        logits: ``[*batch, K]`` unnormalised log-probabilities (or ``probs``).
        hard: straight-through one-hot samples from :meth:`rsample`.
    """

    def __init__(
        self,
        temperature: Tensor | float,
        probs: Tensor | None = None,
        logits: Tensor | None = None,
        *,
        hard: bool = False,
        validate_args: bool | None = None,
    ) -> None:
        if (probs is None) == (logits is None):
            raise ValueError("RelaxedCategorical: give exactly one of probs and logits")
        given = logits if logits is not None else probs
        if not isinstance(given, Tensor) or given.dim() < 1 or given.shape[-1] < 2:
            raise ValueError(
                f"RelaxedCategorical: logits/probs must be a tensor [*batch, K] with K >= 2, "
                f"got {tuple(getattr(given, 'shape', ()))}"
            )
        tau = torch.as_tensor(temperature, dtype=given.dtype, device=given.device)
        if is_validating(validate_args) and not bool((tau > 0).all()):
            raise ValueError(f"RelaxedCategorical: temperature must be positive, got {temperature}")
        self.hard = hard
        super().__init__(tau, probs=probs, logits=logits, validate_args=validate_args)

    @property
    def categorical(self) -> Categorical:
        """The categorical this relaxes: ``Categorical(logits)``, the law of ``argmax y``."""
        return Categorical(logits=self.logits)

    def expand(self, batch_shape, _instance=None) -> RelaxedCategorical:
        new = self._get_checked_instance(RelaxedCategorical, _instance)
        new.hard = self.hard
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        """``sample_shape + [*batch, K]`` draws, reparameterised (straight-through one-hots when ``hard``)."""
        shape = self._extended_shape(torch.Size(sample_shape))
        logits = self.logits.expand(shape)
        tau = self.temperature.unsqueeze(-1) if self.temperature.dim() > 0 else self.temperature
        y = torch.softmax((logits + gumbel_noise(logits, generator)) / tau, dim=-1)
        if not self.hard:
            return y
        one_hot = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
        return one_hot - y.detach() + y

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)


# ------------------------------------------------------------------------------------------------
# von Mises-Fisher on the unit sphere, and the uniform prior
# ------------------------------------------------------------------------------------------------
# the Debye (uniform asymptotic) polynomials u_k(t) of log I_v, as {power of t: coefficient}
_DEBYE = (
    {1: 3 / 24, 3: -5 / 24},
    {2: 81 / 1152, 4: -462 / 1152, 6: 385 / 1152},
    {3: 30375 / 414720, 5: -369603 / 414720, 7: 765765 / 414720, 9: -425425 / 414720},
    {
        4: 4465125 / 39813120,
        6: -94121676 / 39813120,
        8: 349922430 / 39813120,
        10: -446185740 / 39813120,
        12: 185910725 / 39813120,
    },
)
_SERIES_BELOW = 100.0  # sqrt(v^2 + x^2) under which log I_v is summed as its series
_SERIES_TERMS = 256


def log_bessel_iv(v: Tensor | float, x: Tensor | float) -> Tensor:
    r"""``log I_v(x)``, the modified Bessel function of the first kind, for ``v >= 0`` and ``x > 0``.

    Computed in float64 and returned in the dtype of ``x`` (float64 if ``x`` is a number), broadcast
    over ``v`` and ``x``; stable for large ``x`` and ``v`` (no ``I_v`` is ever formed).  With
    ``r = sqrt(v^2 + x^2)``:

    - ``r < 100``: the power series ``I_v(x) = sum_k (x/2)^(2k+v) / (k! Gamma(k+v+1))`` by
      log-sum-exp over its first 256 terms (all positive: no cancellation; the terms peak at
      ``k < r / 2`` and fall faster than geometrically past it);
    - else the uniform asymptotic (Debye) expansion (Abramowitz & Stegun 9.7.7, DLMF 10.41.3)
      written in ``r`` and ``t = v / r`` so that it holds down to ``v = 0``::

          log I_v(x) = r + v log(x / (v + r)) - 1/2 log(2 pi r) + log(1 + sum_{k=1..4} u_k(t) / v^k)

      where ``u_k(t) / v^k = sum_j c_kj v^(j-k) / r^j`` (``j >= k``) is of order ``r^-k``; the
      first omitted term is below ``1e-10`` of the value at ``r = 100``.
    """
    x = torch.as_tensor(x)
    out_dtype = x.dtype if x.is_floating_point() else torch.float64
    x64 = x.to(torch.float64)
    v64 = torch.as_tensor(v, dtype=torch.float64, device=x64.device)
    v64, x64 = torch.broadcast_tensors(v64, x64)
    r = torch.sqrt(v64 * v64 + x64 * x64)
    small = r < _SERIES_BELOW
    # the series, on the rows where it is used (others get a harmless x = 1)
    xs = torch.where(small, x64, torch.ones_like(x64)).unsqueeze(-1)
    vs = v64.unsqueeze(-1)
    k = torch.arange(_SERIES_TERMS, dtype=torch.float64, device=x64.device)
    terms = (2 * k + vs) * torch.log(xs / 2) - torch.lgamma(k + 1) - torch.lgamma(k + vs + 1)
    series = torch.logsumexp(terms, dim=-1)
    # the Debye expansion, on the others (with r >= 100 there)
    rl = torch.where(small, torch.full_like(r, _SERIES_BELOW), r)
    xl = torch.where(small, rl, x64)
    vl = torch.where(small, torch.zeros_like(v64), v64)
    correction = torch.zeros_like(rl)
    for order, poly in enumerate(_DEBYE, start=1):
        correction = correction + sum(c * vl ** (j - order) / rl**j for j, c in poly.items())
    debye = rl + vl * torch.log(xl / (vl + rl)) - 0.5 * torch.log(2 * math.pi * rl) + torch.log1p(correction)
    return torch.where(small, series, debye).to(out_dtype)


def log_sphere_area(d: int) -> float:
    """``log |S^(d-1)| = log(2 pi^(d/2) / Gamma(d/2))``, the surface area of the unit sphere in ``R^d``."""
    return math.log(2.0) + 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d)


def _sphere_tolerance(dtype: torch.dtype) -> float:
    """``max(sqrt(eps), 1e-6)``: float32 unit vectors cast to float64 still count as unit vectors."""
    return max(torch.finfo(dtype).eps ** 0.5, 1e-6)


class _UnitSphere(torch.distributions.constraints.Constraint):
    """Vectors ``[..., d]`` of unit Euclidean norm, within ``max(sqrt(eps), 1e-6)`` of the dtype."""

    event_dim = 1

    def check(self, value: Tensor) -> Tensor:
        return (torch.linalg.vector_norm(value, dim=-1) - 1).abs() <= _sphere_tolerance(value.dtype)


unit_sphere = _UnitSphere()


def _check_dimension(d: object) -> int:
    if isinstance(d, bool) or not isinstance(d, int) or d < 2:
        raise ValueError(f"d must be an integer >= 2 (the sphere S^(d-1) in R^d), got d = {d!r}")
    return d


class VonMisesFisher(torch.distributions.Distribution):
    r"""The von Mises-Fisher distribution on the unit sphere ``S^(d-1)`` in ``R^d``, of fixed concentration.

    .. math::

        q(z) = C_d(\kappa) \exp(\kappa \mu^\top z), \qquad
        \log C_d(\kappa) = (d/2 - 1) \log \kappa - (d/2) \log(2\pi) - \log I_{d/2-1}(\kappa)

    with mean direction ``mu = loc`` and concentration ``kappa``; ``I_v`` is the modified Bessel
    function of the first kind (:func:`log_bessel_iv`).  ``mean = A_d(kappa) mu`` with
    ``A_d = I_{d/2} / I_{d/2-1}`` (the mean resultant length, :attr:`mean_resultant_length`) and
    ``entropy = -log C_d(kappa) - kappa A_d(kappa)``.  The family of Xu & Durrett (2018),
    *Spherical latent spaces for stable variational autoencoders*: with ``kappa`` fixed the KL to the
    uniform prior (:class:`HypersphericalUniform`) is a constant, so nothing pulls ``q`` towards the
    prior.

    :meth:`rsample` is Wood's (1994) rejection sampler: ``w = mu^T z`` is drawn from its marginal
    ``p(w) prop. exp(kappa w) (1 - w^2)^((d-3)/2)`` on ``[-1, 1]`` (which does not involve ``mu``),
    a direction ``v`` uniformly on the sphere orthogonal to ``e_1``, and
    ``z = H (w e_1 + sqrt(1 - w^2) v)`` with ``H`` the Householder reflection mapping ``e_1`` to
    ``mu``.  For a fixed draw ``z`` is a smooth function of ``mu``: the sample is reparameterised
    in ``loc`` (not in ``concentration``, which is fixed: no gradient reaches it through a sample).

    Args:
        loc: ``[*batch, d]``, unit vectors (``d >= 2``); with validation on, their norms must be 1
            within ``max(sqrt(eps), 1e-6)`` of the dtype (normalise them first, e.g. ``F.normalize``).
        concentration: ``kappa > 0``, a float or a tensor broadcastable to ``[*batch]``.

    Batch shape ``[*batch]`` (``loc``'s leading dimensions broadcast with ``concentration``'s), event
    shape ``[d]``.
    """

    arg_constraints: dict = {}
    support = unit_sphere
    has_rsample = True

    def __init__(self, loc: Tensor, concentration: Tensor | float, validate_args: bool | None = None) -> None:
        if not isinstance(loc, Tensor) or loc.dim() < 1 or not loc.is_floating_point():
            raise ValueError(f"loc must be a floating tensor [*batch, d], got {getattr(loc, 'shape', type(loc))}")
        if loc.shape[-1] < 2:
            raise ValueError(f"loc must be [*batch, d] with d >= 2 (a sphere S^(d-1)), got shape {tuple(loc.shape)}")
        kappa = torch.as_tensor(concentration, dtype=loc.dtype, device=loc.device)
        try:
            batch_shape = torch.broadcast_shapes(loc.shape[:-1], kappa.shape)
        except RuntimeError:
            raise ValueError(
                f"concentration of shape {tuple(kappa.shape)} does not broadcast with loc's batch shape "
                f"{tuple(loc.shape[:-1])}"
            ) from None
        if is_validating(validate_args):
            if not bool((kappa > 0).all()):
                raise ValueError(f"concentration must be positive, got minimum {float(kappa.min())}")
            norms = torch.linalg.vector_norm(loc.detach(), dim=-1)
            if not bool(unit_sphere.check(loc.detach()).all()):
                raise ValueError(
                    f"loc must hold unit vectors (within {_sphere_tolerance(loc.dtype):.1e}), got norms "
                    f"from {float(norms.min()):.6g} to {float(norms.max()):.6g}"
                )
        self.dim = loc.shape[-1]
        self.loc = loc.expand(batch_shape + (self.dim,))
        self._kappa = kappa  # unexpanded: the Bessel functions are evaluated once per distinct kappa
        self.concentration = kappa.expand(batch_shape)
        super().__init__(batch_shape, torch.Size((self.dim,)), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> VonMisesFisher:
        new = self._get_checked_instance(VonMisesFisher, _instance)
        batch_shape = torch.Size(batch_shape)
        new.dim = self.dim
        new.loc = self.loc.expand(batch_shape + (self.dim,))
        new._kappa = self._kappa
        new.concentration = self._kappa.expand(batch_shape)
        super(VonMisesFisher, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @lazy_property
    def log_normalizer(self) -> Tensor:
        """``log C_d(kappa)``, ``[*batch]``."""
        return vmf_log_normalizer(self.dim, self._kappa).expand(self.batch_shape)

    @lazy_property
    def mean_resultant_length(self) -> Tensor:
        """``A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa) = E[mu^T z]``, ``[*batch]``."""
        return vmf_mean_resultant_length(self.dim, self._kappa).expand(self.batch_shape)

    @property
    def mean(self) -> Tensor:
        return self.mean_resultant_length.unsqueeze(-1) * self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    def log_prob(self, value: Tensor) -> Tensor:
        """``log C_d(kappa) + kappa mu^T z`` for ``z`` ``[..., *batch, d]`` on the sphere."""
        if self._validate_args:
            self._validate_sample(value)
        return self.log_normalizer + self.concentration * (value * self.loc).sum(-1)

    def entropy(self) -> Tensor:
        """``-log C_d(kappa) - kappa A_d(kappa)``, ``[*batch]``."""
        return -self.log_normalizer - self.concentration * self.mean_resultant_length

    def _sample_w(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``n`` draws per batch element of ``w = mu^T z`` (Wood 1994), and ``1 - w^2``: ``[n, *batch]``
        each, in float64.  Rejection is vectorised: each pass redraws only the rows not yet accepted."""
        d = self.dim
        kappa = self.concentration.detach().to(torch.float64).expand((n,) + self.batch_shape).reshape(-1)
        b = (d - 1) / (2 * kappa + torch.sqrt(4 * kappa**2 + (d - 1) ** 2))
        x0 = (1 - b) / (1 + b)
        c = kappa * x0 + (d - 1) * torch.log1p(-x0 * x0)
        w = torch.empty_like(kappa)
        one_minus_w2 = torch.empty_like(kappa)
        pending = torch.arange(kappa.shape[0], device=kappa.device)
        alpha = torch.full((1,), 0.5 * (d - 1), dtype=torch.float64, device=kappa.device)
        while pending.numel():
            m = pending.numel()
            g1 = torch._standard_gamma(alpha.expand(m).contiguous(), generator=generator)
            g2 = torch._standard_gamma(alpha.expand(m).contiguous(), generator=generator)
            beta = g1 / (g1 + g2)  # Beta((d-1)/2, (d-1)/2)
            u = torch.rand(m, dtype=torch.float64, device=kappa.device, generator=generator)
            bp, kp, x0p, cp = b[pending], kappa[pending], x0[pending], c[pending]
            denominator = 1 - (1 - bp) * beta
            proposal = (1 - (1 + bp) * beta) / denominator
            accept = kp * proposal + (d - 1) * torch.log1p(-x0p * proposal) - cp >= torch.log(u)
            rows = pending[accept]
            w[rows] = proposal[accept]
            # 1 - w^2 = 4 b Z (1 - Z) / (1 - (1 - b) Z)^2, without the cancellation of 1 - w^2 near w = 1
            one_minus_w2[rows] = (4 * bp * beta * (1 - beta) / denominator**2)[accept]
            pending = pending[~accept]
        shape = (n,) + self.batch_shape
        return w.view(shape), one_minus_w2.view(shape)

    def rsample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        """``sample_shape + [*batch, d]`` draws on the sphere, reparameterised in ``loc`` (from
        ``generator``, else the global seed)."""
        sample_shape = torch.Size(sample_shape)
        n = max(1, math.prod(sample_shape))
        d, dtype = self.dim, self.loc.dtype
        w, one_minus_w2 = self._sample_w(n, generator)
        v = torch.randn(
            (n,) + self.batch_shape + (d - 1,), dtype=torch.float64, device=self.loc.device, generator=generator
        )
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        tangent = torch.sqrt(one_minus_w2.clamp_min(0)).unsqueeze(-1) * v
        z0 = torch.cat([w.unsqueeze(-1), tangent], dim=-1).to(dtype)  # around e_1
        # H = I - 2 u u^T with u = (e_1 - mu) / |e_1 - mu| maps e_1 to mu; H = I where mu = e_1
        e1 = torch.zeros(d, dtype=dtype, device=self.loc.device)
        e1[0] = 1.0
        diff = e1 - self.loc
        norm2 = (diff * diff).sum(-1, keepdim=True)
        flat = norm2 <= torch.finfo(dtype).eps
        u = diff / torch.where(flat, torch.ones_like(norm2), norm2).sqrt()
        u = torch.where(flat, torch.zeros_like(u), u)
        z = z0 - 2 * u * (u * z0).sum(-1, keepdim=True)
        return z.reshape(sample_shape + self.batch_shape + (d,))

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)


def vmf_log_normalizer(d: int, concentration: Tensor | float) -> Tensor:
    """``log C_d(kappa) = (d/2 - 1) log kappa - (d/2) log(2 pi) - log I_{d/2-1}(kappa)``, in ``kappa``'s shape."""
    kappa = torch.as_tensor(concentration)
    v = 0.5 * _check_dimension(d) - 1
    log_i = log_bessel_iv(v, kappa).to(kappa.dtype if kappa.is_floating_point() else torch.float64)
    return v * torch.log(kappa) - 0.5 * d * math.log(2 * math.pi) - log_i


def vmf_mean_resultant_length(d: int, concentration: Tensor | float) -> Tensor:
    """``A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa)``, in ``kappa``'s shape (a ratio of logs)."""
    kappa = torch.as_tensor(concentration)
    v = 0.5 * _check_dimension(d) - 1
    ratio = torch.exp(log_bessel_iv(v + 1, kappa).double() - log_bessel_iv(v, kappa).double())
    return ratio.to(kappa.dtype if kappa.is_floating_point() else torch.float64)


class HypersphericalUniform(torch.distributions.Distribution):
    """The uniform distribution on ``S^(d-1)``: ``log p(z) = -log |S^(d-1)|`` (:func:`log_sphere_area`).

    The prior of a vMF latent.  :meth:`sample` normalises standard normal draws (from ``generator``,
    else the global seed).

    Args:
        d: the dimension of the ambient space, ``>= 2``.
        batch_shape: the batch shape (default ``()``).
        dtype, device: of the samples and log-densities.
    """

    arg_constraints: dict = {}
    support = unit_sphere

    def __init__(
        self, d: int, batch_shape=torch.Size(), *, dtype=None, device=None, validate_args: bool | None = None
    ) -> None:
        self.dim = _check_dimension(d)
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        super().__init__(torch.Size(batch_shape), torch.Size((self.dim,)), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> HypersphericalUniform:
        return HypersphericalUniform(
            self.dim, batch_shape, dtype=self.dtype, device=self.device, validate_args=self._validate_args
        )

    @property
    def log_area(self) -> float:
        return log_sphere_area(self.dim)

    @property
    def mean(self) -> Tensor:
        return torch.zeros(self.batch_shape + self.event_shape, dtype=self.dtype, device=self.device)

    def log_prob(self, value: Tensor) -> Tensor:
        """``-log |S^(d-1)|`` for every ``z`` ``[..., *batch, d]``, shape ``[..., *batch]``."""
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        return torch.full(shape, -self.log_area, dtype=value.dtype, device=value.device)

    def entropy(self) -> Tensor:
        return torch.full(self.batch_shape, self.log_area, dtype=self.dtype, device=self.device)

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            x = torch.randn(shape, dtype=self.dtype, device=self.device, generator=generator)
            return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


@register_kl(VonMisesFisher, HypersphericalUniform)
def _kl_vmf_uniform(q: VonMisesFisher, p: HypersphericalUniform) -> Tensor:
    """``KL = kappa A_d(kappa) + log C_d(kappa) + log |S^(d-1)|``, ``[*batch]``: constant in ``mu``."""
    if q.dim != p.dim:
        raise ValueError(f"KL(vMF || uniform) needs one sphere: q is on S^{q.dim - 1}, p on S^{p.dim - 1}")
    kl = q.concentration * q.mean_resultant_length + q.log_normalizer + p.log_area
    return kl.expand(torch.broadcast_shapes(q.batch_shape, p.batch_shape))
