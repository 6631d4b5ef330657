"""Optimiser with per-stage learning rates and weight-decay groups, and a per-step warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.models.freezing import HEAD, require_stages, stage_parameters
from finetune.config.recipe import TrainConfig

__all__ = ["stage_lr_multipliers", "param_groups", "base_lr", "stage_lrs", "create_optimizer",
           "create_scheduler", "lr_factor"]


def stage_lr_multipliers(model: nn.Module, cfg: TrainConfig) -> dict[str, float]:
    """Learning-rate multiplier per stage (and 'head'): 1.0 unless lr_mult or layer_decay says otherwise.

    `train.fine_tune` adds no spread of its own: rates falling from the head to the stem (fastai's
    lr/100 at the stem, or lr/10) scored about 3 points below one rate for every stage in the ablation
    (benchmarks/README.md), on the demo's stages and on the whole network alike.
    """
    stages = list(stage_parameters(model))
    body = [s for s in stages if s != HEAD]
    multipliers = {s: 1.0 for s in stages}
    if cfg.lr_mult:
        require_stages(model, "train.lr_mult")
        unknown = [s for s in cfg.lr_mult if s not in multipliers]
        if unknown:
            raise FinetuneError(
                f"unknown stage '{unknown[0]}' in train.lr_mult; stages of this backbone: {', '.join(stages)}"
            )
        multipliers.update(cfg.lr_mult)
        return multipliers
    decay = cfg.layer_decay
    if decay is not None:
        require_stages(model, "train.layer_decay")
        # The stage just below the head gets decay, the one below it decay², ... the stem the smallest.
        for depth, stage in enumerate(reversed(body), start=1):
            multipliers[stage] = decay**depth
    return multipliers


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
    # Head first, then towards the stem: the order `finetune inspect` and the logs show.
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


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The scheduled rate train.lr stands for now (any group's rate over its stage multiplier)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_mult", 1.0)


def stage_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate of each stage now (its groups share one), head first."""
    return {group.get("stage", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)}


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
