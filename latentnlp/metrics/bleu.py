"""Corpus BLEU by sacreBLEU, detokenized (``13a``) or of tokenized text (multi-bleu style).

``BLEU = BP * exp(1/4 sum_{n=1..4} log p_n)`` with clipped n-gram precisions ``p_n`` summed over
the corpus and brevity penalty ``BP = min(1, exp(1 - r / c))`` (``r``, ``c``: reference and
hypothesis lengths in tokens).  sacreBLEU is imported inside the functions, so the rest of the
library needs only torch.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["corpus_bleu", "tokenized_bleu"]


def _reference_streams(
    hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> list[list[str]]:
    """sacreBLEU's reference streams (each one sentence per hypothesis) from either layout."""
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a sequence of sentences, not one string")
    if len(references) and isinstance(references[0], str):
        streams = [list(references)]  # one reference per hypothesis
    else:
        streams = [list(stream) for stream in references]
    for stream in streams:
        if len(stream) != len(hypotheses):
            raise ValueError(
                f"each reference stream must have one sentence per hypothesis: "
                f"{len(stream)} references for {len(hypotheses)} hypotheses"
            )
    return streams


def corpus_bleu(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tokenize: str = "13a",
    lowercase: bool = False,
    smooth_method: str = "exp",
    force: bool = False,
):
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


def tokenized_bleu(
    hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], *, lowercase: bool = True
):
    """BLEU of already tokenized text, as ``multi-bleu.perl [-lc]`` computes it.

    Splits on whitespace only (sacreBLEU ``tokenize='none'``), lowercases by default (the
    ``-lc`` flag used for lowercased corpora such as IWSLT'14 de-en) and applies no smoothing,
    so a corpus with no matching 4-gram scores 0 as in multi-bleu.
    """
    return corpus_bleu(hypotheses, references, tokenize="none", lowercase=lowercase, smooth_method="none", force=True)
