"""Amortised mean-field variational families ``q(z | x) = prod_i q_i(z_i | x)``.

Each family is a :class:`torch.distributions.Distribution` whose parameters are
the outputs of an encoder (an inference network), and each has its KL
divergence to a prior of the same family registered with
:func:`torch.distributions.kl.register_kl`, so ``kl_divergence(q, p)`` is exact
and differentiable.

- :class:`MaskedCategorical`: one categorical per batch position over ``K``
  categories of which only those with ``mask`` set are allowed, e.g. the
  alignment ``q(z_t = m | x, y)`` over the ``S`` positions of a padded source
  sentence (Deng et al. 2018).  Masked categories have probability exactly 0
  and log-probability ``-inf``; entropies, KLs and their gradients stay finite.
- :class:`DiagonalGaussian`: ``N(mu, diag(sigma^2))`` over ``R^D``,
  reparameterised (``rsample``).
- :class:`MeanFieldBernoulli`: ``D`` independent bits, ``q(z_d = 1) = sigmoid(logits_d)``.

Closed forms (summed over the event dimension where there is one)::

    KL(q || p) categorical   = sum_{k: mask_q[k]} q_k (log q_k - log p_k)   (+inf if p_k = 0 < q_k)
    KL(q || p) gaussian      = sum_d log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2
    KL(q || p) bernoulli     = sum_d q_d (log q_d - log p_d) + (1 - q_d) (log(1 - q_d) - log(1 - p_d))

Every ``sample``/``rsample`` accepts an optional ``generator`` (a
:class:`torch.Generator`) so randomness can be made explicit.
"""

from __future__ import annotations

import math
from itertools import product

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Categorical, Distribution, constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import lazy_property

__all__ = [
    "MaskedCategorical",
    "DiagonalGaussian",
    "MeanFieldBernoulli",
    "lengths_to_mask",
]


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """Boolean mask ``[B, max_len]``: ``mask[b, i] = i < lengths[b]``."""
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D [B], got shape {tuple(lengths.shape)}")
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


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
            allows every category.  Every row must allow at least one category (checked
            unless ``validate_args=False``, which also skips the check's device sync).

    ``logits`` (normalised) holds ``-inf`` at masked categories and ``probs``
    holds exact zeros there; ``sample`` never returns a masked category.
    """

    def __init__(self, logits: Tensor, mask: Tensor | None = None,
                 validate_args: bool | None = None) -> None:
        if not isinstance(logits, Tensor) or logits.dim() < 1:
            raise ValueError(f"logits must be a tensor [*batch, K], got "
                             f"{getattr(logits, 'shape', type(logits))}")
        if mask is None:
            mask = torch.ones((), dtype=torch.bool, device=logits.device)
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        try:
            mask = mask.expand(logits.shape)
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to logits "
                             f"of shape {tuple(logits.shape)}") from None
        check = Distribution._validate_args if validate_args is None else validate_args
        if check and not bool(mask.any(-1).all()):
            raise ValueError("mask allows no category in some row: every row needs one "
                             f"(logits {tuple(logits.shape)}, mask {tuple(mask.shape)})")
        self.mask = mask
        super().__init__(logits=logits.masked_fill(~mask, -math.inf), validate_args=validate_args)

    @classmethod
    def from_lengths(cls, logits: Tensor, lengths: Tensor, **kwargs) -> "MaskedCategorical":
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
class DiagonalGaussian(Distribution):
    """``N(loc, diag(scale^2))`` over ``R^D`` (event shape ``[D]``), reparameterised.

    Args:
        loc: ``[*batch, D]``.
        scale: ``[*batch, D]`` (broadcastable), positive.
    """

    arg_constraints = {"loc": constraints.real_vector,
                       "scale": constraints.independent(constraints.positive, 1)}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, scale: Tensor, validate_args: bool | None = None) -> None:
        if loc.dim() < 1:
            raise ValueError(f"loc must be [*batch, D], got shape {tuple(loc.shape)}")
        try:
            self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        except RuntimeError:
            raise ValueError(f"scale of shape {tuple(scale.shape)} does not broadcast with loc "
                             f"of shape {tuple(loc.shape)}") from None
        super().__init__(self.loc.shape[:-1], self.loc.shape[-1:], validate_args=validate_args)

    @classmethod
    def from_params(cls, params: Tensor, min_scale: float = 0.0, **kwargs) -> "DiagonalGaussian":
        """From an encoder output ``[*batch, 2D]``: ``loc, raw = params.chunk(2)``, ``scale = softplus(raw) + min_scale``."""
        if params.shape[-1] % 2:
            raise ValueError(f"params must have an even last dimension [*batch, 2D], got {tuple(params.shape)}")
        loc, raw = params.chunk(2, dim=-1)
        return cls(loc, F.softplus(raw) + min_scale, **kwargs)

    @classmethod
    def from_logvar(cls, loc: Tensor, logvar: Tensor, **kwargs) -> "DiagonalGaussian":
        """``scale = exp(logvar / 2)`` (the usual VAE parameterisation)."""
        return cls(loc, torch.exp(0.5 * logvar), **kwargs)

    @classmethod
    def standard(cls, batch_shape, dim: int, *, dtype=None, device=None) -> "DiagonalGaussian":
        """The prior ``N(0, I_D)`` with the given batch shape."""
        shape = torch.Size(batch_shape) + (dim,)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.ones(shape, dtype=dtype, device=device))

    @lazy_property
    def log_scale(self) -> Tensor:
        return self.scale.log()

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        return self.scale.pow(2)

    @property
    def stddev(self) -> Tensor:
        return self.scale

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiagonalGaussian, _instance)
        shape = torch.Size(batch_shape) + self.event_shape
        new.loc = self.loc.expand(shape)
        new.scale = self.scale.expand(shape)
        Distribution.__init__(new, torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device, generator=generator)
        return self.loc + self.scale * eps

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z = (value - self.loc) / self.scale
        return (-0.5 * z.pow(2) - self.log_scale - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> Tensor:
        return (0.5 + 0.5 * math.log(2 * math.pi) + self.log_scale).expand(
            self.batch_shape + self.event_shape).sum(-1)


@register_kl(DiagonalGaussian, DiagonalGaussian)
def _kl_diagonal_gaussian(q: DiagonalGaussian, p: DiagonalGaussian) -> Tensor:
    var_ratio = (q.scale / p.scale).pow(2)
    t = ((q.loc - p.loc) / p.scale).pow(2)
    return 0.5 * (var_ratio + t - 1 - var_ratio.log()).sum(-1)


# ------------------------------------------------------------------------------------------------
# factorised Bernoulli
# ------------------------------------------------------------------------------------------------
class MeanFieldBernoulli(Distribution):
    """``D`` independent bits (event shape ``[D]``): ``q(z_d = 1) = sigmoid(logits_d)``.

    Args:
        logits: ``[*batch, D]``.

    All log-probabilities use ``logsigmoid`` (no ``log(p + eps)``).
    ``enumerate_support`` lists all ``2^D`` bit vectors (``D <= 20``) for exact
    enumeration in tests and small models.
    """

    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.independent(constraints.boolean, 1)
    has_enumerate_support = True

    def __init__(self, logits: Tensor, validate_args: bool | None = None) -> None:
        if logits.dim() < 1:
            raise ValueError(f"logits must be [*batch, D], got shape {tuple(logits.shape)}")
        self.logits = logits
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    @lazy_property
    def probs(self) -> Tensor:
        return torch.sigmoid(self.logits)

    @property
    def mean(self) -> Tensor:
        return self.probs

    @property
    def variance(self) -> Tensor:
        return self.probs * (1 - self.probs)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MeanFieldBernoulli, _instance)
        new.logits = self.logits.expand(torch.Size(batch_shape) + self.event_shape)
        Distribution.__init__(new, torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            u = torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device,
                           generator=generator)
            return (u < self.probs).to(self.logits.dtype)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value = value.to(self.logits.dtype)
        return (value * F.logsigmoid(self.logits) + (1 - value) * F.logsigmoid(-self.logits)).sum(-1)

    def entropy(self) -> Tensor:
        p = self.probs
        return -(p * F.logsigmoid(self.logits) + (1 - p) * F.logsigmoid(-self.logits)).sum(-1)

    def enumerate_support(self, expand: bool = True) -> Tensor:
        d = self.event_shape[0]
        if d > 20:
            raise ValueError(f"enumerate_support lists 2^D vectors; D = {d} is too large")
        values = torch.tensor(list(product((0.0, 1.0), repeat=d)), dtype=self.logits.dtype,
                              device=self.logits.device)  # [2^D, D]
        values = values.view((values.shape[0],) + (1,) * len(self.batch_shape) + (d,))
        if expand:
            values = values.expand((values.shape[0],) + self.batch_shape + (d,))
        return values


@register_kl(MeanFieldBernoulli, MeanFieldBernoulli)
def _kl_mean_field_bernoulli(q: MeanFieldBernoulli, p: MeanFieldBernoulli) -> Tensor:
    a, b = q.logits, p.logits
    return (q.probs * (F.logsigmoid(a) - F.logsigmoid(b))
            + torch.sigmoid(-a) * (F.logsigmoid(-a) - F.logsigmoid(-b))).sum(-1)
