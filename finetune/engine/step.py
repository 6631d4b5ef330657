"""One training step's pieces, shared by the fit loop and the learning-rate finder."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Optional

import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.config.recipe import TrainConfig

__all__ = ["DTYPES", "train_precision", "check_precision", "grad_scaler", "autocast", "compile_model", "to_device",
           "optimizer_step"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device, key: str = "train.precision") -> str:
    """`precision` if `device` can run it, else one FinetuneError naming what to use instead."""
    if precision not in ("fp32", *DTYPES):
        raise FinetuneError(f"{key} is {precision!r}; valid choices: fp32, {', '.join(DTYPES)}")
    if precision == "fp16" and device.type != "cuda":
        raise FinetuneError(f"{key} fp16 needs a CUDA GPU (it trains with a gradient scaler there); on {device.type} "
                            "use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FinetuneError(f"{key} bf16 is not supported by this GPU; use fp16 or fp32")
    return precision


def train_precision(cfg: TrainConfig, device: torch.device) -> str:
    """fp32, bf16 or fp16: train.precision, or (unset) fp16 on CUDA when train.amp, else fp32."""
    if cfg.precision is None:
        return "fp16" if cfg.amp and device.type == "cuda" else "fp32"
    return check_precision(cfg.precision, device)


def grad_scaler(cfg: TrainConfig, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler("cuda") if train_precision(cfg, device) == "fp16" else None


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast to bf16/fp16 as `precision` says; a no-op for fp32."""
    if precision in DTYPES:
        return torch.autocast(device_type=device.type, dtype=DTYPES[precision])
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


def compile_model(model: nn.Module, example: torch.Tensor, log: Callable[[str], None] = print) -> bool:
    """torch.compile `model` in place (its state_dict keeps its keys); on failure run eager, with one warning.

    Compilation happens at the first call, so one no-grad eval-mode forward of `example` tries it now.
    Returns whether the model runs compiled.
    """
    was_training = model.training
    try:
        model.compile()
        model.eval()
        with torch.no_grad():
            model(example)
    except Exception as err:  # noqa: BLE001 - any backend failure (no compiler, unsupported op) means eager
        model._compiled_call_impl = None  # nn.Module.compile's hook: None restores the eager forward
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log(f"warning: train.compile: torch.compile failed here ({reason[:200]}); training without it")
        return False
    finally:
        model.train(was_training)
    return True
