"""The optimiser and the learning-rate scheduler a :class:`~latentnlp.training.TrainConfig` names."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from latentnlp.schedules import CosineDecay, LinearDecay, Schedule, Warmup
from latentnlp.training.config import TrainConfig

__all__ = ["lr_schedule", "make_optimizer", "make_scheduler"]


def make_optimizer(
    model: nn.Module, config: TrainConfig, parameters: Iterable[nn.Parameter] | None = None
) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over the parameters of ``model`` (or the given ``parameters``) that require a gradient."""
    params = [p for p in (model.parameters() if parameters is None else parameters) if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_schedule(config: TrainConfig, total_steps: int) -> Schedule | None:
    """The learning-rate multiplier of ``config.schedule`` over ``total_steps`` updates.

    ``none`` is :class:`~latentnlp.schedules.Warmup` (None without ``warmup_steps``), ``linear``
    :class:`~latentnlp.schedules.LinearDecay` and ``cosine``
    :class:`~latentnlp.schedules.CosineDecay` down to ``min_lr / lr``; a Schedule object is
    itself; ``plateau`` is no function of the step (None).
    """
    if isinstance(config.schedule, Schedule):
        return config.schedule
    if config.schedule == "plateau" or (config.schedule == "none" and not config.warmup_steps):
        return None
    if config.schedule == "none":
        return Warmup(config.warmup_steps)
    floor = config.min_lr / config.lr if config.lr > 0 else 0.0
    decay = LinearDecay if config.schedule == "linear" else CosineDecay
    return decay(total=total_steps, warmup=config.warmup_steps, floor=floor)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """``ReduceLROnPlateau`` for ``plateau``, a ``LambdaLR`` of :func:`lr_schedule` otherwise,
    None for a constant rate.  The trainer steps a ``LambdaLR`` after every update and a
    plateau scheduler after every validation."""
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=config.decay_factor,
            patience=config.decay_patience,
            threshold=0.0,
            min_lr=config.min_lr,
        )
    schedule = lr_schedule(config, total_steps)
    if schedule is None:
        return None
    # a plain function, not the object: LambdaLR would save the object's fields in its state dict
    # and a resume would restore them over the config's (e.g. the total of an extended run)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))
