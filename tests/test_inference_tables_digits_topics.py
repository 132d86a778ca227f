"""The digits and topics tables of recipes/inference.py, ``smoke`` preset end to end: each trains
its models through the trainer, reports every check, and reuses finished runs when run again."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture
def tables(monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES))
    return lambda name: importlib.import_module(f"inference_tables.{name}")


def _check_result(result, out: Path, table: str) -> None:
    assert result.markdown.count("\n|") >= 3 and result.checks
    for name, passed, detail in result.checks:
        assert isinstance(name, str) and isinstance(passed, bool) and detail
    for figure in result.figures:
        assert (out / figure).stat().st_size > 0
    assert result.metrics and all(row["table"] == table for row in result.metrics)
    json.dumps(result.metrics), json.dumps(result.config, default=str)


@pytest.mark.slow
def test_digits_smoke(tables, tmp_path):
    digits = tables("digits")
    result = digits.run("smoke", tmp_path, None, 0)
    _check_result(result, tmp_path, "digits")
    assert [r["objective"] for r in result.metrics] == list(digits.OBJECTIVES)
    for row in result.metrics:
        # trained: below 64 pixels at probability 1/2 (44.4 nats per image)
        assert row["test_nll_iwae"] < 64 * 0.6931 and row["test_nll_iwae"] <= row["test_neg_elbo"] + 1e-6
        assert (tmp_path / "digits" / row["objective"] / "finished.json").exists()
    again = digits.run("smoke", tmp_path, None, 0)  # finished runs are reused, not retrained
    assert [r["steps"] for r in again.metrics] == [r["steps"] for r in result.metrics]


@pytest.mark.slow
def test_topics_smoke(tables, tmp_path):
    topics = tables("topics")
    result = topics.run("smoke", tmp_path, None, 0)
    _check_result(result, tmp_path, "topics")
    ntm, lda, unigram = result.metrics
    assert [r["model"].split()[0] for r in result.metrics] == ["neural", "online", "unigram"]
    for row in (ntm, lda):
        assert 1 < row["test_ppl_bound"] < 60 and -1 <= row["npmi"] <= 1
    assert lda["test_ppl_bound"] <= lda["test_ppl_sklearn"]  # the topics' KL taken out
    assert 1 < unigram["test_ppl"] < 60
    assert ntm["test_ppl_iwae100"] <= ntm["test_ppl_bound"] * 1.001  # the IWAE bound is the tighter
    assert "1015" in result.markdown and "published" in result.markdown.lower()


def test_npmi_against_hand_counts(tables):
    """NPMI of a two-word topic over four documents, computed by hand."""
    import math

    topics = tables("topics")
    counts = topics.count_matrix([[0, 1], [0], [0, 1, 2], [2]], 3)
    # P(0) = 3/4, P(1) = 1/2, P(0, 1) = 1/2
    expected = math.log(0.5 / (0.75 * 0.5)) / -math.log(0.5)
    assert math.isclose(topics.npmi([[0, 1]], counts), expected)
    assert topics.npmi([[1, 2]], topics.count_matrix([[1], [2]], 3)) == -1.0


def test_topics_kl_is_the_whole_model_term_of_sklearns_bound(tables):
    """scikit-learn's ``score`` is a sum of per-document terms plus one term of the topics, so
    ``score(A) + score(B) - score(A + B) = -sum_k KL(Dir(lambda_k) || Dir(eta))``."""
    from scipy.sparse import vstack
    from sklearn.decomposition import LatentDirichletAllocation

    topics = tables("topics")
    train, heldout, test = topics.generated_corpus(0, vocab=30, topics=3, docs=700)
    lda = LatentDirichletAllocation(n_components=3, learning_method="online", max_iter=3, random_state=0)
    lda.fit(topics.count_matrix(train, 30))
    a, b = topics.count_matrix(heldout, 30), topics.count_matrix(test, 30)
    global_term = lda.score(a) + lda.score(b) - lda.score(vstack([a, b]))
    assert abs(global_term + topics.topics_kl(lda)) < 1e-6 * abs(global_term)
