"""Test-time augmentation: deterministic flips and crops whose probabilities are averaged.

Views are the centre view (exactly the evaluation preprocessing), optionally its horizontal
mirror, and optionally four corner crops taken from a slightly larger square (the classic
ten-crop of torchvision's ``TenCrop``). ``flip`` gives 2 views, ``crops`` 5, ``flip,crops`` 10.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from finetune.data.preprocessing import Preprocessing
from finetune.data.transforms import build_eval_transform, cv2_interpolation, eval_decode_side
from finetune.errors import FinetuneError

__all__ = ["TTA_CHOICES", "parse_tta", "ViewTransform", "average_views", "view_count"]

TTA_CHOICES = ("flip", "crops")
# Corner crops come from a square this much larger than the model input when the model's own
# crop_pct leaves no margin (crop_pct 1.0): torchvision's 256 → 224 ratio.
DEFAULT_CROP_PCT = 0.875


def parse_tta(spec: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """`"flip,crops"` / `["flip"]` / `None` / `"none"` → the TTA choices, validated."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [item.strip().lower() for item in items if item.strip()]
    if names in ([], ["none"]):
        return ()
    unknown = [n for n in names if n not in TTA_CHOICES]
    if unknown:
        raise FinetuneError(
            f"unknown TTA choice(s) {unknown}; use any of {', '.join(TTA_CHOICES)} separated by commas "
            "(e.g. --tta flip or --tta flip,crops), or none"
        )
    return tuple(c for c in TTA_CHOICES if c in names)


def view_count(tta: Sequence[str]) -> int:
    """How many forward passes one image costs with these TTA choices."""
    return (5 if "crops" in tta else 1) * (2 if "flip" in tta else 1)


def _big_size(pre: Preprocessing) -> int:
    resize_to = max(pre.size, int(round(pre.size / pre.crop_pct)))
    return resize_to if resize_to >= pre.size + 2 else int(round(pre.size / DEFAULT_CROP_PCT))


class ViewTransform:
    """Albumentations-style callable: the evaluation tensor, plus a larger square when crops are wanted."""

    def __init__(self, pre: Preprocessing, tta: Sequence[str] = ()) -> None:
        self.eval = build_eval_transform(pre)
        self.size = pre.size
        self.big: Optional[A.Compose] = None
        self.big_size = _big_size(pre)
        # The shorter side the views resize to: a JPEG decodes at reduced scale down to it, never below.
        self.decode_side = max(eval_decode_side(pre), self.big_size if "crops" in tta else 0)
        if "crops" in tta:
            self.big = A.Compose([
                A.SmallestMaxSize(max_size=self.big_size, interpolation=cv2_interpolation(pre)),
                A.CenterCrop(self.big_size, self.big_size),
                A.Normalize(mean=pre.mean, std=pre.std),
                ToTensorV2(),
            ])

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, ...]:
        """One image → (eval view,) or (eval view, larger square)."""
        views = (self.eval(image=image)["image"],)
        return views if self.big is None else views + (self.big(image=image)["image"],)

    def blank(self) -> tuple[torch.Tensor, ...]:
        """Zeros in normalised space (the mean colour): the stand-in for an unreadable image."""
        views = (torch.zeros(3, self.size, self.size),)
        return views if self.big is None else views + (torch.zeros(3, self.big_size, self.big_size),)


def _corners(big: torch.Tensor, size: int) -> list[torch.Tensor]:
    edge = big.shape[-1] - size
    return [big[..., y : y + size, x : x + size] for y in (0, edge) for x in (0, edge)]


def average_views(model: torch.nn.Module, views: Sequence[torch.Tensor], tta: Sequence[str],
                  activation: str = "softmax", temperature: float = 1.0) -> torch.Tensor:
    """Probabilities (B, C) of logits / `temperature` averaged over the TTA views of one batch: softmax, or
    sigmoid for multi-label models."""
    centre = views[0]
    crops = [centre] + (_corners(views[1], centre.shape[-1]) if "crops" in tta else [])
    if "flip" in tta:
        crops += [torch.flip(c, dims=[-1]) for c in crops]
    total = None
    for crop in crops:
        logits = model(crop.contiguous(memory_format=torch.channels_last)).float()
        logits = logits / temperature
        probs = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=1)
        total = probs if total is None else total + probs
    return total / len(crops)
