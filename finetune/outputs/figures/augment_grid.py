"""A grid of augmented training images, denormalised: what the model actually sees."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from finetune.outputs.figures.gallery import Tile, plot_gallery

__all__ = ["denormalise", "save_augment_grid"]


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (N, 3, H, W) tensors back to (N, H, W, 3) uint8 RGB."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * std_t + mean_t).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_augment_grid(
    images: torch.Tensor,
    captions: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    path: Path,
    title: str,
) -> Path:
    """Write the batch as a captioned PNG grid and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tiles = [Tile(image, caption) for image, caption in zip(denormalise(images, mean, std), captions)]
    plot_gallery(tiles, path, title, columns=int(np.ceil(np.sqrt(len(tiles)))))
    return path
