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
from finetune.engine.resume import capture_all_ranks, check_resumable, restore_this_rank
from finetune.engine.step import autocast, grad_scaler, optimizer_step, to_device, train_precision
from finetune.errors import FinetuneError
from finetune.models.unfreezing import plan_unfreezing
from finetune.recipe import TrainConfig, is_better, worst_value

__all__ = ["EpochStats", "FitState", "Monitor", "RunFolder", "EpochHook", "EpochScorer", "Mixer", "TrainingParts",
           "train_one_epoch", "validate", "fit", "HISTORY_COLUMNS"]

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
    """What the loop needs of the run folder (finetune.run.RunDir): where checkpoints go, and every write."""

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


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: Optional[torch.amp.GradScaler],
    device: torch.device,
    cfg: TrainConfig,
    description: str,
    scorer: EpochScorer,
    mixer: Optional[Mixer] = None,
    ema: Optional[WeightEma] = None,
    on_step: Optional[Callable[[float], None]] = None,
) -> EpochStats:
    """One pass over the training data; optimiser, schedule and EMA step every cfg.accumulate batches.

    `on_step` gets the mean loss of the batches behind each optimiser step (the live loggers' per-step curve).
    Under DDP `model` is the wrapper: batches that only accumulate skip the gradient all-reduce, and the
    returned loss and accuracy are over every rank's samples.
    """
    model.train()
    precision = train_precision(cfg, device)
    total_loss, correct, seen = 0.0, 0, 0
    batches = len(loader)
    group_loss = 0.0
    optimizer.zero_grad(set_to_none=True)
    progress = tqdm(loader, desc=description, leave=False, disable=None if distributed.is_main() else True,
                    dynamic_ncols=True)
    for index, (images, labels) in enumerate(progress):
        images, labels = to_device(images, labels, device, cfg.channels_last)
        targets = labels
        if mixer is not None:
            images, targets = mixer(images, labels)
        # Each batch contributes loss/group so an accumulated step uses the mean gradient of its group
        # (the last group of an epoch may be shorter).
        group_start = index - index % cfg.accumulate
        group = min(cfg.accumulate, batches - group_start)
        stepping = index + 1 == group_start + group
        # DDP decides in the forward pass whether this backward all-reduces: not until the group's last batch.
        with distributed.sync_context(model, stepping), autocast(device, precision):
            logits = model(images)
            loss = criterion(logits, targets)
        value = loss.item()
        if not math.isfinite(value):
            # Stepping on a NaN/inf loss turns every weight into NaN; a checkpoint of those predicts nothing.
            raise FinetuneError(
                f"{description}, batch {index + 1}/{batches}: the loss is {value} (training diverged); lower "
                f"train.lr (now {optimizer.param_groups[0]['lr']:.3g}) or set train.grad_clip, e.g. 1.0. The last "
                "good checkpoints are kept"
            )
        scaled = loss / group
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        group_loss += scaled.item()
        if stepping:
            optimizer_step(model, optimizer, scaler, cfg.grad_clip)
            scheduler.step()
            if ema is not None:
                ema.update(distributed.unwrap(model))
            if on_step is not None:
                on_step(group_loss)
            group_loss = 0.0
        batch = labels.shape[0]
        total_loss += value * batch
        # With mixed targets, a prediction counts as right when it names the label with the larger share.
        correct += scorer.correct(logits, targets)
        seen += batch
        progress.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    total_loss, correct, seen = distributed.reduce_sums([total_loss, correct, seen])
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1))


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


def _restore(
    resume: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: Optional[torch.amp.GradScaler],
    ema: Optional[WeightEma],
    monitor: Monitor,
    train_loader: DataLoader,
    log: Callable[[str], None],
) -> tuple[int, list[dict]]:
    """Load a last.pt payload into the training objects; returns (next epoch, history so far)."""
    state = resume["resume"]
    if (state["ema_updates"] is not None) != (ema is not None):
        raise FinetuneError("train.ema differs from the run being resumed; resume with the run's own setting")
    live = state["model_state"] if state["model_state"] is not None else resume["model_state"]
    model.load_state_dict(live)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_state_dict({"model": resume["model_state"], "updates": state["ema_updates"]})
    for key, value in state["monitor"].items():
        if key != "metric":
            setattr(monitor, key, value)
    restore_this_rank(state, train_loader, log)
    return int(resume["epoch"]) + 1, [dict(row) for row in state["history"]]


def fit(
    model: nn.Module,
    parts: TrainingParts,
    cfg: TrainConfig,
    run: RunFolder,
    device: torch.device,
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
    """
    train_loader, val_loader, criterion = parts.train_loader, parts.val_loader, parts.criterion
    scorer, mixer, feature_cache = parts.scorer, parts.mixer, parts.feature_cache
    steps_per_epoch = math.ceil(len(train_loader) / cfg.accumulate)
    # Parameters that a later epoch unfreezes join the optimizer now; frozen, they get no gradient.
    unfreezing = plan_unfreezing(model, cfg)
    optimizer = create_optimizer(model, cfg, unfreezing.ever_trainable)
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = grad_scaler(cfg, device)
    ema = WeightEma(model, cfg.ema_decay) if cfg.ema else None
    eval_model = ema.module if ema is not None else model
    monitor = Monitor(cfg.monitor)
    first_epoch, history = 1, []
    if resume is not None:
        check_resumable(resume, cfg)
        first_epoch, history = _restore(resume, model, optimizer, scheduler, scaler, ema, monitor,
                                          train_loader, log)
        # Rows the crash left after the last checkpoint would otherwise appear twice.
        run.rewrite_history(history)
        log(f"resuming {run.path} at epoch {first_epoch}/{cfg.epochs}")
    epoch, saved_epoch = first_epoch, first_epoch - 1
    # One lr column per stage when the stages' multipliers differ: fixed for the run, so the header stays valid.
    per_stage = len({group.get("lr_mult", 1.0) for group in optimizer.param_groups}) > 1
    train_model = model
    try:
        for epoch in range(first_epoch, cfg.epochs + 1):
            start = time.perf_counter()
            trainable_now = unfreezing.apply(model, epoch)
            if trainable_now:
                log(f"epoch {epoch}: trainable stages now {', '.join(trainable_now)}")
            if trainable_now or train_model is model:
                train_model = distributed.wrap(model, device)  # DDP tracks only what was trainable when built
            lr = base_lr(optimizer)
            rates = stage_lrs(optimizer)
            steps = itertools.count((epoch - 1) * steps_per_epoch + 1)  # optimiser steps since the run began

            def on_step(loss: float) -> None:
                run.log_step({"step": next(steps), "train_loss": loss, "lr": base_lr(optimizer)})

            cached = feature_cache is not None and head_only(unfreezing.trainable_at(epoch))
            epoch_loaders, epoch_cfg = (train_loader, val_loader), cfg
            if cached:
                epoch_loaders = feature_cache.loaders(model, device, cfg, log)
                epoch_cfg = replace(cfg, channels_last=False)  # feature batches are (N, C), not images
            if hasattr(epoch_loaders[0].sampler, "set_epoch"):
                # The epoch's order: the same on every rank, and on resume.
                epoch_loaders[0].sampler.set_epoch(epoch)
            with features_in(*{id(m): m for m in (model, eval_model)}.values()) if cached else nullcontext():
                train = train_one_epoch(
                    train_model, epoch_loaders[0], criterion, optimizer, scheduler, scaler, device, epoch_cfg,
                    f"epoch {epoch}/{cfg.epochs}", scorer, mixer, ema, on_step,
                )
                distributed.sync_buffers(model, eval_model)  # BN statistics as rank 0 has them, before validating
                val = validate(eval_model, epoch_loaders[1], criterion, device, epoch_cfg, scorer)
            if not math.isfinite(val.loss):  # the epoch's last step broke the weights: save nothing of them
                raise FinetuneError(
                    f"epoch {epoch}/{cfg.epochs}: the validation loss is {val.loss} (training diverged in the "
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
            if per_stage:
                row.update({f"lr_{stage}": f"{rate:.6g}" for stage, rate in rates.items()})
            history.append(row)
            payload = {
                **checkpoint_extras,
                "model_state": eval_model.state_dict(),
                "epoch": epoch,
                "metrics": {"val_acc": val.accuracy, "val_loss": val.loss, **val.extra, "ema": ema is not None},
            }
            if monitor.update(epoch, val):
                run.save_checkpoint(run.best, payload)
            run.save_checkpoint(run.last, {**payload, "resume": {
                "model_state": model.state_dict() if ema is not None else None,  # else it is model_state
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema_updates": ema.updates if ema is not None else None,
                "monitor": monitor.state_dict(),
                "history": history,
                **capture_all_ranks(train_loader),
            }})
            saved_epoch = epoch
            run.plot_curves(history)
            # The row goes in last: a row in history.csv means its epoch's checkpoint and curves are on disk.
            run.append_history(row)
            log(
                f"epoch {epoch}/{cfg.epochs}  train loss {train.loss:.4f} acc {train.accuracy:.4f}  "
                f"val loss {val.loss:.4f} acc {val.accuracy:.4f}"
                + "".join(f" {name[4:]} {value:.4f}" for name, value in val.extra.items())
                + f"  lr {lr:.2e}  {row['seconds']:.1f}s"
            )
            # Every rank saw the same reduced metrics; rank 0's decision is still the one all ranks follow.
            if distributed.broadcast_object(monitor.exhausted(cfg.patience)):
                log(f"early stop: {cfg.monitor} has not improved for {cfg.patience} epoch(s); "
                    f"best {monitor.best:.4f} at epoch {monitor.best_epoch}")
                break
            if distributed.broadcast_object(on_epoch is not None and on_epoch(row)):
                log(f"stopped after epoch {epoch} by the caller (e.g. a tuning trial pruned); "
                    f"best {monitor.best:.4f} at epoch {monitor.best_epoch}")
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
    return FitState(run.best, run.last, monitor.best_accuracy, monitor.best_epoch, history)
