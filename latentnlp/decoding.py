"""Batched greedy and beam-search decoding for any step-wise decoder.

A decoder takes part by implementing the :class:`StepDecoder` protocol::

    state, batch_size = model.decoder_start(batch)       # encode the sources
    log_probs, state = model.decoder_step(state, tokens)  # tokens [N] -> log_probs [N, V'] (normalised)
    state = model.reorder_state(state, index)             # select / repeat rows: index [N']

Sequences start from ``bos_id`` and end at the first ``eos_id`` (included in the
output and its length) or after ``max_length`` tokens.  Positions after the end
hold ``pad_id`` (default ``eos_id``).

Beam search keeps ``beam_size`` hypotheses per example ranked by their summed
log-probability; a finished hypothesis stays in the beam with its score frozen
(its only continuation is padding at log-probability 0).  The search stops when
every hypothesis of every example has finished, or after ``max_length`` steps; an
example whose best finished hypothesis no running one can overtake stops early with
the same answer, and the decoder is stepped on the running hypotheses only.
The returned hypothesis maximises ``score / lp(length)`` with the GNMT length
penalty ``lp(L) = ((5 + L) / 6) ** length_penalty`` (``0`` = raw log-probability).
With ``beam_size = 1`` beam search is exactly greedy decoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["Hypotheses", "StepDecoder", "greedy", "beam_search", "gnmt_length_penalty"]


class StepDecoder(Protocol):
    def decoder_start(self, batch: Mapping[str, Any]) -> tuple[Any, int]: ...
    def decoder_step(self, state: Any, tokens: Tensor) -> tuple[Tensor, Any]: ...
    def reorder_state(self, state: Any, index: Tensor) -> Any: ...


@dataclass
class Hypotheses:
    """The decoded output: ``tokens [B, L]`` (``<eos>`` included, then padding),
    ``lengths [B]`` (tokens up to and including ``<eos>``) and ``scores [B]``
    (summed log-probabilities of those tokens)."""

    tokens: Tensor
    lengths: Tensor
    scores: Tensor


def gnmt_length_penalty(lengths: Tensor, alpha: float) -> Tensor:
    """GNMT length penalty ``((5 + L) / 6) ** alpha``."""
    return ((5.0 + lengths.to(torch.float64)) / 6.0) ** alpha


def _check(max_length: int, beam_size: int = 1) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")


@torch.no_grad()
def greedy(
    model: StepDecoder,
    batch: Mapping[str, Any],
    *,
    bos_id: int,
    eos_id: int,
    max_length: int,
    pad_id: int | None = None,
) -> Hypotheses:
    """Pick the most probable token at every step, for the whole batch at once.

    Only the sequences still running are stepped: the decoder state keeps their rows alone.
    """
    _check(max_length)
    pad_id = eos_id if pad_id is None else pad_id
    state, size = model.decoder_start(batch)
    device = _device(batch)
    running = torch.arange(size, device=device)  # the examples the state's rows belong to
    tokens = torch.full((size,), bos_id, dtype=torch.long, device=device)
    lengths = torch.full((size,), max_length, dtype=torch.long, device=device)
    scores = torch.zeros(size, dtype=torch.float64, device=device)
    out = []
    for t in range(max_length):
        log_probs, state = model.decoder_step(state, tokens)
        best, word = log_probs.max(-1)
        scores[running] += best.to(torch.float64)
        column = torch.full((size,), pad_id, dtype=torch.long, device=device)
        column[running] = word
        out.append(column)
        ended = word == eos_id
        lengths[running[ended]] = t + 1
        if bool(ended.all()):
            break
        keep = (~ended).nonzero().squeeze(1)
        running, tokens = running[keep], word[keep]
        state = model.reorder_state(state, keep)
    return Hypotheses(torch.stack(out, 1), lengths, scores)


@torch.no_grad()
def beam_search(
    model: StepDecoder,
    batch: Mapping[str, Any],
    *,
    beam_size: int,
    bos_id: int,
    eos_id: int,
    max_length: int,
    length_penalty: float = 0.0,
    pad_id: int | None = None,
) -> Hypotheses:
    """Batched beam search (see the module docstring for the rules).

    An example stops early, with the same answer, once no running hypothesis can overtake
    its best finished one: log-probabilities are at most 0, so a running score ``s`` can only
    fall, and its normalised value stays below ``s / max(lp(L + 1), lp(max_length))``.  Only the
    running hypotheses of unsettled examples are stepped: the decoder state keeps their rows
    alone, in flat ``(example, beam)`` order.
    """
    _check(max_length, beam_size)
    pad_id = eos_id if pad_id is None else pad_id
    k = beam_size
    state, size = model.decoder_start(batch)
    device = _device(batch)
    rows = torch.arange(size, device=device)
    state = model.reorder_state(state, rows.repeat_interleave(k))
    tokens = torch.full((size * k,), bos_id, dtype=torch.long, device=device)
    scores = torch.full((size, k), float("-inf"), dtype=torch.float64, device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand the first only
    finished = torch.zeros(size, k, dtype=torch.bool, device=device)
    settled = torch.zeros(size, dtype=torch.bool, device=device)
    lengths = torch.zeros(size, k, dtype=torch.long, device=device)
    seqs = torch.zeros(size, k, 0, dtype=torch.long, device=device)
    same_beam = torch.arange(k, device=device).expand(size, k)
    stepped = torch.ones(size * k, dtype=torch.bool, device=device)  # the hypotheses the state holds
    for _ in range(max_length):
        step_log_probs, state = model.decoder_step(state, tokens)
        vocab = step_log_probs.shape[-1]
        # a hypothesis not stepped continues with padding at log-probability 0
        log_probs = torch.full((size * k, vocab), float("-inf"), dtype=torch.float64, device=device)
        log_probs[:, eos_id] = 0.0
        log_probs[stepped] = step_log_probs.to(torch.float64)
        candidates, flat = (scores[..., None] + log_probs.view(size, k, vocab)).view(size, -1).topk(k, dim=-1)
        frozen = settled[:, None]  # a settled example keeps its beam as it is
        beam = torch.where(frozen, same_beam, flat // vocab)
        word = flat % vocab
        scores = torch.where(frozen, scores, candidates)
        was_finished = finished.gather(1, beam)
        lengths = lengths.gather(1, beam) + (~was_finished & ~frozen).long()
        finished = torch.where(frozen, finished, was_finished | (word == eos_id))
        word = torch.where(was_finished | frozen, pad_id, word)
        seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, seqs.shape[-1])), word[..., None]], dim=-1)
        settled |= _cannot_improve(scores, lengths, finished, length_penalty, max_length)
        parent = (stepped.long().cumsum(0) - 1)[(beam + rows[:, None] * k).view(-1)]  # its state row
        stepped = (~finished & ~settled[:, None]).view(-1)
        if not bool(stepped.any()):
            break
        state = model.reorder_state(state, parent[stepped])
        tokens = word.view(-1)[stepped]
    normalised = scores / gnmt_length_penalty(lengths, length_penalty)
    best = normalised.argmax(-1, keepdim=True)
    tokens_out = seqs.gather(1, best[..., None].expand(-1, -1, seqs.shape[-1])).squeeze(1)
    return Hypotheses(tokens_out, lengths.gather(1, best).squeeze(1), scores.gather(1, best).squeeze(1))


def _cannot_improve(scores: Tensor, lengths: Tensor, finished: Tensor, alpha: float, max_length: int) -> Tensor:
    """``[B]``: True where the best finished hypothesis beats every continuation of the running ones.

    A running hypothesis with score ``s <= 0`` and length ``L`` ends at some length in
    ``(L, max_length]``; its normalised score is at most ``s / max(lp(L + 1), lp(max_length))``.
    """
    normalised = scores / gnmt_length_penalty(lengths, alpha)
    best_finished = torch.where(finished, normalised, float("-inf")).amax(-1)
    largest_lp = torch.maximum(
        gnmt_length_penalty(lengths + 1, alpha), gnmt_length_penalty(torch.full_like(lengths, max_length), alpha)
    )
    best_running = torch.where(finished, float("-inf"), scores / largest_lp).amax(-1)
    return (best_finished > float("-inf")) & (best_running <= best_finished)


def _device(batch: Mapping[str, Any]) -> torch.device:
    """The device of the batch (of its first tensor)."""
    for value in batch.values():
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")
