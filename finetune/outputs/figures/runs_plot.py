"""The validation curves of many runs on one figure (`finetune runs --html`, the tuning study)."""

from __future__ import annotations

import io
from typing import Mapping, Sequence

from finetune.outputs.figures.canvas import new_figure

__all__ = ["plot_runs"]


def plot_runs(histories: Mapping[str, Sequence[dict]]) -> bytes:
    """PNG bytes: validation accuracy and loss per epoch, one line per run, overlaid."""
    fig = new_figure(figsize=(13, 4.5))
    axes = fig.subplots(1, 2)
    for name, rows in histories.items():
        if not rows:
            continue
        epochs = [int(r["epoch"]) for r in rows]
        for ax, key in zip(axes, ("val_acc", "val_loss")):
            ax.plot(epochs, [float(r[key]) for r in rows], marker="o", markersize=3, label=name)
    for ax, title in zip(axes, ("validation accuracy", "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if len(histories) <= 20:  # past that a legend covers the curves; the table names them
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
