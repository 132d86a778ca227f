"""The training loop: epochs and updates, validation, model selection, early stopping, skipping
non-finite batches, and the checkpoints and log events it writes on the way."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentnlp.metrics import MetricSums, corpus_summary, perplexity
from latentnlp.models.base import LatentModel
from latentnlp.schedules import Schedule
from latentnlp.training import progress, run_dir
from latentnlp.training.aggressive import StallRule, mutual_information_climbs, validation_posterior
from latentnlp.training.checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_save,
    read_checkpoint,
)
from latentnlp.training.config import TrainConfig
from latentnlp.training.distributed import (
    DataSource,
    Ranks,
    is_stream,
    resolve_device,
    to_device,
)
from latentnlp.training.evaluation import evaluate
from latentnlp.training.optim import make_optimizer, make_scheduler
from latentnlp.training.rng import get_rng_state, seed_everything, set_rng_state
from latentnlp.training.run_log import METRICS, RunLog

__all__ = ["Trainer"]

log = logging.getLogger(__name__)


@dataclass
class _State:
    """Counters of a run; saved in every checkpoint."""

    epoch: int = 0  # current epoch (0-based)
    position: int = 0  # batches of this epoch's order already consumed (all ranks)
    step: int = 0  # optimiser updates made
    skipped: int = 0  # batches skipped for a non-finite loss or gradient
    best_value: float = math.inf  # best validation value of the selection metric (per token)
    best_step: int = -1
    best_epoch: int = -1
    best_valid: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0  # evaluations since the last improvement
    last_eval_step: int = -1
    stopped_early: bool = False
    elapsed: float = 0.0  # wall seconds spent in earlier sessions
    aggressive: bool = False  # the aggressive inference-network schedule is on
    last_mi: float = -math.inf  # validation I(x; z) at the last epoch end (aggressive schedule)
    inner_steps: int = 0  # inference-network updates made by the aggressive schedule


def _has_extra_state(module: torch.nn.Module) -> bool:
    return type(module).get_extra_state is not torch.nn.Module.get_extra_state


class Trainer:
    """Train, evaluate, checkpoint and resume a :class:`LatentModel`.

    ``Trainer(model, config, train_data, valid_data, test_data=None, run_info=None)`` moves the
    model to ``config.device`` (initialising ``torch.distributed`` under torchrun and wrapping
    the model in DDP) and builds the optimiser and schedule; :meth:`fit` trains and returns a
    summary; :meth:`evaluate` gives corpus-level numbers for any data set.  ``run_info``
    (JSON-ready) is stored in ``config.json`` beside the trainer config (recipes put their own
    settings there).  The data objects follow :class:`~latentnlp.training.DataSource`.

    The trainer only calls ``model(batch, objective=..., **kwargs)`` (which is ``model.loss``)
    and ``model.reset_state()``.  The loss is per target token.  Under ``objective_kwargs``,
    a :class:`~latentnlp.schedules.Schedule` is evaluated at the number of updates made.

    **Files** (``config.output_dir``): see :mod:`~latentnlp.training.run_dir`.  ``last.pt`` is
    written every ``checkpoint_every`` updates and at the end of each epoch; training resumes
    from it to a bit-identical result.  ``best.pt`` holds the parameters with the best value of
    ``config.selection_metric`` on validation.  An unfinished run is resumed; under a changed
    config, ``config.json`` is rewritten and lists the changes in ``changed_on_resume``.

    **Continuing a finished run**: delete its ``finished.json`` and run again with a larger
    ``max_steps`` or ``max_epochs``; the run resumes from ``last.pt``, ends where a run given
    the larger budget from the start would end, and records the change in ``config.json``.

    **Skipping**: a batch whose loss or gradient is not finite makes no update (on every rank
    when any rank's is not finite), is logged as a ``skip`` event and does not count as a step.

    **Aggressive inference-network training** (``config.aggressive_inference``, He et al.
    2019; :mod:`~latentnlp.training.aggressive`): while on, each update is preceded by inner
    updates of ``model.inference_parameters()`` on batches drawn at random from the training
    data, by an optimiser of their own (its state in ``last.pt``, its learning rate that of the
    main optimiser), until :class:`~latentnlp.training.aggressive.StallRule` stops them; the
    update itself then leaves the inference network alone.  An inner batch with a non-finite
    loss or gradient is skipped like any other.  Training ``log`` events carry
    ``inner_steps`` (over the window) and ``aggressive``; after each epoch a ``posterior``
    event records the validation ``mi`` and ``active_units`` and whether the schedule stays on
    (after every epoch under ``config.posterior_diagnostics``).

    **Distributed**: see :mod:`~latentnlp.training.distributed`.  Metrics are summed over
    ranks; :meth:`evaluate` is collective; ``output_dir`` must be visible to every rank.

    **Reproducibility.**  A fresh run seeds python, numpy and torch with ``seed + rank``;
    evaluation runs under its own seeded RNG and restores the training RNG afterwards, so
    evaluating (or not) never changes the training trajectory.  Resuming from ``last.pt`` is
    bit-identical on CPU; on CUDA it also needs deterministic kernels
    (``torch.use_deterministic_algorithms(True)``).  Events logged after the checkpoint are cut
    from ``metrics.jsonl`` on resume, so the log reads as that of an uninterrupted run.

    **Device syncs**: one per update (the loss, gradient norm and token count are read back
    together to decide on skipping and to log), none otherwise between log windows.
    """

    def __init__(
        self,
        model: LatentModel,
        config: TrainConfig,
        train_data: DataSource,
        valid_data: DataSource,
        test_data: DataSource | None = None,
        *,
        run_info: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.train_data, self.valid_data, self.test_data = train_data, valid_data, test_data
        self.run_info = dict(run_info or {})
        if len(train_data) == 0:
            raise ValueError("train_data has no batches")

        self.device = resolve_device(config.device)
        self.ranks = Ranks.from_environment(self.device)
        self.model = model.to(self.device)
        self._net = self.ranks.wrap(self.model, self.device, config.find_unused_parameters)

        self._train_stream = self.world_size > 1 and is_stream(train_data)
        self.steps_per_epoch = self.ranks.num_batches(train_data, train=True, stream=self._train_stream)
        if self.steps_per_epoch == 0:
            raise ValueError(f"train_data has {len(train_data)} batches, fewer than the {self.world_size} ranks")
        self.optimizer = make_optimizer(self.model, config)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._inference: list[torch.nn.Parameter] = []
        self.encoder_optimizer: torch.optim.Optimizer | None = None
        if config.aggressive_inference is not None:
            self._inference = [p for p in self._inference_parameters() if p.requires_grad]
            self.encoder_optimizer = make_optimizer(self.model, config, self._inference)
        self.scheduler = make_scheduler(self.optimizer, config, self.total_steps())
        self.select_on = config.selection_metric
        self.state = _State()
        self._saved: tuple | None = None  # the counters last.pt was written at
        self.out = Path(config.output_dir) if config.output_dir else None
        self._log_file = RunLog(self.out / METRICS) if self.out is not None and self.is_main else None
        self._bars = progress.bars_enabled(config.progress, self.is_main)
        self._lines = progress.lines_enabled(config.progress, self.is_main)
        if self._lines:
            progress.ensure_console()
        self._best_state: dict[str, Any] | None = None
        self._session_start = time.time()
        # this rank's training sums since the last log line
        self._window, self._window_loss, self._window_time = MetricSums(), 0.0, 0.0
        self._window_inner = 0  # inner inference-network updates (aggressive schedule)

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    def total_steps(self) -> int:
        """Updates the schedule spans: ``max_steps``, else ``max_epochs`` epochs."""
        epochs = self.config.max_epochs * self.steps_per_epoch
        return min(self.config.max_steps, epochs) if self.config.max_steps else epochs

    # ---- small parts ----------------------------------------------------------------------
    def _inference_parameters(self) -> list[torch.nn.Parameter]:
        """The model's inference network, checked to be a non-empty proper subset of its parameters."""
        try:
            params = list(self.model.inference_parameters())
        except (AttributeError, NotImplementedError) as error:
            raise ValueError(
                f"aggressive_inference needs a model that names its inference network "
                f"(LatentModel.inference_parameters); {type(self.model).__name__}: {error}"
            ) from error
        ids, own = {id(p) for p in params}, {id(p) for p in self.model.parameters()}
        if not params or not ids < own:
            raise ValueError(
                f"{type(self.model).__name__}.inference_parameters() must be a non-empty proper subset "
                f"of the model's parameters; got {len(params)} of {len(own)} "
                f"({len(ids - own)} not the model's)"
            )
        return params

    def _kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The loss kwargs with every schedule evaluated at the current step."""
        return {k: v(self.state.step) if isinstance(v, Schedule) else v for k, v in kwargs.items()}

    def _wall(self) -> float:
        return self.state.elapsed + time.time() - self._session_start

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _log(self, event: Mapping[str, Any]) -> None:
        """Append to ``metrics.jsonl`` (rank 0, with an output dir) and echo as a log line."""
        if self._log_file is not None:
            self._log_file.write(event)
        if self._lines and event["event"] != "skip":  # skips are logged as warnings already
            log.info(progress.describe(event))

    def _config_info(self) -> dict[str, Any]:
        return {
            "trainer": self.config.to_dict(),
            "select_on": self.select_on,
            "model": type(self.model).__name__,
            "constructor": self._constructor(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "world_size": self.world_size,
            "train_batches": len(self.train_data),
            "valid_batches": len(self.valid_data),
            "run": self.run_info,
        }

    # ---- checkpoints ----------------------------------------------------------------------
    def _counters(self) -> tuple:
        st = self.state
        return st.epoch, st.position, st.step, st.skipped, st.last_eval_step

    def _constructor(self) -> dict[str, Any] | None:
        return self.model.constructor if isinstance(self.model, LatentModel) else None

    def save_checkpoint(self) -> None:
        """Write ``last.pt`` (a no-op without ``output_dir``); collective under DDP."""
        if self.out is None or self._counters() == self._saved:
            return
        self._saved = self._counters()
        ranks = self.ranks.gather(
            {
                "rng": get_rng_state(self.device),
                "window": self._window.totals(),
                "window_loss": self._window_loss,
                "window_time": self._window_time,
                "window_inner": self._window_inner,
            }
        )
        self.state.elapsed = self._wall()
        self._session_start = time.time()
        if self._log_file is not None:
            payload = {
                "format": CHECKPOINT_FORMAT,
                "model": self.model.state_dict(),
                "constructor": self._constructor(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "encoder_optimizer": self.encoder_optimizer.state_dict() if self.encoder_optimizer else None,
                "ranks": ranks,
                "state": asdict(self.state),
                "log_offset": self._log_file.size(),
                "config": self.config.to_dict(),
            }
            atomic_save(payload, self.out / run_dir.LAST)
        self.ranks.barrier()

    def _resume(self) -> None:
        payload = read_checkpoint(self.out / run_dir.LAST, map_location=self.device)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload["scheduler"] is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        if self.encoder_optimizer is not None and payload.get("encoder_optimizer") is not None:
            self.encoder_optimizer.load_state_dict(payload["encoder_optimizer"])
        self.state = _State(**payload["state"])
        self._saved = self._counters()
        ranks = payload["ranks"]
        if len(ranks) != self.world_size:
            log.warning(
                "checkpoint was written by %d ranks, resuming on %d: RNG streams differ", len(ranks), self.world_size
            )
        mine = ranks[self.rank % len(ranks)]
        set_rng_state(mine["rng"], self.device)
        self._window = MetricSums.from_totals(mine["window"])
        self._window_loss, self._window_time = mine["window_loss"], mine["window_time"]
        self._window_inner = mine.get("window_inner", 0)
        changed = run_dir.config_changes(payload["config"], self.config.to_dict())
        if changed:
            log.warning("resuming %s with a changed config: %s", self.out, ", ".join(changed))
            if self.is_main:
                run_dir.write_config(self.out, self._config_info(), step=self.state.step, changed_on_resume=changed)
        if self._log_file is not None:  # drop events logged after the checkpoint: they are replayed
            self._log_file.truncate(payload["log_offset"])
        self.ranks.barrier()
        log.info(
            "resumed %s at epoch %d, position %d, step %d",
            self.out,
            self.state.epoch,
            self.state.position,
            self.state.step,
        )

    def _keep_best(self) -> None:
        if self.out is None:
            self._best_state = copy.deepcopy(self.model.state_dict())
        elif self.is_main:
            atomic_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "model": self.model.state_dict(),
                    "constructor": self._constructor(),
                    "step": self.state.step,
                    "epoch": self.state.epoch,
                    "valid": self.state.best_valid,
                    "select_on": self.select_on,
                },
                self.out / run_dir.BEST,
            )

    def _restore_best(self) -> None:
        self.ranks.barrier()
        if self.out is not None and (self.out / run_dir.BEST).exists():
            payload = read_checkpoint(self.out / run_dir.BEST, map_location=self.device)
            self.model.load_state_dict(payload["model"])
        elif self._best_state is not None:
            self.model.load_state_dict(self._best_state)

    # ---- evaluation -----------------------------------------------------------------------
    def evaluate(
        self, data: DataSource, *, objective: str | None = None, split: str | None = None, **kwargs: Any
    ) -> dict[str, float]:
        """Corpus-level numbers of the model on ``data`` (every rank gets the same dict).

        :func:`~latentnlp.training.evaluate` on this trainer's device and ranks, under the
        evaluation RNG of ``config.seed``.  ``objective`` and ``kwargs`` default to the config's
        evaluation (else training) objective; schedules among the kwargs are evaluated at the
        current step.  When ``split`` is given the result is logged to ``metrics.jsonl`` under
        that name.
        """
        cfg = self.config
        if objective is None:
            objective = cfg.eval_objective or cfg.objective
            if not kwargs:
                kwargs = dict(cfg.objective_kwargs if cfg.eval_kwargs is None else cfg.eval_kwargs)
        result = evaluate(
            self.model,
            data,
            objective=objective,
            device=self.device,
            seed=cfg.seed,
            ranks=self.ranks,
            progress=self._bars,
            desc=split or "eval",
            **self._kwargs(kwargs),
        )
        if split is not None:
            selection = {"select_on": self.select_on} if split == "valid" else {}
            self._log(
                {
                    "split": split,
                    "event": "eval",
                    "step": self.state.step,
                    "epoch": self.state.epoch,
                    **result,
                    **selection,
                    "lr": self._lr(),
                    "skipped": self.state.skipped,
                    "wall_time": self._wall(),
                }
            )
        return result

    def _validate(self) -> None:
        """Evaluate on valid, keep the best model, count toward early stopping and plateau."""
        st, cfg = self.state, self.config
        stream_states = {
            name: copy.deepcopy(m.get_extra_state()) for name, m in self.model.named_modules() if _has_extra_state(m)
        }
        result = self.evaluate(self.valid_data, split="valid")
        for name, m in self.model.named_modules():  # training streams continue where they were
            if name in stream_states:
                m.set_extra_state(stream_states[name])
        st.last_eval_step = st.step
        if self.select_on not in result:
            raise ValueError(
                f"select_on={self.select_on!r}, but the validation objective gives "
                f"{sorted(k for k in result if k in ('nll', 'neg_elbo'))}"
            )
        value = result[self.select_on]
        if value < st.best_value:
            st.best_value, st.best_step, st.best_epoch, st.bad_evals = value, st.step, st.epoch, 0
            st.best_valid = result
            self._keep_best()
        else:
            st.bad_evals += 1
            if cfg.patience is not None and st.bad_evals >= cfg.patience:
                st.stopped_early = True
                log.info(
                    "early stopping at step %d: no improvement of valid %s in %d evaluations",
                    st.step,
                    self.select_on,
                    st.bad_evals,
                )
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(value)

    # ---- training -------------------------------------------------------------------------
    def _max_steps_reached(self) -> bool:
        return self.config.max_steps is not None and self.state.step >= self.config.max_steps

    def _train_step(self, batch: dict[str, Any], position: int) -> tuple[bool, float, float]:
        """One update; returns (update made, loss value, tokens).  Skips non-finite batches."""
        cfg, st = self.config, self.state
        tic = time.time()
        if st.aggressive:
            self._window_inner += self._inner_updates(position)
        loss, value, norm_, tokens_, bad = self._backward(batch)
        if bad or not math.isfinite(norm_):
            self._skip(position, value, "loss" if bad else "gradient")
            return False, value, tokens_
        if st.aggressive:  # the update is the generative model's alone
            for p in self._inference:
                p.grad = None
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

    def _backward(self, batch: Mapping[str, Any]) -> tuple[Any, float, float, float, float]:
        """Loss and gradients of one batch: ``(loss, value, gradient norm, tokens, bad)``."""
        cfg = self.config
        loss = self._net(to_device(batch, self.device), objective=cfg.objective, **self._kwargs(cfg.objective_kwargs))
        self.optimizer.zero_grad(set_to_none=True)
        loss.value.backward()
        norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm=cfg.grad_clip if cfg.grad_clip else math.inf)
        value = loss.value.detach().to(torch.float64)
        bad = self.ranks.maximum((~torch.isfinite(value)).to(torch.float64))  # all ranks skip together
        tokens = loss.metrics["tokens"].detach().to(torch.float64).sum()
        value, norm_, tokens_, bad = torch.stack(  # the one device sync of the update
            [value, norm.detach().to(torch.float64), tokens, bad]
        ).tolist()
        return loss, value, norm_, tokens_, bad

    def _skip(self, position: int, value: float, reason: str) -> None:
        """Drop the gradients of a batch with a non-finite loss or gradient, and log the skip."""
        st = self.state
        self.optimizer.zero_grad(set_to_none=True)
        st.skipped += 1
        if self.is_main:
            log.warning("skipping batch at position %d of epoch %d: non-finite %s", position, st.epoch, reason)
        self._log(
            {
                "split": "train",
                "event": "skip",
                "step": st.step,
                "epoch": st.epoch,
                "position": position,
                "reason": f"non-finite {reason}",
                "loss": value if math.isfinite(value) else repr(value),
                "skipped": st.skipped,
                "lr": self._lr(),
                "wall_time": self._wall(),
            }
        )

    def _inner_updates(self, position: int) -> int:
        """The aggressive schedule's inner loop before the update at ``position``; returns its updates.

        Each inner step draws a training batch at random (the torch RNG, saved in ``last.pt``),
        updates the inference network by ``encoder_optimizer`` at the main optimiser's current
        learning rate, and feeds its loss to a :class:`StallRule`.  The gradient norm is clipped
        over all parameters, as for an update (He et al.'s code).
        """
        agg, st = self.config.aggressive_inference, self.state
        assert agg is not None and self.encoder_optimizer is not None
        for group in self.encoder_optimizer.param_groups:
            group["lr"] = self._lr()
        rule, made = StallRule(agg.window), 0
        for _ in range(agg.max_inner_steps):
            index = int(torch.randint(len(self.train_data), ()))
            batch = next(iter(self.train_data.iterate(st.epoch, index)))
            _, value, norm, tokens, bad = self._backward(batch)
            if bad or not math.isfinite(norm):
                self._skip(position, value, f"{'loss' if bad else 'gradient'} in an inner step")
                continue
            self.encoder_optimizer.step()
            made += 1
            totals = self.ranks.sum({"loss": value * tokens, "tokens": tokens})
            if rule.update(totals["loss"], totals["tokens"]):
                break
        self.optimizer.zero_grad(set_to_none=True)
        st.inner_steps += made
        return made

    def _check_posterior(self) -> None:
        """After an epoch: log the validation MI and active units; the aggressive schedule stays on
        while the MI climbs."""
        agg, st = self.config.aggressive_inference, self.state
        diagnostics = validation_posterior(
            self.model, self.valid_data, self.device, num_samples=agg.mi_samples if agg else 1, seed=self.config.seed
        )
        schedule: dict[str, Any] = {}
        if st.aggressive:
            st.aggressive = mutual_information_climbs(st.last_mi, diagnostics["mi"])
            st.last_mi = diagnostics["mi"]
            if not st.aggressive:
                log.info("aggressive inference training off after epoch %d: valid I(x; z) fell", st.epoch + 1)
        if agg is not None:
            schedule = {"aggressive": st.aggressive, "inner_steps_total": st.inner_steps}
        self._log(
            {
                "split": "valid",
                "event": "posterior",
                "step": st.step,
                "epoch": st.epoch,
                **diagnostics,
                **schedule,
                "lr": self._lr(),
                "wall_time": self._wall(),
            }
        )

    def _log_train(self) -> None:
        st = self.state
        totals = self.ranks.sum({**self._window.totals(), "loss_sum": self._window_loss, "seconds": self._window_time})
        tokens = totals.get("tokens", 0.0)
        if tokens > 0:
            summary = corpus_summary({k: v for k, v in totals.items() if k not in ("loss_sum", "seconds")})
            seconds = totals["seconds"] / self.world_size
            self._log(
                {
                    "split": "train",
                    "event": "log",
                    "step": st.step,
                    "epoch": st.epoch,
                    "position": st.position,
                    **summary,
                    "loss": totals["loss_sum"] / tokens,
                    "tokens_per_s": tokens / max(seconds, 1e-9),
                    "lr": self._lr(),
                    "skipped": st.skipped,
                    "wall_time": self._wall(),
                    **self._aggressive_fields(),
                }
            )
        self._window, self._window_loss, self._window_time = MetricSums(), 0.0, 0.0
        self._window_inner = 0

    def _aggressive_fields(self) -> dict[str, Any]:
        """``inner_steps`` (of this rank, over the window) and ``aggressive``, under the aggressive schedule."""
        if self.config.aggressive_inference is None:
            return {}
        return {"inner_steps": self._window_inner, "aggressive": self.state.aggressive}

    def _train_epoch(self) -> None:
        """Train from the current position to the end of the epoch (or a stop)."""
        cfg, st = self.config, self.state
        self._net.train()
        if st.position == 0:
            self.model.reset_state()
        sharded = self.world_size > 1 and not self._train_stream
        done = st.position // self.world_size if sharded else st.position
        end = (
            (len(self.train_data) // self.world_size) * self.world_size if sharded else len(self.train_data)
        )  # training drops the remainder a rank share leaves
        bar = progress.bar(
            self._bars,
            total=self.steps_per_epoch,
            initial=done,
            unit="batch",
            leave=False,
            desc=f"epoch {st.epoch + 1}/{cfg.max_epochs}",
            dynamic_ncols=True,
        )
        tokens_seen, tic = 0.0, time.time()
        try:
            for position, batch in self.ranks.batches(self.train_data, st.epoch, st.position, True):
                st.position = position if position < end else len(self.train_data)
                updated, value, tokens = self._train_step(batch, position)
                if not bar.disable:
                    tokens_seen += tokens
                    bar.set_postfix(
                        loss=f"{value:.4f}", tok_s=f"{tokens_seen / max(time.time() - tic, 1e-9):.0f}", refresh=False
                    )
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

    def _start(self) -> bool:
        """Prepare the output directory and resume or seed; True when resumed."""
        resumed = False
        if self.out is not None:
            run_dir.prepare(self.out, self.config.overwrite, self.is_main)
            self.ranks.barrier()
            resumed = (self.out / run_dir.LAST).exists()
        self._session_start = time.time()
        if resumed:
            self._resume()
            return True
        seed_everything(self.config.seed + self.rank)
        self.state.aggressive = self.config.aggressive_inference is not None
        if self._log_file is not None:
            self._log_file.remove()
            run_dir.write_config(self.out, self._config_info(), step=0)
        return False

    def fit(self) -> dict[str, Any]:
        """Train (or resume), select on ``config.selection_metric``, test; returns the run summary.

        The summary holds ``steps``, ``epochs`` (completed), ``skipped``, ``stopped_early``,
        ``inner_steps`` (the aggressive schedule's inference-network updates), ``select_on``
        (the validation metric that selected the best model), ``best_step``,
        ``best_epoch``, ``best_valid_nll`` and ``best_valid_ppl`` (NaN when the validation
        objective gives no ``nll``), ``valid`` (the best validation numbers), ``test``
        (numbers of the best model on ``test_data``, or None), ``resumed``, ``wall_time`` and
        ``output_dir``.  It is also written to ``finished.json``.
        """
        cfg = self.config
        resumed = self._start()
        st = self.state
        while not (st.stopped_early or st.epoch >= cfg.max_epochs or self._max_steps_reached()):
            self._train_epoch()
            if st.position >= len(self.train_data):  # the epoch is complete
                if st.last_eval_step != st.step:
                    self._validate()
                if st.aggressive or cfg.posterior_diagnostics:
                    self._check_posterior()
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
        best_nll = st.best_valid.get("nll", math.nan)
        summary = {
            "steps": st.step,
            "epochs": st.epoch,
            "skipped": st.skipped,
            "inner_steps": st.inner_steps,
            "stopped_early": st.stopped_early,
            "select_on": self.select_on,
            "best_step": st.best_step,
            "best_epoch": st.best_epoch,
            "best_valid_nll": best_nll,
            "best_valid_ppl": perplexity(best_nll, 1.0) if math.isfinite(best_nll) else best_nll,
            "valid": st.best_valid,
            "test": test,
            "resumed": resumed,
            "wall_time": self._wall(),
            "output_dir": str(self.out) if self.out else None,
        }
        if self.out is not None and self.is_main:
            run_dir.write_finished(self.out, summary)
        self.ranks.barrier()
        return summary
