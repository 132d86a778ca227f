"""``evaluate``: corpus-level numbers of a model on a data set, with or without a trainer.

**Numbers.**  Each ``Loss.metrics`` entry (per example ``[B]``) is summed over the corpus (and
over the ranks) and divided by the summed ``tokens``, the target tokens (``<eos>`` counted,
BOS not): ``nll`` is nats per target token under ``marginal`` or ``iwae`` and
``ppl = exp(sum nll / sum tokens)``; under ``elbo`` the bound is ``neg_elbo`` per token and
``ppl_bound = exp(sum neg_elbo / sum tokens)`` bounds the perplexity from above.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from latentnlp.metrics import MetricSums, corpus_summary
from latentnlp.models.base import LatentModel
from latentnlp.training.distributed import DataSource, Ranks, is_stream, to_device
from latentnlp.training.progress import bar as progress_bar
from latentnlp.training.rng import isolated_rng

__all__ = ["EVAL_SEED_STRIDE", "evaluate"]

#: rank ``r`` evaluates under the RNG seeded with ``seed + EVAL_SEED_STRIDE * (r + 1)``
EVAL_SEED_STRIDE = 7919


@torch.no_grad()
def evaluate(
    model: LatentModel,
    data: DataSource,
    *,
    objective: str = "marginal",
    device: torch.device | str | None = None,
    seed: int = 0,
    ranks: Ranks | None = None,
    progress: bool = False,
    desc: str = "eval",
    **kwargs: Any,
) -> dict[str, float]:
    """Corpus-level numbers of ``model`` on ``data`` under ``objective`` (``kwargs`` go to the loss).

    Returns, from :func:`~latentnlp.metrics.corpus_summary`: ``tokens``, ``examples``, every
    metric ``m`` per token and ``m_per_example``, ``ppl`` when there is an ``nll``; plus
    ``ppl_bound`` when there is a ``neg_elbo``, ``loss`` (the per-token ``nll``, else
    ``neg_elbo``) and ``tokens_per_s``.  The model's state is reset first, it runs in eval
    mode (restored after) under ``torch.no_grad()`` (a model that needs autograd inside its
    loss must enable it itself) and under its own RNG seeded from ``seed``, which leaves the
    caller's RNG untouched: the result depends on the parameters only.  ``device`` (default:
    that of the model's first parameter) receives the batches' tensors.  Under DDP pass the
    trainer's ``ranks`` (default: one process): each rank evaluates its share and every rank gets the same dict
    (collective: every rank must call it).  ``progress`` draws a tqdm bar titled ``desc``.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    ranks = ranks or Ranks()
    stream = ranks.world_size > 1 and is_stream(data)
    was_training = model.training
    model.eval()
    model.reset_state()
    sums = MetricSums()
    start = time.time()
    bar = progress_bar(
        progress, total=ranks.num_batches(data, train=False, stream=stream), desc=desc, leave=False, dynamic_ncols=True
    )
    try:
        with isolated_rng(seed + EVAL_SEED_STRIDE * (ranks.rank + 1), device):
            for _, batch in ranks.batches(data, 0, 0, train=False):
                sums.add(model(to_device(batch, device), objective=objective, **kwargs).metrics)
                bar.update()
    finally:
        bar.close()
        model.train(was_training)
    result = corpus_summary(ranks.sum(sums.totals()))
    if "nll" in result:
        result["loss"] = result["nll"]
    elif "neg_elbo" in result:
        result["loss"] = result["neg_elbo"]
    else:
        raise ValueError(
            f"the model's Loss.metrics under {objective!r} must contain 'nll' or 'neg_elbo', got {sorted(result)}"
        )
    result["tokens_per_s"] = result["tokens"] / max(time.time() - start, 1e-9)
    return result
