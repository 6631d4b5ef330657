"""Figures written into run folders: confusion matrices, most-confused pairs, per-class recall, training curves.

Every figure has a bounded size whatever the number of classes: above LEGIBLE_CLASSES the matrix is
drawn without per-cell numbers (and above LABELLED_CLASSES without class names), and the two bar
charts show the classes and pairs that matter most.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from finetune.outputs.figures.canvas import new_figure  # a bare Figure, not pyplot, imported when first drawn

__all__ = ["LEGIBLE_CLASSES", "plot_confusion_matrix", "plot_confused_pairs", "plot_class_recall", "plot_curves"]

LEGIBLE_CLASSES = 30  # up to this many classes every cell's number is printed and the figure grows with them
LABELLED_CLASSES = 80  # up to this many, class names still fit along the axes of the bounded figure
MAX_SIDE = 12.0  # inches per matrix panel beyond LEGIBLE_CLASSES: 1 320 px at 110 dpi
BARS = 25  # bars per chart: pairs or classes, each with a readable label


def _matrix_panel(ax, matrix: np.ndarray, classes: Sequence[str], title: str, fmt: str) -> None:
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if len(classes) <= LABELLED_CLASSES:
        ticks = np.arange(len(classes))
        size = 10 if len(classes) <= LEGIBLE_CLASSES else 5
        ax.set_xticks(ticks, labels=classes, rotation=45 if len(classes) <= LEGIBLE_CLASSES else 90, ha="right",
                      fontsize=size)
        ax.set_yticks(ticks, labels=classes, fontsize=size)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    else:  # a thousand names cannot be read along an axis; the bar charts name the classes that matter
        ax.set_xlabel("predicted (class index, in the order of the class list)")
        ax.set_ylabel("true (class index)")
    ax.set_title(title)
    if len(classes) <= LEGIBLE_CLASSES:
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
    side = max(5.0, 0.55 * len(classes) + 2) if len(classes) <= LEGIBLE_CLASSES else MAX_SIDE
    fig = new_figure(figsize=(2 * side + 1, side))
    axes = fig.subplots(1, 2)
    _matrix_panel(axes[0], matrix, classes, "confusion matrix (counts)", "d")
    _matrix_panel(axes[1], normalised, classes, "normalised by true class (recall)", ".2f")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _bar_height(bars: int) -> float:
    return 1.5 + 0.3 * max(bars, 1)


def plot_confused_pairs(pairs: Sequence[tuple[str, str, int]], path: Path) -> None:
    """The most frequent mistakes, 'true → predicted', as labelled horizontal bars (largest on top)."""
    pairs = list(pairs)[:BARS]
    fig = new_figure(figsize=(9, _bar_height(len(pairs))))
    ax = fig.subplots()
    if pairs:
        labels = [f"{true} \u2192 {predicted}" for true, predicted, _ in pairs]
        bars = ax.barh(np.arange(len(pairs)), [count for _, _, count in pairs], color="tab:red")
        ax.bar_label(bars, padding=3, fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_yticks(np.arange(len(pairs)), labels=labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("images")
    else:
        ax.text(0.5, 0.5, "no mistakes", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"most confused pairs (true \u2192 predicted), top {len(pairs)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_class_recall(matrix: np.ndarray, classes: Sequence[str], path: Path) -> None:
    """Per-class recall: every class when few, else the spread over all classes and the weakest ones by name."""
    support = matrix.sum(axis=1)
    recall = np.divide(np.diag(matrix), support, out=np.zeros(len(classes)), where=support > 0)
    present = np.flatnonzero(support > 0)
    order = present[np.argsort(recall[present], kind="stable")][:BARS]  # the weakest classes first
    many = len(present) > BARS
    fig = new_figure(figsize=(14 if many else 9, _bar_height(len(order))))
    axes = fig.subplots(1, 2 if many else 1, squeeze=False)[0]
    ax = axes[-1]
    bars = ax.barh(np.arange(len(order)), recall[order], color="tab:blue")
    # The value is written out: a recall of 0, the case to look at first, has no visible bar.
    ax.bar_label(bars, labels=[f"{recall[k]:.2f} ({matrix[k, k]}/{support[k]})" for k in order], padding=3,
                 fontsize=8)
    ax.set_yticks(np.arange(len(order)), labels=[classes[k] for k in order], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.2)
    ax.set_xlabel("recall (images of the class predicted right)")
    ax.set_title(f"the {len(order)} classes with the lowest recall (right/images)" if many
                 else "recall per class (right/images)")
    if many:
        axes[0].hist(recall[present], bins=20, range=(0, 1), color="tab:gray")
        axes[0].set_xlabel("recall")
        axes[0].set_ylabel("classes")
        axes[0].set_title(f"recall of all {len(present)} classes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss, accuracy and learning rate per epoch."""
    epochs = [int(r["epoch"]) for r in history]
    fig = new_figure(figsize=(14, 4))
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
