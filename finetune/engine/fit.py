"""The training loop: train_one_epoch, validate, fit — read top to bottom."""

from __future__ import annotations

import csv
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from finetune.engine.checkpoint import save_checkpoint
from finetune.engine.optim import create_optimizer, create_scheduler
from finetune.recipe import TrainConfig

__all__ = ["EpochStats", "FitState", "train_one_epoch", "validate", "fit", "HISTORY_COLUMNS"]

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


@dataclass
class EpochStats:
    loss: float
    accuracy: float


@dataclass
class FitState:
    """What `fit` returns: where the checkpoints are and the best validation accuracy."""

    best_path: Path
    last_path: Path
    best_accuracy: float
    best_epoch: int
    history: list[dict]


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


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
) -> EpochStats:
    """One pass over the training data; the schedule steps every batch."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    progress = tqdm(loader, desc=description, leave=False, disable=None, dynamic_ncols=True)
    for images, labels in progress:
        images, labels = _to_device(images, labels, device, cfg.channels_last)
        with _autocast(device, cfg.amp):
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        batch = labels.shape[0]
        total_loss += loss.item() * batch
        correct += (logits.argmax(1) == labels).sum().item()
        seen += batch
        progress.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1))


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device, cfg: TrainConfig) -> EpochStats:
    """Loss and accuracy on the validation data."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, cfg.channels_last)
        with _autocast(device, cfg.amp):
            logits = model(images)
            loss = criterion(logits.float(), labels)
        total_loss += loss.item() * labels.shape[0]
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.shape[0]
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1))


def _append_history(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    criterion: nn.Module,
    cfg: TrainConfig,
    run_dir: Path,
    device: torch.device,
    checkpoint_extras: dict,
    on_epoch_end: Optional[Callable[[list[dict]], None]] = None,
    log: Callable[[str], None] = print,
) -> FitState:
    """Train for cfg.epochs; write history.csv, last.pt every epoch and best.pt on improvement."""
    optimizer = create_optimizer(model, cfg)
    scheduler = create_scheduler(optimizer, cfg, len(train_loader))
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    history: list[dict] = []
    best_accuracy, best_epoch = -1.0, 0
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(
            model, train_loader, criterion, optimizer, scheduler, scaler, device, cfg, f"epoch {epoch}/{cfg.epochs}"
        )
        val = validate(model, val_loader, criterion, device, cfg)
        row = {
            "epoch": epoch,
            "train_loss": round(train.loss, 6),
            "train_acc": round(train.accuracy, 6),
            "val_loss": round(val.loss, 6),
            "val_acc": round(val.accuracy, 6),
            "lr": f"{lr:.6g}",
            "seconds": round(time.perf_counter() - start, 2),
        }
        history.append(row)
        _append_history(run_dir / "history.csv", row)
        payload = {
            **checkpoint_extras,
            "model_state": model.state_dict(),
            "epoch": epoch,
            "metrics": {"val_acc": val.accuracy, "val_loss": val.loss},
        }
        if val.accuracy > best_accuracy:
            best_accuracy, best_epoch = val.accuracy, epoch
            save_checkpoint(best_path, payload)
        save_checkpoint(last_path, {**payload, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
        log(
            f"epoch {epoch}/{cfg.epochs}  train loss {train.loss:.4f} acc {train.accuracy:.4f}  "
            f"val loss {val.loss:.4f} acc {val.accuracy:.4f}  lr {lr:.2e}  {row['seconds']:.1f}s"
        )
        if on_epoch_end is not None:
            on_epoch_end(history)
    return FitState(best_path, last_path, best_accuracy, best_epoch, history)
