"""latentnlp.training.run_log: the one schema of metrics.jsonl, its writer and readers, and the
plots that read it without the trainer."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from contract import NaiveBayesMixture, ToyCorpus, mixture_batches

from latentnlp.training import TrainConfig, Trainer
from latentnlp.training.run_log import FIELDS, METRICS, REQUIRED, RunLog, read_metrics, series, training_speed


def _run(tmp_path, **kw):
    torch.manual_seed(0)
    train = ToyCorpus(mixture_batches(6, seed=1), seed=5)
    valid = ToyCorpus(mixture_batches(2, seed=2), shuffle=False)
    cfg = TrainConfig(lr=0.05, max_epochs=2, log_every=2, progress=False, device="cpu", output_dir=str(tmp_path), **kw)
    return Trainer(NaiveBayesMixture(12, 3), cfg, train, valid, test_data=valid).fit()


def _documented(key):
    base = key.removesuffix("_per_example")
    return key in FIELDS or base in FIELDS or base in ("kl", "reconstruction")


@pytest.mark.parametrize("objective", ["marginal", "elbo"])
def test_the_trainers_events_keep_the_schema(tmp_path, objective):
    _run(tmp_path, objective=objective)
    events = read_metrics(tmp_path)
    assert {e["event"] for e in events} == {"log", "eval"}
    for event in events:
        assert set(REQUIRED[event["event"]]) <= set(event), event
        assert all(_documented(k) for k in event), sorted(k for k in event if not _documented(k))
    valid = [e for e in events if e["split"] == "valid"]
    assert {e["select_on"] for e in valid} == {"nll" if objective == "marginal" else "neg_elbo"}


def test_writer_checks_required_fields_and_truncates(tmp_path):
    log = RunLog(tmp_path / METRICS)
    with pytest.raises(ValueError, match="lacks"):
        log.write({"split": "train", "event": "log", "step": 1})
    with pytest.raises(ValueError, match="event must be"):
        log.write({"split": "train", "event": "other"})
    assert log.size() == 0 and read_metrics(tmp_path) == []
    event = {name: 0 for name in REQUIRED["log"]} | {"split": "train", "event": "log", "tokens_per_s": 10.0}
    log.write(event)
    offset = log.size()
    log.write(event | {"step": 2, "tokens_per_s": 30.0})
    assert series(read_metrics(tmp_path), "train", "log", "step") == [(0, 0), (2, 2)]
    assert training_speed(tmp_path) == 20.0
    log.truncate(offset)
    assert len(read_metrics(tmp_path)) == 1
    assert math.isnan(training_speed(tmp_path / "nowhere"))


def test_training_curves_read_the_run_log(tmp_path):
    pytest.importorskip("matplotlib")
    from latentnlp import plots

    _run(tmp_path / "run")
    out = plots.training_curves({"toy": tmp_path / "run", "empty": tmp_path / "none"}, tmp_path / "c.png")
    assert out.exists() and out.stat().st_size > 0
    assert json.loads((tmp_path / "run" / "finished.json").read_text())["select_on"] == "nll"


def test_reading_the_run_log_does_not_import_the_trainer():
    code = (
        "import sys, latentnlp.plots, latentnlp.training.run_log; "
        "print(sorted(m for m in sys.modules if m.startswith('latentnlp.training')))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    ).stdout
    assert out.strip() == "['latentnlp.training', 'latentnlp.training.run_log']"
