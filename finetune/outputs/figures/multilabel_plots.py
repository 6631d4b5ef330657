"""Figures of a multi-label evaluation: one 2×2 confusion matrix per class, and precision-recall curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from finetune.outputs.figures.canvas import new_figure

__all__ = ["GRID_CLASSES", "plot_label_confusion_grid", "plot_pr_curves"]

GRID_CLASSES = 36  # panels drawn at most (the classes with the lowest F1 first when there are more)
CURVES = 10  # PR curves drawn with a legend entry; more would be unreadable


def plot_label_confusion_grid(matrices: np.ndarray, classes: Sequence[str], f1: Sequence[float], path: Path) -> None:
    """One 2×2 panel per class (rows: true no/yes, columns: predicted no/yes), counts written in each cell.

    `matrices` is scikit-learn's `multilabel_confusion_matrix`: (C, 2, 2) as [[TN, FP], [FN, TP]].
    """
    order = np.argsort(np.asarray(f1), kind="stable")[:GRID_CLASSES] if len(classes) > GRID_CLASSES \
        else np.arange(len(classes))
    columns = min(6, len(order))
    rows = -(-len(order) // columns)
    fig = new_figure(figsize=(2.2 * columns, 2.3 * rows + 0.6))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, k in zip(axes.flat, order):
        ax.axis("on")
        cell = matrices[k]
        ax.imshow(cell / max(cell.sum(), 1), cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(int(cell[i, j])), ha="center", va="center", fontsize=9,
                        color="white" if cell[i, j] > cell.sum() / 2 else "black")
        ax.set_xticks([0, 1], labels=["pred no", "pred yes"], fontsize=7)
        ax.set_yticks([0, 1], labels=["no", "yes"], fontsize=7)
        ax.set_title(f"{classes[k]} (F1 {f1[k]:.2f})", fontsize=8)
    shown = "" if len(order) == len(classes) else f" (the {len(order)} of {len(classes)} with the lowest F1)"
    fig.suptitle(f"per-class confusion: rows true, columns predicted{shown}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_pr_curves(targets: np.ndarray, probs: np.ndarray, classes: Sequence[str], ap: Sequence[float],
                   path: Path) -> None:
    """Micro-averaged precision-recall curve, plus the curves of the classes with the lowest AP."""
    from sklearn.metrics import precision_recall_curve

    targets = np.asarray(targets) > 0.5
    fig = new_figure(figsize=(7.5, 6))
    ax = fig.subplots()
    if targets.any():
        precision, recall, _ = precision_recall_curve(targets.ravel(), np.asarray(probs).ravel())
        ax.plot(recall, precision, color="black", linewidth=2.2, label="all labels (micro)")
    ap = np.asarray(ap, dtype=float)
    present = np.flatnonzero(~np.isnan(ap))
    for k in present[np.argsort(ap[present], kind="stable")][:CURVES]:
        precision, recall, _ = precision_recall_curve(targets[:, k], probs[:, k])
        ax.plot(recall, precision, linewidth=1, label=f"{classes[k]} (AP {ap[k]:.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    many = "" if len(present) <= CURVES else f" ({CURVES} lowest-AP classes of {len(present)})"
    ax.set_title(f"precision-recall{many}")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
