"""recipes/yahoo.py --preset smoke end to end: every row trains and is evaluated, the table, checks
and plots are written, a VAE that uses its latent beats the LM on the generated topic documents,
the aggressive row logs its inner steps and MI checks, and a second invocation reuses the finished runs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from latentnlp.data.corpora import MissingSplitWarning

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "yahoo.py"


@pytest.fixture(scope="module")
def yahoo():
    spec = importlib.util.spec_from_file_location("yahoo_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_preset_end_to_end(yahoo, tmp_path, capsys):
    out = tmp_path / "run"
    rows = yahoo.main(["--preset", "smoke", "--out", str(out), "--no-progress"])
    names = [r.name for r in yahoo.PRESETS["smoke"].runs]
    assert [r["name"] for r in rows] == names
    by = {r["name"]: r for r in rows}
    uniform = by["lm"]["tokens"] / by["lm"]["docs"] * 3.3  # log(27 types) nats per token, per document
    for row in rows:
        assert row["nll"] < 0.6 * uniform, row  # trained: far below the uniform distribution
        for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "finished.json", "eval.json"):
            assert (out / row["name"] / name).exists(), (row["name"], name)
        if row["kind"] == "vae":
            assert row["nll"] <= row["neg_elbo"] + 1e-6
            assert row["neg_elbo"] == pytest.approx(row["reconstruction"] + row["kl"])
    users = [r for r in rows if r["kind"] == "vae" and r["kl"] > 1]
    assert users and min(r["nll"] for r in users) < by["lm"]["nll"]
    aggressive = by["vae-aggressive"]
    assert aggressive["inner_steps"] > aggressive["aggressive_updates"] > 0
    assert aggressive["inner_steps"] <= 5 * aggressive["aggressive_updates"]  # max_inner_steps of smoke
    log = [json.loads(line) for line in open(out / "vae-aggressive" / "metrics.jsonl")]
    checks = [e for e in log if e["event"] == "posterior"]
    assert checks and all("aggressive" in e and e["mi"] >= -0.1 for e in checks)
    assert sum(e["inner_steps"] for e in log if e["event"] == "log") <= aggressive["inner_steps"]
    plain = [e for e in map(json.loads, open(out / "vae" / "metrics.jsonl")) if e["event"] == "posterior"]
    assert len(plain) == yahoo.PRESETS["smoke"].train["max_epochs"] and all("aggressive" not in e for e in plain)
    for name in (
        "results.md",
        "metrics.jsonl",
        "config.json",
        "curves.png",
        "kl_reconstruction.png",
        "mi_active_units.png",
    ):
        assert (out / name).exists(), name
    results = (out / "results.md").read_text()
    assert "| LSTM-VAE + free bits |" in results and "329.1" in results and "## Checks" in results
    assert "| on the topic documents a VAE that uses z (KL > 1) beats the LM | pass |" in results
    assert "t = 0.50" in results
    assert "| LSTM-VAE + aggressive inference training |" in results and "326.7" in results
    assert "aggressive training beats the annealed LSTM-VAE" in results and "inner encoder updates" in results

    stamp = (out / "cnn-vae" / "finished.json").stat().st_mtime_ns
    again = yahoo.main(["--preset", "smoke", "--out", str(out), "--no-progress", "--model", "cnn-vae"])
    assert "reusing" in capsys.readouterr().out
    assert (out / "cnn-vae" / "finished.json").stat().st_mtime_ns == stamp
    assert [r["name"] for r in again] == names
    assert json.loads((out / "cnn-vae" / "eval.json").read_text())["nll"] == by["cnn-vae"]["nll"]


def test_full_preset_needs_the_training_file(yahoo, tmp_path):
    data = tmp_path / "yahoo"
    data.mkdir()
    for split in ("valid", "test"):
        (data / f"yahoo.{split}.txt").write_text("a b c\nb c a\n")
    (data / "vocab.txt").write_text("a\nb\nc\n_UNK\n<pad>\n<bos>\n<eos>\n")
    with pytest.raises(SystemExit, match="yahoo.train.txt"), pytest.warns(MissingSplitWarning):
        yahoo.main(["--preset", "full", "--data", str(data), "--out", str(tmp_path / "out")])
