"""Mixup and CutMix on whole training batches, with soft targets (torchvision.transforms.v2)."""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F
from torchvision.transforms import v2

from finetune.config.recipe import AugmentConfig

__all__ = ["BatchMixer", "create_mixer", "dominant_label"]


class BatchMixer:
    """With probability `prob`, mix a batch by mixup or cutmix (one picked per batch).

    Always returns soft targets (N, num_classes), one-hot for an unmixed batch, so the loss sees
    one kind of target. Randomness comes from torch's global generator: seeded and checkpointed.
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0) -> None:
        self.num_classes = num_classes
        self.prob = prob
        self.ops: list[v2.Transform] = []
        if mixup > 0:
            self.ops.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            self.ops.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        if not self.ops:
            raise ValueError("BatchMixer needs mixup > 0 or cutmix > 0")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and soft targets for a batch of images (N, C, H, W) and class indices (N,)."""
        if torch.rand(()).item() >= self.prob:
            return images, F.one_hot(labels, self.num_classes).to(images.dtype)
        op = self.ops[int(torch.randint(len(self.ops), ()).item())]
        return op(images, labels)


def create_mixer(cfg: AugmentConfig, num_classes: int) -> Optional[BatchMixer]:
    """The recipe's batch mixer, or None when mixup and cutmix are off."""
    if (cfg.mixup <= 0 and cfg.cutmix <= 0) or cfg.mix_prob <= 0:
        return None
    return BatchMixer(num_classes, cfg.mixup, cfg.cutmix, cfg.mix_prob)


def dominant_label(targets: torch.Tensor) -> torch.Tensor:
    """The class with the largest share of each (soft or hard) target, for train accuracy."""
    return targets.argmax(1) if targets.ndim == 2 else targets
