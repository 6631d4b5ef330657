"""Decode and preprocess an image exactly as `finetune predict` does, with Pillow, NumPy and OpenCV only.

This module imports nothing from finetune: `finetune export --format timm` copies it into the model folder as
`preprocess.py`, so that someone without the toolkit feeds the model the same tensors (and gets the same
probabilities). finetune decodes every image with `decode_rgb`; the tests check `preprocess` against the
toolkit's evaluation transform (albumentations) pixel for pixel.

    from preprocess import load
    x = load("photo.jpg", json.load(open("config.json"))["finetune"]["preprocessing"])  # 3 x S x S float32
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

__all__ = ["decode_rgb", "load", "preprocess", "resize_side"]

HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
CV2_INTERPOLATIONS = {"nearest": 0, "bilinear": 1, "bicubic": 2}  # cv2.INTER_NEAREST, INTER_LINEAR, INTER_CUBIC


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit / float single-channel images into 8-bit grayscale."""
    array = np.asarray(image, dtype=np.float64)
    lo, hi = float(array.min()), float(array.max())
    if image.mode.startswith("I;16") or (image.mode == "I" and hi > 255):
        scale = 65535.0 if hi > 255 else 255.0
        array = array / scale * 255.0
    elif image.mode == "F":
        array = (array - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(array)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")


def _draft(image: Image.Image, min_side: int) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale while its shorter side stays >= `min_side`.

    libjpeg skips most of the work at reduced scale (several times faster for a 512 px photo at 128 px);
    PIL's draft never goes below the requested size, so later resizing still downsamples.
    """
    width, height = image.size
    scale = min_side / max(min(width, height), 1)
    if image.format == "JPEG" and scale < 0.5:
        image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def decode_rgb(path: object, min_side: Optional[int] = None) -> np.ndarray:
    """An HxWx3 uint8 RGB array: EXIF-rotated, 16-bit and float scaled to 8 bits, palettes expanded, alpha over
    white; with `min_side`, a JPEG may decode at reduced scale, its shorter side still >= `min_side`.
    Pillow's errors pass through (the caller words them)."""
    with Image.open(path) as image:
        if min_side:
            _draft(image, min_side)
        image.load()
        image = ImageOps.exif_transpose(image) or image
        if image.mode in HIGH_DEPTH_MODES:
            image = _to_8bit(image)
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "La", "RGBa"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def resize_side(size: int, crop_pct: float) -> int:
    """The shorter side evaluation resizes to before the centre crop: size / crop_pct, never below size."""
    return max(size, int(round(size / crop_pct)))


def preprocess(rgb: np.ndarray, size: int, mean: tuple, std: tuple, interpolation: str = "bilinear",
               crop_pct: float = 0.875) -> np.ndarray:
    """Resize the shorter side to `resize_side`, centre-crop `size` x `size`, scale to [0, 1], normalise:
    a 3 x size x size float32 array (channels first)."""
    import cv2

    side = resize_side(size, crop_pct)
    height, width = rgb.shape[:2]
    scale = side / min(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))  # as albumentations
    if (new_height, new_width) != (height, width):
        rgb = cv2.resize(rgb, (new_width, new_height), interpolation=CV2_INTERPOLATIONS.get(interpolation, 1))
    top, left = (new_height - size) // 2, (new_width - size) // 2
    crop = rgb[top:top + size, left:left + size].astype(np.float32)
    mean_255 = np.array(mean, dtype=np.float32) * 255.0
    inverse_std_255 = np.reciprocal(np.array(std, dtype=np.float32) * 255.0)
    return np.ascontiguousarray(((crop - mean_255) * inverse_std_255).transpose(2, 0, 1))


def load(path: object, config: dict) -> np.ndarray:
    """`path` decoded and preprocessed for the model `config` describes (keys: size, mean, std, interpolation,
    crop_pct): a 3 x size x size float32 array; stack several for a batch."""
    size, crop_pct = int(config["size"]), float(config["crop_pct"])
    rgb = decode_rgb(path, min_side=resize_side(size, crop_pct))
    return preprocess(rgb, size, tuple(config["mean"]), tuple(config["std"]), str(config["interpolation"]),
                      crop_pct)


