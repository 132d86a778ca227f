"""Mixture of softmaxes (Yang, Dai, Salakhutdinov & Cohen 2018, "Breaking the softmax bottleneck").

For a hidden state ``h [H]`` and ``K`` experts, with the expert index ``k`` a
latent variable summed out exactly::

    pi(h)     = softmax(Q h)                 [K]      mixture weights (no bias, as in the paper)
    g_k(h)    = a(P_k h + c_k)               [K, d]   d = projection_size, a = tanh (or identity)
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
from latentnlp.layers.output_head import HeadOutput, check_context, tie_projection
from latentnlp.layers.softmax_output import ACTIVATIONS
from latentnlp.precision import upcast


class MixtureOfSoftmaxes(nn.Module):
    """``MixtureOfSoftmaxes(input_size H, vocab_size V, num_experts K, projection_size=None,
    bias=True, dropout=0.0, max_chunk_elements=None, activation="tanh")``.

    ``projection_size`` (``d``) defaults to ``input_size``; ``dropout`` is
    applied to the expert contexts ``g_k`` (the paper's "latent" dropout);
    ``activation`` ``a`` is the paper's ``"tanh"`` or ``"identity"`` (see
    :class:`~latentnlp.layers.SoftmaxOutput` on tanh saturation under Adam).

    * ``log_probs(hidden [..., H]) -> [..., V]`` log-probabilities with the expert
      summed out.  It builds ``[..., K, V]`` scores; when they exceed ``max_chunk_elements`` it
      mixes the experts one at a time and never holds more than ``[..., V]``.
    * ``log_prob(hidden [..., H], targets [...]) -> [...]`` ``log p(targets | h)``
      only.  With ``max_chunk_elements`` each expert's normaliser is computed over
      vocabulary chunks of at most that many scores in all (recomputed in backward), so memory
      is ``O(max_chunk_elements)`` in both passes; without, ``O(... x K x V)``.
    * ``expert_log_weights(hidden) -> [..., K]`` ``log pi(h)``;
      ``expert_log_probs(hidden) -> [..., K, V]`` ``log softmax_k``.
    * ``forward(hidden, targets=None, full=False)``: both as a ``HeadOutput``.
    * ``tie_weights(embedding)`` shares ``output_projection.weight [V, d]`` with an input embedding.

    Parameters: ``prior`` (Q, ``H -> K``), ``projection`` (P, ``H -> K*d``),
    ``output_projection`` (W, b, ``d -> V``).  With ``K = 1`` the layer equals
    :class:`~latentnlp.layers.SoftmaxOutput` with ``projection_size = d`` and the
    same ``projection``/``output_projection`` parameters and activation.
    """

    def __init__(
        self,
        input_size: int,
        vocab_size: int,
        num_experts: int,
        projection_size: int | None = None,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        max_chunk_elements: int | None = None,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        check_activation("MixtureOfSoftmaxes", activation, ACTIVATIONS)
        d = input_size if projection_size is None else projection_size
        for arg, value in (
            ("input_size", input_size),
            ("vocab_size", vocab_size),
            ("num_experts", num_experts),
            ("projection_size", d),
        ):
            if value < 1:
                raise ValueError(f"MixtureOfSoftmaxes: {arg} must be >= 1, got {value}")
        if max_chunk_elements is not None and max_chunk_elements < 1:
            raise ValueError(f"MixtureOfSoftmaxes: max_chunk_elements must be >= 1 or None, got {max_chunk_elements}")
        self.input_size = input_size
        self.vocab_size = vocab_size
        self.num_experts = num_experts
        self.projection_size = d
        self.max_chunk_elements = max_chunk_elements
        self.activation = activation
        self.prior = nn.Linear(input_size, num_experts, bias=False)
        self.projection = nn.Linear(input_size, num_experts * d)
        self.dropout = nn.Dropout(dropout)
        self.output_projection = nn.Linear(d, vocab_size, bias=bias)

    def tie_weights(self, embedding: nn.Embedding) -> None:
        """Use ``embedding.weight [V, d]`` as the output embedding ``W`` (``output_projection.weight``)."""
        tie_projection(self, self.output_projection, embedding)

    # ---- pieces ---------------------------------------------------------------------------
    def expert_log_weights(self, hidden: Tensor) -> Tensor:
        """``log pi(h)`` ``[..., K]``."""
        check_hidden(self, hidden, self.input_size)
        return torch.log_softmax(upcast(self.prior(hidden)), dim=-1)

    def features(self, hidden: Tensor) -> Tensor:
        """Expert contexts ``g_k(h)`` ``[..., K, d]``."""
        g = ACTIVATIONS[self.activation](self.projection(hidden))
        return self.dropout(g.unflatten(-1, (self.num_experts, self.projection_size)))

    def expert_log_probs(self, hidden: Tensor) -> Tensor:
        """``log softmax(W g_k(h) + b)`` ``[..., K, V]`` for every expert."""
        check_hidden(self, hidden, self.input_size)
        return torch.log_softmax(upcast(self.output_projection(self.features(hidden))), dim=-1)

    # ---- outputs --------------------------------------------------------------------------
    def log_probs(self, hidden: Tensor, *, max_chunk_elements: int | None = None, **context) -> Tensor:
        """The :class:`~latentnlp.layers.output_head.OutputHead` method: ``log p(. | h)``, expert summed out.

        Args:
            hidden: ``[..., H]`` float decoder states (finite; checked when validating).
            max_chunk_elements: overrides the layer's; when ``[..., K, V]`` scores exceed it the
                experts are mixed one at a time (never more than ``[..., V]`` scores held).
            **context: the other :data:`~latentnlp.layers.output_head.CONTEXT_KEYWORDS`, ignored;
                any other keyword is a ``TypeError``.

        Returns:
            ``[..., V]`` float log-probabilities, ``logsumexp`` over the last dim 0.
        """
        check_context(self, "log_probs", context)
        check_finite(self, hidden=hidden)
        log_pi = self.expert_log_weights(hidden)  # [..., K]
        chunk = self.max_chunk_elements if max_chunk_elements is None else max_chunk_elements
        if chunk is None or log_pi.numel() * self.vocab_size <= chunk:
            log_experts = self.expert_log_probs(hidden)  # [..., K, V]
            return torch.logsumexp(log_pi.unsqueeze(-1) + log_experts, dim=-2)
        g = self.features(hidden)
        out = None
        for k in range(self.num_experts):
            term = log_pi[..., k, None] + torch.log_softmax(upcast(self.output_projection(g[..., k, :])), -1)
            out = term if out is None else torch.logaddexp(out, term)
        return out

    def forward(
        self,
        hidden: Tensor,
        targets: Tensor | None = None,
        *,
        full: bool = False,
        max_chunk_elements: int | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> HeadOutput:
        """:meth:`log_prob` of ``targets`` and/or :meth:`log_probs` (``full`` or no targets).

        Args:
            hidden: ``[..., H]`` float decoder states.
            targets: ``[...]`` long ids in ``0..V-1`` or ``ignore_index`` (optional).
            full: also return the whole distribution when ``targets`` are given.
            max_chunk_elements: overrides the layer's (see :meth:`log_prob`, :meth:`log_probs`).
            ignore_index: targets equal to it get log-probability 0 and no gradient.

        Returns:
            :class:`~latentnlp.layers.output_head.HeadOutput` ``(log_prob [...], log_probs [..., V])``.
        """
        log_prob = None
        if targets is not None:
            log_prob = self.log_prob(hidden, targets, max_chunk_elements=max_chunk_elements, ignore_index=ignore_index)
        log_probs = self.log_probs(hidden, max_chunk_elements=max_chunk_elements) if full or targets is None else None
        return HeadOutput(log_prob, log_probs)

    def log_prob(
        self,
        hidden: Tensor,
        targets: Tensor,
        *,
        max_chunk_elements: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        **context,
    ) -> Tensor:
        """``log p(targets | hidden)`` without building ``[..., V]`` log-probabilities.

        ``log p(y | h) = logsumexp_k(log pi_k + s_k(y) - logsumexp_v s_k(v))`` with
        ``s_k(v) = w_v . g_k + b_v``.

        Args:
            hidden: ``[..., H]`` float decoder states (finite; checked when validating).
            targets: ``[...]`` long ids in ``0..V-1`` or ``ignore_index`` (range checked when validating).
            max_chunk_elements: overrides the layer's bound on the normalisers' scores built at once.
            ignore_index: targets equal to it get log-probability 0 and no gradient.
            **context: the other :data:`~latentnlp.layers.output_head.CONTEXT_KEYWORDS`, ignored;
                any other keyword is a ``TypeError``.

        Returns:
            ``[...]`` float log-probabilities of the targets (0 where ignored).
        """
        check_context(self, "log_prob", context)
        check_hidden(self, hidden, self.input_size, targets)
        check_finite(self, hidden=hidden)
        check_target_range(self, targets, self.vocab_size, ignore_index)
        ignored, targets = ignored_targets(targets, ignore_index)
        chunk = self.max_chunk_elements if max_chunk_elements is None else max_chunk_elements
        log_pi = self.expert_log_weights(hidden)  # [..., K]
        g = self.features(hidden)  # [..., K, d]
        weight, bias = self.output_projection.weight, self.output_projection.bias
        log_expert_y = target_logits(g, weight, bias, targets) - logsumexp_linear(g, weight, bias, chunk)
        return torch.logsumexp(log_pi + log_expert_y, dim=-1).masked_fill(ignored, 0.0)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, vocab_size={self.vocab_size}, "
            f"num_experts={self.num_experts}, projection_size={self.projection_size}, "
            f"max_chunk_elements={self.max_chunk_elements}, activation={self.activation!r}"
        )
