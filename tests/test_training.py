"""The Trainer: evaluation numbers, files, checkpoint/resume, skipping, stopping, schedules, DDP,
progress reporting, rebuilding a model from its run directory."""

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from contract import (
    NaiveBayesMixture,
    StreamingUnigram,
    ToyCorpus,
    check_data_source,
    mixture_batches,
)

from latentnlp.models.base import LatentModel, Loss
from latentnlp.schedules import (
    Constant,
    CosineDecay,
    Cyclical,
    LinearDecay,
    LinearWarmup,
)
from latentnlp.training import (
    CorruptCheckpointError,
    FinishedRunError,
    TrainConfig,
    Trainer,
    evaluate,
    load_model,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """The toy models are tiny: one intra-op thread is fastest (and immune to a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_data(train=12, valid=3, stream=False):
    train_batches = mixture_batches(train, seed=1)
    valid_batches = mixture_batches(valid, seed=2)
    if stream:
        for b in train_batches + valid_batches:
            b["stream"] = True
    return (ToyCorpus(train_batches, seed=5, shuffle=not stream), ToyCorpus(valid_batches, shuffle=False))


def make_model(seed=0, cls=NaiveBayesMixture):
    torch.manual_seed(seed)
    return cls(12) if cls is StreamingUnigram else cls(12, 3)


def config(tmp_path=None, **kw):
    kw.setdefault("lr", 0.05)
    kw.setdefault("max_epochs", 2)
    kw.setdefault("log_every", 2)
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")  # bit-identity on CUDA would need deterministic kernels
    return TrainConfig(output_dir=str(tmp_path) if tmp_path else None, **kw)


def events(path):
    return [json.loads(line) for line in open(Path(path) / "metrics.jsonl")]


def test_toy_corpus_keeps_the_data_protocol():
    check_data_source(make_data()[0])


# ---- evaluation --------------------------------------------------------------------------------


class CountingResets(NaiveBayesMixture):
    resets = 0

    def reset_state(self):
        self.resets += 1


def test_evaluate_is_corpus_level_per_token():
    train, valid = make_data()
    model = make_model(cls=CountingResets)
    trainer = Trainer(model, config(), train, valid)
    before = torch.get_rng_state()
    result = trainer.evaluate(valid)
    assert torch.equal(torch.get_rng_state(), before)  # evaluation leaves training RNG alone
    assert model.resets == 1
    with torch.no_grad():
        nll = -sum(model.log_marginal(b).sum() for b in valid.batches)
    tokens = sum(int(b["lengths"].sum()) for b in valid.batches)  # targets include <eos>
    assert result["tokens"] == tokens
    assert result["examples"] == sum(len(b["lengths"]) for b in valid.batches)
    assert result["nll"] == pytest.approx(float(nll) / tokens, rel=1e-6)
    assert result["loss"] == result["nll"]
    assert result["ppl"] == pytest.approx(math.exp(float(nll) / tokens), rel=1e-6)
    assert result["nll_per_example"] == pytest.approx(float(nll) / result["examples"], rel=1e-6)
    # an ELBO evaluation reports KL and reconstruction sums per token too; its bound is named
    # neg_elbo (not nll), bounds the NLL, and its perplexity is a bound too
    elbo = trainer.evaluate(valid, objective="elbo")
    assert "nll" not in elbo and "ppl" not in elbo
    assert elbo["neg_elbo"] >= result["nll"] - 1e-9
    assert elbo["loss"] == elbo["neg_elbo"]
    assert elbo["ppl_bound"] == pytest.approx(math.exp(elbo["neg_elbo"]))
    assert elbo["kl"] * elbo["tokens"] == pytest.approx(elbo["kl_per_example"] * elbo["examples"])
    assert model.training  # the mode is restored


def test_evaluate_needs_no_trainer():
    train, valid = make_data()
    model = make_model()
    trainer_result = Trainer(model, config(), train, valid).evaluate(valid)
    before = torch.get_rng_state()
    alone = evaluate(model, valid, objective="marginal")
    assert torch.equal(torch.get_rng_state(), before)
    assert {k: v for k, v in alone.items() if k != "tokens_per_s"} == {
        k: v for k, v in trainer_result.items() if k != "tokens_per_s"
    }
    sampled = [evaluate(model, valid, objective="iwae", num_samples=2, seed=s)["nll"] for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] != sampled[2]  # its own seeded RNG: a function of the seed


# ---- a full run --------------------------------------------------------------------------------


def test_fit_learns_and_writes_its_files(tmp_path, capsys):
    train, valid = make_data()
    model = make_model()
    trainer = Trainer(
        model, config(tmp_path, max_epochs=3, progress=True), train, valid, test_data=valid, run_info={"recipe": "toy"}
    )
    initial = trainer.evaluate(valid)["nll"]
    summary = trainer.fit()
    assert "epoch" not in capsys.readouterr().err  # no bars when stderr is not a terminal
    assert summary["steps"] == 3 * len(train) and summary["epochs"] == 3
    assert summary["best_valid_nll"] < initial
    assert summary["best_valid_ppl"] == pytest.approx(math.exp(summary["best_valid_nll"]))
    assert summary["test"]["nll"] == pytest.approx(summary["best_valid_nll"])  # best restored
    assert not summary["stopped_early"] and summary["skipped"] == 0 and not summary["resumed"]
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "finished.json",
    }
    info = json.loads((tmp_path / "config.json").read_text())
    assert info["trainer"]["lr"] == 0.05 and info["run"] == {"recipe": "toy"}
    assert info["model"] == "NaiveBayesMixture"
    assert info["select_on"] == summary["select_on"] == "nll"
    assert info["constructor"] == {"class": "contract.NaiveBayesMixture", "args": [12, 3], "kwargs": {}}
    assert json.loads((tmp_path / "finished.json").read_text())["steps"] == summary["steps"]
    log = events(tmp_path)
    train_events = [e for e in log if e["split"] == "train"]
    assert [e["step"] for e in train_events] == list(range(2, 3 * len(train) + 1, 2))
    for e in log:
        for key in ("step", "epoch", "loss", "ppl", "tokens_per_s", "lr", "skipped", "wall_time"):
            assert key in e, (key, e)
    assert [e["split"] for e in log if e["split"] != "train"] == ["valid"] * 3 + ["test"]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, best["model"][name])
    fresh = make_model(seed=3)
    assert load_model(tmp_path / "best.pt", fresh) is fresh
    assert torch.equal(fresh.emit_logits, model.emit_logits)


def test_objective_kwargs_may_follow_the_step():
    seen = []

    class Recording(NaiveBayesMixture):
        def elbo(self, batch, **kw):
            seen.append((kw["kl_weight"], batch["batch_id"], batch["targets"].device.type))
            return super().elbo(batch, **kw)

    train, valid = make_data()
    cfg = config(
        objective="elbo",
        max_epochs=1,
        eval_objective="marginal",
        objective_kwargs={"kl_weight": LinearWarmup(0.0, 2.0, 20), "estimator": "exact"},
    )
    Trainer(make_model(cls=Recording), cfg, train, valid).fit()
    assert [w for w, _, _ in seen] == pytest.approx([s / 10 for s in range(len(train))])
    assert sorted(i for _, i, _ in seen) == list(range(len(train)))  # non-tensor values kept
    assert {d for _, _, d in seen} == {"cpu"}
    assert cfg.to_dict()["objective_kwargs"]["kl_weight"] == {
        "schedule": "linear_warmup",
        "start": 0.0,
        "end": 2.0,
        "steps": 20,
    }


def test_objective_kwargs_refuse_other_callables():
    with pytest.raises(ValueError, match="schedule object"):
        TrainConfig(objective="elbo", objective_kwargs={"kl_weight": lambda step: min(1, step / 100)})
    with pytest.raises(ValueError, match="schedule object"):
        TrainConfig(eval_kwargs={"kl_weight": math.sqrt})


def test_config_round_trips_through_json():
    cfg = TrainConfig(
        objective="elbo",
        betas=(0.8, 0.9),
        schedule=CosineDecay(total=100, warmup=5, floor=0.1),
        objective_kwargs={
            "kl_weight": Cyclical(period=50, ratio=0.5, cycles=4),
            "estimator": "sample",
            "num_samples": 2,
        },
        eval_kwargs={"kl_weight": Constant(1.0)},
        select_on="neg_elbo",
        max_steps=7,
    )
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(TrainConfig().to_dict()))) == TrainConfig()


def test_resuming_an_unchanged_run_with_a_schedule_records_no_change(tmp_path):
    train, valid = make_data()
    cfg = dict(
        objective="elbo",
        eval_objective="marginal",
        max_steps=5,
        max_epochs=1,
        objective_kwargs={"kl_weight": LinearWarmup(0.1, 1.0, 8), "estimator": "exact"},
    )
    Trainer(make_model(), config(tmp_path, **cfg), train, valid).fit()
    (tmp_path / "finished.json").unlink()
    written = json.loads((tmp_path / "config.json").read_text())
    assert TrainConfig.from_dict(written["trainer"]) == config(tmp_path, **cfg)
    summary = Trainer(make_model(), config(tmp_path, **cfg), train, valid).fit()
    assert summary["resumed"]
    assert "changed_on_resume" not in json.loads((tmp_path / "config.json").read_text())


# ---- checkpoint and resume ---------------------------------------------------------------------


class Crash(RuntimeError):
    pass


class CrashingCorpus:
    """Wraps a data object; raises while fetching batch ``position`` of epoch ``epoch``."""

    def __init__(self, data, epoch, position):
        self.data, self.at = data, (epoch, position)
        self.stream = getattr(data, "stream", None)

    def __len__(self):
        return len(self.data)

    def iterate(self, epoch, start=0):
        for i, batch in enumerate(self.data.iterate(epoch, start), start):
            if (epoch, i) == self.at:
                raise Crash("simulated crash (a killed process)")
            yield batch


def _comparable(log):
    return [{k: v for k, v in e.items() if k not in ("wall_time", "tokens_per_s")} for e in log]


RESUME_SETTINGS = {
    "adam-cosine-marginal": dict(schedule="cosine", warmup_steps=3, checkpoint_every=5, grad_clip=0.5),
    "sgd-plateau-sampled-elbo": dict(
        optimizer="sgd",
        momentum=0.9,
        lr=0.2,
        schedule="plateau",
        objective="elbo",
        eval_every=4,
        checkpoint_every=3,
        objective_kwargs={"estimator": "sample", "num_samples": 2},
    ),
    "adamw-linear-stream": dict(
        optimizer="adamw", weight_decay=0.1, schedule="linear", eval_every=5, checkpoint_every=4, model=StreamingUnigram
    ),
}


@pytest.mark.parametrize("name", list(RESUME_SETTINGS))
def test_resume_after_a_crash_is_bit_identical(tmp_path, name):
    settings = dict(RESUME_SETTINGS[name])
    cls = settings.pop("model", NaiveBayesMixture)
    train, valid = make_data(stream=cls is StreamingUnigram)
    cfg = dict(max_epochs=3, **settings)

    straight = make_model(cls=cls)
    summary = Trainer(straight, config(tmp_path / "a", **cfg), train, valid, valid).fit()

    crashed = make_model(cls=cls)
    with pytest.raises(Crash):  # dies in the middle of epoch 1, past a checkpoint
        Trainer(
            crashed,
            config(tmp_path / "b", **cfg),
            CrashingCorpus(train, epoch=1, position=len(train) // 2 + 1),
            valid,
            valid,
        ).fit()
    assert (tmp_path / "b" / "last.pt").exists() and not (tmp_path / "b" / "finished.json").exists()
    resumed = make_model(seed=1, cls=cls)  # a fresh process: other initial parameters
    again = Trainer(resumed, config(tmp_path / "b", **cfg), train, valid, valid).fit()

    assert again["resumed"] and not summary["resumed"]
    for (name_a, a), (name_b, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert name_a == name_b and torch.equal(a, b), name_a
    last_a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    last_b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for key, value in last_a["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, last_b["model"][key]), key
    for sa, sb in zip(last_a["optimizer"]["state"].values(), last_b["optimizer"]["state"].values()):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    assert last_a["scheduler"] == last_b["scheduler"]
    drop = ("wall_time", "resumed", "output_dir")
    strip = lambda s: json.loads(json.dumps({k: v for k, v in s.items() if k not in drop}))
    for s in (summary, again):
        for part in ("valid", "test"):
            s[part].pop("tokens_per_s")
    assert strip(summary) == strip(again)
    # the log of the resumed run is the log of the straight one: no duplicated events
    assert _comparable(events(tmp_path / "a")) == _comparable(events(tmp_path / "b"))


def test_resume_with_the_library_stream_and_hmm_language_model(tmp_path):
    """Integration: latentnlp.data.BPTTStream + HMMLanguageModel (dropout, carried filter)."""
    from latentnlp.data.batching import BPTTStream
    from latentnlp.models.hmm_lm import HMMLanguageModel

    ids = torch.randint(0, 20, (1200,), generator=torch.Generator().manual_seed(0))
    train, valid = BPTTStream(ids, batch_size=4, bptt=20), BPTTStream(ids[:300], 2, 20)
    cfg = dict(lr=0.01, max_epochs=2, eval_every=4, checkpoint_every=3)

    def model(seed):
        torch.manual_seed(seed)
        return HMMLanguageModel(20, 6, embedding_size=8, state_dropout=0.2, dropout=0.1)

    straight = model(0)
    Trainer(straight, config(tmp_path / "a", **cfg), train, valid).fit()
    with pytest.raises(Crash):
        Trainer(model(0), config(tmp_path / "b", **cfg), CrashingCorpus(train, 1, 10), valid).fit()
    resumed = model(1)
    Trainer(resumed, config(tmp_path / "b", **cfg), train, valid).fit()
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_resume_continues_an_unfinished_run(tmp_path):
    train, valid = make_data()
    Trainer(make_model(), config(tmp_path, max_steps=5, max_epochs=1), train, valid).fit()
    (tmp_path / "finished.json").unlink()  # as if killed after the last checkpoint
    summary = Trainer(make_model(), config(tmp_path, max_steps=5, max_epochs=1), train, valid).fit()
    assert summary["resumed"] and summary["steps"] == 5


def test_extending_a_run_equals_training_it_longer_and_is_recorded(tmp_path):
    """A finished run resumed with a larger max_steps ends where a straight run ends."""
    train, valid = make_data()
    straight = make_model()
    Trainer(
        straight, config(tmp_path / "a", max_steps=8, max_epochs=2, eval_every=4, schedule="plateau"), train, valid
    ).fit()
    Trainer(
        make_model(), config(tmp_path / "b", max_steps=4, max_epochs=2, eval_every=4, schedule="plateau"), train, valid
    ).fit()
    (tmp_path / "b" / "finished.json").unlink()
    extended = make_model(seed=1)
    summary = Trainer(
        extended, config(tmp_path / "b", max_steps=8, max_epochs=2, eval_every=4, schedule="plateau"), train, valid
    ).fit()
    assert summary["resumed"] and summary["steps"] == 8
    for a, b in zip(straight.parameters(), extended.parameters()):
        assert torch.equal(a, b)
    info = json.loads((tmp_path / "b" / "config.json").read_text())
    assert info["trainer"]["max_steps"] == 8
    assert info["changed_on_resume"] == [{"step": 4, "changes": {"max_steps": {"checkpoint": 4, "now": 8}}}]
    assert "changed_on_resume" not in json.loads((tmp_path / "a" / "config.json").read_text())


def test_finished_run_is_refused_unless_overwrite(tmp_path):
    train, valid = make_data()
    first = Trainer(make_model(), config(tmp_path, max_epochs=1), train, valid).fit()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FinishedRunError, match="overwrite"):
        Trainer(make_model(), config(tmp_path, max_epochs=1), train, valid).fit()
    second = Trainer(make_model(), config(tmp_path, max_epochs=1, overwrite=True), train, valid).fit()
    assert not second["resumed"] and second["best_valid_nll"] == first["best_valid_nll"]
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the trainer's files go
    assert len([e for e in events(tmp_path) if e["split"] == "valid"]) == 1


def test_command_line_flags():
    parser = argparse.ArgumentParser()
    TrainConfig.add_arguments(parser)
    args = parser.parse_args(["--overwrite", "--max-steps", "7", "--device", "cpu", "--no-progress"])
    cfg = TrainConfig(lr=0.3).with_arguments(args)
    assert cfg.overwrite and cfg.max_steps == 7 and cfg.device == "cpu" and not cfg.progress
    assert cfg.lr == 0.3 and cfg.seed == 0
    assert TrainConfig().with_arguments(parser.parse_args([])) == TrainConfig()


def test_config_validation():
    for bad in (
        dict(optimizer="adagrad"),
        dict(schedule="exp"),
        dict(objective="mle"),
        dict(max_steps=0),
        dict(schedule="plateau", warmup_steps=2),
        dict(decay_factor=1.5),
        dict(select_on="ppl"),
        dict(schedule=LinearDecay(total=10), warmup_steps=2),
    ):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


# ---- non-finite batches ------------------------------------------------------------------------


class Poisoned(NaiveBayesMixture):
    """NaN loss (``mode="loss"``) or NaN gradients (``mode="grad"``) on chosen batches."""

    poison: frozenset = frozenset()
    mode = "loss"

    def loss(self, batch, objective="marginal", **kw):
        out = super().loss(batch, objective, **kw)
        if self.training and batch["batch_id"] in self.poison:
            if self.mode == "loss":
                out.value = out.value + float("nan")
            else:
                out.value = _NanGradient.apply(out.value)
        return out


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("mode", ["loss", "grad"])
def test_nonfinite_batches_are_skipped(tmp_path, mode):
    batches = mixture_batches(8, seed=1)
    valid = ToyCorpus(mixture_batches(2, seed=2), shuffle=False)
    poisoned = make_model(cls=Poisoned)
    poisoned.poison, poisoned.mode = frozenset({2, 5}), mode
    cfg = dict(max_epochs=2, max_steps=12, schedule="linear", log_every=1)
    summary = Trainer(poisoned, config(tmp_path, **cfg), ToyCorpus(batches, shuffle=False), valid).fit()
    assert summary["skipped"] == 4 and summary["steps"] == 12
    skips = [e for e in events(tmp_path) if e.get("event") == "skip"]
    assert [e["position"] for e in skips] == [3, 6, 3, 6]
    assert skips[0]["reason"] == f"non-finite {'loss' if mode == 'loss' else 'gradient'}"
    # skipping a batch is exactly training without it (the schedule counts updates)
    clean = make_model()
    kept = [b for b in batches if b["batch_id"] not in {2, 5}]
    Trainer(clean, config(None, **cfg), ToyCorpus(kept, shuffle=False), valid).fit()
    for a, b in zip(poisoned.parameters(), clean.parameters()):
        assert torch.equal(a, b)


# ---- model selection, early stopping, schedules ------------------------------------------------


class Scripted(LatentModel):
    """Training loss pulls ``w`` towards 1; validation NLL per token follows ``script``."""

    objectives = ("marginal",)

    def __init__(self, script):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.script, self.evals, self.snapshots = list(script), 0, []

    def reset_state(self):
        if not self.training:
            self.evals += 1
            self.snapshots.append(self.w.item())

    def loss(self, batch, objective="marginal", **kw):
        tokens = batch["lengths"].double()
        if self.training:
            nll = (self.w - 1) ** 2 * tokens
        else:
            nll = self.script[self.evals - 1] * tokens
        value = nll.sum() / tokens.sum()
        return Loss(value, {"nll": nll.detach(), "tokens": tokens})


def test_best_model_and_early_stopping(tmp_path):
    train, valid = make_data(train=4)
    model = Scripted([5.0, 4.0, 4.5, 4.6, 3.0, 2.0])
    summary = Trainer(model, config(tmp_path, optimizer="sgd", lr=0.1, max_epochs=10, patience=2), train, valid).fit()
    assert summary["stopped_early"] and summary["epochs"] == 4 and summary["steps"] == 16
    assert summary["best_epoch"] == 1 and summary["best_step"] == 8
    assert summary["best_valid_nll"] == 4.0
    assert model.w.item() == model.snapshots[1]  # the best parameters are restored
    assert torch.load(tmp_path / "best.pt", weights_only=True)["step"] == 8


def test_plateau_schedule_decays_on_no_improvement():
    train, valid = make_data(train=2)
    trainer = Trainer(
        Scripted([5.0, 4.0, 4.5, 4.6, 3.0]),
        config(optimizer="sgd", lr=1.0, schedule="plateau", max_epochs=5),
        train,
        valid,
    )
    lrs = []
    original = trainer._validate

    def validate():
        original()
        lrs.append(trainer.optimizer.param_groups[0]["lr"])

    trainer._validate = validate
    trainer.fit()
    assert lrs == [1.0, 1.0, 0.5, 0.25, 0.25]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "none"])
def test_warmup_and_decay_schedules(schedule):
    train, valid = make_data(train=4)
    trainer = Trainer(
        make_model(), config(lr=1.0, schedule=schedule, warmup_steps=2, min_lr=0.1, max_epochs=2), train, valid
    )
    lrs = [trainer.optimizer.param_groups[0]["lr"]]
    original = trainer._train_step

    def step(*args):
        out = original(*args)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return out

    trainer._train_step = step
    trainer.fit()
    # lr of updates 0..8 (8 = after the last update): warmup 1/2, 2/2, then decay over 2..8
    progress = [min(1.0, (s - 2) / 6) for s in range(2, 9)]
    if schedule == "linear":
        after_warmup = [0.1 + 0.9 * (1 - p) for p in progress]
    elif schedule == "cosine":
        after_warmup = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in progress]
    else:
        after_warmup = [1.0] * 7
    assert lrs == pytest.approx([0.5, 1.0] + after_warmup)


def test_max_steps_stops_mid_epoch_and_validates(tmp_path):
    train, valid = make_data()
    summary = Trainer(make_model(), config(tmp_path, max_steps=5, max_epochs=5), train, valid).fit()
    assert summary["steps"] == 5 and summary["epochs"] == 0
    evals = [e for e in events(tmp_path) if e["split"] == "valid"]
    assert [e["step"] for e in evals] == [5]


# ---- distributed ---------------------------------------------------------------------------------


def test_two_process_ddp_training(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "ddp_train_script.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for run in ("iid", "stream"):
        a, b = ranks[0][run], ranks[1][run]
        for name, value in a["params"].items():
            assert torch.equal(value, b["params"][name]), (run, name)
        assert a["summary"] == b["summary"]  # metrics are reduced over ranks
    # batches: 9 per epoch, 4 to each rank (the ninth is dropped), disjoint, same order
    for epoch in range(2):
        seen = [ranks[r]["iid"]["seen"][epoch] for r in range(2)]
        assert len(seen[0]) == len(seen[1]) == 4 and not set(seen[0]) & set(seen[1])
    # the poisoned batch was skipped on both ranks, whichever held it
    assert ranks[0]["iid"]["summary"]["skipped"] == 2 and ranks[0]["iid"]["summary"]["steps"] == 6
    # stream batches are split by rows: every rank sees every batch, half of its rows
    for r in range(2):
        assert ranks[r]["stream"]["rows"] == [4] * 6
    # a crash mid-epoch and a resume under DDP end where the straight run ended
    for r in range(2):
        for name, value in ranks[r]["iid"]["params"].items():
            assert torch.equal(value, ranks[r]["resumed"]["params"][name]), name
        assert ranks[r]["resumed"]["summary"]["resumed"]
    log = events(tmp_path / "iid")  # only rank 0 writes
    assert [e["step"] for e in log if e["split"] == "train" and e["event"] == "log"] == list(range(1, 7))
    assert (tmp_path / "iid" / "finished.json").exists()


def test_progress_bars_on_a_terminal(monkeypatch, capsys):
    train, valid = make_data()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr("tqdm.std.time", _slow_clock())  # every refresh interval has passed
    Trainer(make_model(), config(max_epochs=1, progress=True), train, valid).fit()
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "tok_s=" in err and "loss=" in err and "valid" in err


def _slow_clock():
    now = [1000.0]

    def clock():
        now[0] += 1.0
        return now[0]

    return clock


def test_log_lines_when_stderr_is_not_a_terminal(tmp_path, caplog):
    train, valid = make_data()
    caplog.set_level(logging.INFO, logger="latentnlp.training")
    Trainer(make_model(), config(tmp_path, max_epochs=1, progress=True, log_every=4), train, valid).fit()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("latentnlp.training")]
    assert [line.split(",")[1] for line in lines if line.startswith("train log")] == [" step 4", " step 8", " step 12"]
    assert all("loss " in line and "tok/s" in line for line in lines if line.startswith("train log"))
    assert any(line.startswith("valid eval, step 12") and "ppl " in line for line in lines)
    caplog.clear()
    Trainer(make_model(), config(max_epochs=1, progress=False), train, valid).fit()
    assert not [r for r in caplog.records if r.getMessage().startswith(("train log", "valid eval"))]


def test_log_lines_reach_stderr_when_logging_is_unconfigured(monkeypatch):
    from latentnlp.training import progress

    logger = logging.getLogger("latentnlp.training")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    progress.ensure_console()
    assert len(logger.handlers) == 1 and logger.level == logging.INFO
    progress.ensure_console()  # once only
    assert len(logger.handlers) == 1


# ---- model selection on a named metric -----------------------------------------------------------


def test_elbo_validation_selects_on_neg_elbo_and_says_so(tmp_path):
    train, valid = make_data()
    summary = Trainer(
        make_model(),
        config(tmp_path, objective="elbo", max_epochs=2, objective_kwargs={"estimator": "exact"}),
        train,
        valid,
    ).fit()
    assert summary["select_on"] == "neg_elbo"
    assert math.isnan(summary["best_valid_nll"]) and summary["valid"]["neg_elbo"] > 0
    evals = [e for e in events(tmp_path) if e["split"] == "valid"]
    assert {e["select_on"] for e in evals} == {"neg_elbo"}
    assert min(e["neg_elbo"] for e in evals) == summary["valid"]["neg_elbo"]
    assert torch.load(tmp_path / "best.pt", weights_only=True)["select_on"] == "neg_elbo"
    # asking for the NLL of an evaluation that has none fails clearly
    with pytest.raises(ValueError, match="select_on='nll'"):
        config(None, objective="elbo", select_on="nll")
    with pytest.raises(ValueError, match="select_on='neg_elbo'"):
        config(None, objective="elbo", eval_objective="iwae", select_on="neg_elbo")
    # an exact validation objective under ELBO training selects on the exact NLL
    cfg = config(None, objective="elbo", eval_objective="marginal", max_steps=2)
    assert Trainer(make_model(), cfg, train, valid).fit()["select_on"] == "nll"


def test_a_schedule_object_as_learning_rate_schedule():
    train, valid = make_data(train=4)
    lrs = {}
    for name, schedule in (("string", "linear"), ("object", LinearDecay(total=8, warmup=2, floor=0.1))):
        trainer = Trainer(
            make_model(),
            config(
                lr=1.0,
                schedule=schedule,
                max_epochs=2,
                **({"warmup_steps": 2, "min_lr": 0.1} if name == "string" else {}),
            ),
            train,
            valid,
        )
        seen = lrs.setdefault(name, [])
        original = trainer._train_step

        def step(*args, trainer=trainer, original=original, seen=seen):
            seen.append(trainer.optimizer.param_groups[0]["lr"])
            return original(*args)

        trainer._train_step = step
        trainer.fit()
    assert lrs["string"] == lrs["object"] and lrs["string"][:2] == [0.5, 1.0]


# ---- rebuilding a model, damaged checkpoints -----------------------------------------------------


def test_load_model_rebuilds_the_model_from_its_run_directory(tmp_path):
    from latentnlp.models.hmm_lm import HMMLanguageModel

    train, valid = make_data()
    torch.manual_seed(0)
    model = HMMLanguageModel(12, 4, embedding_size=8, dropout=0.1)
    Trainer(model, config(tmp_path, max_steps=2, max_epochs=1, restore_best=False), train, valid).fit()
    rebuilt = load_model(tmp_path)  # best.pt, the only inputs being the files
    assert type(rebuilt) is HMMLanguageModel and rebuilt is not model
    assert rebuilt.constructor == model.constructor
    batch = valid.batches[0]
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model.log_marginal(batch), rebuilt.log_marginal(batch))
    last = load_model(tmp_path / "last.pt")
    for a, b in zip(model.parameters(), last.parameters()):
        assert torch.equal(a, b)


def test_model_without_a_plain_constructor_needs_the_model(tmp_path):
    class Holder(NaiveBayesMixture):
        def __init__(self, table):
            super().__init__(12, 3)
            self.table = table

    train, valid = make_data()
    model = Holder(torch.zeros(2))  # a tensor argument: no record
    assert model.constructor is None
    Trainer(model, config(tmp_path, max_steps=1, max_epochs=1), train, valid).fit()
    with pytest.raises(ValueError, match="model="):
        load_model(tmp_path)
    assert load_model(tmp_path, Holder(torch.ones(2))).table.sum() == 2


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_a_truncated_checkpoint_fails_naming_the_file_and_the_remedy(tmp_path, name):
    train, valid = make_data()
    cfg = dict(max_steps=3, max_epochs=1)
    Trainer(make_model(), config(tmp_path, **cfg), train, valid).fit()
    (tmp_path / "finished.json").unlink()
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=f"{name}.*truncated or corrupt.*Delete it") as error:
        if name == "last.pt":
            Trainer(make_model(), config(tmp_path, **cfg), train, valid).fit()
        else:
            load_model(tmp_path)
    assert isinstance(error.value, RuntimeError) and str(path) in str(error.value)


def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    train, valid = make_data()
    Trainer(make_model(), config(tmp_path, max_steps=1, max_epochs=1), train, valid).fit()
    payload = torch.load(tmp_path / "best.pt", weights_only=True)
    torch.save({**payload, "format": 1}, tmp_path / "best.pt")
    with pytest.raises(ValueError, match="format 1"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "settings, metric",
    [
        ({"objective": "marginal"}, "nll"),
        ({"objective": "elbo"}, "neg_elbo"),
        ({"objective": "elbo", "eval_objective": "iwae"}, "nll"),
        ({"objective": "wake-sleep"}, "neg_elbo"),
        ({"objective": "wake-sleep", "objective_kwargs": {"num_samples": 5}}, "nll"),
        ({"objective": "wake-sleep", "objective_kwargs": {"num_samples": 5}, "eval_kwargs": {}}, "neg_elbo"),
        ({"objective": "marginal", "eval_objective": "elbo", "select_on": "neg_elbo"}, "neg_elbo"),
    ],
)
def test_selection_metric_is_the_one_validation_reports(settings, metric):
    """best.pt is selected on ``nll`` only where validation reports a likelihood estimate (exact or
    importance-weighted with several samples); a bound such as a one-sample wake-sleep ELBO is ``neg_elbo``."""
    assert TrainConfig(**settings).selection_metric == metric
