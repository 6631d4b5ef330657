"""Optimiser with per-stage learning rates and weight-decay groups, and a per-step warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from finetune.models.freezing import HEAD, stage_parameters
from finetune.models.unfreezing import stage_lr_multipliers
from finetune.recipe import TrainConfig

__all__ = ["param_groups", "create_optimizer", "create_scheduler", "lr_factor"]


def param_groups(model: nn.Module, cfg: TrainConfig, include: Optional[set[str]] = None) -> list[dict]:
    """Two groups per stage (weight decay / none) at lr × the stage's multiplier; the head's come first.

    `include` names the parameters to optimise (default: those with requires_grad). Gradual
    unfreezing passes every parameter that will ever train: a frozen one has no gradient, so
    SGD and AdamW leave it alone until it is unfrozen.
    """
    named = dict(model.named_parameters())
    if include is None:
        include = {n for n, p in named.items() if p.requires_grad}
    multipliers = stage_lr_multipliers(model, cfg)
    stages = stage_parameters(model)
    # Head first, so param_groups[0]["lr"] is the base rate that the history logs.
    order = ([HEAD] + [s for s in reversed(stages) if s != HEAD]) if HEAD in stages else list(stages)
    groups = []
    for stage in order:
        decay, no_decay = [], []
        for name in stages[stage]:
            if name in include:
                # Biases and norm scales are 1-D: decaying them hurts and is the common convention to skip.
                (no_decay if named[name].ndim <= 1 else decay).append(named[name])
        for params, weight_decay in ((decay, cfg.weight_decay), (no_decay, 0.0)):
            if params:
                lr = cfg.lr * multipliers[stage]
                groups.append({"params": params, "weight_decay": weight_decay, "lr": lr, "stage": stage,
                               "lr_mult": multipliers[stage]})
    return groups


def create_optimizer(model: nn.Module, cfg: TrainConfig, include: Optional[set[str]] = None) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters (or `include`), one group per stage."""
    groups = param_groups(model, cfg, include)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base rate at `step`: linear warmup, then cosine decay (or constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """LambdaLR stepped once per optimiser step."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg.schedule)
    )
