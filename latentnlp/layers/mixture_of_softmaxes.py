"""Mixture of softmaxes (Yang, Dai, Salakhutdinov & Cohen 2018, "Breaking the softmax bottleneck").

For a hidden state ``h [H]`` and ``K`` experts, with the expert index ``k`` a
latent variable summed out exactly::

    pi(h)     = softmax(Q h)                 [K]      mixture weights (no bias, as in the paper)
    g_k(h)    = a(P_k h + c_k)               [K, d]   d = softmax_input_size, a = tanh (or identity)
    p(y | h)  = sum_k pi_k(h) softmax(W g_k(h) + b)_y

computed in log space as ``logsumexp_k(log pi_k + log_softmax_k(y))``.  The
output embedding ``W [V, d]`` and bias ``b`` are shared by the experts, so the
layer can tie ``W`` to an input embedding of size ``d``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from latentnlp.layers.checks import (
    IGNORE_INDEX,
    check_activation,
    check_finite,
    check_hidden,
    check_target_range,
    ignored_targets,
)
from latentnlp.layers.chunked_softmax import logsumexp_linear, target_logits
from latentnlp.layers.softmax_output import ACTIVATIONS
from latentnlp.precision import upcast


class MixtureOfSoftmaxes(nn.Module):
    """``MixtureOfSoftmaxes(input_size H, vocab_size V, num_experts K, softmax_input_size=None,
    bias=True, dropout=0.0, chunk_size=None, activation="tanh")``.

    ``softmax_input_size`` (``d``) defaults to ``input_size``; ``dropout`` is
    applied to the expert contexts ``g_k`` (the paper's "latent" dropout);
    ``activation`` ``a`` is the paper's ``"tanh"`` or ``"identity"`` (see
    :class:`~latentnlp.layers.SoftmaxOutput` on tanh saturation under Adam).

    * ``log_probs(hidden [..., H]) -> [..., V]`` (also ``forward``) log-probabilities with the expert
      summed out.  It builds ``[..., K, V]`` scores; with ``chunk_size`` set it
      mixes the experts one at a time and never holds more than ``[..., V]``.
    * ``log_prob(hidden [..., H], targets [...]) -> [...]`` ``log p(targets | h)``
      only.  With ``chunk_size`` each expert's normaliser is computed over
      vocabulary chunks of that size (recomputed in backward), so memory is
      ``O(... x K x chunk_size)`` in both passes; without, ``O(... x K x V)``.
    * ``expert_log_weights(hidden) -> [..., K]`` ``log pi(h)``;
      ``expert_log_probs(hidden) -> [..., K, V]`` ``log softmax_k``.
    * ``tie_weights(embedding)`` shares ``decoder.weight [V, d]`` with an input embedding.

    Parameters: ``prior`` (Q, ``H -> K``), ``projection`` (P, ``H -> K*d``),
    ``decoder`` (W, b, ``d -> V``).  With ``K = 1`` the layer equals
    :class:`~latentnlp.layers.SoftmaxOutput` with ``projection_size = d`` and the
    same ``projection``/``decoder`` parameters and activation.
    """

    def __init__(
        self,
        input_size: int,
        vocab_size: int,
        num_experts: int,
        softmax_input_size: int | None = None,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        chunk_size: int | None = None,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        check_activation("MixtureOfSoftmaxes", activation, ACTIVATIONS)
        d = input_size if softmax_input_size is None else softmax_input_size
        for arg, value in (
            ("input_size", input_size),
            ("vocab_size", vocab_size),
            ("num_experts", num_experts),
            ("softmax_input_size", d),
        ):
            if value < 1:
                raise ValueError(f"MixtureOfSoftmaxes: {arg} must be >= 1, got {value}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"MixtureOfSoftmaxes: chunk_size must be >= 1 or None, got {chunk_size}")
        self.input_size = input_size
        self.vocab_size = vocab_size
        self.num_experts = num_experts
        self.softmax_input_size = d
        self.chunk_size = chunk_size
        self.activation = activation
        self.prior = nn.Linear(input_size, num_experts, bias=False)
        self.projection = nn.Linear(input_size, num_experts * d)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(d, vocab_size, bias=bias)

    def tie_weights(self, embedding: nn.Embedding) -> None:
        """Use ``embedding.weight`` ``[V, d]`` as the output embedding ``W``."""
        if tuple(embedding.weight.shape) != tuple(self.decoder.weight.shape):
            raise ValueError(
                f"MixtureOfSoftmaxes.tie_weights: embedding.weight must be "
                f"{tuple(self.decoder.weight.shape)} = [vocab_size, softmax_input_size],"
                f" got {tuple(embedding.weight.shape)}"
            )
        self.decoder.weight = embedding.weight

    # ---- pieces ---------------------------------------------------------------------------
    def expert_log_weights(self, hidden: Tensor) -> Tensor:
        """``log pi(h)`` ``[..., K]``."""
        check_hidden(self, hidden, self.input_size)
        return torch.log_softmax(upcast(self.prior(hidden)), dim=-1)

    def features(self, hidden: Tensor) -> Tensor:
        """Expert contexts ``g_k(h)`` ``[..., K, d]``."""
        g = ACTIVATIONS[self.activation](self.projection(hidden))
        return self.dropout(g.unflatten(-1, (self.num_experts, self.softmax_input_size)))

    def expert_log_probs(self, hidden: Tensor) -> Tensor:
        """``log softmax(W g_k(h) + b)`` ``[..., K, V]`` for every expert."""
        check_hidden(self, hidden, self.input_size)
        return torch.log_softmax(upcast(self.decoder(self.features(hidden))), dim=-1)

    # ---- outputs --------------------------------------------------------------------------
    def log_probs(self, hidden: Tensor, chunk_size: int | None = None, **context) -> Tensor:
        """The :class:`~latentnlp.layers.output_head.OutputHead` method: ``log p(. | h)``, expert summed out.

        Args:
            hidden: ``[..., H]`` float decoder states (finite; checked when validating).
            chunk_size: overrides the layer's; when set the experts are mixed one at a time
                (never more than ``[..., V]`` scores held).
            **context: unused.

        Returns:
            ``[..., V]`` float log-probabilities, ``logsumexp`` over the last dim 0.
        """
        check_finite(self, hidden=hidden)
        log_pi = self.expert_log_weights(hidden)  # [..., K]
        chunk = self.chunk_size if chunk_size is None else chunk_size
        if chunk is None:
            log_experts = self.expert_log_probs(hidden)  # [..., K, V]
            return torch.logsumexp(log_pi.unsqueeze(-1) + log_experts, dim=-2)
        g = self.features(hidden)
        out = None
        for k in range(self.num_experts):
            term = log_pi[..., k, None] + torch.log_softmax(upcast(self.decoder(g[..., k, :])), -1)
            out = term if out is None else torch.logaddexp(out, term)
        return out

    def forward(self, hidden: Tensor, chunk_size: int | None = None) -> Tensor:
        """:meth:`log_probs`: ``hidden [..., H]`` -> ``[..., V]`` log-probabilities."""
        return self.log_probs(hidden, chunk_size)

    def log_prob(
        self,
        hidden: Tensor,
        targets: Tensor,
        chunk_size: int | None = None,
        *,
        ignore_index: int = IGNORE_INDEX,
        **context,
    ) -> Tensor:
        """``log p(targets | hidden)`` without building ``[..., V]`` log-probabilities.

        ``log p(y | h) = logsumexp_k(log pi_k + s_k(y) - logsumexp_v s_k(v))`` with
        ``s_k(v) = w_v . g_k + b_v``.

        Args:
            hidden: ``[..., H]`` float decoder states (finite; checked when validating).
            targets: ``[...]`` long ids in ``0..V-1`` or ``ignore_index`` (range checked when validating).
            chunk_size: overrides the layer's vocabulary chunk of each expert's normaliser.
            ignore_index: targets equal to it get log-probability 0 and no gradient.
            **context: unused.

        Returns:
            ``[...]`` float log-probabilities of the targets (0 where ignored).
        """
        check_hidden(self, hidden, self.input_size, targets)
        check_finite(self, hidden=hidden)
        check_target_range(self, targets, self.vocab_size, ignore_index)
        ignored, targets = ignored_targets(targets, ignore_index)
        chunk = self.chunk_size if chunk_size is None else chunk_size
        log_pi = self.expert_log_weights(hidden)  # [..., K]
        g = self.features(hidden)  # [..., K, d]
        weight, bias = self.decoder.weight, self.decoder.bias
        log_expert_y = target_logits(g, weight, bias, targets) - logsumexp_linear(g, weight, bias, chunk)
        return torch.logsumexp(log_pi + log_expert_y, dim=-1).masked_fill(ignored, 0.0)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, vocab_size={self.vocab_size}, "
            f"num_experts={self.num_experts}, softmax_input_size={self.softmax_input_size}, "
            f"chunk_size={self.chunk_size}, activation={self.activation!r}"
        )
