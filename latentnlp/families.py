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

Closed forms (summed over the event dimension where there is one)::

    KL(q || p) categorical   = sum_{k: mask_q[k]} q_k (log q_k - log p_k)   (+inf if p_k = 0 < q_k)
    KL(q || p) gaussian      = sum_d log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2
    KL(q || p) bernoulli     = sum_d q_d (log q_d - log p_d) + (1 - q_d) (log(1 - q_d) - log(1 - p_d))

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
