"""The training loop: train_one_epoch, validate, fit — read top to bottom."""

from __future__ import annotations

import itertools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from finetune.engine import distributed
from finetune.engine.ema import WeightEma
from finetune.engine.features import FeatureCache, features_in, head_only
from finetune.engine.optim import base_lr, create_optimizer, create_scheduler, stage_lrs
from finetune.engine.progress import Progress
from finetune.engine.resume import capture_all_ranks, check_resumable, restore_this_rank
from finetune.engine.step import autocast, grad_scaler, optimizer_step, to_device, train_precision
from finetune.engine.threads import ThreadGovernor
from finetune.errors import FinetuneError
from finetune.models.unfreezing import UnfreezePlan, describe_beyond, plan_unfreezing
from finetune.config.recipe import TrainConfig, is_better, worst_value

__all__ = ["EpochStats", "FitState", "Monitor", "RunFolder", "EpochHook", "EpochScorer", "Mixer", "TrainingParts",
           "OptimState", "train_one_epoch", "validate", "fit", "HISTORY_COLUMNS"]

# With discriminative rates (layer_decay, lr_mult, fine_tune) each stage's rate follows as lr_<stage>.
HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]

# Mixes batches and their targets as the task says (class indices to soft one-hot, or multi-hot).
Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class EpochScorer(Protocol):
    """The task's view of a pass: correct predictions per batch, and metrics over the whole pass."""

    metrics: tuple[str, ...]  # the names `score` returns (history columns beside val_loss / val_acc)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> int: ...

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]: ...


@dataclass
class TrainingParts:
    """What `fit` trains with: the loaders, the task's loss, mixer and scorer, and an optional feature cache."""

    train_loader: DataLoader
    val_loader: DataLoader
    criterion: nn.Module
    scorer: EpochScorer
    mixer: Optional[Mixer] = None
    feature_cache: Optional[FeatureCache] = None

# Called with each epoch's history row once it is saved; returning True stops training there (tune's pruner).
EpochHook = Callable[[dict], bool]


class RunFolder(Protocol):
    """What the loop needs of the run folder (finetune.outputs.run_dir.RunDir): where checkpoints go, and every write."""

    path: Path
    best: Path
    last: Path

    def save_checkpoint(self, path: Path, payload: dict) -> None: ...

    def append_history(self, row: dict) -> None: ...

    def log_step(self, values: dict) -> None: ...

    def rewrite_history(self, rows: Sequence[dict]) -> None: ...

    def plot_curves(self, history: Sequence[dict]) -> None: ...


@dataclass
class EpochStats:
    """Mean loss and accuracy over one pass (multi-label: exact-match accuracy, and mAP/F1 in `extra`)."""

    loss: float
    accuracy: float
    extra: dict = field(default_factory=dict)


@dataclass
class FitState:
    """What `fit` returns: where the checkpoints are and the best validation accuracy."""

    best_path: Path
    last_path: Path
    best_accuracy: float
    best_epoch: int
    history: list[dict]


@dataclass
class Monitor:
    """Tracks the best epoch by `metric` (its direction from recipe.METRICS) and epochs since it improved."""

    metric: str = "val_acc"
    best: Optional[float] = None  # None: no epoch yet (the metric's worst value)
    best_epoch: int = 0
    best_accuracy: float = -1.0
    bad_epochs: int = 0

    def __post_init__(self) -> None:
        if self.best is None:
            self.best = worst_value(self.metric)

    def update(self, epoch: int, val: EpochStats) -> bool:
        """Record an epoch's validation result; True when it is the new best."""
        value = {"val_acc": val.accuracy, "val_loss": val.loss, **val.extra}[self.metric]
        improved = is_better(self.metric, value, self.best)
        if improved:
            self.best, self.best_epoch, self.best_accuracy, self.bad_epochs = value, epoch, val.accuracy, 0
        else:
            self.bad_epochs += 1
        return improved

    def exhausted(self, patience: Optional[int]) -> bool:
        """True when `patience` epochs in a row brought no improvement."""
        return patience is not None and self.bad_epochs >= patience

    def state_dict(self) -> dict:
        """Plain numbers, for last.pt."""
        return {"metric": self.metric, "best": self.best, "best_epoch": self.best_epoch,
                "best_accuracy": self.best_accuracy, "bad_epochs": self.bad_epochs}


@dataclass
class OptimState:
    """What an optimiser step moves besides the weights: the optimiser, its schedule, the fp16 loss scaler, the EMA."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Optional[torch.amp.GradScaler] = None
    ema: Optional[WeightEma] = None


def train_one_epoch(
    model: nn.Module,
    parts: TrainingParts,
    optim: OptimState,
    device: torch.device,
    cfg: TrainConfig,
    description: str,
    on_step: Optional[Callable[[float], None]] = None,
    loader: Optional[DataLoader] = None,
) -> EpochStats:
    """One pass over the training data; optimiser, schedule and EMA step every cfg.accumulate batches.

    The loss, mixer and scorer come from `parts`; the batches from `loader` (default `parts.train_loader`;
    the feature cache's when only the head trains). `on_step` gets the mean loss of the batches behind each
    optimiser step (the live loggers' per-step curve).
    Under DDP `model` is the wrapper: batches that only accumulate skip the gradient all-reduce, and the
    returned loss and accuracy are over every rank's samples.
    """
    loader = parts.train_loader if loader is None else loader
    model.train()
    precision = train_precision(cfg, device)
    total_loss, correct, seen = 0.0, 0, 0
    batches = len(loader)
    group_loss = 0.0
    optim.optimizer.zero_grad(set_to_none=True)
    progress = tqdm(loader, desc=description, leave=False, disable=None if distributed.is_main() else True,
                    dynamic_ncols=True)
    for index, (images, labels) in enumerate(progress):
        images, labels = to_device(images, labels, device, cfg.channels_last)
        targets = labels
        if parts.mixer is not None:
            images, targets = parts.mixer(images, labels)
        # Each batch contributes loss/group so an accumulated step uses the mean gradient of its group
        # (the last group of an epoch may be shorter).
        group_start = index - index % cfg.accumulate
        group = min(cfg.accumulate, batches - group_start)
        stepping = index + 1 == group_start + group
        # DDP decides in the forward pass whether this backward all-reduces: not until the group's last batch.
        with distributed.sync_context(model, stepping), autocast(device, precision):
            logits = model(images)
            loss = parts.criterion(logits, targets)
        value = loss.item()
        if not math.isfinite(value):
            raise _diverged(f"{description}, batch {index + 1}/{batches}", value, optim.optimizer)
        scaled = loss / group
        (optim.scaler.scale(scaled) if optim.scaler is not None else scaled).backward()
        group_loss += scaled.item()
        if stepping:
            _step(model, optim, cfg)
            if on_step is not None:
                on_step(group_loss)
            group_loss = 0.0
        batch = labels.shape[0]
        total_loss += value * batch
        # With mixed targets, a prediction counts as right when it names the label with the larger share.
        correct += parts.scorer.correct(logits, targets)
        seen += batch
        progress.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    total_loss, correct, seen = distributed.reduce_sums([total_loss, correct, seen])
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1))


def _diverged(where: str, value: float, optimizer: torch.optim.Optimizer) -> FinetuneError:
    # Stepping on a NaN/inf loss turns every weight into NaN; a checkpoint of those predicts nothing.
    return FinetuneError(
        f"{where}: the loss is {value} (training diverged); lower "
        f"train.lr (now {optimizer.param_groups[0]['lr']:.3g}) or set train.grad_clip, e.g. 1.0. The last "
        "good checkpoints are kept"
    )


def _step(model: nn.Module, optim: OptimState, cfg: TrainConfig) -> None:
    """One optimiser step on the accumulated gradients, then the schedule's step and the EMA's update."""
    optimizer_step(model, optim.optimizer, optim.scaler, cfg.grad_clip)
    optim.scheduler.step()
    if optim.ema is not None:
        optim.ema.update(distributed.unwrap(model))


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device, cfg: TrainConfig,
             scorer: EpochScorer) -> EpochStats:
    """Loss and accuracy on the validation data (under DDP: each rank's share, summed over ranks), and the
    scorer's metrics over the whole pass (under DDP: every rank's outputs gathered in rank order, as one process
    would see them)."""
    model.eval()
    precision = train_precision(cfg, device)
    total_loss, correct, seen = 0.0, 0, 0
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for images, labels in loader:
        images, labels = to_device(images, labels, device, cfg.channels_last)
        with autocast(device, precision):
            logits = model(images)
            loss = criterion(logits.float(), labels)
        total_loss += loss.item() * labels.shape[0]
        correct += scorer.correct(logits, labels)
        if scorer.metrics:
            outputs.append((logits.float().cpu(), labels.cpu()))
        seen += labels.shape[0]
    total_loss, correct, seen = distributed.reduce_sums([total_loss, correct, seen])
    extra: dict[str, float] = {}
    if scorer.metrics:
        # Metrics over the whole pass (mAP) do not add up over shares: score every rank's outputs together.
        parts = [part for rank_parts in distributed.gather_objects(outputs) for part in rank_parts]
        if parts:
            extra = scorer.score(*(torch.cat(column) for column in zip(*parts)))
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), extra)


@dataclass
class _Loop:
    """One `fit` call: what it was given and what it builds once (optimisation state, unfreezing plan, monitor)."""

    model: nn.Module
    parts: TrainingParts
    cfg: TrainConfig
    run: RunFolder
    device: torch.device
    log: Callable[[str], None]
    unfreezing: UnfreezePlan
    optim: OptimState
    monitor: Monitor
    steps_per_epoch: int
    first_epoch: int = 1
    history: list[dict] = field(default_factory=list)
    per_stage: bool = False  # one lr column per stage
    train_model: Optional[nn.Module] = None  # the model, or the DDP wrapper it trains through
    governor: Optional[ThreadGovernor] = None  # automatic threads on a CPU: the faster of the budget's and one

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved: the EMA's averaged copy when train.ema is on, else the model."""
        return self.optim.ema.module if self.optim.ema is not None else self.model


def _prepare(model: nn.Module, parts: TrainingParts, cfg: TrainConfig, run: RunFolder, device: torch.device,
             log: Callable[[str], None], resume: Optional[dict]) -> _Loop:
    """The optimiser, schedule, scaler, EMA and monitor for this run, restored from a last.pt payload if given."""
    steps_per_epoch = math.ceil(len(parts.train_loader) / cfg.accumulate)
    # Parameters that a later epoch unfreezes join the optimizer now; frozen, they get no gradient.
    unfreezing = plan_unfreezing(model, cfg)
    if describe_beyond(unfreezing, cfg) and resume is None:
        log(describe_beyond(unfreezing, cfg))
    optimizer = create_optimizer(model, cfg, unfreezing.ever_trainable)
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = grad_scaler(cfg, device)
    ema = WeightEma(model, cfg.ema_decay) if cfg.ema else None
    loop = _Loop(model, parts, cfg, run, device, log, unfreezing, OptimState(optimizer, scheduler, scaler, ema),
                 Monitor(cfg.monitor), steps_per_epoch, train_model=model)
    if device.type == "cpu" and cfg.threads is None and torch.get_num_threads() > 1:
        loop.governor = ThreadGovernor(torch.get_num_threads(), log if distributed.is_main() else None)
    if resume is not None:
        check_resumable(resume, cfg)
        _restore(loop, resume)
        # Rows the crash left after the last checkpoint would otherwise appear twice.
        run.rewrite_history(loop.history)
        log(f"resuming {run.path} at epoch {loop.first_epoch}/{cfg.epochs}")
    # One lr column per stage when the stages' multipliers differ: fixed for the run, so the header stays valid.
    loop.per_stage = len({group.get("lr_mult", 1.0) for group in optimizer.param_groups}) > 1
    return loop


def _restore(loop: _Loop, resume: dict) -> None:
    """Load a last.pt payload into the training objects; sets the next epoch and the history so far."""
    state, optim = resume["resume"], loop.optim
    if (state["ema_updates"] is not None) != (optim.ema is not None):
        raise FinetuneError("train.ema differs from the run being resumed; resume with the run's own setting")
    live = state["model_state"] if state["model_state"] is not None else resume["model_state"]
    loop.model.load_state_dict(live)
    optim.optimizer.load_state_dict(state["optimizer"])
    optim.scheduler.load_state_dict(state["scheduler"])
    if optim.scaler is not None and state["scaler"] is not None:
        optim.scaler.load_state_dict(state["scaler"])
    if optim.ema is not None:
        optim.ema.load_state_dict({"model": resume["model_state"], "updates": state["ema_updates"]})
    for key, value in state["monitor"].items():
        if key != "metric":
            setattr(loop.monitor, key, value)
    restore_this_rank(state, loop.parts.train_loader, loop.log)
    loop.first_epoch, loop.history = int(resume["epoch"]) + 1, [dict(row) for row in state["history"]]


def _unfreeze(loop: _Loop, epoch: int) -> None:
    """Apply the epoch's unfreezing; rebuild the DDP wrapper, which tracks only what was trainable when built."""
    trainable_now = loop.unfreezing.apply(loop.model, epoch)
    if trainable_now:
        loop.log(f"epoch {epoch}: trainable stages now {', '.join(trainable_now)}")
    if trainable_now or loop.train_model is loop.model:
        loop.train_model = distributed.wrap(loop.model, loop.device)


def _passes(loop: _Loop, epoch: int) -> tuple[EpochStats, EpochStats]:
    """The epoch's training pass and validation pass (on cached backbone features when only the head trains)."""
    model, parts, cfg, device, optimizer = loop.model, loop.parts, loop.cfg, loop.device, loop.optim.optimizer
    steps = itertools.count((epoch - 1) * loop.steps_per_epoch + 1)  # optimiser steps since the run began

    if loop.governor is not None:
        loop.governor.epoch_start()

    cached = parts.feature_cache is not None and head_only(loop.unfreezing.trainable_at(epoch))
    epoch_loaders, epoch_cfg = (parts.train_loader, parts.val_loader), cfg
    if cached:
        epoch_loaders = parts.feature_cache.loaders(model, device, cfg, loop.log)
        epoch_cfg = replace(cfg, channels_last=False)  # feature batches are (N, C), not images
    progress = _progress(loop, epoch, epoch_loaders[0])

    def on_step(loss: float) -> None:
        loop.run.log_step({"step": next(steps), "train_loss": loss, "lr": base_lr(optimizer)})
        progress.step()
        if loop.governor is not None:
            loop.governor.step()

    if hasattr(epoch_loaders[0].sampler, "set_epoch"):
        # The epoch's order: the same on every rank, and on resume.
        epoch_loaders[0].sampler.set_epoch(epoch)
    eval_model = loop.eval_model
    with features_in(*{id(m): m for m in (model, eval_model)}.values()) if cached else nullcontext():
        train = train_one_epoch(loop.train_model, parts, loop.optim, device, epoch_cfg, f"epoch {epoch}/{cfg.epochs}",
                                on_step, loader=epoch_loaders[0])
        distributed.sync_buffers(model, eval_model)  # BN statistics as rank 0 has them, before validating
        val = validate(eval_model, epoch_loaders[1], parts.criterion, device, epoch_cfg, parts.scorer)
    return train, val


def _progress(loop: _Loop, epoch: int, loader: DataLoader) -> Progress:
    """The epoch's progress lines (main process only; the first step's line once per run)."""
    per_batch = loader.batch_size or getattr(loader.batch_sampler, "batch_size", 1) or 1
    images_per_step = per_batch * loop.cfg.accumulate * distributed.world_size()
    log = loop.log if distributed.is_main() else (lambda line: None)
    return Progress(log, loop.cfg.progress_every, images_per_step, loop.steps_per_epoch,
                    f"epoch {epoch}/{loop.cfg.epochs}", first_of_run=epoch == loop.first_epoch)


def _history_row(loop: _Loop, epoch: int, train: EpochStats, val: EpochStats, lr: float, rates: dict,
                 start: float) -> dict:
    """The epoch's history row, appended to the run's history; refused when validation shows the run diverged."""
    if not math.isfinite(val.loss):  # the epoch's last step broke the weights: save nothing of them
        raise FinetuneError(
            f"epoch {epoch}/{loop.cfg.epochs}: the validation loss is {val.loss} (training diverged in the "
            f"epoch's last step); lower train.lr (now {lr:.3g}) or set train.grad_clip, e.g. 1.0"
        )
    row = {
        "epoch": epoch,
        "train_loss": round(train.loss, 6),
        "train_acc": round(train.accuracy, 6),
        "val_loss": round(val.loss, 6),
        "val_acc": round(val.accuracy, 6),
        **{name: round(value, 6) for name, value in val.extra.items()},
        "lr": f"{lr:.6g}",
        "seconds": round(time.perf_counter() - start, 2),
    }
    if loop.per_stage:
        row.update({f"lr_{stage}": f"{rate:.6g}" for stage, rate in rates.items()})
    loop.history.append(row)
    return row


def _save_checkpoints(loop: _Loop, epoch: int, val: EpochStats, checkpoint_extras: dict) -> None:
    """best.pt when the monitored metric improved; last.pt always, with everything a resume needs."""
    optim = loop.optim
    payload = {
        **checkpoint_extras,
        "model_state": loop.eval_model.state_dict(),
        "epoch": epoch,
        "metrics": {"val_acc": val.accuracy, "val_loss": val.loss, **val.extra, "ema": optim.ema is not None},
    }
    if loop.monitor.update(epoch, val):
        loop.run.save_checkpoint(loop.run.best, payload)
    loop.run.save_checkpoint(loop.run.last, {**payload, "resume": {
        "model_state": loop.model.state_dict() if optim.ema is not None else None,  # else it is model_state
        "optimizer": optim.optimizer.state_dict(),
        "scheduler": optim.scheduler.state_dict(),
        "scaler": optim.scaler.state_dict() if optim.scaler is not None else None,
        "ema_updates": optim.ema.updates if optim.ema is not None else None,
        "monitor": loop.monitor.state_dict(),
        "history": loop.history,
        **capture_all_ranks(loop.parts.train_loader),
    }})


def _record(loop: _Loop, epoch: int, row: dict, train: EpochStats, val: EpochStats, lr: float) -> None:
    """The curves, then the history row, then the console line."""
    loop.run.plot_curves(loop.history)
    # The row goes in last: a row in history.csv means its epoch's checkpoint and curves are on disk.
    loop.run.append_history(row)
    loop.log(
        f"epoch {epoch}/{loop.cfg.epochs}  train loss {train.loss:.4f} acc {train.accuracy:.4f}  "
        f"val loss {val.loss:.4f} acc {val.accuracy:.4f}"
        + "".join(f" {name[4:]} {value:.4f}" for name, value in val.extra.items())
        + f"  lr {lr:.2e}  {row['seconds']:.1f}s"
    )


def _stops(loop: _Loop, epoch: int, row: dict, on_epoch: Optional[EpochHook]) -> bool:
    """True when patience ran out or the caller's hook asked to stop."""
    cfg, monitor = loop.cfg, loop.monitor
    # Every rank saw the same reduced metrics; rank 0's decision is still the one all ranks follow.
    if distributed.broadcast_object(monitor.exhausted(cfg.patience)):
        loop.log(f"early stop: {cfg.monitor} has not improved for {cfg.patience} epoch(s); "
                 f"best {monitor.best:.4f} at epoch {monitor.best_epoch}")
        return True
    if distributed.broadcast_object(on_epoch is not None and on_epoch(row)):
        loop.log(f"stopped after epoch {epoch} by the caller (e.g. a tuning trial pruned); "
                 f"best {monitor.best:.4f} at epoch {monitor.best_epoch}")
        return True
    return False


def fit(
    model: nn.Module,
    parts: TrainingParts,
    cfg: TrainConfig,
    run: RunFolder,
    checkpoint_extras: dict,
    log: Callable[[str], None] = print,
    resume: Optional[dict] = None,
    on_epoch: Optional[EpochHook] = None,
) -> FitState:
    """Train up to cfg.epochs (fewer with early stopping), continuing from a last.pt payload if given.

    Every epoch writes last.pt (with the state to resume) and the curves, then its history row;
    best.pt is written when cfg.monitor improves. With EMA on, the averaged weights are validated
    and saved. All of it goes through `run`, which decides whether this process writes.
    `on_epoch` sees each saved row and may stop training early, like patience does.
    Under torchrun every rank runs this with its own loaders' shares; `model` stays the plain model
    (what is saved) and trains through a DDP wrapper, rebuilt when the trainable set changes.
    With `parts.feature_cache`, epochs that train the head only run it on backbone features computed once.
    The model trains on the device it is on.
    """
    device = next(model.parameters()).device
    loop = _prepare(model, parts, cfg, run, device, log, resume)
    epoch, saved_epoch = loop.first_epoch, loop.first_epoch - 1
    try:
        for epoch in range(loop.first_epoch, cfg.epochs + 1):
            start = time.perf_counter()
            _unfreeze(loop, epoch)
            lr, rates = base_lr(loop.optim.optimizer), stage_lrs(loop.optim.optimizer)
            train, val = _passes(loop, epoch)
            row = _history_row(loop, epoch, train, val, lr, rates, start)
            _save_checkpoints(loop, epoch, val, checkpoint_extras)
            saved_epoch = epoch
            _record(loop, epoch, row, train, val, lr)
            if _stops(loop, epoch, row, on_epoch):
                break
    except (torch.OutOfMemoryError, MemoryError) as err:
        raise FinetuneError(
            f"out of memory in epoch {epoch} ({type(err).__name__}); lower data.batch_size or data.image_size "
            "(or use train.accumulate to keep the effective batch)"
        ) from None
    except KeyboardInterrupt:
        if saved_epoch > 0:
            log(f"interrupted in epoch {epoch}; {run.last} holds epoch {saved_epoch}. "
                f"Continue with: finetune train --resume {run.path}")
        else:
            log("interrupted before the first epoch finished; nothing was saved to resume from")
        raise
    return FitState(run.best, run.last, loop.monitor.best_accuracy, loop.monitor.best_epoch, loop.history)
