r"""A neural topic model: LDA's generative story with an amortised logistic-normal posterior.

The model of Srivastava & Sutton (2017, *Autoencoding variational inference for topic models*,
"NVLDA"; Miao et al. 2017 have the Gaussian-softmax variant) for a document ``x = (x_1..x_N)``
over a vocabulary of ``V`` words, with ``K`` topics ``beta_k = softmax(b_k)`` on the ``V``-simplex:

.. math::

    z \sim p(z) \approx \mathrm{Dirichlet}(\alpha) \text{ in the softmax basis}, \quad
    \theta = \mathrm{softmax}(z), \qquad
    y_n \mid \theta \sim \mathrm{Cat}(\theta), \quad x_n \mid y_n \sim \mathrm{Cat}(\beta_{y_n})

with the per-word topics ``y_n`` summed out exactly,

.. math::

    \log p(x \mid \theta) = \sum_n \log \sum_k \theta_k \beta_{k, x_n},

the prior the Laplace approximation of ``Dirichlet(alpha)``
(:meth:`latentnlp.families.LogisticNormal.from_dirichlet`), and ``q(z | x)`` a
:class:`~latentnlp.families.LogisticNormal` whose parameters an MLP reads from the document's bag
of words (``log(1 + counts)``, so long documents do not saturate it).  Training maximises the
reparameterised ELBO ``E_q[log p(x | softmax(z))] - KL(q || p)`` (the Gaussian KL in closed form,
Srivastava & Sutton's eq. (7)).

Batches are language-model batches read as bags of words: ``targets [B, T]`` word ids and
``lengths [B]`` (positions at or past a length are padding); the loss is per word.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentnlp import objectives
from latentnlp.families import LogisticNormal
from latentnlp.masks import lengths_to_mask
from latentnlp.models.base import ELBO, Batch, LatentModel
from latentnlp.validation import is_validating

__all__ = ["NeuralTopicModel"]


class NeuralTopicModel(LatentModel):
    """LDA with a logistic-normal amortised posterior over topic proportions (NVLDA).

    Args:
        vocab_size: ``V``.
        num_topics: ``K >= 2``.
        hidden_size: the width of the encoder's two softplus layers.
        alpha: the symmetric Dirichlet concentration of the prior on ``theta`` (approximated by a
            logistic normal; Srivastava & Sutton use 1).

    Objectives: ``"elbo"`` (reparameterised, ``num_samples``) and ``"iwae"`` (``num_samples``).
    """

    objectives = ("elbo", "iwae")

    def __init__(self, vocab_size: int, num_topics: int = 20, hidden_size: int = 100, alpha: float = 1.0) -> None:
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        if isinstance(num_topics, bool) or not isinstance(num_topics, int) or num_topics < 2:
            raise ValueError(f"num_topics must be an integer >= 2, got {num_topics!r}")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be an integer >= 1, got {hidden_size!r}")
        if not float(alpha) > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        self.vocab_size, self.num_topics, self.alpha = vocab_size, num_topics, float(alpha)
        self.encoder = nn.Sequential(
            nn.Linear(vocab_size, hidden_size),
            nn.Softplus(),
            nn.Linear(hidden_size, hidden_size),
            nn.Softplus(),
            nn.Linear(hidden_size, 2 * num_topics),
        )
        self.topic_logits = nn.Parameter(0.02 * torch.randn(num_topics, vocab_size))

    # ---- pieces -----------------------------------------------------------------------------
    def _words(self, batch: Batch) -> tuple[Tensor, Tensor]:
        targets, lengths = batch.get("targets"), batch.get("lengths")
        if not isinstance(targets, Tensor) or targets.dim() != 2 or targets.dtype.is_floating_point:
            raise ValueError(f"batch['targets'] must be integer word ids [B, T], got {getattr(targets, 'shape', None)}")
        if not isinstance(lengths, Tensor) or lengths.shape != targets.shape[:1]:
            raise ValueError(
                f"batch['lengths'] must be [B] = {tuple(targets.shape[:1])}, got {tuple(getattr(lengths, 'shape', ()))}"
            )
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise ValueError(f"batch['lengths'] must be an integer tensor, got {lengths.dtype}")
        if is_validating() and lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > targets.shape[1]):
            raise ValueError(f"batch['lengths'] must lie in 1..{targets.shape[1]} (T), got {lengths.tolist()}")
        mask = lengths_to_mask(lengths, targets.shape[1])
        if is_validating():
            seen = targets[mask]
            low, high = (int(seen.min()), int(seen.max())) if seen.numel() else (0, 0)
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"batch['targets'] must be word ids in [0, {self.vocab_size}), got [{low}, {high}]")
        return targets.masked_fill(~mask, 0), mask

    def counts(self, batch: Batch) -> Tensor:
        """The bag of words of each document, ``[B, V]`` (padding not counted)."""
        words, mask = self._words(batch)
        out = torch.zeros(words.shape[0], self.vocab_size, dtype=self.topic_logits.dtype, device=words.device)
        return out.scatter_add_(1, words, mask.to(out.dtype))

    def log_topics(self) -> Tensor:
        """``log beta``, ``[K, V]``: each row a topic's log distribution over words."""
        return F.log_softmax(self.topic_logits, dim=-1)

    def encode(self, counts: Tensor) -> LogisticNormal:
        """``q(z | x)`` from bags of words ``[*batch, V]``: batch shape ``[*batch]``, event ``[K]``."""
        loc, raw = self.encoder(torch.log1p(counts)).chunk(2, dim=-1)
        return LogisticNormal(loc, F.softplus(raw) + 1e-4)

    def prior(self) -> LogisticNormal:
        """The Laplace approximation of ``Dirichlet(alpha 1_K)`` in the softmax basis."""
        alpha = torch.full(
            (self.num_topics,), self.alpha, dtype=self.topic_logits.dtype, device=self.topic_logits.device
        )
        return LogisticNormal.from_dirichlet(alpha)

    def word_log_likelihoods(self, batch: Batch, log_theta: Tensor) -> Tensor:
        r"""``log p(x_n | theta) = log sum_k theta_k beta_{k, x_n}`` for each word, ``[S, B, T]``.

        ``log_theta [S, B, K]``, log topic proportions; the per-word topic is summed out by a
        log-sum-exp over ``K`` (padding positions give 0).
        """
        words, mask = self._words(batch)
        log_beta = self.log_topics().t()[words]  # [B, T, K]
        per_word = torch.logsumexp(log_theta.unsqueeze(-2) + log_beta, dim=-1)  # [S, B, T]
        return per_word.masked_fill(~mask, 0.0)

    def log_likelihood(self, batch: Batch, z: Tensor) -> Tensor:
        """``log p(x | softmax(z))`` of each document, ``z [S, B, K] -> [S, B]``."""
        return self.word_log_likelihoods(batch, F.log_softmax(z, dim=-1)).sum(-1)

    # ---- objectives ---------------------------------------------------------------------------
    def elbo(
        self,
        batch: Batch,
        *,
        estimator: str | None = None,
        num_samples: int = 1,
        kl_weight: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> ELBO:
        """:func:`latentnlp.objectives.elbo`, reparameterised, with the closed-form Gaussian KL; ``z``
        drawn with ``generator``."""
        q = self.encode(self.counts(batch))
        return objectives.elbo(
            lambda z: self.log_likelihood(batch, z),
            q,
            self.prior(),
            num_samples=num_samples,
            kl_weight=kl_weight,
            estimator=estimator or "reparam",
            generator=generator,
        )

    def iwae(
        self,
        batch: Batch,
        num_samples: int,
        *,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """:func:`latentnlp.objectives.iwae` over ``z`` (the softmax basis), ``[B]`` (``chunk_size``
        samples decoded at a time, drawn with ``generator``)."""
        q = self.encode(self.counts(batch))
        return objectives.iwae(
            lambda z: self.log_likelihood(batch, z),
            q,
            self.prior(),
            num_samples,
            chunk_size=chunk_size,
            generator=generator,
        )

    def posterior(self, batch: Batch) -> LogisticNormal:
        """The amortised ``q(z | x)``; ``softmax`` of its draws are topic proportions."""
        return self.encode(self.counts(batch))

    def top_words(self, num: int = 10) -> list[list[int]]:
        """The ids of each topic's ``num`` most probable words, ``K`` lists."""
        return self.topic_logits.detach().topk(num, dim=-1).indices.tolist()
