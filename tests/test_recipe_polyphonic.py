"""recipes/polyphonic.py --preset smoke end to end: an HMM, an exact factorial HMM and a mean-field
one train on generated chorales, the table and plots are written, the mean-field row carries its
bound above the exact NLL of the same model, and a second invocation reuses the finished runs."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "polyphonic.py"


@pytest.fixture(scope="module")
def polyphonic():
    spec = importlib.util.spec_from_file_location("polyphonic_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_piano_rolls_follow_pyros_preprocessing(polyphonic):
    data = {"train": [[[60, 64], []], [[21]]], "valid": [[[60, 108]]], "test": [[[64]]]}
    rolls, keys = polyphonic.piano_rolls(data)
    assert keys.tolist() == [0, 39, 43]  # pitch - 21 of the keys sounding in training, in order
    assert rolls["train"][0].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert rolls["valid"][0].tolist() == [[0, 1, 0]]  # key 108 - 21 never sounds in training: dropped
    batch = polyphonic.PianoRolls(rolls["train"], 2).collate([0, 1])
    assert batch["observations"].shape == (2, 2, 3) and batch["lengths"].tolist() == [2, 1]


@pytest.mark.slow
def test_smoke_preset_end_to_end(polyphonic, tmp_path, capsys):
    out = tmp_path / "run"
    rows = polyphonic.main(["--preset", "smoke", "--out", str(out), "--no-progress"])
    names = [r.name for r in polyphonic.PRESETS["smoke"].runs]
    assert [r["name"] for r in rows] == names
    keys = len(json.loads((out / "config.json").read_text())["keys"])
    for row in rows:
        # trained: below independent fair coins on every kept key
        assert row["test_nll"] < keys * math.log(2), row
        assert row["seconds_per_epoch"] > 0 and row["epochs"] == 3
        for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "finished.json", "row.json"):
            assert (out / row["name"] / name).exists(), (row["name"], name)
    mean_field = rows[-1]
    assert mean_field["objective"] == "elbo" and mean_field["test_bound"] >= mean_field["test_nll"]
    for name in ("results.md", "metrics.jsonl", "config.json", "curves.png", "posterior.png"):
        assert (out / name).exists(), name
    results = (out / "results.md").read_text()
    assert "| mf-3x2 |" in results and "no published number" in results and "## Checks" in results
    assert "bound lies above the exact NLL of the same model | pass" in results

    stamps = {n: (out / n / "finished.json").stat().st_mtime_ns for n in names}
    again = polyphonic.main(["--preset", "smoke", "--out", str(out), "--no-progress", "--model", "hmm-4"])
    assert "reusing" in capsys.readouterr().out
    assert (out / "hmm-4" / "finished.json").stat().st_mtime_ns == stamps["hmm-4"]
    assert [r["name"] for r in again] == names
