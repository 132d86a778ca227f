"""Evaluation metrics, one concept per module; every public name is importable from here.

* :mod:`~latentnlp.metrics.corpus`: corpus numbers from summed per-example loss metrics
  (:func:`perplexity`, :class:`MetricSums`, :func:`corpus_summary`);
* :mod:`~latentnlp.metrics.bleu`: corpus BLEU by sacreBLEU (:func:`corpus_bleu`,
  :func:`tokenized_bleu`); sacreBLEU is imported only when BLEU is computed;
* :mod:`~latentnlp.metrics.posterior_collapse`: diagnostics of an amortised posterior
  (:func:`gaussian_kl`, :func:`average_kl`, :func:`concatenate_posteriors`,
  :func:`posterior_mutual_information`, :func:`mutual_information`, :func:`active_units`).
"""

from .bleu import corpus_bleu, tokenized_bleu
from .corpus import MetricSums, corpus_summary, perplexity
from .posterior_collapse import (
    active_units,
    average_kl,
    concatenate_posteriors,
    gaussian_kl,
    mutual_information,
    posterior_mutual_information,
)

__all__ = [
    "MetricSums",
    "corpus_summary",
    "perplexity",
    "corpus_bleu",
    "tokenized_bleu",
    "gaussian_kl",
    "average_kl",
    "concatenate_posteriors",
    "posterior_mutual_information",
    "mutual_information",
    "active_units",
]
