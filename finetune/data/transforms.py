"""Train/eval transform presets (albumentations), torchvision-references style.

Presets, applied before resizing to the model's size and normalising:

- ``none``:   evaluation preprocessing only (resize shorter side, centre crop).
- ``light``:  RandomResizedCrop (scale 0.5-1) and horizontal flip.
- ``medium``: light + Affine (±15° rotation, shear ±10, scale 0.9-1.1) + colour jitter 0.2.
- ``heavy``:  medium with a wider crop scale (0.25-1) + blur or Gaussian noise + CoarseDropout.
- ``hw03``:   the HW03 recipe: resize, horizontal flip, ±15° rotation, colour jitter 0.2, shear 10.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from finetune.errors import FinetuneError

__all__ = ["PRESETS", "Preprocessing", "build_train_transform", "build_eval_transform"]

INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


@dataclass(frozen=True)
class Preprocessing:
    """How images are sized and normalised for a model; stored in every checkpoint."""

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    def to_dict(self) -> dict:
        """Plain types, for checkpoints (weights_only loading)."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, raw: dict) -> "Preprocessing":
        return cls(
            size=int(raw["size"]),
            mean=tuple(raw["mean"]),
            std=tuple(raw["std"]),
            interpolation=str(raw["interpolation"]),
            crop_pct=float(raw["crop_pct"]),
        )

    @property
    def cv2_interpolation(self) -> int:
        return INTERPOLATIONS.get(self.interpolation, cv2.INTER_LINEAR)


def _light(size: int, interp: int) -> list[A.BasicTransform]:
    return [A.RandomResizedCrop(size=(size, size), scale=(0.5, 1.0), interpolation=interp), A.HorizontalFlip()]


def _medium(size: int, interp: int) -> list[A.BasicTransform]:
    return _light(size, interp) + [
        A.Affine(rotate=(-15, 15), shear=(-10, 10), scale=(0.9, 1.1), interpolation=interp, p=0.7),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8),
    ]


def _heavy(size: int, interp: int) -> list[A.BasicTransform]:
    return [
        A.RandomResizedCrop(size=(size, size), scale=(0.25, 1.0), interpolation=interp),
        A.HorizontalFlip(),
        A.Affine(rotate=(-15, 15), shear=(-10, 10), scale=(0.9, 1.1), interpolation=interp, p=0.7),
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.08))], p=0.3),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.1, 0.25), hole_width_range=(0.1, 0.25), p=0.5),
    ]


def _hw03(size: int, interp: int) -> list[A.BasicTransform]:
    return [
        A.Resize(size, size, interpolation=interp),
        A.HorizontalFlip(),
        A.Rotate(limit=15, interpolation=interp, p=1.0),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0, p=1.0),
        A.Affine(shear=(-10, 10), interpolation=interp, p=1.0),
    ]


PRESETS: dict[str, Optional[Callable[[int, int], list[A.BasicTransform]]]] = {
    "none": None,
    "light": _light,
    "medium": _medium,
    "heavy": _heavy,
    "hw03": _hw03,
}


def _explicit_ops(ops: list[dict]) -> list[A.BasicTransform]:
    built = []
    for i, spec in enumerate(ops):
        spec = dict(spec)
        name = spec.pop("name", None)
        cls: Any = getattr(A, str(name), None) if name else None
        if not isinstance(cls, type):
            raise FinetuneError(
                f"augment.ops[{i}]: {name!r} is not an albumentations transform "
                "(write e.g. {name: HorizontalFlip, p: 0.5})"
            )
        try:
            built.append(cls(**spec))
        except (TypeError, ValueError) as err:
            raise FinetuneError(f"augment.ops[{i}] ({name}): {err}") from None
    return built


def _finish(pre: Preprocessing) -> list[A.BasicTransform]:
    return [A.Normalize(mean=pre.mean, std=pre.std), ToTensorV2()]


def _eval_ops(pre: Preprocessing) -> list[A.BasicTransform]:
    resize_to = max(pre.size, int(round(pre.size / pre.crop_pct)))
    return [
        A.SmallestMaxSize(max_size=resize_to, interpolation=pre.cv2_interpolation),
        A.CenterCrop(pre.size, pre.size),
    ]


def build_eval_transform(pre: Preprocessing) -> A.Compose:
    """Resize the shorter side to size/crop_pct, centre-crop, normalise, to tensor."""
    return A.Compose(_eval_ops(pre) + _finish(pre))


def build_train_transform(pre: Preprocessing, preset: str, ops: Optional[list[dict]] = None) -> A.Compose:
    """The preset's (or the explicit list's) augmentations, then a resize to size x size."""
    if ops:
        augment = _explicit_ops(ops) + [A.Resize(pre.size, pre.size, interpolation=pre.cv2_interpolation)]
    else:
        if preset not in PRESETS:
            raise FinetuneError(f"unknown augment preset {preset!r}; choose one of {', '.join(PRESETS)}")
        factory = PRESETS[preset]
        augment = _eval_ops(pre) if factory is None else factory(pre.size, pre.cv2_interpolation)
    return A.Compose(augment + _finish(pre))
