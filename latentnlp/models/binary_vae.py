r"""A variational autoencoder for binary vectors: Gaussian latent, factorised Bernoulli decoder.

.. math::

    z \sim \mathcal{N}(0, I_L), \qquad
    x_d \mid z \sim \mathrm{Bernoulli}(\sigma(g_\theta(z)_d)), \quad d = 1..D, \qquad
    q_\phi(z \mid x) = \mathcal{N}(\mu_\phi(x), \mathrm{diag}\, \sigma_\phi(x)^2)

with ``g`` and the encoder one-hidden-layer MLPs (Kingma & Welling 2014).  It is the tutorial's
continuous-latent model, and trains by each of the sampling strategies of
:mod:`latentnlp.objectives`: the reparameterised ELBO, the importance-weighted bound (Burda et al.
2016), and wake-sleep (Hinton et al. 1995) with or without the reweighting of Bornschein & Bengio
(2015).

Batches: ``{"pixels": [B, D]}``, a float tensor of zeros and ones (e.g. binarised 8x8 digits,
``D = 64``).  The loss is per *pixel* (:meth:`BinaryVAE.num_tokens` is ``D`` for every example);
the metrics are per image (``nll``, ``neg_elbo`` in nats per image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentnlp import objectives
from latentnlp.families import DiagonalGaussian
from latentnlp.models.base import ELBO, Batch, LatentModel, Loss
from latentnlp.validation import is_validating

__all__ = ["BinaryVAE"]


class BinaryVAE(LatentModel):
    """Gaussian-latent VAE with a Bernoulli decoder over ``num_pixels`` binary values.

    Args:
        num_pixels: ``D``, the length of each binary vector.
        latent_size: ``L``, the dimension of ``z``.
        hidden_size: the width of the encoder's and the decoder's hidden layer (tanh).

    Objectives: ``"elbo"`` (reparameterised; ``kl`` analytic), ``"iwae"`` (``num_samples``,
    reparameterised) and ``"wake-sleep"`` (keywords of :meth:`wake_sleep`).
    """

    objectives = ("elbo", "iwae", "wake-sleep")

    def __init__(self, num_pixels: int = 64, latent_size: int = 8, hidden_size: int = 128) -> None:
        super().__init__()
        for name, value in (("num_pixels", num_pixels), ("latent_size", latent_size), ("hidden_size", hidden_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.num_pixels, self.latent_size = num_pixels, latent_size
        self.encoder = nn.Sequential(
            nn.Linear(num_pixels, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 2 * latent_size)
        )
        self.decoder = nn.Sequential(nn.Linear(latent_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, num_pixels))

    # ---- pieces -----------------------------------------------------------------------------
    def _pixels(self, batch: Batch) -> Tensor:
        x = batch.get("pixels")
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.num_pixels:
            raise ValueError(
                f"batch['pixels'] must be a tensor [B, {self.num_pixels}], got {tuple(getattr(x, 'shape', ()))}"
            )
        x = x.to(self.decoder[0].weight.dtype)
        if is_validating() and not bool(((x == 0) | (x == 1)).all()):
            raise ValueError("batch['pixels'] must hold only zeros and ones")
        return x

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """``q(z | x)`` for binary vectors ``x [*batch, D]``: batch shape ``[*batch]``, event ``[L]``."""
        return DiagonalGaussian.from_params(self.encoder(x), min_scale=1e-4)

    def prior(self, batch_shape: torch.Size | tuple = ()) -> DiagonalGaussian:
        """``p(z) = N(0, I_L)`` with the given batch shape."""
        weight = self.decoder[0].weight
        return DiagonalGaussian.standard(batch_shape, self.latent_size, dtype=weight.dtype, device=weight.device)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(x | z) = sum_d x_d log sigma(g_d) + (1 - x_d) log sigma(-g_d)``.

        ``x [B, D]``, ``z [S, B, L] -> [S, B]`` (any ``z`` whose decoder output broadcasts with ``x``).
        """
        logits, x = torch.broadcast_tensors(self.decoder(z), x)
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)

    def num_tokens(self, batch: Batch) -> Tensor:
        """``D`` for every example: the loss is per pixel."""
        x = self._pixels(batch)
        return torch.full((x.shape[0],), self.num_pixels, dtype=torch.long, device=x.device)

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
        """:func:`latentnlp.objectives.elbo` with the analytic Gaussian KL; ``estimator`` ``"reparam"``
        (default) or ``"score_function"``; ``z`` drawn with ``generator``."""
        x = self._pixels(batch)
        q = self.encode(x)
        return objectives.elbo(
            lambda z: self.log_likelihood(x, z),
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
        """:func:`latentnlp.objectives.iwae`: ``log 1/S sum_s p(x, z_s) / q(z_s | x)``, ``[B]``
        (``chunk_size`` samples decoded at a time, drawn with ``generator``)."""
        x = self._pixels(batch)
        return objectives.iwae(
            lambda z: self.log_likelihood(x, z),
            self.encode(x),
            self.prior(),
            num_samples,
            chunk_size=chunk_size,
            generator=generator,
        )

    def dream(self, num_samples: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``num_samples`` draws ``(x~, z~)`` of ``p(x, z)`` (from ``generator``, else the global seed):
        ``[num_samples, D]`` binary vectors and ``[num_samples, L]`` latents."""
        z = self.prior().sample((num_samples,), generator=generator)
        x = torch.bernoulli(torch.sigmoid(self.decoder(z)), generator=generator)
        return x, z

    def wake_sleep(
        self,
        batch: Batch,
        *,
        num_samples: int = 1,
        reweighted: bool = False,
        q_update: str | None = None,
        generator: torch.Generator | None = None,
    ) -> Loss:
        """The wake-sleep loss (:func:`latentnlp.objectives.wake_sleep`), per pixel.

        ``B`` dreams per batch for the sleep phase; wake samples and dreams drawn with
        ``generator``.  Value: ``-surrogate / (B D)`` (:attr:`~latentnlp.objectives.WakeSleep.surrogate`);
        metrics: ``-log 1/S sum_s p(x, z_s) / q(z_s | x)`` on the wake samples -- named ``nll`` for
        ``S >= 2`` (an importance-weighted estimate) and ``neg_elbo`` for ``S = 1`` (a one-sample
        ELBO estimate), as :class:`~latentnlp.objectives.Loss` names them -- ``wake`` and ``tokens``.
        """
        x = self._pixels(batch)
        terms = objectives.wake_sleep(
            lambda z: self.log_likelihood(x, z),
            self.encode(x),
            self.prior(),
            dream_fn=lambda: self.dream(x.shape[0], generator=generator),
            encoder_fn=self.encode,
            num_samples=num_samples,
            reweighted=reweighted,
            q_update=q_update,
            generator=generator,
        )
        tokens = self.num_tokens(batch).to(torch.float64)
        value = -terms.surrogate / tokens.sum().to(terms.wake.dtype)
        bound = "nll" if num_samples >= 2 else "neg_elbo"
        return Loss(value=value, metrics={bound: -terms.bound, "wake": terms.wake.detach(), "tokens": tokens})

    def posterior(self, batch: Batch) -> DiagonalGaussian:
        """The amortised ``q(z | x)`` (the exact posterior is intractable)."""
        return self.encode(self._pixels(batch))

    def generate(
        self,
        batch: Batch | None = None,
        *,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``num_samples`` (default: the batch size) binary vectors drawn from ``p(x)`` (with
        ``generator``), ``[num_samples, D]``."""
        if num_samples is None:
            if batch is None:
                raise ValueError("generate needs a batch or num_samples")
            num_samples = self._pixels(batch).shape[0]
        with torch.no_grad():
            return self.dream(num_samples, generator=generator)[0]
