r"""The multi-space variational encoder-decoder (MSVED) of Zhou & Neubig (2017) for reinflection.

A word form ``x`` (characters) is generated from a continuous latent ``z`` (the lemma) and
discrete tag latents ``y = (y_1..y_M)``, one per morphological feature::

    z ~ N(0, I_D),     y_i ~ Cat(1 / K_i)   (K_i = 1 + values of feature i; category 0 = "absent"),
    p(x | z, y) = prod_t p(x_t | x_<t, z, y)   a character LSTM fed [emb(x_{t-1}); z; e(y)] at every step,

with ``e(y) = sum_i E_i^T y_i`` (``y_i`` one-hot, or relaxed, over the ``K_i`` categories, ``E_i``
the feature's tag embeddings) and the initial state ``tanh(W [z; e(y)])``.  Inference reads a form
with a BiLSTM: ``q(z | x) = N(mu(h), diag sigma(h)^2)`` and ``q(y_i | x) = softmax(l_i(h))`` over
feature ``i``'s ``K_i`` categories (:class:`~latentnlp.families.MaskedCategorical` over a padded
``[M, K_max]`` table).

Objectives (``elbo``), per row of a batch:

- **labelled** (``y`` observed): ``E_{q(z|s)}[log p(x | z, y)] + log p(y) - KL(q(z | s) || p(z))
  <= log p(x, y)``, where ``s`` is the encoded form: ``x`` itself (auto-encoding) or, for
  reinflection, the source form of ``x``;
- **unlabelled** (``y`` latent, ``s = x``): ``E_{q(z|x) q(y|x)}[log p(x | z, y)] - KL(q(z | x) ||
  p(z)) - sum_i KL(q(y_i | x) || p(y_i)) <= log p(x)``, the expectation over ``y`` by
  straight-through Gumbel-softmax (``estimator="gumbel_softmax"``, temperature ``tau``) or by the
  score function with a learned input-dependent baseline (``"score_function"``).

The labelled bound is the unlabelled one with ``q(y | x)`` one-hot on the observed tags (then
``KL(q(y) || p(y)) = -log p(y)`` and both estimators return the observed ``y``), and that is how
it is computed.  Both KLs are exact.  The KL weight (annealing, a
:class:`~latentnlp.schedules.Schedule` through the trainer) scales both KLs in the surrogate only.
:meth:`MultiSpaceVAE.loss` adds, for labelled rows, the classifier term ``-alpha log q(y | x)``
(``classifier_weight``) on the decoded form, which trains ``q(y | x)`` as a tagger (Kingma et al.
2014's M2 and Zhou & Neubig's labelled objective); it is not part of the bound.

``iwae`` samples ``(z, y)`` from ``q`` (``y`` fixed on labelled rows):
``log 1/S sum_s p(x | z_s, y_s) p(z_s) p(y_s) / (q(z_s | s) q(y_s | s))``.  ``generate`` is
reinflection: ``z`` is the mean of ``q(z | source)``, decoded with the target tags by greedy or
beam search (:mod:`latentnlp.decoding`).

Batch keys: ``src [B, S]`` and ``src_lengths [B]`` (the encoded form, characters only),
``inputs [B, T]`` (``<bos> x``), ``targets [B, T]`` (``x <eos>``), ``lengths [B]``, and optionally
``tags [B, M]`` (feature indices, 0 = absent, as :class:`~latentnlp.data.TagInventory` encodes
them) with ``labelled [B]`` (bool; default all True when ``tags`` is given, all False without
``tags``).  An unlabelled row must encode the form it decodes (``src`` = ``x``).  Positions at or
past a length are ignored.

Departure from the paper: the Gumbel-softmax sample is straight-through (one-hot forward, relaxed
gradient) rather than relaxed in the forward pass, so that ``ELBO.value`` is an unbiased estimate of
the true bound (a relaxed sample gives ``log p(x | z, y)`` at a point outside the support of ``y``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Independent, kl_divergence

from latentnlp import decoding, estimators
from latentnlp.families import DiagonalGaussian, MaskedCategorical
from latentnlp.layers.encoders import encode_packed
from latentnlp.masks import lengths_to_mask
from latentnlp.models.base import ELBO, Batch, LatentModel, Loss
from latentnlp.validation import is_validating

__all__ = ["ESTIMATORS", "MultiSpaceVAE", "TagState", "expect_over_tags"]

#: how ``E_{q(y|x)}`` is estimated
ESTIMATORS = ("gumbel_softmax", "score_function")


class _JointTags(Independent):
    """``prod_i q(y_i)`` over the ``M`` features (event ``[M]``), sampling with a ``generator``."""

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        return self.base_dist.sample(sample_shape, generator=generator)


def expect_over_tags(
    f: Callable[[Tensor], Tensor],
    q: MaskedCategorical,
    *,
    estimator: str,
    num_samples: int = 1,
    tau: float = 1.0,
    baseline: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> estimators.Estimate:
    """An estimate of ``E_{q(y)}[f(y)]`` for ``M`` independent categorical tags.

    Args:
        f: one-hot (or straight-through relaxed) tags ``[S, B, M, K]`` -> values ``[S, B]``.
        q: batch ``[B, M]`` over ``K`` (padded) categories.
        estimator: ``"gumbel_softmax"`` (straight-through, :func:`latentnlp.estimators.gumbel_softmax`
            at temperature ``tau``) or ``"score_function"`` (:func:`latentnlp.estimators.score_function`
            on the joint ``prod_i q(y_i)``, with ``baseline [B]`` when given).
        num_samples: ``S``.

    Returns the :class:`~latentnlp.estimators.Estimate` ``[B]`` (``1/S sum_s f(y_s)`` in value).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    k = q.logits.shape[-1]
    if estimator == "gumbel_softmax":
        logits = q.logits.expand(num_samples, *q.logits.shape)
        y = estimators.gumbel_softmax(logits, tau, hard=True, mask=q.mask, generator=generator)
        return estimators.Estimate(f(y).mean(0))
    joint = _JointTags(q, 1)
    return estimators.score_function(
        lambda y: f(F.one_hot(y, k).to(q.logits.dtype)),
        joint,
        baseline=baseline,
        num_samples=num_samples,
        generator=generator,
    )


@dataclass
class TagState:
    """Decoder state for step-wise decoding: LSTM ``h``, ``c`` ``[layers, N, H]`` and the
    conditioning vector ``cond = [z; e(y)]`` ``[N, C]``."""

    h: Tensor
    c: Tensor
    cond: Tensor

    def index_select(self, index: Tensor) -> TagState:
        return replace(self, h=self.h.index_select(1, index), c=self.c.index_select(1, index), cond=self.cond[index])


class MultiSpaceVAE(LatentModel):
    """MSVED: a character VAE with a Gaussian lemma latent and categorical tag latents.

    Args:
        vocab_size: characters, specials included.
        tag_sizes: ``K_i`` for each feature (``1 +`` its number of values, as
            :attr:`~latentnlp.data.TagInventory.sizes` gives them).
        embedding_size, hidden_size: character embeddings, LSTM sizes (the encoder's two directions
            ``hidden_size`` each).
        latent_size: ``D``, the dimension of ``z``.
        tag_dim: the tag-embedding size of ``e(y)``.
        num_layers: decoder LSTM layers.
        dropout: on character embeddings and the decoder output.
        estimator: the default of :data:`ESTIMATORS`; ``"score_function"`` adds the learned
            baseline ``b(h)`` (an MLP of the detached encoder state), which
            ``elbo(estimator="score_function")`` needs: a model built for ``"gumbel_softmax"`` has
            none and refuses it.
        tau: Gumbel-softmax temperature (``elbo(tau=...)`` overrides it, e.g. by a schedule).
        classifier_weight: ``alpha`` of the classifier term of :meth:`loss`.
        bos_id, eos_id: decoder start and end symbols (needed by :meth:`generate`).
    """

    objectives: ClassVar[tuple[str, ...]] = ("elbo", "iwae")

    def __init__(
        self,
        vocab_size: int,
        tag_sizes: Sequence[int],
        *,
        embedding_size: int = 64,
        hidden_size: int = 128,
        latent_size: int = 32,
        tag_dim: int = 32,
        num_layers: int = 1,
        dropout: float = 0.0,
        estimator: str = "gumbel_softmax",
        tau: float = 1.0,
        classifier_weight: float = 1.0,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ) -> None:
        super().__init__()
        tag_sizes = [int(k) for k in tag_sizes]
        if not tag_sizes or min(tag_sizes) < 2:
            raise ValueError(f"tag_sizes must list K_i >= 2 (absent + values) for each feature, got {tag_sizes}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if tau <= 0 or classifier_weight < 0:
            raise ValueError(f"tau must be > 0 and classifier_weight >= 0, got {tau} and {classifier_weight}")
        self.vocab_size, self.tag_sizes, self.latent_size = vocab_size, tag_sizes, latent_size
        self.estimator, self.tau, self.classifier_weight = estimator, tau, classifier_weight
        self.bos_id, self.eos_id = bos_id, eos_id
        m, k = len(tag_sizes), max(tag_sizes)
        self.register_buffer("tag_mask", torch.arange(k) < torch.tensor(tag_sizes)[:, None], persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.encoder = nn.LSTM(embedding_size, hidden_size, batch_first=True, bidirectional=True)
        self.to_z = nn.Linear(2 * hidden_size, 2 * latent_size)
        self.to_tags = nn.Linear(2 * hidden_size, m * k)
        self.baseline = None
        if estimator == "score_function":
            self.baseline = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1))
        self.tag_embedding = nn.Parameter(0.1 * torch.randn(m, k, tag_dim))
        cond = latent_size + tag_dim
        self.to_state = nn.Linear(cond, 2 * num_layers * hidden_size)
        self.decoder = nn.LSTM(embedding_size + cond, hidden_size, num_layers=num_layers, batch_first=True)
        self.output = nn.Linear(hidden_size, vocab_size)
        self.num_layers, self.hidden_size = num_layers, hidden_size

    # ---- inference ------------------------------------------------------------------------------
    def encode(self, chars: Tensor, lengths: Tensor) -> tuple[DiagonalGaussian, MaskedCategorical, Tensor]:
        """``q(z | x)`` (batch ``[B]``, event ``[D]``), ``q(y | x)`` (batch ``[B, M]`` over ``K_max``) and
        the encoder state ``h [B, 2H]`` of the forms ``chars [B, S]`` with ``lengths [B]``."""
        if chars.dim() != 2 or lengths.shape != chars.shape[:1]:
            raise ValueError(
                f"forms must be [B, S] with lengths [B], got {tuple(chars.shape)} and {tuple(lengths.shape)}"
            )
        if is_validating() and (bool((lengths < 1).any()) or bool((lengths > chars.shape[1]).any())):
            raise ValueError(f"form lengths must lie in 1..{chars.shape[1]}, got {lengths.tolist()}")
        _, (h, _) = encode_packed(self.encoder, self.dropout(self.embedding(chars)), lengths, always_pack=True)
        state = torch.cat([h[-2], h[-1]], -1)
        q_z = DiagonalGaussian.from_params(self.to_z(state), min_scale=1e-4)
        logits = self.to_tags(state).view(chars.shape[0], *self.tag_mask.shape)
        q_y = MaskedCategorical(logits, self.tag_mask, validate_args=False)
        return q_z, q_y, state

    def posterior(self, batch: Batch) -> DiagonalGaussian:
        """The amortised ``q(z | src)``."""
        return self.encode(batch["src"], batch["src_lengths"])[0]

    def tag_posterior(self, batch: Batch) -> MaskedCategorical:
        """The amortised ``q(y | src)``, batch ``[B, M]``; its ``argmax`` tags a form."""
        return self.encode(batch["src"], batch["src_lengths"])[1]

    def tag_prior(self, batch_shape: Sequence[int] = ()) -> MaskedCategorical:
        """The uniform ``p(y_i) = 1 / K_i``, batch ``[*batch_shape, M]``."""
        logits = torch.zeros(self.tag_mask.shape, dtype=self.tag_embedding.dtype, device=self.tag_mask.device)
        prior = MaskedCategorical(logits, self.tag_mask, validate_args=False)
        return prior.expand(torch.Size(batch_shape) + self.tag_mask.shape[:1])

    def observed(self, q_y: MaskedCategorical, batch: Batch) -> MaskedCategorical:
        """``q(y | x)`` with the rows of observed tags made one-hot on them (see the module docstring)."""
        tags, labelled = _tags(batch, len(self.tag_sizes))
        if tags is None:
            return q_y
        if tags.shape != q_y.batch_shape:
            raise ValueError(f"tags must be [B, M] = {tuple(q_y.batch_shape)}, got {tuple(tags.shape)}")
        if is_validating() and bool(((tags < 0) | (tags >= torch.tensor(self.tag_sizes, device=tags.device))).any()):
            raise ValueError(f"tags must lie in 0..K_i - 1 for K = {self.tag_sizes}, got {tags.tolist()}")
        truth = F.one_hot(tags, self.tag_mask.shape[1]).bool()
        mask = torch.where(labelled[:, None, None], truth, q_y.mask)
        return MaskedCategorical(q_y.logits.masked_fill(~q_y.mask, 0.0), mask, validate_args=False)

    # ---- generative model -----------------------------------------------------------------------
    def condition(self, z: Tensor, y: Tensor) -> Tensor:
        """``[z; e(y)]``: ``z [..., D]``, one-hot or relaxed ``y [..., M, K]`` -> ``[..., D + tag_dim]``."""
        return torch.cat([z, torch.einsum("...mk,mke->...e", y, self.tag_embedding)], -1)

    def initial_state(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``(h_0, c_0)``, each ``[layers, N, H]``, ``= tanh(W cond)`` for ``cond [N, C]``."""
        hc = torch.tanh(self.to_state(cond)).view(cond.shape[0], 2, self.num_layers, self.hidden_size)
        return hc[:, 0].transpose(0, 1).contiguous(), hc[:, 1].transpose(0, 1).contiguous()

    def reconstruction(self, batch: Batch, z: Tensor, y: Tensor) -> Tensor:
        """``log p(x | z, y)`` summed over the target characters: ``z [S, B, D]``, ``y [S, B, M, K]`` -> ``[S, B]``."""
        inputs, targets, lengths = batch["inputs"], batch["targets"], batch["lengths"]
        s, b = z.shape[:2]
        cond = self.condition(z, y).reshape(s * b, -1)
        emb = self.dropout(self.embedding(inputs)).repeat(s, 1, 1)  # [S B, T, E]
        x = torch.cat([emb, cond[:, None, :].expand(-1, inputs.shape[1], -1)], -1)
        out, _ = self.decoder(x, self.initial_state(cond))
        log_probs = F.log_softmax(self.output(self.dropout(out)), -1)
        per_char = log_probs.gather(-1, targets.repeat(s, 1).clamp(0, self.vocab_size - 1)[..., None])[..., 0]
        mask = lengths_to_mask(lengths, targets.shape[1]).repeat(s, 1)
        return torch.where(mask, per_char, 0.0).sum(-1).view(s, b)

    # ---- LatentModel ----------------------------------------------------------------------------
    def num_tokens(self, batch: Batch) -> Tensor:
        return batch["lengths"]

    def elbo(
        self,
        batch: Batch,
        *,
        estimator: str | None = None,
        num_samples: int = 1,
        kl_weight: float = 1.0,
        tau: float | None = None,
        q_y: MaskedCategorical | None = None,
        generator: torch.Generator | None = None,
    ) -> ELBO:
        """The bound of the module docstring per row ``[B]``, from ``num_samples`` draws of ``(z, y)``.

        ``estimator`` and ``tau`` override the model's for this call; ``q_y`` (batch ``[B, M]``)
        replaces the inference network's ``q(y | x)`` (observed rows stay one-hot); ``generator``
        draws ``z`` and ``y``.  ``surrogate = estimate - kl_weight * (KL_z + KL_y)`` (plus the
        baseline's zero-valued regression term under the score function).
        """
        estimator = self.estimator if estimator is None else estimator
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if estimator == "score_function" and self.baseline is None:
            raise ValueError(
                "estimator='score_function' needs the learned baseline of a model built with "
                f"estimator='score_function'; this one was built with estimator={self.estimator!r}"
            )
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        _check_batch(batch, self.vocab_size)
        q_z, q_y_net, state = self.encode(batch["src"], batch["src_lengths"])
        q_tags = self.observed(q_y_net if q_y is None else q_y, batch)
        kl_z = kl_divergence(
            q_z,
            DiagonalGaussian.standard(q_z.batch_shape, self.latent_size, dtype=q_z.loc.dtype, device=q_z.loc.device),
        )
        kl_y = kl_divergence(q_tags, self.tag_prior(q_tags.batch_shape[:1])).sum(-1)
        z = q_z.rsample((num_samples,), generator=generator)
        baseline = None
        if estimator == "score_function":
            baseline = self.baseline(state.detach()).squeeze(-1)
        estimate = expect_over_tags(
            lambda y: self.reconstruction(batch, z, y),
            q_tags,
            estimator=estimator,
            num_samples=num_samples,
            tau=self.tau if tau is None else tau,
            baseline=baseline,
            generator=generator,
        )
        kl = kl_z + kl_y
        reconstruction = estimate.value if estimator == "score_function" else estimate.surrogate
        return ELBO(
            value=reconstruction - kl,
            reconstruction=reconstruction,
            kl=kl,
            surrogate=estimate.objective - kl_weight * kl,
        )

    def iwae(self, batch: Batch, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``log 1/S sum_s p(x | z_s, y_s) p(z_s) p(y_s) / (q(z_s) q(y_s))`` per row ``[B]`` (``S = num_samples``).

        ``z_s`` is reparameterised; ``y_s`` is an exact draw without a score-function term, so as a
        training objective its gradient in ``q(y | x)`` is only the pathwise part of ``-log q(y_s)``:
        use it to evaluate, and ``elbo`` to train the tag posterior."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        _check_batch(batch, self.vocab_size)
        q_z, q_y, _ = self.encode(batch["src"], batch["src_lengths"])
        q_tags = self.observed(q_y, batch)
        prior_z = DiagonalGaussian.standard(
            q_z.batch_shape, self.latent_size, dtype=q_z.loc.dtype, device=q_z.loc.device
        )
        z = q_z.rsample((num_samples,), generator=generator)  # [S, B, D]
        y = q_tags.sample((num_samples,), generator=generator)  # [S, B, M]
        one_hot = F.one_hot(y, self.tag_mask.shape[1]).to(z.dtype)
        log_p_y = self.tag_prior(q_tags.batch_shape[:1]).log_prob(y).sum(-1)
        log_w = (
            self.reconstruction(batch, z, one_hot)
            + prior_z.log_prob(z)
            - q_z.log_prob(z)
            + log_p_y
            - q_tags.log_prob(y).sum(-1)
        )
        return torch.logsumexp(log_w, 0) - math.log(num_samples)

    def loss(self, batch: Batch, objective: str = "elbo", **kwargs) -> Loss:
        """:meth:`LatentModel.loss`, plus under ``elbo`` the classifier term
        ``-classifier_weight * log q(y | x)`` of labelled rows on their decoded form ``x``
        (metric ``tag_nll``, 0 on unlabelled rows)."""
        out = super().loss(batch, objective, **kwargs)
        tags, labelled = _tags(batch, len(self.tag_sizes))
        if objective != "elbo" or tags is None or self.classifier_weight == 0:
            return out
        _, q_y, _ = self.encode(batch["targets"], batch["lengths"] - 1)  # the form without <eos>
        tag_nll = torch.where(labelled, -q_y.log_prob(tags).sum(-1), 0.0)
        tokens = out.metrics["tokens"].sum().clamp_min(1).to(tag_nll.dtype)
        out.value = out.value + self.classifier_weight * tag_nll.sum() / tokens
        out.metrics["tag_nll"] = tag_nll.detach()
        return out

    def generate(
        self,
        batch: Batch,
        *,
        method: str = "beam",
        beam_size: int = 5,
        max_length: int | None = None,
        length_penalty: float = 0.0,
    ) -> decoding.Hypotheses:
        """Reinflection: the forms ``src`` inflected into ``tags`` (``z`` = the mean of ``q(z | src)``),
        greedy or by beam search; ``max_length`` (characters) defaults to ``2 * longest source + 10``."""
        if self.bos_id is None or self.eos_id is None:
            raise ValueError("generate needs bos_id and eos_id (give them to the constructor)")
        if "tags" not in batch:
            raise ValueError("generate needs the target tags: batch['tags'] [B, M]")
        _check_batch(batch, self.vocab_size, decoded=False)
        if max_length is None:
            max_length = 2 * int(batch["src_lengths"].max()) + 10
        common = dict(bos_id=self.bos_id, eos_id=self.eos_id, max_length=max_length)
        if method == "greedy":
            return decoding.greedy(self, batch, **common)
        if method == "beam":
            return decoding.beam_search(self, batch, beam_size=beam_size, length_penalty=length_penalty, **common)
        raise ValueError(f"method must be 'greedy' or 'beam', got {method!r}")

    # ---- step-wise decoding (decoding.StepDecoder) -----------------------------------------------
    def decoder_start(self, batch: Batch) -> tuple[TagState, int]:
        q_z, _, _ = self.encode(batch["src"], batch["src_lengths"])
        tags = batch["tags"]
        if tags.shape != (q_z.loc.shape[0], len(self.tag_sizes)):
            raise ValueError(
                f"tags must be [B, M] = [{q_z.loc.shape[0]}, {len(self.tag_sizes)}], got {tuple(tags.shape)}"
            )
        cond = self.condition(q_z.loc, F.one_hot(tags, self.tag_mask.shape[1]).to(q_z.loc.dtype))
        h, c = self.initial_state(cond)
        return TagState(h, c, cond), cond.shape[0]

    def decoder_step(self, state: TagState, tokens: Tensor) -> tuple[Tensor, TagState]:
        """Log-probabilities ``[N, V]`` of the next character after ``tokens [N]``."""
        x = torch.cat([self.dropout(self.embedding(tokens)), state.cond], -1)[:, None, :]
        out, (h, c) = self.decoder(x, (state.h, state.c))
        log_probs = F.log_softmax(self.output(self.dropout(out[:, 0])), -1)
        return log_probs, replace(state, h=h, c=c)

    def reorder_state(self, state: TagState, index: Tensor) -> TagState:
        return state.index_select(index)


def _tags(batch: Batch, num_features: int) -> tuple[Tensor | None, Tensor]:
    """``(tags [B, M] or None, labelled [B] bool)`` of a batch (see the module docstring)."""
    tags = batch.get("tags")
    size = batch["lengths"].shape[0]
    if tags is None:
        return None, torch.zeros(size, dtype=torch.bool, device=batch["lengths"].device)
    labelled = batch.get("labelled")
    if labelled is None:
        labelled = torch.ones(size, dtype=torch.bool, device=tags.device)
    if labelled.shape != (size,) or labelled.dtype != torch.bool:
        raise ValueError(f"labelled must be a bool tensor [B] = [{size}], got {labelled.dtype} {tuple(labelled.shape)}")
    return tags, labelled


def _check_batch(batch: Batch, vocab_size: int, *, decoded: bool = True) -> None:
    """``ValueError`` naming the key for a missing key, a wrong shape or dtype, a length out of
    range or a character id outside ``0..vocab_size - 1`` at a real position (values only when
    validating): ``src``, ``src_lengths`` and, when ``decoded``, ``inputs``, ``targets``,
    ``lengths`` (see the module docstring)."""
    keys = ("src", "src_lengths") + (("inputs", "targets", "lengths") if decoded else ())
    missing = [key for key in keys if key not in batch]
    if missing:
        raise ValueError(f"the batch lacks {missing}: a MultiSpaceVAE batch has keys {list(keys)}, got {sorted(batch)}")
    for key in keys:
        value = batch[key]
        if not isinstance(value, Tensor) or value.dtype.is_floating_point or value.dtype.is_complex:
            raise ValueError(f"batch[{key!r}] must be an integer tensor, got {getattr(value, 'dtype', type(value))}")
    src, src_lengths = batch["src"], batch["src_lengths"]
    if src.dim() != 2 or src_lengths.shape != src.shape[:1]:
        raise ValueError(
            f"src must be [B, S] with src_lengths [B], got {tuple(src.shape)} and {tuple(src_lengths.shape)}"
        )
    if is_validating() and (bool((src_lengths < 1).any()) or bool((src_lengths > src.shape[1]).any())):
        raise ValueError(f"src_lengths must lie in 1..{src.shape[1]}, got {src_lengths.tolist()}")
    pairs = [("src", src, src_lengths)]
    if decoded:
        inputs, targets, lengths = batch["inputs"], batch["targets"], batch["lengths"]
        if inputs.dim() != 2 or targets.shape != inputs.shape or lengths.shape != inputs.shape[:1]:
            raise ValueError(
                f"inputs and targets must be [B, T] with lengths [B], got {tuple(inputs.shape)}, "
                f"{tuple(targets.shape)} and {tuple(lengths.shape)}"
            )
        if inputs.shape[0] != src.shape[0]:
            raise ValueError(f"src and inputs must have the same B, got {tuple(src.shape)} and {tuple(inputs.shape)}")
        if is_validating() and (bool((lengths < 1).any()) or bool((lengths > inputs.shape[1]).any())):
            raise ValueError(f"lengths must lie in 1..{inputs.shape[1]}, got {lengths.tolist()}")
        pairs += [("inputs", inputs, lengths), ("targets", targets, lengths)]
    if is_validating():  # real positions only: padding may hold any id
        for key, ids, length in pairs:
            real = ids[lengths_to_mask(length, ids.shape[1])]
            if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
                raise ValueError(
                    f"batch[{key!r}] ids must lie in 0..{vocab_size - 1} at real positions, "
                    f"got {int(real.min())}..{int(real.max())}"
                )
