"""The Bernoulli-factor document model on Yahoo bags of words: exact ELBO against the score function.

``k`` binary factors, few enough to enumerate the ``2^k`` configurations, so the exact ELBO and
``log p(x)`` are the reference; each score-function variant of
:meth:`latentnlp.models.BernoulliFactorModel.elbo` trains a fresh model from the same
initialisation through the library's trainer, and is measured as in the mixture table
(:mod:`inference_tables.mixture`): held-out exact ELBO and log-likelihood per document, the
encoder gradient's variance and bias at one fixed point, milliseconds per update.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch

from inference_tables import TableResult
from inference_tables.mixture import (
    PRESETS as MIXTURE_PRESETS,
)
from inference_tables.mixture import (
    Row,
    bag_tables_data,
    compare,
    elbo_curves,
    estimator_checks,
    table,
)
from latentnlp.models import BernoulliFactorModel

TITLE = "Bernoulli-factor document model on Yahoo: exact enumeration against the score function"
NAME = "bernoulli_factor"

# the mixture table's data and budgets, with k factors in place of K components
PRESETS = {
    "smoke": replace(MIXTURE_PRESETS["smoke"], latent=4),
    "cpu": replace(MIXTURE_PRESETS["cpu"], latent=8, max_steps=300),
    "full": replace(MIXTURE_PRESETS["full"], latent=12),
}


def rows_for() -> list[Row]:
    sf = {"estimator": "score_function"}
    return [
        Row("exact", {"estimator": "exact"}),
        Row("score function", sf),
        Row("score function + running mean", {**sf, "baseline": "running-mean"}),
        Row("score function + leave-one-out (2 samples)", {**sf, "baseline": "leave-one-out", "num_samples": 2}),
        Row("score function + learned baseline", {**sf, "baseline": "learned"}, True),
        Row(
            "score function + learned baseline + control variate",
            {**sf, "baseline": "learned", "control_variate": True},
            True,
        ),
    ]


def run(preset: str, out: Path, data_dir: Path | None, seed: int) -> TableResult:
    setting = PRESETS[preset]
    data, vocab_size, start, note = bag_tables_data(preset, setting, data_dir, seed)

    def build(learned_baseline: bool) -> BernoulliFactorModel:
        model = BernoulliFactorModel(vocab_size, setting.latent, setting.hidden, learned_baseline=learned_baseline)
        with torch.no_grad():  # the decoder's output bias starts at the unigram
            model.decoder[-1].bias.copy_(start)
        return model

    rows = rows_for()
    results = compare(NAME, build, rows, setting, data, out, seed)
    figure = f"{NAME}_elbo.png"
    elbo_curves({r.label: out / NAME / r.slug for r in rows}, out / figure, f"Bernoulli factors, k = {setting.latent}")
    markdown = "\n\n".join(
        [
            f"Data: {note}.  k = {setting.latent} factors (2^{setting.latent} configurations enumerated for the "
            f"exact rows and columns), decoder, inference network and learned baseline of width {setting.hidden}, "
            "the decoder's output bias starting at the training unigram's log; "
            f"Adam (lr {setting.lr}), batches of {setting.batch_size} documents, {setting.max_steps} updates, one "
            "sample per document unless said, the model selected by the held-out exact ELBO.",
            table(results),
            "No published table measures these estimators on this model.  Columns as in the mixture table: exact "
            f"ELBO and log p(x) (enumerated), the variance and bias² of {setting.draws} gradients w.r.t. the "
            "inference network at the exact-gradient model's parameters, relative to the exact gradient's squared "
            "norm (bias² includes variance / draws), forward-and-backward milliseconds per batch.",
        ]
    )
    config = {"setting": asdict(setting), "rows": [asdict(r) for r in rows], "data": note}
    return TableResult(
        markdown=markdown, checks=estimator_checks(results), figures=[figure], metrics=results, config=config
    )
