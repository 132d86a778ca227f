"""The one-softmax output layer.

``SoftmaxOutput`` maps a hidden state ``h [..., H]`` to log-probabilities over a
vocabulary of ``V`` words::

    g(h) = a(P h + c)             (only with a projection to d = projection_size < H, say;
                                   a = tanh, or the identity for a linear bottleneck)
    g(h) = h                      (without a projection; d = H)
    log p(y | h) = w_y . g(h) + b_y - log sum_v exp(w_v . g(h) + b_v)

The "softmax bottleneck" (Yang et al. 2018) is that the matrix of log-probabilities
``[contexts, V]`` a softmax can express has rank at most ``d + 1``;
:class:`~latentnlp.layers.MixtureOfSoftmaxes` lifts it.  With one expert a
mixture of softmaxes is exactly this layer with a projection.  The layer is an
:class:`~latentnlp.layers.output_head.OutputHead` (it takes no context).
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
from latentnlp.precision import upcast

__all__ = ["ACTIVATIONS", "SoftmaxOutput"]

#: the activations ``a`` of the output layers' projections, by name
ACTIVATIONS = {"tanh": torch.tanh, "identity": lambda x: x}


class SoftmaxOutput(nn.Module):
    """One softmax over the vocabulary, with an optional low-dimensional projection.

    ``SoftmaxOutput(input_size H, vocab_size V, projection_size=None, bias=True,
    dropout=0.0, max_chunk_elements=None, activation="tanh")``.  ``projection_size = d`` inserts
    ``g(h) = a(P h + c)`` of size ``d`` before the output embedding
    ``output_projection.weight [V, d]``; ``dropout`` is applied to ``g``.  ``activation``
    ``a`` is ``"tanh"`` or ``"identity"``.  Trained with Adam at learning rates
    around 1e-3, the tanh saturates within tens of steps (``|P h| >> 1`` for most
    units) and the layer can stall at the unigram distribution; the identity
    gives the same rank bound without that failure.

    * ``log_probs(hidden [..., H]) -> [..., V]`` log-probabilities (they sum to one);
      ``forward(hidden, targets=None, full=False)`` returns both as a ``HeadOutput``.
    * ``log_prob(hidden [..., H], targets [...]) -> [...]`` the log-probability of
      the given targets only; with ``max_chunk_elements`` the normaliser is computed over
      vocabulary chunks of at most that many scores, so memory stays ``O(max_chunk_elements)``.
    * ``output_projection`` is the vocabulary projection ``W [V, d]``, ``b``;
      ``tie_weights(embedding)`` shares ``output_projection.weight`` with an input embedding
      (its dimension must be ``d``).
    """

    def __init__(
        self,
        input_size: int,
        vocab_size: int,
        projection_size: int | None = None,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        max_chunk_elements: int | None = None,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        check_activation("SoftmaxOutput", activation, ACTIVATIONS)
        for arg, value in (("input_size", input_size), ("vocab_size", vocab_size)):
            if value < 1:
                raise ValueError(f"SoftmaxOutput: {arg} must be >= 1, got {value}")
        if projection_size is not None and projection_size < 1:
            raise ValueError(f"SoftmaxOutput: projection_size must be >= 1 or None, got {projection_size}")
        if max_chunk_elements is not None and max_chunk_elements < 1:
            raise ValueError(f"SoftmaxOutput: max_chunk_elements must be >= 1 or None, got {max_chunk_elements}")
        self.input_size = input_size
        self.vocab_size = vocab_size
        self.projection_size = input_size if projection_size is None else projection_size
        self.max_chunk_elements = max_chunk_elements
        self.activation = activation
        self.projection = None if projection_size is None else nn.Linear(input_size, projection_size)
        self.dropout = nn.Dropout(dropout)
        self.output_projection = nn.Linear(self.projection_size, vocab_size, bias=bias)

    def tie_weights(self, embedding: nn.Embedding) -> None:
        """Use ``embedding.weight [V, d]`` as ``output_projection.weight`` (Press & Wolf 2017)."""
        tie_projection(self, self.output_projection, embedding)

    def features(self, hidden: Tensor) -> Tensor:
        """``g(h)`` ``[..., d]``: the softmax input."""
        g = hidden if self.projection is None else ACTIVATIONS[self.activation](self.projection(hidden))
        return self.dropout(g)

    def log_probs(self, hidden: Tensor, **context) -> Tensor:
        """The :class:`OutputHead` method: the whole distribution ``log p(. | h)``.

        Args:
            hidden: ``[..., H]`` float decoder states (finite; checked when validating).
            **context: :data:`~latentnlp.layers.output_head.CONTEXT_KEYWORDS`, ignored (a head without
                context); any other keyword is a ``TypeError``.

        Returns:
            ``[..., V]`` float log-probabilities, ``logsumexp`` over the last dim 0.
        """
        check_context(self, "log_probs", context)
        check_hidden(self, hidden, self.input_size)
        check_finite(self, hidden=hidden)
        return torch.log_softmax(upcast(self.output_projection(self.features(hidden))), dim=-1)

    def forward(
        self, hidden: Tensor, targets: Tensor | None = None, *, full: bool = False, ignore_index: int = IGNORE_INDEX
    ) -> HeadOutput:
        """:meth:`log_prob` of ``targets`` and/or :meth:`log_probs` (``full`` or no targets).

        Args:
            hidden: ``[..., H]`` float decoder states.
            targets: ``[...]`` long ids in ``0..V-1`` or ``ignore_index`` (optional).
            full: also return the whole distribution when ``targets`` are given.
            ignore_index: targets equal to it get log-probability 0 and no gradient.

        Returns:
            :class:`~latentnlp.layers.output_head.HeadOutput` ``(log_prob [...], log_probs [..., V])``.
        """
        log_prob = None if targets is None else self.log_prob(hidden, targets, ignore_index=ignore_index)
        log_probs = self.log_probs(hidden) if full or targets is None else None
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
        """The :class:`OutputHead` method: ``log p(targets | hidden)`` without ``[..., V]`` log-probabilities.

        Args:
            hidden: ``[..., H]`` float decoder states (finite; checked when validating).
            targets: ``[...]`` long ids in ``0..V-1`` or ``ignore_index`` (range checked when validating).
            max_chunk_elements: overrides the layer's bound on the scores of the normaliser built at once.
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
        g = self.features(hidden)
        weight, bias = self.output_projection.weight, self.output_projection.bias
        log_p = target_logits(g, weight, bias, targets) - logsumexp_linear(g, weight, bias, chunk)
        return log_p.masked_fill(ignored, 0.0)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, vocab_size={self.vocab_size}, "
            f"projection_size={self.projection_size}, max_chunk_elements={self.max_chunk_elements}, "
            f"activation={self.activation!r}"
        )
