"""One trainer for every :class:`~latentnlp.models.base.LatentModel`.

The trainer only calls ``model(batch, objective=..., **kwargs)`` (which is ``model.loss``),
``model.reset_state()`` and, through :meth:`Trainer.evaluate`, ``model.loss`` again; a new
model needs nothing else to get training, evaluation, checkpoints, progress bars and DDP.

**Data.**  ``train_data``, ``valid_data`` and ``test_data`` are objects with ``__len__`` (the
number of batches) and ``iterate(epoch, start=0)`` yielding batches: dicts whose tensors are
moved to the device and whose other values (``"stream": True``, ids...) are passed as they
are.  The order of epoch ``e`` must be a function of the data object's seed and ``e`` only,
and ``start`` skips the first ``start`` batches of that order (resuming mid-epoch).

**Numbers.**  The loss is per target token.  :meth:`Trainer.evaluate` sums ``Loss.metrics``
over the corpus and divides by the summed ``tokens``: ``nll`` is nats per target token and
``ppl = exp(sum nll / sum tokens)``, where the target tokens count ``<eos>`` and not BOS.

**Files** (``config.output_dir``; only rank 0 writes): ``config.json``; ``metrics.jsonl``, one
JSON object per event (``split`` is ``train``, ``valid`` or ``test``; ``event`` is ``log``,
``eval`` or ``skip``; with ``step``, ``epoch``, ``loss``, ``ppl``, ``tokens_per_s``, ``lr``,
``skipped``, ``wall_time``); ``last.pt``, a checkpoint written every ``checkpoint_every``
updates and at the end of each epoch from which training resumes to a bit-identical result
(model state including stream state, optimiser, scheduler, RNG states of every rank, epoch,
position within the epoch, best metric, counters); ``best.pt``, the parameters with the best
validation NLL; ``finished.json``, the summary, written last.  A directory holding
``finished.json`` is refused unless ``overwrite=True``; an unfinished run is resumed (under
a changed config, ``config.json`` is rewritten and lists the changes in ``changed_on_resume``).

**Distributed.**  Under ``torchrun`` (``WORLD_SIZE > 1``) the trainer initialises the process
group (NCCL on CUDA, Gloo on CPU) unless it already is, wraps the model in
``DistributedDataParallel`` and gives each rank a disjoint share of every epoch: batch ``i``
goes to rank ``i % world_size`` (training drops the last ``len % world_size`` batches so that
every rank makes the same number of updates); batches flagged ``"stream": True`` (BPTT
streams whose state must follow consecutive batches) are instead split by rows, every rank
taking its slice of every batch.  Metrics are summed over ranks; a batch is skipped on all
ranks when any rank's loss or the gradient is not finite.  :meth:`Trainer.evaluate` is
collective: every rank must call it.  ``output_dir`` must be visible to every rank.

**Reproducibility.**  A fresh run seeds python, numpy and torch with ``seed + rank``;
evaluation runs under its own seeded RNG and restores the training RNG afterwards, so
evaluating (or not) never changes the training trajectory.  Resuming from ``last.pt`` is
bit-identical on CPU; on CUDA it also needs deterministic kernels
(``torch.use_deterministic_algorithms(True)``).  Events logged after the checkpoint are cut
from ``metrics.jsonl`` on resume, so the log reads as that of an uninterrupted run.
Evaluation runs under ``torch.no_grad()``; a model that needs autograd inside its loss
(marginals as gradients of a log-partition) must enable it itself.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from latentnlp.metrics import MetricSums, corpus_summary, perplexity
from latentnlp.models.base import OBJECTIVES, LatentModel

try:  # numpy is optional: its RNG is saved and restored only when it is installed
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

__all__ = ["TrainConfig", "Trainer", "DataSource", "FinishedRunError", "load_model", "read_metrics",
           "training_speed", "OPTIMIZERS", "SCHEDULES"]

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "plateau", "linear", "cosine")

LAST, BEST, FINISHED, METRICS, CONFIG = ("last.pt", "best.pt", "finished.json",
                                         "metrics.jsonl", "config.json")
CHECKPOINT_FORMAT = 1


class DataSource(Protocol):
    """What the trainer needs of a data set: a length in batches and a reproducible order."""

    def __len__(self) -> int: ...

    def iterate(self, epoch: int, start: int = 0) -> Iterator[Mapping[str, Any]]: ...


class FinishedRunError(FileExistsError):
    """The output directory holds a finished run and ``overwrite`` was not set."""


@dataclass
class TrainConfig:
    """Everything that decides a training run (written to ``config.json``).

    Optimisation: ``optimizer`` (``adam``, ``adamw``, ``sgd``), ``lr``, ``weight_decay``,
    ``betas`` (Adam), ``momentum`` (SGD), ``grad_clip`` (max global gradient norm, or None).

    Schedule (``schedule``): ``none`` (constant); ``plateau`` (multiply the lr by
    ``decay_factor`` when validation NLL has not improved for more than ``decay_patience``
    evaluations, down to ``min_lr``); ``linear`` and ``cosine`` (decay from ``lr`` to
    ``min_lr`` over all updates).  ``warmup_steps`` ramps the lr linearly up over the first
    updates (``none``, ``linear``, ``cosine``).

    Length: ``max_epochs``; ``max_steps`` (optimiser updates; skipped batches do not count).

    Objective: ``objective`` and ``objective_kwargs`` for ``model(batch, objective, **kwargs)``;
    a callable value is called with the number of updates made so far (e.g. a KL annealing
    schedule ``{"kl_weight": lambda step: min(1, step / 10000)}``).  Evaluation uses
    ``eval_objective`` / ``eval_kwargs`` (default: the training ones).

    Evaluation: on ``valid_data`` at every epoch end and every ``eval_every`` updates; the
    best validation NLL selects ``best.pt``; training stops early after ``patience``
    evaluations without improvement.  ``restore_best`` loads the best parameters back at the
    end (before the test evaluation).

    Bookkeeping: ``seed`` (RNG seeding at the start of a fresh run; rank r uses seed + r),
    ``output_dir`` (None: no files), ``overwrite``, ``checkpoint_every`` (updates; ``last.pt``
    is also written at each epoch end), ``log_every`` (updates per training log line),
    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``...), ``progress`` (tqdm bars, shown only
    on rank 0 and when stderr is a terminal), ``find_unused_parameters`` (DDP; on by default
    because many models leave some parameters out of some objectives, e.g. the inference
    network under ``marginal``; set it False for speed when every step reaches every parameter).
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0
    grad_clip: float | None = None

    schedule: str = "none"
    warmup_steps: int = 0
    min_lr: float = 0.0
    decay_factor: float = 0.5
    decay_patience: int = 0

    max_epochs: int = 10
    max_steps: int | None = None

    objective: str = "marginal"
    objective_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_objective: str | None = None
    eval_kwargs: dict[str, Any] | None = None

    eval_every: int | None = None
    patience: int | None = None
    restore_best: bool = True

    seed: int = 0
    output_dir: str | None = None
    overwrite: bool = False
    checkpoint_every: int | None = None
    log_every: int = 100
    device: str = "auto"
    progress: bool = True
    find_unused_parameters: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("objective", "eval_objective"):
            value = getattr(self, name)
            if value is not None and value not in OBJECTIVES:
                raise ValueError(f"{name} must be one of {OBJECTIVES}, got {value!r}")
        if self.schedule == "plateau" and self.warmup_steps:
            raise ValueError("warmup_steps is not supported with schedule='plateau'")
        for name in ("max_steps", "eval_every", "checkpoint_every", "patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")
        if self.max_epochs < 1 or self.log_every < 1 or self.warmup_steps < 0:
            raise ValueError("max_epochs and log_every must be >= 1, warmup_steps >= 0")
        if not 0 < self.decay_factor < 1:
            raise ValueError(f"decay_factor must be in (0, 1), got {self.decay_factor}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; callables are written as their ``repr``."""
        return json.loads(json.dumps(asdict(self), default=repr))

    # ---- command line -------------------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add the run-control flags recipes share (``--overwrite``, ``--device``, ...)."""
        group = parser.add_argument_group("training")
        group.add_argument("--overwrite", action="store_true",
                           help="start afresh in an output dir that holds a finished run")
        group.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
        group.add_argument("--seed", type=int, default=None)
        group.add_argument("--max-epochs", type=int, default=None)
        group.add_argument("--max-steps", type=int, default=None)
        group.add_argument("--no-progress", action="store_true", help="no progress bars")

    def with_arguments(self, args: argparse.Namespace) -> TrainConfig:
        """A copy with the flags of :meth:`add_arguments` that were given applied."""
        changes: dict[str, Any] = {}
        for name in ("device", "seed", "max_epochs", "max_steps"):
            value = getattr(args, name, None)
            if value is not None:
                changes[name] = value
        if getattr(args, "overwrite", False):
            changes["overwrite"] = True
        if getattr(args, "no_progress", False):
            changes["progress"] = False
        return dataclasses.replace(self, **changes)


@dataclass
class _State:
    """Counters of a run; saved in every checkpoint."""

    epoch: int = 0              # current epoch (0-based)
    position: int = 0           # batches of this epoch's order already consumed (all ranks)
    step: int = 0               # optimiser updates made
    skipped: int = 0            # batches skipped for a non-finite loss or gradient
    best_nll: float = math.inf  # best validation NLL per token
    best_step: int = -1
    best_epoch: int = -1
    best_valid: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0          # evaluations since the last improvement
    last_eval_step: int = -1
    stopped_early: bool = False
    elapsed: float = 0.0        # wall seconds spent in earlier sessions


# ---- RNG states ----------------------------------------------------------------------------------

def _get_rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (name, keys.tolist(), int(pos), int(has_gauss), float(gauss))
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    if np is not None and state.get("numpy") is not None:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _seed_everything(seed: int, device: torch.device | None = None) -> None:
    """Seed python, numpy and torch: every CUDA device, or only ``device`` when given."""
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
    if device is None:
        torch.manual_seed(seed)
        return
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_model(model: nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load the parameters of ``best.pt`` or ``last.pt`` into ``model``; returns the payload."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(payload["model"])
    return payload


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The events a :class:`Trainer` logged to ``run_dir/metrics.jsonl``, in order; ``[]`` when
    the folder holds no log."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def training_speed(run_dir: str | os.PathLike) -> float:
    """Mean training tokens/s over the logged windows of the run in ``run_dir`` (NaN if none)."""
    rates = [e["tokens_per_s"] for e in read_metrics(run_dir)
             if e.get("split") == "train" and e.get("event") == "log" and "tokens_per_s" in e]
    return sum(rates) / len(rates) if rates else float("nan")


def _has_extra_state(module: nn.Module) -> bool:
    return type(module).get_extra_state is not nn.Module.get_extra_state


# ---- the trainer ---------------------------------------------------------------------------------

class Trainer:
    """Train, evaluate, checkpoint and resume a :class:`LatentModel` (see the module docstring).

    ``Trainer(model, config, train_data, valid_data, test_data=None, run_info=None)`` moves the
    model to ``config.device`` (initialising ``torch.distributed`` under torchrun) and builds
    the optimiser and schedule; :meth:`fit` trains and returns a summary; :meth:`evaluate`
    gives corpus-level numbers for any data set.  ``run_info`` (JSON-ready) is stored in
    ``config.json`` beside the trainer config (recipes put their own settings there).
    """

    def __init__(self, model: LatentModel, config: TrainConfig, train_data: DataSource,
                 valid_data: DataSource, test_data: DataSource | None = None, *,
                 run_info: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.train_data, self.valid_data, self.test_data = train_data, valid_data, test_data
        self.run_info = dict(run_info or {})
        if len(train_data) == 0:
            raise ValueError("train_data has no batches")

        self.device = self._resolve_device(config.device)
        self.world_size, self.rank = self._init_distributed()
        self.model = model.to(self.device)
        self._net: nn.Module = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device.type == "cuda" else None
            self._net = DistributedDataParallel(
                self.model, device_ids=ids, output_device=self.device if ids else None,
                find_unused_parameters=config.find_unused_parameters)

        self._train_stream = self.world_size > 1 and self._is_stream(train_data)
        self.steps_per_epoch = self._num_steps(train_data)
        if self.steps_per_epoch == 0:
            raise ValueError(f"train_data has {len(train_data)} batches, fewer than the "
                             f"{self.world_size} ranks")
        self.optimizer = self._make_optimizer()
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scheduler = self._make_scheduler()
        self.state = _State()
        self._saved: tuple | None = None  # the counters last.pt was written at
        self.out = Path(config.output_dir) if config.output_dir else None
        self._best_state: dict[str, Any] | None = None
        self._session_start = time.time()
        # this rank's training sums since the last log line
        self._window, self._window_loss, self._window_time = MetricSums(), 0.0, 0.0

    # ---- setup ----------------------------------------------------------------------------
    @staticmethod
    def _resolve_device(name: str) -> torch.device:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return device

    def _init_distributed(self) -> tuple[int, int]:
        if not dist.is_available():
            return 1, 0
        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                return 1, 0
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        return dist.get_world_size(), dist.get_rank()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                    weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                     weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)

    def total_steps(self) -> int:
        """Updates the schedule spans: ``max_steps``, else ``max_epochs`` epochs."""
        epochs = self.config.max_epochs * self.steps_per_epoch
        return min(self.config.max_steps, epochs) if self.config.max_steps else epochs

    def _make_scheduler(self):
        cfg = self.config
        if cfg.schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=cfg.decay_factor,
                patience=cfg.decay_patience, threshold=0.0, min_lr=cfg.min_lr)
        if cfg.schedule == "none" and not cfg.warmup_steps:
            return None
        total, warmup = self.total_steps(), cfg.warmup_steps
        floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0

        def factor(step: int) -> float:  # lr multiplier for update number `step` (0-based)
            if step < warmup:
                return (step + 1) / warmup
            if cfg.schedule == "none":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            decay = 1.0 - progress if cfg.schedule == "linear" else \
                0.5 * (1.0 + math.cos(math.pi * progress))
            return floor + (1.0 - floor) * decay

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    # ---- data -----------------------------------------------------------------------------
    @staticmethod
    def _is_stream(data: DataSource) -> bool:
        """Whether ``data`` holds stream batches: its ``stream`` attribute, else its first batch."""
        flag = getattr(data, "stream", None)
        if flag is None:
            first = next(iter(data.iterate(0)), None)
            flag = first is not None and first.get("stream", False)
        return bool(flag)

    def _num_steps(self, data: DataSource, train: bool = True) -> int:
        """Batches this rank processes in one pass over ``data``."""
        n, w = len(data), self.world_size
        if w == 1 or (self._train_stream if data is self.train_data else self._is_stream(data)):
            return n
        return n // w if train else len(range(self.rank, n, w))

    def _rows(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """This rank's slice of the rows of a stream batch."""
        lengths = batch.get("lengths")
        if isinstance(lengths, Tensor):
            size = lengths.shape[0]
        else:
            size = next(v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim())
        if size < self.world_size:
            raise ValueError(f"a stream batch of {size} rows cannot be split over "
                             f"{self.world_size} ranks")
        return {k: v.tensor_split(self.world_size)[self.rank]
                if isinstance(v, Tensor) and v.dim() and v.shape[0] == size else v
                for k, v in batch.items()}

    def _batches(self, data: DataSource, epoch: int, start: int,
                 train: bool) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield ``(position after this batch, this rank's batch)`` from position ``start``.

        Positions count batches of the epoch's order consumed by all ranks together, so they
        agree across ranks.
        """
        w, r = self.world_size, self.rank
        limit = (len(data) // w) * w if train else len(data)
        for index, batch in enumerate(data.iterate(epoch, start=start), start):
            if w == 1:
                yield index + 1, dict(batch)
            elif batch.get("stream", False):
                yield index + 1, self._rows(batch)
            elif index >= limit:
                return
            elif index % w == r:
                yield (index // w + 1) * w, dict(batch)

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        non_blocking = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=non_blocking) if isinstance(v, Tensor) else v
                for k, v in batch.items()}

    def _kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v(self.state.step) if callable(v) else v for k, v in kwargs.items()}

    # ---- distributed helpers --------------------------------------------------------------
    def _sum_over_ranks(self, totals: Mapping[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return dict(totals)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, dict(totals))
        out: dict[str, float] = {}
        for part in gathered:
            for k, v in part.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # ---- files ----------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _path(self, name: str) -> Path | None:
        return self.out / name if self.out is not None else None

    def _wall(self) -> float:
        return self.state.elapsed + time.time() - self._session_start

    def _log(self, event: Mapping[str, Any]) -> None:
        if self.is_main and self.out is not None:
            with open(self.out / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _progress_enabled(self) -> bool:
        return self.config.progress and self.is_main and sys.stderr.isatty()

    def _prepare_output(self) -> bool:
        """Refuse a finished run, honour ``overwrite``; True when ``last.pt`` is to be resumed."""
        if self.out is None:
            return False
        finished = (self.out / FINISHED).exists()
        if finished and not self.config.overwrite:
            raise FinishedRunError(
                f"{self.out} holds a finished run ({FINISHED}); pass overwrite=True "
                f"(--overwrite) to start afresh there")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.config.overwrite:
                for name in (LAST, BEST, FINISHED, METRICS, CONFIG):
                    (self.out / name).unlink(missing_ok=True)
        self._barrier()
        return (self.out / LAST).exists()

    def _write_config(self, changed_on_resume: dict | None = None) -> None:
        """``config.json``; a run resumed under a changed config records it (the old values too)."""
        if not (self.is_main and self.out is not None):
            return
        info = {
            "trainer": self.config.to_dict(),
            "model": type(self.model).__name__,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "world_size": self.world_size,
            "train_batches": len(self.train_data),
            "valid_batches": len(self.valid_data),
            "run": self.run_info,
        }
        if changed_on_resume:
            previous = self.out / CONFIG
            earlier = json.loads(previous.read_text()).get("changed_on_resume", []) \
                if previous.exists() else []
            info["changed_on_resume"] = earlier + [{"step": self.state.step, "changes": changed_on_resume}]
        with open(self.out / CONFIG, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, default=repr)

    # ---- checkpoints ----------------------------------------------------------------------
    def _counters(self) -> tuple:
        st = self.state
        return st.epoch, st.position, st.step, st.skipped, st.last_eval_step

    def save_checkpoint(self) -> None:
        """Write ``last.pt`` (a no-op without ``output_dir``); collective under DDP."""
        if self.out is None or self._counters() == self._saved:
            return
        self._saved = self._counters()
        mine = {"rng": _get_rng_state(self.device), "window": self._window.totals(),
                "window_loss": self._window_loss, "window_time": self._window_time}
        if self.world_size > 1:
            ranks: list[Any] = [None] * self.world_size
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        self.state.elapsed = self._wall()
        self._session_start = time.time()
        if self.is_main:
            metrics = self.out / METRICS
            payload = {
                "format": CHECKPOINT_FORMAT,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "ranks": ranks,
                "state": asdict(self.state),
                "log_offset": metrics.stat().st_size if metrics.exists() else 0,
                "config": self.config.to_dict(),
            }
            _atomic_save(payload, self.out / LAST)
        self._barrier()

    def _resume(self) -> None:
        payload = torch.load(self.out / LAST, map_location=self.device, weights_only=True)
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.out / LAST}: unknown checkpoint format "
                             f"{payload.get('format')!r}")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload["scheduler"] is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        self.state = _State(**payload["state"])
        self._saved = self._counters()
        ranks = payload["ranks"]
        if len(ranks) != self.world_size:
            log.warning("checkpoint was written by %d ranks, resuming on %d: RNG streams differ",
                        len(ranks), self.world_size)
        mine = ranks[self.rank % len(ranks)]
        _set_rng_state(mine["rng"], self.device)
        self._window = MetricSums.from_totals(mine["window"])
        self._window_loss, self._window_time = mine["window_loss"], mine["window_time"]
        changed = {k: {"checkpoint": payload["config"].get(k), "now": v}
                   for k, v in sorted(self.config.to_dict().items())
                   if k not in ("overwrite", "device", "progress") and payload["config"].get(k) != v}
        if changed:
            log.warning("resuming %s with a changed config: %s", self.out, ", ".join(changed))
            self._write_config(changed_on_resume=changed)
        if self.is_main:
            metrics = self.out / METRICS
            if metrics.exists():  # drop events logged after the checkpoint: they are replayed
                with open(metrics, "r+b") as f:
                    f.truncate(payload["log_offset"])
        self._barrier()
        log.info("resumed %s at epoch %d, position %d, step %d", self.out, self.state.epoch,
                 self.state.position, self.state.step)

    def _keep_best(self) -> None:
        path = self._path(BEST)
        if path is None:
            self._best_state = copy.deepcopy(self.model.state_dict())
        elif self.is_main:
            _atomic_save({"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                          "step": self.state.step, "epoch": self.state.epoch,
                          "valid": self.state.best_valid}, path)

    def _restore_best(self) -> None:
        path = self._path(BEST)
        self._barrier()
        if path is not None and path.exists():
            load_model(self.model, path, map_location=self.device)
        elif self._best_state is not None:
            self.model.load_state_dict(self._best_state)

    # ---- evaluation -----------------------------------------------------------------------
    @contextmanager
    def _eval_rng(self):
        """Evaluation draws from its own seeded RNG and leaves training's untouched."""
        saved = _get_rng_state(self.device)
        _seed_everything(self.config.seed + 7919 * (self.rank + 1), self.device)
        try:
            yield
        finally:
            _set_rng_state(saved, self.device)

    @torch.no_grad()
    def evaluate(self, data: DataSource, *, objective: str | None = None,
                 split: str | None = None, **kwargs: Any) -> dict[str, float]:
        """Corpus-level numbers of the model on ``data`` (every rank gets the same dict).

        Sums each ``Loss.metrics`` entry over the corpus (and over ranks) and returns, from
        :func:`~latentnlp.metrics.corpus_summary`: ``nll`` (nats per target token, ``<eos>``
        counted, BOS not), ``ppl = exp(sum nll / sum tokens)``, ``tokens``, ``examples``,
        every other metric ``m`` per token and ``m_per_example``; plus ``loss`` (= ``nll``)
        and ``tokens_per_s``.  ``objective`` and ``kwargs`` default to the config's evaluation
        (else training) objective.  The model's state is reset first, and the pass uses its
        own seeded RNG, so the result depends on the parameters only.  When ``split`` is
        given the result is logged to ``metrics.jsonl`` under that name.
        """
        cfg = self.config
        if objective is None:
            objective = cfg.eval_objective or cfg.objective
            if not kwargs:
                kwargs = dict(cfg.objective_kwargs if cfg.eval_kwargs is None else cfg.eval_kwargs)
        kwargs = self._kwargs(kwargs)
        model = self.model
        was_training = model.training
        model.eval()
        model.reset_state()
        sums = MetricSums()
        start = time.time()
        bar = tqdm(total=self._num_steps(data, train=False), desc=split or "eval",
                   disable=not self._progress_enabled(), leave=False, dynamic_ncols=True)
        try:
            with self._eval_rng():
                for _, batch in self._batches(data, 0, 0, train=False):
                    sums.add(model(self._to_device(batch), objective=objective, **kwargs).metrics)
                    bar.update()
        finally:
            bar.close()
            model.train(was_training)
        totals = self._sum_over_ranks(sums.totals())
        result = corpus_summary(totals)
        if "nll" not in result:
            raise ValueError("the model's Loss.metrics must contain 'nll'")
        result["loss"] = result["nll"]
        result["tokens_per_s"] = result["tokens"] / max(time.time() - start, 1e-9)
        if split is not None:
            self._log({"split": split, "event": "eval", "step": self.state.step,
                       "epoch": self.state.epoch, **result, "lr": self._lr(),
                       "skipped": self.state.skipped, "wall_time": self._wall()})
        return result

    def _validate(self) -> None:
        """Evaluate on valid, keep the best model, count toward early stopping and plateau."""
        st, cfg = self.state, self.config
        stream_states = {name: copy.deepcopy(m.get_extra_state())
                         for name, m in self.model.named_modules() if _has_extra_state(m)}
        result = self.evaluate(self.valid_data, split="valid")
        for name, m in self.model.named_modules():  # training streams continue where they were
            if name in stream_states:
                m.set_extra_state(stream_states[name])
        st.last_eval_step = st.step
        nll = result["nll"]
        if nll < st.best_nll:
            st.best_nll, st.best_step, st.best_epoch, st.bad_evals = nll, st.step, st.epoch, 0
            st.best_valid = result
            self._keep_best()
        else:
            st.bad_evals += 1
            if cfg.patience is not None and st.bad_evals >= cfg.patience:
                st.stopped_early = True
                log.info("early stopping at step %d: no improvement in %d evaluations",
                         st.step, st.bad_evals)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(nll)

    # ---- training -------------------------------------------------------------------------
    def _max_steps_reached(self) -> bool:
        return self.config.max_steps is not None and self.state.step >= self.config.max_steps

    def _train_step(self, batch: dict[str, Any], position: int) -> tuple[bool, float, float]:
        """One update; returns (update made, loss value, tokens).  Skips non-finite batches."""
        cfg, st = self.config, self.state
        tic = time.time()
        loss = self._net(self._to_device(batch), objective=cfg.objective,
                         **self._kwargs(cfg.objective_kwargs))
        self.optimizer.zero_grad(set_to_none=True)
        loss.value.backward()
        norm = torch.nn.utils.clip_grad_norm_(
            self._params, max_norm=cfg.grad_clip if cfg.grad_clip else math.inf)
        value = loss.value.detach().to(torch.float64)
        bad = (~torch.isfinite(value)).to(torch.float64)
        if self.world_size > 1:  # all ranks skip together
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        tokens = loss.metrics["tokens"].detach().to(torch.float64).sum()
        value, norm_, tokens_, bad = torch.stack(
            [value, norm.detach().to(torch.float64), tokens, bad]).tolist()
        if bad or not math.isfinite(norm_):
            self.optimizer.zero_grad(set_to_none=True)
            st.skipped += 1
            reason = "loss" if bad else "gradient"
            if self.is_main:
                log.warning("skipping batch at position %d of epoch %d: non-finite %s",
                            position, st.epoch, reason)
            self._log({"split": "train", "event": "skip", "step": st.step, "epoch": st.epoch,
                       "position": position, "reason": f"non-finite {reason}",
                       "loss": value if math.isfinite(value) else repr(value),
                       "skipped": st.skipped, "lr": self._lr(), "wall_time": self._wall()})
            return False, value, tokens_
        self.optimizer.step()
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            self.scheduler.step()
        st.step += 1
        self._window.add(loss.metrics)
        self._window_loss += value * tokens_
        self._window_time += time.time() - tic
        if st.step % cfg.log_every == 0:
            self._log_train()
        return True, value, tokens_

    def _log_train(self) -> None:
        st = self.state
        totals = self._sum_over_ranks({**self._window.totals(), "loss_sum": self._window_loss,
                                       "seconds": self._window_time})
        tokens = totals.get("tokens", 0.0)
        if tokens > 0:
            summary = corpus_summary({k: v for k, v in totals.items()
                                      if k not in ("loss_sum", "seconds")})
            seconds = totals["seconds"] / self.world_size
            self._log({"split": "train", "event": "log", "step": st.step, "epoch": st.epoch,
                       "position": st.position, "loss": totals["loss_sum"] / tokens, **summary,
                       "tokens_per_s": tokens / max(seconds, 1e-9), "lr": self._lr(),
                       "skipped": st.skipped, "wall_time": self._wall()})
        self._window, self._window_loss, self._window_time = MetricSums(), 0.0, 0.0

    def _train_epoch(self) -> None:
        """Train from the current position to the end of the epoch (or a stop)."""
        cfg, st = self.config, self.state
        self._net.train()
        if st.position == 0:
            self.model.reset_state()
        sharded = self.world_size > 1 and not self._train_stream
        done = st.position // self.world_size if sharded else st.position
        end = (len(self.train_data) // self.world_size) * self.world_size if sharded \
            else len(self.train_data)  # training drops the remainder a rank share leaves
        bar = tqdm(total=self.steps_per_epoch, initial=done, unit="batch", leave=False,
                   desc=f"epoch {st.epoch + 1}/{cfg.max_epochs}", dynamic_ncols=True,
                   disable=not self._progress_enabled())
        tokens_seen, tic = 0.0, time.time()
        try:
            for position, batch in self._batches(self.train_data, st.epoch, st.position, True):
                st.position = position if position < end else len(self.train_data)
                updated, value, tokens = self._train_step(batch, position)
                if not bar.disable:
                    tokens_seen += tokens
                    bar.set_postfix(loss=f"{value:.4f}",
                                    tok_s=f"{tokens_seen / max(time.time() - tic, 1e-9):.0f}",
                                    refresh=False)
                bar.update()
                if not updated:
                    continue
                if cfg.eval_every and st.step % cfg.eval_every == 0:
                    self._validate()
                if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if st.stopped_early or self._max_steps_reached():
                    return
            st.position = len(self.train_data)
        finally:
            bar.close()

    def fit(self) -> dict[str, Any]:
        """Train (or resume), select on validation NLL, test; returns the run summary.

        The summary holds ``steps``, ``epochs`` (completed), ``skipped``, ``stopped_early``,
        ``best_step``, ``best_epoch``, ``best_valid_nll``, ``best_valid_ppl``, ``valid`` (the
        best validation numbers), ``test`` (numbers of the best model on ``test_data``, or
        None), ``resumed``, ``wall_time`` and ``output_dir``.  It is also written to
        ``finished.json``.
        """
        cfg = self.config
        resumed = self._prepare_output()
        self._session_start = time.time()
        if resumed:
            self._resume()
        else:
            _seed_everything(cfg.seed + self.rank)
            if self.is_main and self.out is not None:
                (self.out / METRICS).unlink(missing_ok=True)
            self._write_config()
        st = self.state
        while not (st.stopped_early or st.epoch >= cfg.max_epochs or self._max_steps_reached()):
            self._train_epoch()
            if st.position >= len(self.train_data):  # the epoch is complete
                if st.last_eval_step != st.step:
                    self._validate()
                st.epoch, st.position = st.epoch + 1, 0
                self.save_checkpoint()
        if st.last_eval_step != st.step:  # stopped mid-epoch at max_steps
            self._validate()
        self.save_checkpoint()  # the final state (unless already saved): nothing to replay
        if cfg.restore_best:
            self._restore_best()
        test = None
        if self.test_data is not None:
            test = self.evaluate(self.test_data, split="test")
        summary = {
            "steps": st.step, "epochs": st.epoch, "skipped": st.skipped,
            "stopped_early": st.stopped_early, "best_step": st.best_step,
            "best_epoch": st.best_epoch, "best_valid_nll": st.best_nll,
            "best_valid_ppl": perplexity(st.best_nll, 1.0) if math.isfinite(st.best_nll)
            else math.inf,
            "valid": st.best_valid, "test": test, "resumed": resumed,
            "wall_time": self._wall(), "output_dir": str(self.out) if self.out else None,
        }
        if self.is_main and self.out is not None:
            with open(self.out / FINISHED, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        self._barrier()
        return summary
