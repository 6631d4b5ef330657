"""Learning-rate range test: raise the rate exponentially batch by batch and watch the loss."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.engine.optim import create_optimizer
from finetune.engine.step import autocast, grad_scaler, optimizer_step, to_device, train_precision
from finetune.errors import FinetuneError
from finetune.config.recipe import TrainConfig

__all__ = ["LrFindResult", "LrSweep", "lr_range_test", "suggest_lr"]


@dataclass
class LrFindResult:
    """The sweep (rates and smoothed losses) and the rates it suggests for train.lr."""

    lrs: list[float]
    losses: list[float]  # exponentially smoothed, bias-corrected
    raw_losses: list[float]
    suggestion: float  # what lr-find prints for train.lr: a tenth of the rate with the lowest smoothed loss
    steepest: Optional[float]  # middle of the window where the smoothed loss falls fastest (None: none falls)
    diverged: bool


@dataclass(frozen=True)
class LrSweep:
    """How the rate rises: from start_lr to end_lr over `steps` batches; when the smoothed loss counts as diverged."""

    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 100
    smoothing: float = 0.98  # of the loss's exponential moving average
    diverge_factor: float = 4.0  # stop once the smoothed loss exceeds this times its minimum


def _batches(loader: DataLoader) -> Iterator:
    while True:  # a small dataset is reshuffled and reused until the sweep is done
        yield from loader


def suggest_lr(lrs: list[float], losses: list[float]) -> tuple[float, Optional[float]]:
    """(suggestion, steepest-descent rate) for a smoothed sweep.

    The suggestion is the min-loss rate / 10 (fastai's `lr_min`): the steepest-descent point is
    also reported, but on short or noisy sweeps it often lands on noise.
    """
    values = np.asarray(losses, dtype=np.float64)
    log_lrs = np.log10(np.asarray(lrs, dtype=np.float64))
    best = int(np.argmin(values))
    # The first points carry little signal (the smoothing is still warming up), and past the
    # minimum the loss is on its way to diverging: look between them, over a window of ~10% of the
    # sweep so that one noisy batch does not decide.
    skip, window = max(1, len(values) // 10), max(1, len(values) // 10)
    steepest = None
    if best - window > skip:
        starts = np.arange(skip, best - window + 1)
        slopes = (values[starts + window] - values[starts]) / (log_lrs[starts + window] - log_lrs[starts])
        start = int(starts[np.argmin(slopes)])
        if slopes.min() < 0:
            steepest = float(10 ** ((log_lrs[start] + log_lrs[start + window]) / 2))
    return lrs[best] / 10, steepest


def lr_range_test(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    sweep: LrSweep = LrSweep(),
) -> LrFindResult:
    """Train sweep.steps batches, the rate rising from sweep.start_lr to sweep.end_lr; the weights are restored after.

    Stops early once the smoothed loss exceeds sweep.diverge_factor times its minimum (or is not finite).
    Rates are those of `train.lr`; parameter groups with their own rates are scaled alongside.
    """
    start_lr, end_lr, steps, smoothing = sweep.start_lr, sweep.end_lr, sweep.steps, sweep.smoothing
    saved = copy.deepcopy(model.state_dict())
    optimizer = create_optimizer(model, cfg)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    scaler = grad_scaler(cfg, device)
    precision = train_precision(cfg, device)
    gamma = (end_lr / start_lr) ** (1.0 / max(1, steps - 1))
    lrs, losses, raw = [], [], []
    average, lowest, diverged = 0.0, math.inf, False
    model.train()
    batches = _batches(loader)
    try:
        for step in range(steps):
            lr = start_lr * gamma**step
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr / cfg.lr
            images, labels = to_device(*next(batches), device, cfg.channels_last)
            with autocast(device, precision):
                loss = criterion(model(images), labels)
            value = loss.item()
            if not math.isfinite(value):
                diverged = True
                break
            (scaler.scale(loss) if scaler is not None else loss).backward()
            optimizer_step(model, optimizer, scaler, cfg.grad_clip)
            average = smoothing * average + (1 - smoothing) * value
            smoothed = average / (1 - smoothing ** (step + 1))
            lrs.append(lr)
            losses.append(smoothed)
            raw.append(value)
            lowest = min(lowest, smoothed)
            if step > 0 and smoothed > sweep.diverge_factor * lowest:
                diverged = True
                break
    finally:
        model.load_state_dict(saved)
    if not lrs:
        raise FinetuneError("lr-find: the loss was not finite on the first batch even at the lowest rate; "
                            "check the images and labels (try `finetune augment` to look at them)")
    suggestion, steepest = suggest_lr(lrs, losses)
    return LrFindResult(lrs, losses, raw, suggestion, steepest, diverged)
