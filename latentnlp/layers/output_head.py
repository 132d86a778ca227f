"""The output-head seam: what turns a decoder's states into log-probabilities over a vocabulary.

An output head maps decoder states ``hidden [B, T, H]`` (any leading dims for heads that need no
context) and keyword context to normalised log-probabilities, with any latent variable of the
head (expert, alignment, copy switch) summed out exactly::

    log_prob(hidden, targets, **context)  -> [B, T]      log p(y_t = targets_t | hidden_t, context)
    log_probs(hidden, **context)          -> [B, T, V]   log p(. | hidden_t, context), logsumexp_V = 0

so that ``log_prob(h, y, **c) == log_probs(h, **c).gather(-1, y[..., None])[..., 0]``.  A head takes
the context it needs by keyword and ignores the rest of :data:`CONTEXT_KEYWORDS` (``**context``),
so a model that passes one context to its head can swap heads without other changes; any other
keyword (a misspelling such as ``memory_mak=``) is a ``TypeError`` naming it and the keywords the
head accepts (:func:`check_context`), never silently ignored.  The context of the heads of this
library:

- ``memory [B, S, H_s]`` source states and ``memory_mask [B, S]`` bool, **True at real
  positions** (False at padding): the attention heads
  (:class:`~latentnlp.layers.LatentAttention`, soft or exact);
- ``log_alpha [B, T, S]`` alignment log-probabilities already computed by the decoder
  (``-inf`` at padded sources; optional for the attention heads, required by the copy head);
- ``src_ext [B, S]`` the source as extended-vocabulary ids and ``extended_size`` (the copy head,
  :class:`~latentnlp.layers.CopyGenerator`, whose ``V`` is the extended vocabulary);
- ``attentional [B, T, D]`` the attentional vectors ``o_t`` a decoder fed (the seq2seq copy head)
  and ``switch_input [B, T, D_x]`` the copy switch's features (:class:`~latentnlp.layers.CopyGenerator`);
- ``key_padding_mask [B, S]`` bool, True at padding: ``memory_mask`` in ``nn.MultiheadAttention``'s
  polarity (the attention heads; not with ``memory_mask``);
- ``max_chunk_elements``: a per-call bound on the vocabulary scores built at once (the softmax heads).

Heads without context: :class:`~latentnlp.layers.SoftmaxOutput`,
:class:`~latentnlp.layers.MixtureOfSoftmaxes`.

Every ``log_prob`` takes ``ignore_index`` (default ``-100``, as ``torch.nn.functional.cross_entropy``):
a target equal to it gets log-probability 0 and no gradient.

``forward`` of every layer returns a ``NamedTuple`` whose first two fields are ``log_prob``
(``[B, T]`` of the targets, ``None`` without targets) and ``log_probs`` (``[B, T, V]``, given when
``full=True`` or without targets, else ``None``): :class:`HeadOutput` for the heads without
latent pieces, :class:`~latentnlp.layers.LatentAttentionOutput` and
:class:`~latentnlp.layers.CopyOutput` (which add the alignment, the attentional vector, the
copy switch).  ``log_prob``/``log_probs`` return the tensors themselves.

The vocabulary projection of every layer is its ``output_projection`` (an ``nn.Linear`` with
weight ``[V, d]``); ``tie_weights(embedding)`` shares its weight with an input embedding
(Press & Wolf 2017).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import NamedTuple, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["CONTEXT_KEYWORDS", "HeadOutput", "OutputHead", "check_context", "tie_projection"]

#: every context keyword of the heads of this library; a head ignores those it does not use
CONTEXT_KEYWORDS = frozenset(
    {
        "attentional",
        "extended_size",
        "key_padding_mask",
        "log_alpha",
        "max_chunk_elements",
        "memory",
        "memory_mask",
        "src_ext",
        "switch_input",
    }
)


def check_context(head: object, method: str, context: Mapping[str, object]) -> None:
    """``TypeError`` unless every keyword in ``context`` is one of :data:`CONTEXT_KEYWORDS`.

    ``context`` is what ``head.<method>(..., **context)`` collected beyond its named arguments;
    the message names the unknown keywords and every keyword ``method`` accepts (its own and the
    context it ignores).
    """
    unknown = sorted(set(context) - CONTEXT_KEYWORDS)
    if not unknown:
        return
    parameters = inspect.signature(getattr(type(head), method)).parameters.values()
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
    raise TypeError(
        f"{type(head).__name__}.{method}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
        f"it accepts {', '.join(sorted(named | CONTEXT_KEYWORDS))}"
    )


class HeadOutput(NamedTuple):
    """What ``forward`` of a head without latent pieces returns (``None`` where not asked).

    log_prob   ``[...]``     log p(targets | hidden), 0 where ``targets == ignore_index``
    log_probs  ``[..., V]``  log p(. | hidden) (``full=True`` or no targets)
    """

    log_prob: Tensor | None
    log_probs: Tensor | None


def tie_projection(layer: nn.Module, projection: nn.Linear, embedding: nn.Embedding) -> None:
    """Share ``embedding.weight [V, d]`` as ``projection.weight``; ``ValueError`` unless the shapes agree."""
    if tuple(embedding.weight.shape) != tuple(projection.weight.shape):
        raise ValueError(
            f"{type(layer).__name__}.tie_weights: embedding.weight must be {tuple(projection.weight.shape)} "
            f"= [vocab_size, projection_size] of output_projection, got {tuple(embedding.weight.shape)}"
        )
    projection.weight = embedding.weight


@runtime_checkable
class OutputHead(Protocol):
    """Normalised log-probabilities of the next token, latent variables summed out (see the module)."""

    def log_prob(self, hidden: Tensor, targets: Tensor, **context) -> Tensor:
        """``log p(targets | hidden, context)``: ``hidden [B, T, H]``, ``targets [B, T]`` -> ``[B, T]``."""
        ...

    def log_probs(self, hidden: Tensor, **context) -> Tensor:
        """``log p(. | hidden, context)``: ``hidden [B, T, H]`` -> ``[B, T, V]`` (each row sums to one)."""
        ...
