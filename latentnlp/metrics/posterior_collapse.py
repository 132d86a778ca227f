"""Posterior-collapse diagnostics of an amortised posterior (sentence VAEs).

The posterior of ``N`` examples is one distribution of batch shape ``[N]`` and event shape
``[D]`` (:func:`concatenate_posteriors` joins per-batch ones): a
:class:`~latentnlp.families.DiagonalGaussian` ``q(z | x_i) = N(mu_i, diag exp logvar_i)``, whose
functions also take the two ``[N, D]`` tensors ``mu`` and ``logvar``, or a
:class:`~latentnlp.families.VonMisesFisher` ``q(z | x_i) = vMF(mu_i, kappa_i)``.

* :func:`gaussian_kl`, :func:`average_kl`: ``KL(q(z | x_i) || N(0, I))``, the rate;
* :func:`posterior_mutual_information` (any family with ``sample``, ``log_prob`` and
  ``entropy``) and its Gaussian form :func:`mutual_information`: ``I_q(x; z)`` under the
  aggregate posterior of the ``N`` rows given (He et al., 2019);
* :func:`active_units`: latent dimensions whose posterior mean ``E_q[z | x_i]`` (``q.mean``)
  varies over the data (Burda et al., 2016).

A collapsed posterior has KL and mutual information near 0 and few active units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributions import Distribution, kl_divergence

from latentnlp.families import DiagonalGaussian, VonMisesFisher

__all__ = [
    "gaussian_kl",
    "average_kl",
    "concatenate_posteriors",
    "posterior_mutual_information",
    "mutual_information",
    "active_units",
]


def _check_gaussian(mu: Tensor, logvar: Tensor) -> None:
    if mu.dim() != 2 or mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must both be [N, D]; got mu {tuple(mu.shape)}, logvar {tuple(logvar.shape)}")


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, diag exp logvar) || N(0, I))`` per row, ``[N]``, for ``mu``, ``logvar`` ``[N, D]``.

    ``KL = 1/2 sum_d (mu_d^2 + exp(logvar_d) - 1 - logvar_d)``, computed by the family's KL
    (``kl_divergence`` of two :class:`~latentnlp.families.DiagonalGaussian`), the library's one
    Gaussian KL.  It works with the variance ``exp(logvar)``, so in float32 ``logvar`` should stay
    above about ``-87`` (below ``-103`` the variance underflows to 0 and the KL reads ``inf``);
    pass float64 for posteriors that narrow.
    """
    _check_gaussian(mu, logvar)
    prior = DiagonalGaussian.standard(mu.shape[:-1], mu.shape[-1], dtype=mu.dtype, device=mu.device)
    return kl_divergence(DiagonalGaussian.from_logvar(mu, logvar), prior)


def average_kl(mu: Tensor, logvar: Tensor) -> float:
    """Average over examples of :func:`gaussian_kl` (nats per example, e.g. per sentence)."""
    return float(gaussian_kl(mu, logvar).mean())


def concatenate_posteriors(posteriors: Sequence[Distribution]) -> DiagonalGaussian | VonMisesFisher:
    """The posteriors of several batches as one distribution of batch shape ``[N]`` (``N`` the
    summed batch sizes), detached, in float64 on the CPU, for the whole-set diagnostics.

    Each element is a :class:`~latentnlp.families.DiagonalGaussian` (its ``loc`` and ``scale``
    are joined; subclasses such as the logistic normal count as their Gaussian) or a
    :class:`~latentnlp.families.VonMisesFisher` (``loc`` and ``concentration``), each of batch
    shape ``[B_i]`` and the same event shape ``[D]``, all of one family.
    """
    if not posteriors:
        raise ValueError("posteriors: need at least one distribution, got none")
    families = {type(q).__name__ for q in posteriors}
    if all(isinstance(q, DiagonalGaussian) for q in posteriors):
        family = DiagonalGaussian
    elif all(isinstance(q, VonMisesFisher) for q in posteriors):
        family = VonMisesFisher
    else:
        raise ValueError(
            "posteriors must all be DiagonalGaussian or all VonMisesFisher (the families whose whole-set "
            f"diagnostics are defined here), got {sorted(families)}"
        )
    shapes = {(tuple(q.batch_shape), tuple(q.event_shape)) for q in posteriors}
    if any(len(batch) != 1 for batch, _ in shapes) or len({event for _, event in shapes}) != 1:
        raise ValueError(
            f"posteriors must each have batch shape [B_i] and one event shape [D]; got (batch, event) shapes "
            f"{sorted(shapes)}"
        )

    def joined(values: list[Tensor]) -> Tensor:
        return torch.cat([v.detach().to("cpu", torch.float64) for v in values])

    loc = joined([q.loc for q in posteriors])
    if family is DiagonalGaussian:
        return DiagonalGaussian(loc, joined([q.scale for q in posteriors]))
    return VonMisesFisher(loc, joined([q.concentration for q in posteriors]))


def posterior_mutual_information(
    q: Distribution,
    z: Tensor | None = None,
    *,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> float:
    """Estimate of ``I_q(x; z)`` under the aggregate posterior of the ``N`` posteriors in ``q``.

    Hoffman & Johnson's decomposition, estimated as in He et al. (2019), "Lagging inference
    networks and posterior collapse" (``q`` has batch shape ``[N]``, event shape ``[D]``; see
    :func:`concatenate_posteriors`)::

        I(x; z) = E_x E_{q(z|x)}[log q(z|x)] - E_{q(z)}[log q(z)],
        q(z) ~= 1/N sum_{j=1..N} q(z | x_j)

    The aggregate posterior ``q(z)`` is the mixture over exactly the ``N`` rows passed: over
    the whole evaluation set if the whole set is passed, over one mini-batch if one batch is.
    He et al. call it once per evaluation mini-batch and average the per-batch values; that is
    the caller's loop.  The estimate depends on ``N`` and never exceeds ``log N`` by more than
    sampling noise, so numbers are comparable only at the same ``N``.

    The first term is the family's analytic negative entropy ``-H(q(z | x_i))`` averaged over
    examples; the second is a Monte Carlo average over ``z ~ q(z | x_i)`` (``num_samples`` per
    example drawn with ``q.sample(..., generator=generator)``, or the given ``z`` of shape
    ``[N, D]`` or ``[S, N, D]``), each scored against all ``N`` components.  ``O(S N^2 D)`` time in
    chunks of bounded memory, in ``q``'s dtype (float64 from :func:`concatenate_posteriors`).
    """
    if len(q.batch_shape) != 1 or len(q.event_shape) != 1:
        raise ValueError(
            f"q must have batch shape [N] and event shape [D], got {tuple(q.batch_shape)} and {tuple(q.event_shape)}"
        )
    (n,), (d,) = q.batch_shape, q.event_shape
    if z is None:
        z = q.sample((num_samples,), generator=generator)
    else:
        z = z.detach().to(q.mean)
        if z.dim() == 2:
            z = z.unsqueeze(0)
        if z.dim() != 3 or z.shape[1:] != (n, d):
            raise ValueError(f"z must be [N, D] or [S, N, D] with [N, D] = {(n, d)}, got {tuple(z.shape)}")
    neg_entropy = -q.entropy().mean()
    flat = z.reshape(-1, d)  # [S*N, D]
    chunk = max(1, int(4e6 // max(1, n * d)))
    log_qz = []
    for part in flat.split(chunk):  # [c, D] against all N components
        log_density = q.log_prob(part.unsqueeze(1))  # [c, N]
        log_qz.append(torch.logsumexp(log_density, dim=1) - math.log(n))
    return float(neg_entropy - torch.cat(log_qz).mean())


def mutual_information(
    mu: Tensor,
    logvar: Tensor,
    z: Tensor | None = None,
    *,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> float:
    """:func:`posterior_mutual_information` of the diagonal Gaussians ``N(mu_i, diag exp logvar_i)``
    (``mu``, ``logvar`` ``[N, D]``), in float64.

    The first term is the analytic ``-D/2 log(2 pi) - 1/2 sum_d (1 + logvar_d)`` averaged over
    examples; ``z``, ``num_samples`` and ``generator`` are as there.
    """
    _check_gaussian(mu, logvar)
    q = DiagonalGaussian.from_logvar(mu.detach().double(), logvar.detach().double())
    return posterior_mutual_information(q, z, num_samples=num_samples, generator=generator)


def active_units(mu: Tensor, threshold: float = 0.01) -> int:
    """Number of active latent units (Burda et al., 2016).

    Unit ``d`` is active when ``A_d = Cov_x(E_{q(z|x)}[z_d]) > threshold``: the variance over
    the data set of the posterior mean ``mu[:, d]`` (unbiased, divisor ``N - 1``, as in
    He et al.'s code).  ``mu`` is ``[N, D]`` over the whole evaluation set: the Gaussian's
    ``loc``, or ``q.mean`` of any family (a vMF's ``A_D(kappa) mu_i``).
    """
    if mu.dim() != 2 or mu.shape[0] < 2:
        raise ValueError(f"mu must be [N, D] with N >= 2, got {tuple(mu.shape)}")
    variance = mu.detach().double().var(dim=0, unbiased=True)
    return int((variance > threshold).sum())
