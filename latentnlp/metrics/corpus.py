"""Corpus numbers from sums: perplexity, running metric sums, the per-token summary.

Perplexity and per-token numbers come from *sums*: every :class:`~latentnlp.objectives.Loss`
carries per-example ``metrics`` (``nll`` or ``neg_elbo``, ``tokens``, optionally ``kl``,
``reconstruction``...), each ``[B]``; summing each over a corpus (:class:`MetricSums`) and
dividing by the summed ``tokens`` gives the corpus number, never an average of batch averages::

    ppl = exp(sum_i nll_i / sum_i tokens_i)

``tokens`` counts the predicted target tokens: ``<eos>`` is counted, BOS is not (it is never
predicted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["MetricSums", "corpus_summary", "perplexity"]


def perplexity(nll_sum: float | Tensor, tokens: float | Tensor) -> float:
    """``exp(nll_sum / tokens)``: corpus perplexity from the summed NLL (nats) and token count.

    ``tokens`` is the number of predicted target tokens, ``<eos>`` included and BOS not.
    Overflow gives ``inf`` rather than an error.
    """
    nll_sum, tokens = float(nll_sum), float(tokens)
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    try:
        return math.exp(nll_sum / tokens)
    except OverflowError:
        return math.inf


class MetricSums:
    """Running float64 sums of per-example loss metrics over a corpus.

    ``add(metrics)`` takes a ``Loss.metrics`` dict (each value ``[B]``) and adds each summed
    over the batch; ``examples`` counts rows.  Sums stay on the tensors' device until
    :meth:`totals` (one host synchronisation), so adding costs no GPU sync.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._examples = 0

    def add(self, metrics: Mapping[str, Tensor]) -> None:
        if "tokens" not in metrics:
            raise ValueError(f"metrics must contain 'tokens', got keys {sorted(metrics)}")
        for name, value in metrics.items():
            value = torch.as_tensor(value).detach()
            total = value.to(torch.float64).sum()
            if name in self._sums:
                self._sums[name] = self._sums[name].to(total.device) + total
            else:
                self._sums[name] = total
        self._examples += int(torch.as_tensor(metrics["tokens"]).numel())

    @classmethod
    def from_totals(cls, totals: Mapping[str, float]) -> MetricSums:
        """Rebuild running sums from :meth:`totals` (e.g. out of a checkpoint)."""
        sums = cls()
        sums._sums = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in totals.items() if k != "examples"}
        sums._examples = int(totals.get("examples", 0))
        return sums

    def totals(self) -> dict[str, float]:
        """Summed metrics as Python floats, plus ``examples`` (the number of rows added)."""
        names = sorted(self._sums)
        out: dict[str, float] = {}
        if names:
            values = torch.stack([self._sums[n].cpu() for n in names]).tolist()
            out = dict(zip(names, values))
        out["examples"] = float(self._examples)
        return out


def corpus_summary(totals: Mapping[str, float]) -> dict[str, float]:
    """Corpus numbers from summed metrics (as :meth:`MetricSums.totals` gives them).

    Returns ``tokens``, ``examples`` and, for every other summed metric ``m`` (``nll``,
    ``neg_elbo``, ``kl``, ``reconstruction``...), ``m`` per target token (``sum m / sum tokens``)
    and ``m_per_example`` (``sum m / examples``, e.g. NLL and KL per sentence as sentence-VAE
    tables report them).  Then, from whichever of the two is present:

    * ``ppl = exp(sum nll / sum tokens)`` from the exact (or importance-weighted) NLL;
    * ``ppl_bound = exp(sum neg_elbo / sum tokens)`` from ``-ELBO``, the per-example metric of
      ``objective="elbo"``.  Since ``-ELBO >= -log p(x)`` this is an upper bound on the
      perplexity, never the perplexity itself.
    """
    tokens = float(totals.get("tokens", 0.0))
    examples = float(totals.get("examples", 0.0))
    out: dict[str, float] = {"tokens": tokens, "examples": examples}
    for name, value in sorted(totals.items()):
        if name in ("tokens", "examples"):
            continue
        out[name] = value / tokens if tokens > 0 else math.nan
        out[f"{name}_per_example"] = value / examples if examples > 0 else math.nan
    if "nll" in totals and tokens > 0:
        out["ppl"] = perplexity(totals["nll"], tokens)
    if "neg_elbo" in totals and tokens > 0:
        out["ppl_bound"] = perplexity(totals["neg_elbo"], tokens)
    return out
