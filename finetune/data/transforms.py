"""Train/eval transform presets (albumentations), torchvision-references style.

Presets; each ends at the model's size, then normalises:

- ``none``:   evaluation preprocessing only (resize shorter side to size/crop_pct, centre crop).
- ``light``:  RandomResizedCrop (area 0.5-1) and horizontal flip.
- ``medium``: light + Affine (p 0.7: ±15° rotation, shear ±10°, scale 0.9-1.1) + colour jitter 0.2 (p 0.8).
- ``heavy``:  RandomResizedCrop (area 0.25-1), flip, the Affine, colour jitter 0.3 (p 0.8), blur or
  Gaussian noise (p 0.3) and CoarseDropout of 1-4 holes (p 0.5).
- ``hw03``:   the HW03 recipe: resize, horizontal flip, ±15° rotation, colour jitter 0.2, x-shear ±10°.

``augment.policy`` adds torchvision's RandAugment or TrivialAugmentWide on the uint8 image after the
preset; mixup/cutmix work on whole batches and live in ``finetune.data.mixing``.

The training pipeline draws from one random stream seeded from ``train.seed`` (albumentations 2 ignores
the global numpy/random seeds), so a run's augmentations repeat exactly; DataLoader workers reseed it.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torchvision.transforms import v2

from finetune.data.portable import resize_side
from finetune.data.preprocessing import Preprocessing
from finetune.errors import FinetuneError

__all__ = [
    "PRESETS",
    "POLICIES",
    "cv2_interpolation",
    "TorchvisionPolicy",
    "build_train_transform",
    "build_eval_transform",
    "eval_decode_side",
    "train_decode_side",
    "seed_transform",
    "transform_rng_state",
    "set_transform_rng_state",
]

_CV2_INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


def cv2_interpolation(pre: Preprocessing) -> int:
    """OpenCV's flag for the preprocessing's interpolation (bilinear when unknown)."""
    return _CV2_INTERPOLATIONS.get(pre.interpolation, cv2.INTER_LINEAR)


def _light(size: int, interp: int) -> list[A.BasicTransform]:
    return [A.RandomResizedCrop(size=(size, size), scale=(0.5, 1.0), interpolation=interp), A.HorizontalFlip()]


def _affine(interp: int) -> A.BasicTransform:
    # keep_ratio: scale x and y together; the crop already varies the aspect ratio.
    return A.Affine(rotate=(-15, 15), shear=(-10, 10), scale=(0.9, 1.1), keep_ratio=True, interpolation=interp, p=0.7)


def _medium(size: int, interp: int) -> list[A.BasicTransform]:
    return _light(size, interp) + [
        _affine(interp),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8),
    ]


def _heavy(size: int, interp: int) -> list[A.BasicTransform]:
    return [
        A.RandomResizedCrop(size=(size, size), scale=(0.25, 1.0), interpolation=interp),
        A.HorizontalFlip(),
        _affine(interp),
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
        # torchvision's RandomAffine(shear=10) of the source shears along x only.
        A.Affine(shear={"x": (-10, 10), "y": (0, 0)}, interpolation=interp, p=1.0),
    ]


PRESETS: dict[str, Optional[Callable[[int, int], list[A.BasicTransform]]]] = {
    "none": None,
    "light": _light,
    "medium": _medium,
    "heavy": _heavy,
    "hw03": _hw03,
}


POLICIES: dict[str, Callable[[], v2.Transform]] = {
    "randaugment": v2.RandAugment,
    "trivialaugment": v2.TrivialAugmentWide,
}


class TorchvisionPolicy(A.ImageOnlyTransform):
    """A torchvision auto-augment policy (RandAugment, TrivialAugmentWide) on the uint8 HWC image."""

    def __init__(self, name: str, p: float = 1.0) -> None:
        super().__init__(p=p)
        if name not in POLICIES:
            raise FinetuneError(f"unknown augment policy {name!r}; choose one of none, {', '.join(POLICIES)}")
        self.name = name
        self.policy = POLICIES[name]()

    def get_params(self) -> dict[str, Any]:
        # Draw from the pipeline's own stream so one seed governs every augmentation.
        return {"seed": int(self.random_generator.integers(2**62))}

    def apply(self, img: np.ndarray, seed: int = 0, **params: Any) -> np.ndarray:
        if img.dtype != np.uint8:
            raise FinetuneError(f"augment.policy {self.name} needs 8-bit images, got {img.dtype}")
        chw = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.policy(chw)
        return out.permute(1, 2, 0).contiguous().numpy()

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("name",)


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
    resize_to = eval_decode_side(pre)
    return [
        A.SmallestMaxSize(max_size=resize_to, interpolation=cv2_interpolation(pre)),
        A.CenterCrop(pre.size, pre.size),
    ]


def build_eval_transform(pre: Preprocessing) -> A.Compose:
    """Resize the shorter side to size/crop_pct, centre-crop, normalise, to tensor."""
    return A.Compose(_eval_ops(pre) + _finish(pre))


def eval_decode_side(pre: Preprocessing) -> int:
    """The shorter side the evaluation preprocessing resizes to: decoding larger is wasted work."""
    return resize_side(pre.size, pre.crop_pct)


# Smallest crop area of each preset's RandomResizedCrop; its narrowest crop (aspect 3/4) must still hold
# `size` source pixels, so the image needs a shorter side of size / sqrt(area * 3/4).
_CROP_AREA = {"light": 0.5, "medium": 0.5, "heavy": 0.25}


def train_decode_side(pre: Preprocessing, preset: str, ops: Optional[list[dict]] = None) -> Optional[int]:
    """The smallest shorter side an image needs for the training augmentation to lose no detail.

    None when unknown (an explicit `augment.ops` list): images are then decoded at full size.
    """
    if ops:
        return None
    if preset in _CROP_AREA:
        return int(np.ceil(pre.size / np.sqrt(_CROP_AREA[preset] * 0.75)))
    if preset == "hw03":
        return pre.size  # a plain resize to size x size
    return eval_decode_side(pre)


def build_train_transform(
    pre: Preprocessing,
    preset: str,
    ops: Optional[list[dict]] = None,
    policy: str = "none",
    seed: Optional[int] = None,
) -> A.Compose:
    """The preset's (or the explicit list's) augmentations at size x size, an optional policy, normalise."""
    if ops:
        augment = _explicit_ops(ops) + [A.Resize(pre.size, pre.size, interpolation=cv2_interpolation(pre))]
    else:
        if preset not in PRESETS:
            raise FinetuneError(f"unknown augment preset {preset!r}; choose one of {', '.join(PRESETS)}")
        factory = PRESETS[preset]
        augment = _eval_ops(pre) if factory is None else factory(pre.size, cv2_interpolation(pre))
    if policy != "none":
        augment.append(TorchvisionPolicy(policy))
    transform = A.Compose(augment + _finish(pre))
    seed_transform(transform, seed)
    return transform


def seed_transform(transform: Any, seed: Optional[int]) -> None:
    """Give a Compose and all its transforms one shared random stream (None: fresh entropy)."""
    if isinstance(transform, A.BaseCompose):
        # One shared stream: albumentations' own seeding gives every transform an identical copy,
        # which would correlate e.g. the flip with the crop.
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def transform_rng_state(transform: Any) -> Optional[dict]:
    """The pipeline's random state in plain types (for weights_only checkpoints); None if it has none."""
    if not isinstance(transform, A.BaseCompose):
        return None
    version, internal, gauss = transform.py_random.getstate()
    return {"numpy": transform.random_generator.bit_generator.state,
            "python": [version, list(internal), gauss]}


def set_transform_rng_state(transform: Any, state: Optional[dict]) -> None:
    """Restore what `transform_rng_state` returned."""
    if state is None or not isinstance(transform, A.BaseCompose):
        return
    generator, py_random = np.random.default_rng(), random.Random()
    generator.bit_generator.state = state["numpy"]
    version, internal, gauss = state["python"]
    py_random.setstate((version, tuple(internal), gauss))
    transform.set_random_state(generator, py_random)
