"""The learning-rate range test figure: smoothed loss against a log-scaled rate."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from finetune.outputs.figures.canvas import new_figure

if TYPE_CHECKING:  # for the hint only: figures never import engine code
    from finetune.engine.lr_find import LrFindResult

__all__ = ["plot_lr_find"]


def plot_lr_find(result: LrFindResult, path: Path) -> Path:
    """Raw and smoothed loss per rate, with the suggested rate marked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = new_figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(result.lrs, result.raw_losses, color="0.75", linewidth=0.8, label="loss per batch")
    ax.plot(result.lrs, result.losses, color="C0", label="smoothed loss")
    ax.axvline(result.suggestion, color="C3", linestyle="--",
               label=f"suggested lr {result.suggestion:.1e} (min-loss/10)")
    if result.steepest is not None and result.steepest != result.suggestion:
        ax.axvline(result.steepest, color="C2", linestyle=":", label=f"steepest {result.steepest:.1e}")
    ax.set_xscale("log")
    top = min(max(result.losses), 2 * result.losses[0]) if result.losses else None
    if top is not None and top > min(result.losses):
        ax.set_ylim(min(result.losses) * 0.9, top * 1.05)  # the divergence tail would flatten the rest
    ax.set_xlabel("learning rate (train.lr)")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test" + (" (stopped at divergence)" if result.diverged else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
