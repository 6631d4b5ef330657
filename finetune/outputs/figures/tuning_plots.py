"""A tuning study's figures: parameter importance and the optimisation history (Optuna computes, Figure draws)."""

from __future__ import annotations

import io
from typing import Mapping, Sequence

from finetune.outputs.figures.canvas import new_figure

__all__ = ["plot_importance", "plot_history"]


def _png(fig) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plot_importance(importances: Mapping[str, float]) -> bytes:
    """PNG bytes: one horizontal bar per searched recipe key, the most important on top."""
    names = list(importances)[::-1]
    fig = new_figure(figsize=(7, 0.5 * len(names) + 1.5))
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names], color="#4c72b0")
    ax.set_xlabel("importance (Optuna's default evaluator; shares sum to 1)")
    ax.set_title("which recipe keys mattered")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def plot_history(numbers: Sequence[int], values: Sequence[float], metric: str, maximize: bool) -> bytes:
    """PNG bytes: each finished trial's value and the best so far."""
    fig = new_figure(figsize=(8, 4))
    ax = fig.subplots()
    ax.scatter(numbers, values, label="trial", color="#4c72b0")
    best, running = [], None
    for value in values:
        running = value if running is None else (max if maximize else min)(running, value)
        best.append(running)
    ax.step(numbers, best, where="post", color="#dd8452", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title("optimisation history (finished trials)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)
