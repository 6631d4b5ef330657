"""Image grids with captions: the misclassified gallery and Grad-CAM overlays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from finetune.outputs.figures.canvas import new_figure
from PIL import Image

from finetune.errors import FinetuneError

__all__ = ["Tile", "worst_mistakes", "thumbnail", "plot_gallery"]


@dataclass
class Tile:
    """One picture of a grid: an RGB image, its caption, and an optional heat map drawn over it."""

    image: np.ndarray
    caption: str
    heat: Optional[np.ndarray] = None


def worst_mistakes(y_true: Sequence[int], y_pred: Sequence[int], confidence: Sequence[float], limit: int) -> list[int]:
    """Indices of wrong predictions, most confident first (the mistakes a user should look at first)."""
    y_true, y_pred, confidence = np.asarray(y_true), np.asarray(y_pred), np.asarray(confidence, dtype=float)
    wrong = np.flatnonzero(y_true != y_pred)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:limit].tolist()


def thumbnail(path: Path, size: int = 160) -> np.ndarray:
    """The image as RGB, shrunk to fit `size` pixels (grey if it cannot be read)."""
    # Imported here so that importing the figure modules pulls in nothing of finetune but its errors.
    from finetune.data.images import load_rgb

    try:
        image = Image.fromarray(load_rgb(path))
    except FinetuneError:
        return np.full((size, size, 3), 128, dtype=np.uint8)
    image.thumbnail((size, size))
    return np.asarray(image)


def plot_gallery(tiles: Sequence[Tile], path: Path, title: str, columns: int = 6) -> None:
    """A grid of captioned images (heat maps blended in where given)."""
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    # At least 7 inches wide, so the title fits even above a single tile.
    fig = new_figure(figsize=(max(7.0, 2.3 * columns), 2.6 * rows + 0.5))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tile in zip(axes.flat, tiles):
        ax.imshow(tile.image)
        if tile.heat is not None:
            h, w = tile.image.shape[:2]
            ax.imshow(tile.heat, cmap="jet", alpha=0.45, extent=(-0.5, w - 0.5, h - 0.5, -0.5), vmin=0, vmax=1)
        ax.set_title(tile.caption, fontsize=7.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
