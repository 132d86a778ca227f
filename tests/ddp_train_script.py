"""Run by test_training.test_two_process_ddp_training under torchrun with 2 CPU processes.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_train_script.py OUT

Trains the toy mixture on i.i.d. batches (one of them poisoned with a NaN loss) and the
streaming toy on row-split stream batches, and saves for each rank ``OUT/rank{r}.pt``: final
parameters, the batches it trained on and the summary (timings removed).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from contract import NaiveBayesMixture, StreamingUnigram, ToyCorpus, mixture_batches

from latentnlp.training import TrainConfig, Trainer

torch.set_num_threads(1)


class Recording(NaiveBayesMixture):
    poison = -1

    def __init__(self):
        super().__init__(12, 3)
        self.seen = []

    def loss(self, batch, objective="marginal", **kw):
        out = super().loss(batch, objective, **kw)
        if self.training:
            self.seen.append(batch["batch_id"])
            if batch["batch_id"] == self.poison:
                out.value = out.value * float("nan")
        return out


class RecordingStream(StreamingUnigram):
    def __init__(self):
        super().__init__(12)
        self.rows = []

    def loss(self, batch, objective="marginal", **kw):
        if self.training:
            self.rows.append(int(batch["targets"].shape[0]))
        return super().loss(batch, objective, **kw)


class Crash(RuntimeError):
    pass


class CrashingCorpus(ToyCorpus):
    def __init__(self, corpus, epoch, position):
        super().__init__(corpus.batches, seed=corpus.seed, shuffle=corpus.shuffle)
        self.at = (epoch, position)

    def iterate(self, epoch, start=0):
        for i, batch in enumerate(super().iterate(epoch, start), start):
            if (epoch, i) == self.at:  # every rank reads every index: all ranks stop here
                raise Crash("simulated crash")
            yield batch


def untimed(value):
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in ("wall_time", "tokens_per_s")}
    return value


def main(out: Path) -> None:
    cfg = dict(lr=0.05, max_epochs=2, log_every=1, progress=False, checkpoint_every=2)
    train = ToyCorpus(mixture_batches(9, seed=1), seed=3)
    valid = ToyCorpus(mixture_batches(3, seed=2), shuffle=False)
    kept = [set(train.order(e)[:8]) for e in range(2)]  # the ninth batch is dropped
    torch.manual_seed(dist.get_rank() if dist.is_initialized() else 0)  # DDP syncs the init
    poison = min(kept[0] & kept[1])
    model = Recording()
    model.poison = poison
    trainer = Trainer(model, TrainConfig(output_dir=str(out / "iid"), **cfg), train, valid)
    rank = trainer.rank
    assert trainer.world_size == 2 and dist.get_backend() == "gloo"
    summary = trainer.fit()
    result = {
        "iid": {
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "seen": [model.seen[:4], model.seen[4:]],
            "summary": untimed(summary),
        }
    }

    # the same run, killed in epoch 1 (after the checkpoint at position 2), then resumed
    resume_cfg = TrainConfig(output_dir=str(out / "resume"), **cfg)
    model = Recording()
    model.poison = poison
    try:
        Trainer(model, resume_cfg, CrashingCorpus(train, 1, 4), valid).fit()
        raise AssertionError("no crash")
    except Crash:
        pass
    torch.manual_seed(100 + rank)
    model = Recording()
    model.poison = poison
    summary = Trainer(model, resume_cfg, train, valid).fit()
    result["resumed"] = {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "summary": untimed(summary),
    }

    stream_batches = mixture_batches(3, seed=4)
    for b in stream_batches:
        b["stream"] = True
    stream = ToyCorpus(stream_batches, shuffle=False)
    torch.manual_seed(0)
    model = RecordingStream()
    trainer = Trainer(model, TrainConfig(output_dir=str(out / "stream"), **cfg), stream, stream)
    summary = trainer.fit()
    result["stream"] = {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "rows": model.rows,
        "summary": untimed(summary),
    }
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
