"""One training step's pieces, shared by the fit loop and the learning-rate finder."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Optional

import torch
from torch import nn

__all__ = ["autocast", "to_device", "optimizer_step"]


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """fp16 autocast on CUDA when `enabled`; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


def to_device(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to `device`, images in channels-last layout when asked."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler], grad_clip: Optional[float]
) -> None:
    """Clip (the unscaled gradients), step, update the AMP scale, and clear the gradients."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if grad_clip:
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
