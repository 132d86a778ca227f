"""recipes/ptb.py --preset smoke end to end: every model trains (HMMs, factorial HMMs exact and by
mean field, LSTMs), the table and plots are written, and a second invocation reuses the finished
runs instead of overwriting them."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ptb.py"


@pytest.fixture(scope="module")
def ptb():
    spec = importlib.util.spec_from_file_location("ptb_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_preset_end_to_end(ptb, tmp_path, capsys):
    out = tmp_path / "run"
    rows = ptb.main(["--preset", "smoke", "--out", str(out), "--no-progress"])
    names = [r.name for r in ptb.PRESETS["smoke"].runs]
    assert [r["name"] for r in rows] == names
    for row in rows:
        # trained: far below the uniform perplexity over the generated 40-word vocabulary (+ <eos>)
        assert row["valid_ppl"] < 30 and row["test_ppl"] < 30, row
        run_dir = out / row["name"]
        for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "finished.json"):
            assert (run_dir / name).exists(), (row["name"], name)
    for name in ("results.md", "metrics.jsonl", "config.json", "curves.png", "hmm_states.png"):
        assert (out / name).exists(), name
    results = (out / "results.md").read_text()
    assert "| hmm-16 |" in results and "54.44" in results and "## Checks" in results
    # the factorial HMMs: beside the HMM of as many states, on sentence batches, no published number
    assert "| fhmm-2x4 | 4^2 = 16 | sentences | exact marginal |" in results
    assert "| Factorial HMM | - | - | none known" in results
    by_name = {r["name"]: r for r in rows}
    assert {"fhmm-2x4", "fhmm-4x2", "fhmm-3x2-mf"} <= set(by_name)
    assert by_name["fhmm-4x2"]["states"] == by_name["hmm-16"]["states"] == 16
    # the sentence batches read every training sentence and its <eos> once an epoch
    sentences = (out / "data" / "ptb.train.txt").read_text().splitlines()
    epoch_tokens = sum(len(line.split()) + 1 for line in sentences)
    assert by_name["fhmm-2x4"]["train_tokens"] == 2 * epoch_tokens
    assert by_name["fhmm-3x2-mf"]["train_tokens"] == epoch_tokens  # one epoch
    # the mean-field row: its bound and the exact perplexity of the same model, the bound above
    mf = by_name["fhmm-3x2-mf"]
    assert mf["objective"] == "elbo" and mf["test_ppl_bound"] >= mf["test_ppl"] > 1
    assert f"| {mf['test_ppl']:.2f} (bound {mf['test_ppl_bound']:.2f}) |" in results
    assert "| mean-field bound of fhmm-3x2-mf above its exact perplexity | pass |" in results
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(names)

    # a finished run is reused, not retrained or overwritten
    stamps = {n: (out / n / "finished.json").stat().st_mtime_ns for n in names}
    again = ptb.main(["--preset", "smoke", "--out", str(out), "--no-progress", "--model", "hmm-4"])
    assert "reusing" in capsys.readouterr().out
    assert (out / "hmm-4" / "finished.json").stat().st_mtime_ns == stamps["hmm-4"]
    assert [r["name"] for r in again] == names  # the report still covers every finished run
    assert again[0]["valid_ppl"] == json.loads((out / "hmm-4" / "finished.json").read_text())["best_valid_ppl"]
