"""recipes/inference.py --preset smoke end to end: every table that exists runs on generated data,
the driver writes results.md, metrics.jsonl, config.json and the plots, and a second invocation
reuses the finished training runs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "inference.py"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("inference_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_preset_end_to_end(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    results = recipe.main(["--preset", "smoke", "--out", str(out)])
    names = recipe.available_tables()
    assert {"mixture", "bernoulli_factor", "hmm"} <= set(names)
    assert list(results) == names
    text = (out / "results.md").read_text()
    assert "## Checks" in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "smoke" and config["data"] is None and set(config["tables"]) == set(names)
    for name, result in results.items():
        module = importlib.import_module(f"inference_tables.{name}")
        assert f"## {module.TITLE}" in text
        assert result.checks and result.metrics
        assert all(row["table"] == name for row in result.metrics)
        for figure in result.figures:
            assert (out / figure).stat().st_size > 0, figure
        for check, _, _ in result.checks:
            assert check in text
    assert len(rows) == sum(len(r.metrics) for r in results.values())

    # the bag-of-words tables: every estimator trained and measured against the exact ELBO
    mixture = {r["estimator"]: r for r in results["mixture"].metrics}
    assert mixture["exact"]["relative_variance"] == pytest.approx(0.0, abs=1e-12)
    for row in results["mixture"].metrics + results["bernoulli_factor"].metrics:
        assert row["elbo_per_doc"] <= row["log_px_per_doc"] + 1e-6, row
    # the generated text is far below the uniform perplexity over its 30 words for every HMM
    assert all(row["held_out_ppl"] < 30 for row in results["hmm"].metrics)
    assert all(ok for check, ok, _ in results["hmm"].checks if "trajectory" in check or "log posterior" in check)
    assert sum("feature-rich" in row["method"] for row in results["hmm"].metrics) == 2 * 2  # EM and gradient, 2 K
    assert "The words of the states" in text

    # a finished run is reused, not retrained
    run_dir = out / "bernoulli_factor" / "exact"
    stamp = (run_dir / "finished.json").stat().st_mtime_ns
    capsys.readouterr()
    again = recipe.main(["--preset", "smoke", "--out", str(out), "--table", "bernoulli_factor"])
    assert "reusing" in capsys.readouterr().out
    assert (run_dir / "finished.json").stat().st_mtime_ns == stamp
    first = {r["estimator"]: r["log_px_per_doc"] for r in results["bernoulli_factor"].metrics}
    assert {r["estimator"]: r["log_px_per_doc"] for r in again["bernoulli_factor"].metrics} == first
