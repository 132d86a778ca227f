"""Corpus-level evaluation metrics: perplexity, BLEU, and diagnostics of a Gaussian posterior.

Perplexity and per-token numbers come from *sums*: every :class:`~latentnlp.models.base.Loss`
carries per-example ``metrics`` (``nll``, ``tokens``, optionally ``kl``, ``reconstruction``...);
summing each over a corpus (:class:`MetricSums`) and dividing by the summed ``tokens`` gives the
corpus number, never an average of batch averages::

    ppl = exp(sum_i nll_i / sum_i tokens_i)

``tokens`` counts the predicted target tokens: ``<eos>`` is counted, BOS is not (it is never
predicted).

BLEU wraps sacreBLEU (:func:`corpus_bleu`, :func:`tokenized_bleu`).

For a diagonal-Gaussian amortised posterior ``q(z | x) = N(mu(x), diag exp logvar(x))``
(sentence VAEs) the usual posterior-collapse diagnostics are :func:`average_kl`,
:func:`mutual_information` (He et al., 2019) and :func:`active_units` (Burda et al., 2016).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "MetricSums",
    "corpus_summary",
    "perplexity",
    "corpus_bleu",
    "tokenized_bleu",
    "gaussian_kl",
    "average_kl",
    "mutual_information",
    "active_units",
]


# ---- perplexity and corpus sums ----------------------------------------------------------------

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
        sums._sums = {k: torch.tensor(float(v), dtype=torch.float64)
                      for k, v in totals.items() if k != "examples"}
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

    Returns ``tokens``, ``examples``, ``ppl = exp(nll / tokens)`` and, for every other summed
    metric ``m`` (``nll``, ``kl``, ``reconstruction``...), ``m`` per target token
    (``sum m / sum tokens``) and ``m_per_example`` (``sum m / examples``, e.g. NLL and KL per
    sentence as sentence-VAE tables report them).
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
    return out


# ---- BLEU ----------------------------------------------------------------------------------------

def _reference_streams(hypotheses: Sequence[str],
                       references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a sequence of sentences, not one string")
    if len(references) and isinstance(references[0], str):
        streams = [list(references)]  # one reference per hypothesis
    else:
        streams = [list(stream) for stream in references]
    for stream in streams:
        if len(stream) != len(hypotheses):
            raise ValueError(f"each reference stream must have one sentence per hypothesis: "
                             f"{len(stream)} references for {len(hypotheses)} hypotheses")
    return streams


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]],
                *, tokenize: str = "13a", lowercase: bool = False, smooth_method: str = "exp",
                force: bool = False):
    """Corpus BLEU by sacreBLEU; returns its ``BLEUScore`` (``.score`` in 0..100).

    The default is the standard sacreBLEU setting for *detokenized* text (``tokenize='13a'``,
    case-sensitive, exponential smoothing).  ``references`` is either one reference per
    hypothesis (a list of strings) or sacreBLEU's list of reference *streams*, each with one
    sentence per hypothesis.  ``BLEU = BP * exp(1/4 sum_n log p_n)`` with clipped n-gram
    precisions ``p_n`` summed over the corpus and ``BP = min(1, exp(1 - r / c))``.
    ``force`` silences sacreBLEU's warning about hypotheses that look tokenized.
    """
    from sacrebleu.metrics import BLEU

    streams = _reference_streams(hypotheses, references)
    bleu = BLEU(tokenize=tokenize, lowercase=lowercase, smooth_method=smooth_method, force=force)
    return bleu.corpus_score(list(hypotheses), streams)


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]],
                   *, lowercase: bool = True):
    """BLEU of already tokenized text, as ``multi-bleu.perl [-lc]`` computes it.

    Splits on whitespace only (sacreBLEU ``tokenize='none'``), lowercases by default (the
    ``-lc`` flag used for lowercased corpora such as IWSLT'14 de-en) and applies no smoothing,
    so a corpus with no matching 4-gram scores 0 as in multi-bleu.
    """
    return corpus_bleu(hypotheses, references, tokenize="none", lowercase=lowercase,
                       smooth_method="none", force=True)


# ---- Gaussian posterior diagnostics ------------------------------------------------------------

def _check_gaussian(mu: Tensor, logvar: Tensor) -> None:
    if mu.dim() != 2 or mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must both be [N, D]; got mu {tuple(mu.shape)}, "
                         f"logvar {tuple(logvar.shape)}")


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, diag exp logvar) || N(0, I))`` per row, ``[N]``.

    ``KL = 1/2 sum_d (mu_d^2 + exp(logvar_d) - 1 - logvar_d)``.
    """
    _check_gaussian(mu, logvar)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def average_kl(mu: Tensor, logvar: Tensor) -> float:
    """Average over examples of :func:`gaussian_kl` (nats per example, e.g. per sentence)."""
    return float(gaussian_kl(mu, logvar).mean())


def mutual_information(mu: Tensor, logvar: Tensor, z: Tensor | None = None, *,
                       num_samples: int = 1, generator: torch.Generator | None = None) -> float:
    """Estimate of ``I_q(x; z)`` under the aggregate posterior of a diagonal Gaussian ``q``.

    Hoffman & Johnson's decomposition, estimated as in He et al. (2019), "Lagging inference
    networks and posterior collapse", over the ``N`` examples given (``mu``, ``logvar`` are
    ``[N, D]``)::

        I(x; z) = E_x E_{q(z|x)}[log q(z|x)] - E_{q(z)}[log q(z)],
        q(z) ~= 1/N sum_j q(z | x_j)

    The first term is the (analytic) negative entropy ``-D/2 log(2 pi) - 1/2 sum_d (1 + logvar_d)``
    averaged over examples; the second is estimated with ``z ~ q(z | x_i)`` (``num_samples``
    per example, or the given ``z`` of shape ``[N, D]`` or ``[S, N, D]``).  The estimate
    depends on ``N``: He et al. compute it per evaluation mini-batch and average over batches.
    Never exceeds ``log N`` by more than sampling noise.
    """
    _check_gaussian(mu, logvar)
    mu, logvar = mu.detach().double(), logvar.detach().double()
    n, d = mu.shape
    std = (0.5 * logvar).exp()
    if z is None:
        eps = torch.randn((num_samples, n, d), generator=generator, dtype=mu.dtype,
                          device=mu.device)
        z = mu + std * eps
    else:
        z = z.detach().to(mu)
        if z.dim() == 2:
            z = z.unsqueeze(0)
        if z.dim() != 3 or z.shape[1:] != mu.shape:
            raise ValueError(f"z must be [N, D] or [S, N, D] with [N, D] = {tuple(mu.shape)}, "
                             f"got {tuple(z.shape)}")
    neg_entropy = (-0.5 * d * math.log(2 * math.pi) - 0.5 * (1.0 + logvar).sum(-1)).mean()
    flat = z.reshape(-1, d)                          # [S*N, D]
    inv_var = (-logvar).exp()
    log_norm = -0.5 * (d * math.log(2 * math.pi) + logvar.sum(-1))  # [N]
    chunk = max(1, int(4e6 // max(1, n * d)))
    log_qz = []
    for part in flat.split(chunk):                   # [c, D] against all N components
        dev = part.unsqueeze(1) - mu.unsqueeze(0)    # [c, N, D]
        log_density = -0.5 * (dev.pow(2) * inv_var).sum(-1) + log_norm  # [c, N]
        log_qz.append(torch.logsumexp(log_density, dim=1) - math.log(n))
    return float(neg_entropy - torch.cat(log_qz).mean())


def active_units(mu: Tensor, threshold: float = 0.01) -> int:
    """Number of active latent units (Burda et al., 2016).

    Unit ``d`` is active when ``A_d = Cov_x(E_{q(z|x)}[z_d]) > threshold``: the variance over
    the data set of the posterior mean ``mu[:, d]`` (unbiased, divisor ``N - 1``, as in
    He et al.'s code).  ``mu`` is ``[N, D]`` over the whole evaluation set.
    """
    if mu.dim() != 2 or mu.shape[0] < 2:
        raise ValueError(f"mu must be [N, D] with N >= 2, got {tuple(mu.shape)}")
    variance = mu.detach().double().var(dim=0, unbiased=True)
    return int((variance > threshold).sum())
