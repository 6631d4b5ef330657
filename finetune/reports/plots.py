"""Figures written into run folders: confusion matrices and training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
# A bare Figure, not pyplot: savefig renders PNGs through Agg by itself, so neither importing nor drawing
# touches the process-wide backend (a notebook importing finetune keeps its own).
from matplotlib.figure import Figure

__all__ = ["plot_confusion_matrix", "plot_curves"]


def _matrix_panel(ax, matrix: np.ndarray, classes: Sequence[str], title: str, fmt: str) -> None:
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classes) <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                value = matrix[i, j]
                ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=7,
                        color="white" if value > threshold else "black")


def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: Path) -> None:
    """Counts and row-normalised (recall) confusion matrices side by side."""
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    side = max(5.0, 0.55 * len(classes) + 2)
    fig = Figure(figsize=(2 * side + 1, side))
    axes = fig.subplots(1, 2)
    _matrix_panel(axes[0], matrix, classes, "confusion matrix (counts)", "d")
    _matrix_panel(axes[1], normalised, classes, "normalised by true class (recall)", ".2f")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss, accuracy and learning rate per epoch."""
    epochs = [int(r["epoch"]) for r in history]
    fig = Figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        axes[0].plot(epochs, [float(r[key]) for r in history], marker="o", label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "val")):
        axes[1].plot(epochs, [float(r[key]) for r in history], marker="o", label=label)
    axes[2].plot(epochs, [float(r["lr"]) for r in history], marker="o")
    for ax, title in zip(axes, ("loss", "accuracy", "learning rate (epoch start)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
