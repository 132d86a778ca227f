r"""The sentence VAE: a continuous latent per sentence, trained by amortised variational inference.

For a sentence ``x = x_1..x_n`` (``targets``: the words then ``<eos>``; ``inputs``: ``<bos>``
then the words)::

    z ~ p(z) = N(0, I_D)
    q(z | x) = N(mu(x), diag sigma(x)^2),   (mu, log sigma^2) = W_q h_enc(x) + b_q,
               h_enc(x) the last state of an LSTM over the embedded targets
    p(x | z) = prod_t p(x_t | x_<t, z) = prod_t softmax(W_o d_t + b_o)_{x_t}

with the decoder states ``d_t`` computed from ``[embed(inputs_t); z]`` (``z`` concatenated to
every input, as the reference code of Kim et al. 2018 and He et al. 2019 does) by

- ``decoder="lstm"``: an LSTM whose initial state is ``c_0 = W_z z + b_z``, ``h_0 = tanh(c_0)``;
- ``decoder="cnn"``: stacked dilated causal 1-D convolutions (Yang et al. 2017, *Improved
  variational autoencoders for text modeling using dilated convolutions*), residual, with ReLU:
  ``u^(l) = u^(l-1) + ReLU(conv_{k, d_l}(u^(l-1)))`` where position ``t`` of the convolution
  reads positions ``t - j d_l``, ``j = 0..k-1``.  ``d_t`` sees the inputs ``t - R + 1 .. t``
  only, ``R = 1 + (k - 1) sum_l d_l`` (:attr:`DilatedCNNDecoder.receptive_field`): the knob that
  controls how much the decoder can predict without ``z``, and so posterior collapse.

With ``latent="vmf"`` (Xu & Durrett 2018, *Spherical latent spaces for stable variational
autoencoders*) ``z`` lives on the unit sphere ``S^(D-1)``::

    z ~ p(z) = uniform on S^(D-1)
    q(z | x) = vMF(mu(x), kappa),   mu(x) = normalise(W_q h_enc(x) + b_q),  kappa fixed

(:class:`~latentnlp.families.VonMisesFisher`, :class:`~latentnlp.families.HypersphericalUniform`),
whose KL, ``kappa A_D(kappa) + log C_D(kappa) + log |S^(D-1)|``, is the same for every ``x``: the
objective puts no pressure on ``q`` to collapse onto the prior, and ``kappa`` sets the rate.

``log p(x)`` is intractable; the objectives are ``"elbo"`` (:func:`latentnlp.objectives.elbo`,
the KL analytic, reparameterised gradient) and ``"iwae"``
(:func:`latentnlp.objectives.iwae`).  Under ``"iwae"`` the loss reports ``nll`` (the
importance-weighted estimate, the number to report for a VAE) and beside it, from the same
samples, ``neg_elbo``, ``reconstruction`` and ``kl``.  The KL weight (annealing: pass a
:mod:`latentnlp.schedules` object in the trainer's ``objective_kwargs``) and free bits
(:func:`latentnlp.objectives.free_bits`) are arguments of :meth:`SentenceVAE.elbo`; word dropout
(:func:`latentnlp.objectives.word_dropout`) is a constructor option applied in training mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import kl_divergence

from latentnlp import decoding, objectives
from latentnlp.decoding import Hypotheses
from latentnlp.families import DiagonalGaussian, HypersphericalUniform, VonMisesFisher
from latentnlp.layers import SoftmaxOutput
from latentnlp.layers.encoders import encode_packed
from latentnlp.masks import lengths_to_mask
from latentnlp.models.base import ELBO, Batch, LatentModel, Loss
from latentnlp.validation import is_validating

__all__ = ["DilatedCNNDecoder", "SentenceVAE", "slerp"]


class DilatedCNNDecoder(nn.Module):
    """Stacked dilated causal convolutions over ``x [N, T, input_size] -> [N, T, channels]``.

    ``u^(0) = W_in x_t``; layer ``l`` adds ``ReLU(conv(u^(l-1)))``, a convolution of width
    ``kernel_size`` and dilation ``dilations[l]`` padded on the left only, so output ``t`` depends on
    inputs ``t - receptive_field + 1 .. t`` and never on a later one.
    """

    def __init__(
        self, input_size: int, channels: int, kernel_size: int, dilations: Sequence[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        if kernel_size < 1 or not dilations or any(d < 1 for d in dilations):
            raise ValueError(
                f"DilatedCNNDecoder: kernel_size must be >= 1 and dilations a non-empty list of ints >= 1, "
                f"got {kernel_size} and {list(dilations)}"
            )
        self.kernel_size, self.dilations = kernel_size, tuple(int(d) for d in dilations)
        self.input = nn.Linear(input_size, channels)
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, dilation=d) for d in self.dilations)
        self.dropout = nn.Dropout(dropout)

    @property
    def receptive_field(self) -> int:
        """``R = 1 + (kernel_size - 1) * sum(dilations)``: the inputs an output position sees."""
        return 1 + (self.kernel_size - 1) * sum(self.dilations)

    def forward(self, x: Tensor) -> Tensor:
        u = self.input(x).transpose(1, 2)  # [N, C, T]
        for conv, d in zip(self.convs, self.dilations):
            u = u + self.dropout(F.relu(conv(F.pad(u, ((self.kernel_size - 1) * d, 0)))))
        return u.transpose(1, 2)


class SentenceVAE(LatentModel):
    """``SentenceVAE(vocab_size, embedding_size=512, hidden_size=1024, latent_size=32, *,
    latent="gaussian"|"vmf", concentration=80.0, decoder="lstm"|"cnn", decoder_size=None, kernel_size=3,
    dilations=(1, 2, 4), dropout=0.0,
    word_dropout=0.0, unk_id=None, bos_id=None, eos_id=None, iwae_chunk_size=None,
    max_chunk_elements=None)`` (equations: module docstring).

    * ``latent``: ``"gaussian"`` (``q`` a diagonal Gaussian, prior ``N(0, I)``) or ``"vmf"`` (``q`` a
      von Mises-Fisher of fixed ``concentration`` on the sphere ``S^(latent_size - 1)``, prior the
      uniform; ``latent_size >= 2``).  The default ``concentration = 80`` is of the order Xu & Durrett
      fix (a hyperparameter they tune per data set); the KL it fixes grows with it and with the
      dimension: 17.9 nats at ``latent_size = 32``, 2.3 at 4 with ``concentration = 10``.
    * ``hidden_size``: the encoder LSTM; ``decoder_size``: the decoder LSTM's hidden size or the
      CNN's channels (default ``hidden_size``).
    * ``kernel_size``, ``dilations``: the CNN decoder's layers (``receptive_field`` gives ``R``).
    * ``dropout``: on the decoder's embeddings and outputs.
    * ``word_dropout``: the rate of :func:`~latentnlp.objectives.word_dropout` on the decoder's
      inputs in training mode (needs ``unk_id``; ``bos_id``/``eos_id`` are never dropped).
    * ``bos_id``, ``eos_id``: the start and end symbols, needed by :meth:`generate`.
    * ``iwae_chunk_size``: samples per decoder call in :meth:`iwae` (``None``: all at once).
    * ``max_chunk_elements``: bound on the vocabulary scores built at once
      (:class:`~latentnlp.layers.SoftmaxOutput`).

    Batches: ``inputs [B, T]``, ``targets [B, T]`` (long), ``lengths [B]``, as
    :class:`~latentnlp.data.SentenceBatches` builds them; ``num_tokens`` is ``lengths``
    (``<eos>`` counted, ``<bos>`` not).
    """

    objectives = ("elbo", "iwae")

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int = 512,
        hidden_size: int = 1024,
        latent_size: int = 32,
        *,
        latent: Literal["gaussian", "vmf"] = "gaussian",
        concentration: float = 80.0,
        decoder: Literal["lstm", "cnn"] = "lstm",
        decoder_size: int | None = None,
        kernel_size: int = 3,
        dilations: Sequence[int] = (1, 2, 4),
        dropout: float = 0.0,
        word_dropout: float = 0.0,
        unk_id: int | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        iwae_chunk_size: int | None = None,
        max_chunk_elements: int | None = None,
    ) -> None:
        super().__init__()
        for arg, value in (
            ("vocab_size", vocab_size),
            ("embedding_size", embedding_size),
            ("hidden_size", hidden_size),
            ("latent_size", latent_size),
            ("decoder_size", 1 if decoder_size is None else decoder_size),
            ("iwae_chunk_size", 1 if iwae_chunk_size is None else iwae_chunk_size),
        ):
            if value < 1:
                raise ValueError(f"SentenceVAE: {arg} must be >= 1, got {value}")
        if latent not in ("gaussian", "vmf"):
            raise ValueError(f"SentenceVAE: latent must be 'gaussian' or 'vmf', got {latent!r}")
        if latent == "vmf" and latent_size < 2:
            raise ValueError(f"SentenceVAE: latent='vmf' needs latent_size >= 2 (a sphere S^(D-1)), got {latent_size}")
        if not (isinstance(concentration, (int, float)) and math.isfinite(concentration) and concentration > 0):
            raise ValueError(f"SentenceVAE: concentration must be a finite number > 0, got {concentration!r}")
        if decoder not in ("lstm", "cnn"):
            raise ValueError(f"SentenceVAE: decoder must be 'lstm' or 'cnn', got {decoder!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SentenceVAE: dropout must be in [0, 1), got {dropout}")
        if not 0.0 <= word_dropout <= 1.0:
            raise ValueError(f"SentenceVAE: word_dropout must be in [0, 1], got {word_dropout}")
        if word_dropout > 0 and unk_id is None:
            raise ValueError(
                f"SentenceVAE: word_dropout={word_dropout} needs unk_id (the id written for a dropped word)"
            )
        for arg, value in (("unk_id", unk_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            if value is not None and not 0 <= value < vocab_size:
                raise ValueError(f"SentenceVAE: {arg} must be a token id in 0..{vocab_size - 1}, got {value}")
        self.vocab_size, self.latent_size, self.decoder_kind = vocab_size, latent_size, decoder
        self.latent, self.concentration = latent, float(concentration)
        self.word_dropout, self.unk_id, self.bos_id, self.eos_id = word_dropout, unk_id, bos_id, eos_id
        self.iwae_chunk_size = iwae_chunk_size
        size = hidden_size if decoder_size is None else decoder_size
        # inference network q(z | x)
        self.encoder_embedding = nn.Embedding(vocab_size, embedding_size)
        self.encoder = nn.LSTM(embedding_size, hidden_size, batch_first=True)
        self.posterior_params = nn.Linear(hidden_size, (2 if latent == "gaussian" else 1) * latent_size)
        # generative network p(x | z)
        self.decoder_embedding = nn.Embedding(vocab_size, embedding_size)
        if decoder == "lstm":
            self.decoder: nn.Module = nn.LSTM(embedding_size + latent_size, size, batch_first=True)
            self.initial_cell = nn.Linear(latent_size, size)
        else:
            self.decoder = DilatedCNNDecoder(embedding_size + latent_size, size, kernel_size, dilations, dropout)
        self.dropout = nn.Dropout(dropout)
        self.output_layer = SoftmaxOutput(size, vocab_size, max_chunk_elements=max_chunk_elements)
        for embedding in (self.encoder_embedding, self.decoder_embedding):
            nn.init.uniform_(embedding.weight, -0.1, 0.1)

    # ---- batches ------------------------------------------------------------------------------
    def _check_batch(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(inputs, targets, lengths, mask)`` with padding positions set to id 0."""
        names = ("inputs", "targets", "lengths")
        missing = [n for n in names if not isinstance(batch.get(n), Tensor)]
        if missing:
            raise ValueError(f"SentenceVAE: batch needs tensors {names}, missing {missing}")
        inputs, targets, lengths = batch["inputs"], batch["targets"], batch["lengths"]
        assert isinstance(inputs, Tensor) and isinstance(targets, Tensor) and isinstance(lengths, Tensor)
        if inputs.dim() != 2 or inputs.dtype != torch.long or 0 in inputs.shape or targets.shape != inputs.shape:
            raise ValueError(
                f"SentenceVAE: inputs and targets must be non-empty LongTensors [B, T] of one shape, got "
                f"{inputs.dtype} {tuple(inputs.shape)} and {targets.dtype} {tuple(targets.shape)}"
            )
        B, T = inputs.shape
        if lengths.shape != (B,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise ValueError(f"SentenceVAE: lengths must be an integer tensor [B] = [{B}], got {tuple(lengths.shape)}")
        lengths = lengths.to(inputs.device, torch.long)
        mask = lengths_to_mask(lengths, T)
        inputs, targets = inputs.masked_fill(~mask, 0), targets.masked_fill(~mask, 0)
        if is_validating():
            low_len, high_len, low, high = torch.stack(
                [
                    lengths.min(),
                    lengths.max(),
                    torch.minimum(inputs.min(), targets.min()),
                    torch.maximum(inputs.max(), targets.max()),
                ]
            ).tolist()
            if low_len < 1 or high_len > T:
                raise ValueError(f"SentenceVAE: lengths must lie in 1..T = 1..{T}, got {low_len}..{high_len}")
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"SentenceVAE: inputs and targets (token ids) must lie in 0..{self.vocab_size - 1}, "
                    f"got {low}..{high}"
                )
        return inputs, targets, lengths, mask

    # ---- the two networks ---------------------------------------------------------------------
    def _posterior(self, targets: Tensor, lengths: Tensor) -> DiagonalGaussian | VonMisesFisher:
        _, (h, _) = encode_packed(self.encoder, self.encoder_embedding(targets), lengths)
        params = self.posterior_params(h[-1])
        if self.latent == "vmf":
            return VonMisesFisher(F.normalize(params, dim=-1), self.concentration)
        loc, logvar = params.chunk(2, dim=-1)
        return DiagonalGaussian.from_logvar(loc, logvar)

    def _prior(self, like: Tensor) -> DiagonalGaussian | HypersphericalUniform:
        if self.latent == "vmf":
            return HypersphericalUniform(self.latent_size, like.shape[:1], dtype=like.dtype, device=like.device)
        return DiagonalGaussian.standard(like.shape[:1], self.latent_size, dtype=like.dtype, device=like.device)

    def _decoder_states(self, z: Tensor, embedded: Tensor) -> Tensor:
        """Decoder outputs ``[N, T, H]`` from ``z [N, D]`` and embedded inputs ``[N, T, E]``."""
        x = torch.cat([embedded, z.unsqueeze(1).expand(-1, embedded.shape[1], -1)], dim=-1)
        if self.decoder_kind == "lstm":
            cell = self.initial_cell(z).unsqueeze(0)
            out, _ = self.decoder(x, (torch.tanh(cell), cell))
        else:
            out = self.decoder(x)
        return self.dropout(out)

    def _log_likelihood(self, z: Tensor, inputs: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        """``log p(x | z_s)`` ``[S, B]`` for samples ``z [S, B, D]`` (the decoder runs on ``S B`` rows)."""
        S, B, D = z.shape
        T = inputs.shape[1]
        embedded = self.dropout(self.decoder_embedding(inputs))  # [B, T, E]
        embedded = embedded.unsqueeze(0).expand(S, -1, -1, -1).reshape(S * B, T, -1)
        hidden = self._decoder_states(z.reshape(S * B, D), embedded)
        log_p = self.output_layer.log_prob(hidden, targets.unsqueeze(0).expand(S, -1, -1).reshape(S * B, T))
        return (log_p.view(S, B, T) * mask).sum(-1)

    def _decoder_inputs(self, inputs: Tensor) -> Tensor:
        if not (self.training and self.word_dropout > 0):
            return inputs
        assert self.unk_id is not None
        keep = [i for i in (self.bos_id, self.eos_id) if i is not None]
        return objectives.word_dropout(inputs, self.word_dropout, self.unk_id, keep=keep)

    @property
    def receptive_field(self) -> int | None:
        """The CNN decoder's receptive field ``R`` (None for the LSTM decoder, which sees the whole prefix)."""
        return self.decoder.receptive_field if isinstance(self.decoder, DilatedCNNDecoder) else None

    # ---- LatentModel ----------------------------------------------------------------------------
    def inference_parameters(self) -> list[nn.Parameter]:
        """``q(z | x)``'s parameters: the encoder embedding, the encoder LSTM and the posterior layer."""
        return [p for m in (self.encoder_embedding, self.encoder, self.posterior_params) for p in m.parameters()]

    def posterior(self, batch: Batch) -> DiagonalGaussian | VonMisesFisher:
        """The amortised posterior ``q(z | x)``, batch ``[B]``, event ``[latent_size]``: a
        :class:`~latentnlp.families.DiagonalGaussian`, or a :class:`~latentnlp.families.VonMisesFisher`
        under ``latent="vmf"``."""
        _, targets, lengths, _ = self._check_batch(batch)
        return self._posterior(targets, lengths)

    def elbo(
        self,
        batch: Batch,
        *,
        estimator: str | None = None,
        num_samples: int = 1,
        kl_weight: float = 1.0,
        free_bits: float = 0.0,
        free_bits_per: str = "dimension",
        generator: torch.Generator | None = None,
    ) -> ELBO:
        r"""``E_q[log p(x | z)] - KL(q(z | x) || p(z))`` per sentence ``[B]`` (analytic KL).

        ``estimator`` (``None``: ``"reparam"``), ``num_samples``, ``kl_weight`` and ``generator`` go to
        :func:`latentnlp.objectives.elbo`.  ``free_bits = lambda > 0`` replaces the KL of the
        surrogate by :func:`latentnlp.objectives.free_bits` of the per-dimension KLs ``[B, D]``
        (``free_bits_per="dimension"``, Kingma et al. 2016) or of their sum
        (``"sentence"``, Li et al. 2019): the surrogate's ``- kl_weight * KL`` becomes ``- kl_weight * F``; the
        reported bound and ``kl`` stay unclamped.  A vMF latent refuses free bits: its KL is a constant
        of ``concentration`` that no floor can change the gradient of.
        """
        if free_bits and self.latent == "vmf":
            raise ValueError(
                f"SentenceVAE: free_bits={free_bits} with latent='vmf': the vMF KL is fixed by concentration "
                f"({self.concentration}), so a floor on it does nothing; set concentration instead"
            )
        inputs, targets, lengths, mask = self._check_batch(batch)
        q = self._posterior(targets, lengths)
        prior = self._prior(q.loc)
        decoder_inputs = self._decoder_inputs(inputs)
        bound = objectives.elbo(
            lambda z: self._log_likelihood(z, decoder_inputs, targets, mask),
            q,
            prior,
            num_samples=num_samples,
            kl="analytic",
            kl_weight=kl_weight,
            estimator="reparam" if estimator is None else estimator,
            generator=generator,
        )
        if free_bits:
            assert isinstance(q, DiagonalGaussian) and isinstance(prior, DiagonalGaussian)
            per_dimension = kl_divergence(q.base_dist, prior.base_dist)  # [B, D]
            floored = objectives.free_bits(per_dimension, free_bits, per=free_bits_per)
            # swap the weighted KL inside the estimator's surrogate for the floored one, so a score-function
            # estimator keeps its own reconstruction term
            bound.surrogate = bound.surrogate + float(kl_weight) * (bound.kl - floored)
        return bound

    def iwae(
        self, batch: Batch, num_samples: int, *, chunk_size: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``log 1/S sum_s p(x | z_s) p(z_s) / q(z_s | x)`` per sentence ``[B]``, ``z_s ~ q(z | x)``
        (:func:`latentnlp.objectives.iwae`, ``chunk_size`` samples per decoder call, default
        ``iwae_chunk_size``)."""
        return self._importance_weighted(batch, num_samples, chunk_size, generator)[0]

    def _importance_weighted(
        self, batch: Batch, num_samples: int, chunk_size: int | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The IW bound ``[B]`` and, from the same ``S`` samples, the ELBO's reconstruction
        ``1/S sum_s log p(x | z_s)`` and the analytic KL."""
        inputs, targets, lengths, mask = self._check_batch(batch)
        q = self._posterior(targets, lengths)
        prior = self._prior(q.loc)
        decoder_inputs = self._decoder_inputs(inputs)
        summed: list[Tensor] = []

        def log_likelihood(z: Tensor) -> Tensor:
            log_lik = self._log_likelihood(z, decoder_inputs, targets, mask)
            summed.append(log_lik.sum(0))
            return log_lik

        bound = objectives.iwae(
            log_likelihood, q, prior, num_samples, chunk_size=chunk_size or self.iwae_chunk_size, generator=generator
        )
        return bound, torch.stack(summed).sum(0) / num_samples, kl_divergence(q, prior)

    def loss(self, batch: Batch, objective: str = "elbo", **kwargs: Any) -> Loss:
        """:meth:`LatentModel.loss`; under ``"iwae"`` (``kwargs`` go to :meth:`iwae`) the metrics also
        hold ``neg_elbo``, ``reconstruction`` and ``kl`` estimated from the IW samples."""
        if objective != "iwae":
            return super().loss(batch, objective, **kwargs)
        return self._iwae_loss(batch, **kwargs)

    def _iwae_loss(
        self,
        batch: Batch,
        num_samples: int,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Loss:
        bound, reconstruction, kl = self._importance_weighted(batch, num_samples, chunk_size, generator)
        tokens = self.num_tokens(batch).to(torch.float64)
        metrics = {
            "nll": -bound.detach(),
            "neg_elbo": -(reconstruction - kl).detach(),
            "reconstruction": reconstruction.detach(),
            "kl": kl.detach(),
            "tokens": tokens,
        }
        return Loss(value=-bound.sum() / tokens.sum().clamp_min(1).to(bound.dtype), metrics=metrics)

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        batch: Batch | None = None,
        *,
        z: Tensor | None = None,
        num_samples: int = 1,
        method: Literal["greedy", "beam", "sample"] = "greedy",
        max_length: int = 50,
        beam_size: int = 5,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Hypotheses:
        """Decode sentences from latent codes: ``Hypotheses`` with ``tokens [N, L]`` (``<eos>``
        included, then ``<eos>`` padding), ``lengths [N]``, ``scores [N]``.

        The codes: ``z [N, D]`` if given; else the posterior means ``E_q[z | x]`` of ``batch``
        (``N = B``; for a vMF latent the mean direction ``mu``, the mode, on the sphere where the
        decoder was trained, not the mean ``A_D mu`` inside it); else ``num_samples`` draws of the
        prior, ``N(0, I)`` or uniform on the sphere (from ``generator``).
        ``method``: ``"greedy"`` or ``"beam"`` (``beam_size``), by :mod:`latentnlp.decoding`, or
        ``"sample"`` (ancestral, ``p^(1/temperature)`` renormalised, from ``generator``).
        Call ``model.eval()`` first unless dropout is wanted.
        """
        if self.bos_id is None or self.eos_id is None:
            raise ValueError("SentenceVAE.generate needs the model built with bos_id and eos_id")
        if z is None:
            if batch is not None:
                z = self.posterior(batch).loc
            else:
                device = self.posterior_params.weight.device
                dtype = self.posterior_params.weight.dtype
                if self.latent == "vmf":
                    prior = HypersphericalUniform(self.latent_size, dtype=dtype, device=device)
                    z = prior.sample((num_samples,), generator=generator)
                else:
                    z = torch.randn(num_samples, self.latent_size, generator=generator, device=device, dtype=dtype)
        if z.dim() != 2 or z.shape[1] != self.latent_size:
            raise ValueError(f"SentenceVAE.generate: z must be [N, {self.latent_size}], got {tuple(z.shape)}")
        common = {"bos_id": self.bos_id, "eos_id": self.eos_id, "max_length": max_length}
        if method == "greedy":
            return decoding.greedy(self, {"z": z}, **common)
        if method == "beam":
            return decoding.beam_search(self, {"z": z}, beam_size=beam_size, **common)
        if method == "sample":
            return self._sample(z, max_length, temperature, generator)
        raise ValueError(f"SentenceVAE.generate: method must be 'greedy', 'beam' or 'sample', got {method!r}")

    def _sample(self, z: Tensor, max_length: int, temperature: float, generator: torch.Generator | None) -> Hypotheses:
        if max_length < 1 or not temperature > 0:
            raise ValueError(f"max_length must be >= 1 and temperature > 0, got {max_length} and {temperature}")
        assert self.bos_id is not None and self.eos_id is not None
        N = z.shape[0]
        state, _ = self.decoder_start({"z": z})
        tokens = torch.full((N,), self.bos_id, dtype=torch.long, device=z.device)
        out = torch.full((N, max_length), self.eos_id, dtype=torch.long, device=z.device)
        lengths = torch.full((N,), max_length, dtype=torch.long, device=z.device)
        scores = torch.zeros(N, dtype=torch.float64, device=z.device)
        running = torch.ones(N, dtype=torch.bool, device=z.device)
        for t in range(max_length):
            log_probs, state = self.decoder_step(state, tokens)
            word = torch.multinomial(torch.softmax(log_probs / temperature, -1), 1, generator=generator).squeeze(1)
            word = word.masked_fill(~running, self.eos_id)
            scores += torch.where(running, log_probs.gather(1, word[:, None]).squeeze(1).double(), 0.0)
            out[:, t] = word
            ended = running & (word == self.eos_id)
            lengths[ended] = t + 1
            running &= ~ended
            if not bool(running.any()):
                break
            tokens = word
        return Hypotheses(out[:, : t + 1], lengths, scores)

    @torch.no_grad()
    def interpolate(self, batch_a: Batch, batch_b: Batch, steps: int = 5, **kwargs: Any) -> Hypotheses:
        """The homotopy between two sentences (Bowman et al. 2016): decode
        ``z_k = (1 - t_k) mu_a + t_k mu_b`` for ``t_k = k / (steps - 1)``, ``k = 0..steps-1``, with
        ``mu`` the posterior means of the rows of ``batch_a`` and ``batch_b`` (both ``B`` rows).  A vMF
        latent goes along the great circle instead (slerp of the mean directions, angle
        ``omega = arccos(mu_a^T mu_b)``): ``z_k = (sin((1 - t_k) omega) mu_a + sin(t_k omega) mu_b) / sin omega``,
        every ``z_k`` on the sphere (:func:`slerp`).

        Returns ``Hypotheses`` with ``tokens [steps, B, L]``, ``lengths`` and ``scores [steps, B]``;
        ``kwargs`` go to :meth:`generate` (``method``, ``max_length``, ...).
        """
        if steps < 2:
            raise ValueError(f"SentenceVAE.interpolate: steps must be >= 2, got {steps}")
        mu_a, mu_b = self.posterior(batch_a).loc, self.posterior(batch_b).loc
        if mu_a.shape != mu_b.shape:
            raise ValueError(
                f"SentenceVAE.interpolate: batch_a and batch_b must have as many rows, got {mu_a.shape[0]} and "
                f"{mu_b.shape[0]}"
            )
        t = torch.linspace(0.0, 1.0, steps, dtype=mu_a.dtype, device=mu_a.device).view(steps, 1, 1)
        if self.latent == "vmf":
            z = slerp(mu_a, mu_b, t).reshape(-1, self.latent_size)
        else:
            z = ((1 - t) * mu_a + t * mu_b).reshape(-1, self.latent_size)
        out = self.generate(z=z, **kwargs)
        B = mu_a.shape[0]
        return Hypotheses(out.tokens.view(steps, B, -1), out.lengths.view(steps, B), out.scores.view(steps, B))

    # ---- step-wise decoding (decoding.StepDecoder) ------------------------------------------------
    def decoder_start(self, batch: Batch) -> tuple[tuple[Tensor, ...], int]:
        """The decoding state of the codes ``batch["z"] [N, D]``: ``(z, h, c)`` for the LSTM
        decoder, ``(z, inputs so far [N, t])`` for the CNN."""
        z = batch["z"]
        assert isinstance(z, Tensor)
        if self.decoder_kind == "lstm":
            cell = self.initial_cell(z).unsqueeze(0)
            return (z, torch.tanh(cell), cell), z.shape[0]
        return (z, z.new_zeros((z.shape[0], 0), dtype=torch.long)), z.shape[0]

    def decoder_step(self, state: tuple[Tensor, ...], tokens: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Log-probabilities ``[N, V]`` of the next token after ``tokens [N]``, and the new state."""
        z = state[0]
        if self.decoder_kind == "lstm":
            x = torch.cat([self.decoder_embedding(tokens), z], dim=-1).unsqueeze(1)
            out, (h, c) = self.decoder(x, (state[1], state[2]))
            return self.output_layer.log_probs(self.dropout(out[:, 0])), (z, h, c)
        # the last position reads only the last R inputs: keep those, so a step costs O(R), not O(t)
        history = torch.cat([state[1], tokens.unsqueeze(1)], dim=1)[:, -self.decoder.receptive_field :]
        hidden = self._decoder_states(z, self.decoder_embedding(history))
        return self.output_layer.log_probs(hidden[:, -1]), (z, history)

    def reorder_state(self, state: tuple[Tensor, ...], index: Tensor) -> tuple[Tensor, ...]:
        return tuple(s.index_select(1 if s.dim() == 3 else 0, index) for s in state)


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of unit vectors ``a``, ``b`` ``[..., D]`` at ``t`` (broadcast):
    ``(sin((1 - t) omega) a + sin(t omega) b) / sin omega`` with ``omega = arccos(a^T b)``; where
    ``sin omega < 1e-6`` (equal vectors) the renormalised straight line.  Opposite vectors have no
    one great circle between them (the line passes through 0)."""
    cos = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    tiny = sin < 1e-6
    safe = torch.where(tiny, torch.ones_like(sin), sin)
    arc = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / safe
    line = F.normalize((1 - t) * a + t * b, dim=-1)
    return torch.where(tiny, line, arc)
