r"""Variational objectives for models whose latent variable cannot be summed out.

Each objective is a function of distributions and log-densities: a model supplies the amortised
posterior ``q(z | x)``, the prior ``p(z)`` and a function ``log_likelihood_fn`` giving
``log p(x | z)``; nothing here knows about encoders or decoders.

- :func:`elbo`: the evidence lower bound ``E_q[log p(x | z)] - KL(q || p) <= log p(x)``, with the
  KL analytic where torch has it registered and Monte Carlo otherwise, and a surrogate carrying the
  reparameterised or score-function gradient (:mod:`latentnlp.estimators`).
- :func:`iwae`: the importance-weighted bound of Burda et al. (2016),
  ``log 1/S sum_s p(x, z_s) / q(z_s | x)``, streamed over chunks of samples.
- :func:`free_bits`: the KL term with a floor, per latent dimension over the batch (Kingma et al.
  2016) or per sentence with a target rate (Li et al. 2019).
- :func:`word_dropout`: decoder inputs with words replaced by ``<unk>`` (Bowman et al. 2016).
- :func:`wake_sleep`: the wake-sleep surrogate of Hinton et al. (1995), the model updated on
  ``q``'s samples and ``q`` on the model's dreams, with the reweighted wake phase of Bornschein &
  Bengio (2015) as an option.

Shapes: ``q`` has batch shape ``[*batch]`` (``[B]`` for a batch of sentences) and event shape
``[*event]``; ``log_likelihood_fn`` maps samples ``z [S, *batch, *event]`` to
``log p(x | z_s) [S, *batch]``.  The KL weights that change over training are schedule objects
(:mod:`latentnlp.schedules`); these functions take the weight of the current update.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.distributions import Distribution, kl_divergence

from latentnlp import estimators

__all__ = ["ELBO", "Loss", "elbo", "iwae", "free_bits", "word_dropout", "WakeSleep", "wake_sleep"]


# ------------------------------------------------------------------------------------------------
# what a bound and a loss are (models return them; the trainer reads them)
# ------------------------------------------------------------------------------------------------
@dataclass
class ELBO:
    """An evidence lower bound ``E_q[log p(x | z)] - KL(q || p) <= log p(x)``, per example.

    ``value = reconstruction - kl``, each ``[B]``.  ``surrogate [B]`` has the
    estimator's gradient (score-function terms, baselines...) and equals
    ``value`` in expectation; it defaults to ``value`` for reparameterised or
    exactly enumerated expectations.  A KL weight (annealing) changes only the
    surrogate; ``value`` is always the true bound.
    """

    value: Tensor
    reconstruction: Tensor
    kl: Tensor
    surrogate: Tensor | None = None

    def __post_init__(self) -> None:
        if self.surrogate is None:
            self.surrogate = self.value


@dataclass
class Loss:
    """A scalar to minimise (per target token) and per-example metrics.

    ``metrics`` maps names to ``[B]`` tensors (detached), summed over the
    tokens of each example: the negative objective -- ``nll`` (exact or
    importance-weighted negative log-likelihood) or, under ``elbo``,
    ``neg_elbo`` (the negative bound, which is not a likelihood) -- and
    ``tokens`` (number of target tokens of each example), plus any of
    ``kl``, ``reconstruction``, ...  Summing each over a corpus and dividing
    by the summed ``tokens`` gives corpus-level per-token numbers.
    """

    value: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


LogLikelihood = Callable[[Tensor], Tensor]

_KL_MODES = ("auto", "analytic", "mc")
_ESTIMATORS = ("auto", "reparam", "score_function")


# ------------------------------------------------------------------------------------------------
# checks shared by the bounds
# ------------------------------------------------------------------------------------------------
def _check_num_samples(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_pair(q: Distribution, prior: Distribution) -> None:
    if not isinstance(q, Distribution):
        raise ValueError(f"q must be a torch Distribution, got {type(q).__name__}")
    if not isinstance(prior, Distribution):
        raise ValueError(f"prior must be a torch Distribution, got {type(prior).__name__}")
    if q.event_shape != prior.event_shape:
        raise ValueError(
            f"prior has event shape {tuple(prior.event_shape)} but q has {tuple(q.event_shape)}: "
            "they must be distributions over the same z"
        )
    try:
        joint = torch.broadcast_shapes(prior.batch_shape, q.batch_shape)
    except RuntimeError:
        joint = None
    if joint != q.batch_shape:
        raise ValueError(f"prior's batch shape {tuple(prior.batch_shape)} must broadcast to q's {tuple(q.batch_shape)}")


def _check_generator(q: Distribution, generator: torch.Generator | None, reparameterised: bool) -> None:
    method = q.rsample if reparameterised else q.sample
    if generator is not None and "generator" not in inspect.signature(method).parameters:
        raise ValueError(
            f"generator given, but {type(q).__name__}.{method.__name__} takes none: use a latentnlp.families "
            "distribution (their samplers take a generator) or draw from the global seed (generator=None)"
        )


def _draw(q: Distribution, n: int, generator: torch.Generator | None, reparameterised: bool) -> Tensor:
    _check_generator(q, generator, reparameterised)
    method = q.rsample if reparameterised else q.sample
    if generator is None:
        return method(torch.Size((n,)))
    return method(torch.Size((n,)), generator=generator)


def _log_likelihood(fn: LogLikelihood, z: Tensor, expected: torch.Size) -> Tensor:
    value = fn(z)
    if not isinstance(value, Tensor) or value.shape != expected:
        raise ValueError(
            f"log_likelihood_fn(z) for z of shape {tuple(z.shape)} must return one log p(x | z) per sample "
            f"and batch element, shape {tuple(expected)}; got {tuple(getattr(value, 'shape', ()))}"
        )
    return value


def _analytic_kl(q: Distribution, prior: Distribution) -> Tensor | None:
    """``KL(q || prior)`` expanded to ``q.batch_shape``, or None where torch has no closed form."""
    try:
        kl = kl_divergence(q, prior)
    except NotImplementedError:
        return None
    return kl.expand(q.batch_shape)


# ------------------------------------------------------------------------------------------------
# ELBO
# ------------------------------------------------------------------------------------------------
def elbo(
    log_likelihood_fn: LogLikelihood,
    q: Distribution,
    prior: Distribution,
    *,
    num_samples: int = 1,
    kl: str = "auto",
    kl_weight: float = 1.0,
    estimator: str = "auto",
    baseline: Tensor | str | None = None,
    generator: torch.Generator | None = None,
) -> ELBO:
    r"""The evidence lower bound of each batch element, estimated from ``num_samples`` draws of ``q``.

    .. math::

        \mathcal{L}(x) = \mathbb{E}_{q(z|x)}[\log p(x \mid z)] - \mathrm{KL}(q(z|x) \,\|\, p(z))
        \le \log p(x)

    estimated by ``reconstruction = 1/S sum_s log p(x | z_s)`` with ``z_s ~ q`` and

    - ``kl="analytic"``: the closed form ``kl_divergence(q, prior)`` (a ``ValueError`` if torch has
      none registered for the pair);
    - ``kl="mc"``: ``1/S sum_s [log q(z_s) - log p(z_s)]`` on the same samples;
    - ``kl="auto"`` (default): analytic when registered, Monte Carlo otherwise (e.g. a mixture prior).

    Gradients (``estimator``): ``"reparam"`` draws ``z_s = q.rsample()`` (the pathwise gradient,
    :func:`latentnlp.estimators.reparam`); ``"score_function"`` draws ``z_s = q.sample()`` and
    builds the REINFORCE surrogate of :func:`latentnlp.estimators.score_function` on the learning
    signal ``log p(x | z) - kl_weight (log q(z) - log p(z))`` (Monte Carlo KL) or ``log p(x | z)``
    (analytic KL, whose gradient is exact); ``baseline`` (a tensor ``[*batch]`` predicted from
    ``x``, or ``"leave-one-out"``) goes to it, and a learned baseline's regression loss is added to
    the surrogate as a zero-valued term.  ``"auto"`` is ``"reparam"`` when ``q.has_rsample``, else
    ``"score_function"``.

    Args:
        log_likelihood_fn: ``z [S, *batch, *event] -> log p(x | z) [S, *batch]``.
        q: the posterior ``q(z | x)``, batch shape ``[*batch]`` (``[B]``).
        prior: ``p(z)``, same event shape, a batch shape that broadcasts to ``q``'s.
        num_samples: ``S >= 1``.
        kl_weight: ``beta >= 0``, the KL weight of the surrogate (KL annealing; pass
            ``schedule(step)`` of a :mod:`latentnlp.schedules` object).  The bound itself is unweighted.
        generator: the source of the samples (else the global seed).

    Returns an :class:`ELBO` of ``[*batch]`` tensors:
    ``value = reconstruction - kl`` (the bound, whatever ``kl_weight``), ``reconstruction``, ``kl``,
    and ``surrogate``, whose value is ``reconstruction - kl_weight * kl`` and whose gradient is the
    estimator's (unbiased for the ``kl_weight``-weighted bound).  Train on ``surrogate``; report
    ``value`` (as ``neg_elbo = -value``, never as ``nll``).
    """
    _check_num_samples("num_samples", num_samples)
    _check_pair(q, prior)
    if kl not in _KL_MODES:
        raise ValueError(f"kl must be one of {_KL_MODES}, got {kl!r}")
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
    kl_weight = float(kl_weight)
    if not (kl_weight >= 0 and math.isfinite(kl_weight)):
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight}")
    if estimator == "auto":
        estimator = "reparam" if q.has_rsample else "score_function"
    if estimator == "reparam" and not q.has_rsample:
        raise ValueError(f"estimator='reparam' needs a q with rsample; {type(q).__name__} has none")
    if baseline is not None and estimator != "score_function":
        raise ValueError("baseline is only used by estimator='score_function'")
    _check_generator(q, generator, reparameterised=estimator == "reparam")

    analytic = None if kl == "mc" else _analytic_kl(q, prior)
    if kl == "analytic" and analytic is None:
        raise ValueError(
            f"kl='analytic' but no closed-form KL is registered for {type(q).__name__} || "
            f"{type(prior).__name__}; use kl='mc' or kl='auto'"
        )
    expected = torch.Size((num_samples,)) + q.batch_shape

    if estimator == "reparam":
        z = _draw(q, num_samples, generator, reparameterised=True)
        log_lik = _log_likelihood(log_likelihood_fn, z, expected)
        reconstruction = log_lik.mean(0)
        kl_value = analytic if analytic is not None else (q.log_prob(z) - prior.log_prob(z)).mean(0)
        surrogate = reconstruction - kl_weight * kl_value
        return ELBO(value=reconstruction - kl_value, reconstruction=reconstruction, kl=kl_value, surrogate=surrogate)

    # score function: estimators.score_function draws the samples and calls the signal once
    seen: dict[str, Tensor] = {}

    def signal(z: Tensor) -> Tensor:
        log_lik = _log_likelihood(log_likelihood_fn, z, expected)
        seen["log_lik"] = log_lik
        if analytic is not None:
            return log_lik
        kl_samples = q.log_prob(z) - prior.log_prob(z)
        seen["kl"] = kl_samples
        return log_lik - kl_weight * kl_samples

    estimate = estimators.score_function(signal, q, baseline=baseline, num_samples=num_samples, generator=generator)
    reconstruction = seen["log_lik"].mean(0)
    if analytic is not None:
        kl_value = analytic
        surrogate = estimate.objective - kl_weight * analytic
    else:
        kl_value = seen["kl"].mean(0)
        surrogate = estimate.objective
    return ELBO(value=reconstruction - kl_value, reconstruction=reconstruction, kl=kl_value, surrogate=surrogate)


# ------------------------------------------------------------------------------------------------
# IWAE
# ------------------------------------------------------------------------------------------------
def iwae(
    log_likelihood_fn: LogLikelihood,
    q: Distribution,
    prior: Distribution,
    num_samples: int,
    *,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The importance-weighted bound (Burda et al. 2016) of each batch element, ``[*batch]``.

    .. math::

        \mathcal{L}_S(x) = \log \frac{1}{S} \sum_{s=1}^{S} \frac{p(x \mid z_s)\, p(z_s)}{q(z_s \mid x)},
        \qquad z_s \sim q(z \mid x)

    computed in log space: ``log w_s = log p(x | z_s) + log p(z_s) - log q(z_s)`` and
    ``L_S = logsumexp_s(log w_s) - log S``.  ``E[L_1]`` is the ELBO, ``E[L_S]`` rises with ``S`` and
    tends to ``log p(x)`` (Burda et al., Theorem 1), so with ``S`` in the hundreds it is the
    reported ``nll = -L_S`` of a variational model.

    All ``S`` samples are drawn first, as one ``[S, *batch, *event]`` draw (so the value does not
    depend on ``chunk_size``); ``log_likelihood_fn`` -- the decoder, where the memory goes -- is then
    called on chunks of at most ``chunk_size`` samples, and the chunks' log-sum-exps are combined by
    a streaming ``logaddexp``.  The result equals the unchunked one up to float rounding.  Under
    ``torch.no_grad()`` (evaluation) peak memory is that of one chunk; with gradients autograd keeps
    every chunk's graph.

    The result is differentiable: with a reparameterised ``q`` (``q.has_rsample``) its gradient is the
    IWAE gradient, ``sum_s w~_s grad log w_s`` with normalised weights ``w~_s``, for the parameters
    of the model and of ``q`` alike.  Without ``rsample`` the samples are fixed and the gradient is
    that of the model's parameters only; what it gives ``q``'s parameters (through ``log q(z_s)``)
    is not an estimator of the bound's gradient, so train such a ``q`` with :func:`elbo`.

    Args:
        log_likelihood_fn: ``z [S', *batch, *event] -> log p(x | z) [S', *batch]`` for ``S'``
            samples at a time (``S' <= chunk_size``).
        q, prior: as for :func:`elbo`.
        num_samples: ``S >= 1``.
        chunk_size: samples per call of ``log_likelihood_fn``; ``None`` is all ``S`` at once.
        generator: the source of the samples (else the global seed).
    """
    _check_num_samples("num_samples", num_samples)
    if chunk_size is not None:
        _check_num_samples("chunk_size", chunk_size)
    _check_pair(q, prior)
    z = _draw(q, num_samples, generator, reparameterised=q.has_rsample)
    total: Tensor | None = None
    for part in z.split(chunk_size or num_samples):
        expected = torch.Size((part.shape[0],)) + q.batch_shape
        log_w = _log_likelihood(log_likelihood_fn, part, expected) + prior.log_prob(part) - q.log_prob(part)
        chunk = torch.logsumexp(log_w, dim=0)
        total = chunk if total is None else torch.logaddexp(total, chunk)
    assert total is not None
    return total - math.log(num_samples)


# ------------------------------------------------------------------------------------------------
# free bits
# ------------------------------------------------------------------------------------------------
_FREE_BITS = ("dimension", "sentence")


def free_bits(kl: Tensor, lambda_: float, *, per: str = "dimension") -> Tensor:
    r"""The KL term with a floor of ``lambda_`` nats, to put in the loss in place of the KL, ``[B]``.

    ``per="dimension"`` -- Kingma et al. (2016), *Improved variational inference with inverse
    autoregressive flow*, eq. (15), with each latent dimension its own group: the batch mean of
    each dimension's KL is clamped from below, and the batch objective's KL term is

    .. math::

        \sum_{d=1}^{D} \max\Big(\lambda, \frac{1}{B} \sum_{b=1}^{B} \mathrm{KL}_{bd}\Big)

    It is returned per example as ``F_b = sum_d [m_d > lambda] KL_bd + [m_d <= lambda] lambda``
    with ``m_d = 1/B sum_b KL_bd``, whose batch mean is the sum above and whose gradient is
    ``KL_bd``'s for a dimension above the floor and zero for one at or below it.  ``kl`` is
    ``[B, D]`` (e.g. ``kl_divergence(q.base_dist, prior.base_dist)`` for a
    :class:`~latentnlp.families.DiagonalGaussian`); a ``[B]`` KL is one group (``D = 1``).
    ``lambda_`` is nats per dimension.  The floor depends on the batch, so ``F_b`` does too.

    ``per="sentence"`` -- Li et al. (2019), *A surprisingly effective fix for deep latent variable
    modeling of text*: a target rate per example, ``F_b = max(lambda, sum_d KL_bd)``, with zero
    gradient for an example whose KL is at or below the target.  ``kl`` is ``[B]`` or ``[B, D]``
    (summed over ``D``); ``lambda_`` is nats per sentence.  (Li et al.'s code multiplies the KL by
    the indicator ``[KL_b > lambda]`` instead: the same gradient, a value lower by ``lambda`` for
    the examples below the target.)

    In a loss, replace the KL: ``-(reconstruction - kl_weight * free_bits(kl, lambda_))``; report the
    unclamped ``kl`` and ``neg_elbo``, which the floor does not change.
    """
    if per not in _FREE_BITS:
        raise ValueError(f"per must be one of {_FREE_BITS}, got {per!r}")
    if not isinstance(kl, Tensor) or kl.dim() not in (1, 2) or kl.shape[0] < 1:
        raise ValueError(f"kl must be a tensor [B] or [B, D] with B >= 1, got {tuple(getattr(kl, 'shape', ()))}")
    lambda_ = float(lambda_)
    if not (lambda_ >= 0 and math.isfinite(lambda_)):
        raise ValueError(f"lambda_ must be a finite number >= 0, got {lambda_}")
    if per == "sentence":
        total = kl if kl.dim() == 1 else kl.sum(-1)
        return torch.where(total > lambda_, total, torch.full_like(total, lambda_))
    per_dim = kl if kl.dim() == 2 else kl.unsqueeze(-1)
    above = per_dim.mean(0) > lambda_  # [D]
    floor = torch.full_like(per_dim, lambda_)
    return torch.where(above, per_dim, floor).sum(-1)


# ------------------------------------------------------------------------------------------------
# word dropout
# ------------------------------------------------------------------------------------------------
def word_dropout(
    tokens: Tensor,
    rate: float,
    unk_id: int,
    *,
    keep: Iterable[int] | Tensor = (),
    training: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Decoder inputs with each word replaced by ``<unk>`` with probability ``rate`` (Bowman et al. 2016).

    ``out[b, t] = unk_id`` if ``u_bt < rate`` and position ``(b, t)`` is not kept, else
    ``tokens[b, t]``, with ``u_bt ~ U[0, 1)`` independent (drawn from ``generator``, else the global
    seed).  A batch transform on the *decoder's inputs* only (the targets stay whole): the decoder
    must then lean on ``z`` to predict the next word, which keeps a sentence VAE from ignoring its
    latent.  ``rate = 1`` is Bowman et al.'s inputless decoder (word keep rate 0).

    Args:
        tokens: integer ids ``[B, T]`` (any shape works).
        rate: replacement probability in ``[0, 1]``.
        unk_id: the id written in place of a dropped word.
        keep: never replaced -- token ids (``(bos_id, eos_id, pad_id)``: specials and padding; a
            sequence or an integer tensor), or a bool mask broadcastable to ``tokens``, True at
            positions to keep.
        training: False (evaluation: pass ``module.training``) returns ``tokens`` unchanged, as does
            ``rate == 0``; no random numbers are drawn then.

    Returns a new tensor of ``tokens``' shape and dtype (``tokens`` itself when nothing is dropped).
    """
    if not isinstance(tokens, Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor [B, T], got {getattr(tokens, 'dtype', type(tokens))}")
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if isinstance(unk_id, bool) or not isinstance(unk_id, int):
        raise ValueError(f"unk_id must be an int token id, got {unk_id!r}")
    if isinstance(keep, Tensor) and not keep.dtype.is_floating_point and keep.dtype != torch.bool:
        keep = keep.reshape(-1).tolist()  # a tensor of token ids
    if isinstance(keep, Tensor):
        if keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool mask or a collection of token ids, got a {keep.dtype} tensor")
        try:
            kept = keep.to(tokens.device).expand(tokens.shape)
        except RuntimeError:
            raise ValueError(
                f"keep mask of shape {tuple(keep.shape)} does not broadcast to tokens of shape {tuple(tokens.shape)}"
            ) from None
    else:
        ids = list(keep)
        try:
            if any(isinstance(i, bool) for i in ids):
                raise TypeError
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise ValueError(f"keep must be token ids (ints) or a bool mask, got {ids!r}") from None
        kept = torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))
    if not training or rate == 0.0:
        return tokens
    u = torch.rand(tokens.shape, device=tokens.device, generator=generator)
    drop = (u < rate) & ~kept
    return tokens.masked_fill(drop, unk_id)


# ------------------------------------------------------------------------------------------------
# wake-sleep
# ------------------------------------------------------------------------------------------------
_Q_UPDATES = ("sleep", "wake", "both")


class WakeSleep:
    """The terms of one wake-sleep update (:func:`wake_sleep`).

    Attributes:
        wake: ``[*batch]``, ``sum_s w_s log p(x, z_s)`` on ``q``'s samples (``w_s = 1/S``, or the
            self-normalised importance weights when reweighted), plus the wake-phase ``q`` term
            ``sum_s w_s log q(z_s | x)`` when ``q`` learns by the wake phase.
        sleep: ``[M]``, ``log q(z~_m | x~_m)`` on the model's ``M`` dreams, or None when ``q``
            learns by the wake phase only.
        bound: ``[*batch]``, detached: ``log 1/S sum_s p(x, z_s) / q(z_s | x)`` on the wake
            samples, the importance-weighted bound of ``S`` samples (the one-sample ELBO estimate
            for ``S = 1``).
    """

    __slots__ = ("wake", "sleep", "bound")

    def __init__(self, wake: Tensor, sleep: Tensor | None, bound: Tensor) -> None:
        self.wake, self.sleep, self.bound = wake, sleep, bound

    @property
    def surrogate(self) -> Tensor:
        r"""The scalar to maximise, ``sum_b [wake_b + 1/M sum_m sleep_m]`` = ``wake.sum() + N *
        sleep.mean()`` over the ``N`` examples of the batch: each example's wake term plus the sleep
        objective ``E_{p(x, z)} log q(z | x)``, estimated by the mean over the ``M`` dreams, so the
        two phases keep their relative weight whatever ``M`` is.  One backward gives both phases'
        gradients."""
        total = self.wake.sum()
        return total if self.sleep is None else total + self.wake.numel() * self.sleep.mean()


def wake_sleep(
    log_likelihood_fn: LogLikelihood,
    q: Distribution,
    prior: Distribution,
    *,
    dream_fn: Callable[[], tuple[Tensor, Tensor]] | None = None,
    encoder_fn: Callable[[Tensor], Distribution] | None = None,
    num_samples: int = 1,
    reweighted: bool = False,
    q_update: str | None = None,
    generator: torch.Generator | None = None,
) -> WakeSleep:
    r"""Wake-sleep (Hinton et al. 1995) and reweighted wake-sleep (Bornschein & Bengio 2015) as one surrogate.

    The generative model ``p_theta(x, z) = p(z) p(x | z)`` and the inference network ``q_phi(z | x)``
    are trained by two objectives, each with its own parameters:

    .. math::

        \text{wake: } \max_\theta \sum_s w_s \log p_\theta(x, z_s), \quad z_s \sim q_\phi(z \mid x)
        \qquad
        \text{sleep: } \max_\phi \frac{1}{M} \sum_m \log q_\phi(\tilde z_m \mid \tilde x_m),
        \quad (\tilde x_m, \tilde z_m) \sim p_\theta(x, z)

    With ``reweighted=False``, ``w_s = 1/S``.  With ``reweighted=True``,
    ``w_s = softmax_s(log p(x, z_s) - log q(z_s | x))`` (detached), so the wake gradient for
    ``theta`` is that of the ``S``-sample importance-weighted bound, and ``q`` may also learn by the
    *wake-phase q update* ``max_phi sum_s w_s log q_phi(z_s | x)``, whose expected gradient tends to
    ``-grad_phi KL(p(z | x) || q_phi(z | x))`` as ``S`` grows.  The sleep phase minimises
    ``E_{p(x)} KL(p(z | x) || q_phi(z | x))``: its fixed point is ``q = p(z | x)`` where the
    family can represent it.

    The surrogate (:attr:`WakeSleep.surrogate`) adds, for each of the ``N`` examples of the batch,
    its wake term and the sleep term's estimate by the mean over the ``M`` dreams:
    ``sum_b wake_b + N/M sum_m log q(z~_m | x~_m)``.

    Samples and dreams are detached, so the wake terms reach only ``theta`` (``log p`` of fixed
    ``z``) -- and ``phi`` through the wake-phase ``q`` term -- and the sleep term only ``phi``
    (``log q`` of fixed dreams): maximising :attr:`WakeSleep.surrogate` does both phases in one
    backward.  ``q`` needs no ``rsample``: this trains discrete latents as well as continuous ones.

    Args:
        log_likelihood_fn: ``z [S, *batch, *event] -> log p(x | z) [S, *batch]``, as for :func:`elbo`.
        q: ``q(z | x)``, batch shape ``[*batch]``.
        prior: ``p(z)``, broadcasting to ``q``; its parameters get the wake gradient.
        dream_fn: ``() -> (x~, z~)``, ``M`` draws of ``p(x, z)`` (run under ``torch.no_grad``);
            needed when ``q`` learns by the sleep phase.
        encoder_fn: ``x~ -> q(z | x~)``, batch shape ``[M]``; needed with ``dream_fn``.
        num_samples: ``S >= 1`` wake samples per example (``>= 2`` is needed for reweighting to
            matter).
        reweighted: self-normalised importance weights in the wake phase.
        q_update: how ``q`` learns: ``"sleep"`` (default without reweighting), ``"wake"`` (the
            reweighted wake-phase update, default with reweighting) or ``"both"`` (Bornschein &
            Bengio's combination); ``"wake"`` and ``"both"`` need ``reweighted=True``.
        generator: the source of the wake samples (else the global seed); ``dream_fn`` draws its own.

    Returns a :class:`WakeSleep`.
    """
    _check_num_samples("num_samples", num_samples)
    _check_pair(q, prior)
    if q_update is None:
        q_update = "wake" if reweighted else "sleep"
    if q_update not in _Q_UPDATES:
        raise ValueError(f"q_update must be one of {_Q_UPDATES}, got {q_update!r}")
    if q_update != "sleep" and not reweighted:
        raise ValueError(f"q_update={q_update!r} is the reweighted wake-phase update: it needs reweighted=True")
    sleeps = q_update in ("sleep", "both")
    if sleeps and (dream_fn is None or encoder_fn is None):
        raise ValueError(f"q_update={q_update!r} learns q on dreams: dream_fn and encoder_fn are both needed")

    expected = torch.Size((num_samples,)) + q.batch_shape
    z = _draw(q, num_samples, generator, reparameterised=False).detach()
    log_joint = _log_likelihood(log_likelihood_fn, z, expected) + prior.log_prob(z)  # [S, *batch]
    log_q = q.log_prob(z)
    log_w = (log_joint - log_q).detach()
    bound = torch.logsumexp(log_w, dim=0) - math.log(num_samples)
    weights = torch.softmax(log_w, dim=0) if reweighted else torch.full_like(log_w, 1.0 / num_samples)
    wake = (weights * log_joint).sum(0)
    if q_update in ("wake", "both"):
        wake = wake + (weights * log_q).sum(0)

    sleep = None
    if sleeps:
        with torch.no_grad():
            dreams, dreamed_z = dream_fn()
        sleep = encoder_fn(dreams.detach()).log_prob(dreamed_z.detach())
    return WakeSleep(wake=wake, sleep=sleep, bound=bound)
