"""A bare matplotlib Figure, imported when the first figure is drawn.

Not pyplot: savefig renders PNGs through Agg by itself, so neither importing nor drawing touches the process-wide
backend (a notebook importing finetune keeps its own). Imported late: matplotlib costs about half a second, which
every command would otherwise pay before its first line of work.
"""

from __future__ import annotations

from typing import Any

__all__ = ["new_figure"]


def new_figure(**kwargs: Any):
    """matplotlib.figure.Figure(**kwargs)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)
