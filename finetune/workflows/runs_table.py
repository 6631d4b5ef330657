"""`finetune runs [DIR]`: one line per run folder under DIR — what differed between the runs and how each did."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import yaml

from finetune.errors import FinetuneError
from finetune.config.recipe import METRICS, flatten, lower_is_better, read_yaml
from finetune.outputs.report_page import render_runs_page
from finetune.outputs.figures.runs_plot import plot_runs
from finetune.outputs.run_dir import RunDir

__all__ = ["RunInfo", "find_runs", "read_run", "differing_keys", "table_rows", "runs_table"]

Log = Callable[[str], None]

# Keys that differ between any two runs without saying anything about them.
_IGNORED = ("name", "output")


@dataclass
class RunInfo:
    """What one run folder says about itself: its recipe, progress, best epoch and state."""

    run: RunDir
    name: str
    recipe: dict[str, Any]  # flattened: {"train.lr": 0.001, ...}
    history: list[dict]
    metric: str
    best: Optional[float]
    best_epoch: Optional[int]
    epochs_done: int
    seconds: float
    status: str


def find_runs(root: Union[str, Path]) -> list[RunDir]:
    """Every run folder under `root` (k-fold folds and tuning trials included), in path order."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FinetuneError(f"no runs folder {root}: give the folder your recipes' `output` points to (default runs/)")
    found = []
    for folder, subfolders, _ in os.walk(root):
        run = RunDir(folder)
        if run.recipe.is_file() and not run.cv_summary.is_file():
            found.append(run)
            subfolders.clear()  # a run folder holds no other runs
        else:
            subfolders.sort()
    return sorted(found, key=lambda r: str(r.path))


def _status(run: RunDir, done: int, epochs: int) -> str:
    abandoned = run.abandoned_reason()
    if abandoned:
        return abandoned
    if run.eval.exists():
        return "finished" if done >= epochs else "stopped early"
    if run.last.is_file():
        return "interrupted (resumable)"
    return "interrupted" if done == 0 else "interrupted (no checkpoint)"


def read_run(run: RunDir, root: Path) -> RunInfo:
    """Read one run folder's recipe.yaml and history.csv; a folder that cannot be read is marked `unreadable: why`."""
    name = str(run.path.relative_to(root)) if run.path != root else run.path.name
    reading = run.recipe.name
    try:
        recipe = flatten(read_yaml(run.recipe.read_text(encoding="utf-8")) or {})
        reading = run.history.name
        history = run.read_history()
        metric = str(recipe.get("train.monitor", "val_acc"))
        values = [(float(r[metric]), int(r["epoch"])) for r in history if r.get(metric) not in (None, "")]
        seconds = sum(float(r.get("seconds") or 0) for r in history)
        epochs = int(recipe.get("train.epochs") or 0)
        best, best_epoch = None, None
        if values:
            best, best_epoch = (min if lower_is_better(metric) else max)(values, key=lambda v: v[0])
    except UnicodeDecodeError as err:
        return _unreadable(run, name, f"{reading} is not UTF-8 text (byte {err.start})")
    except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError, FinetuneError) as err:
        # One damaged folder (a hand-edited or half-copied file) must not cost the whole table.
        return _unreadable(run, name, f"{reading}: " + " ".join(f"{type(err).__name__}: {err}".split())[:120])
    return RunInfo(run, name, recipe, history, metric, best, best_epoch, len(history), seconds,
                   _status(run, len(history), epochs))


def _unreadable(run: RunDir, name: str, why: str) -> RunInfo:
    """The row of a run folder whose recipe or history cannot be read."""
    return RunInfo(run, name, {}, [], "val_acc", None, None, 0, 0.0, f"unreadable: {why}")


def differing_keys(runs: Sequence[RunInfo]) -> list[str]:
    """Recipe keys whose values are not the same in all `runs` (in recipe order)."""
    keys: list[str] = []
    for info in runs:
        keys += [k for k in info.recipe if k not in keys]
    missing = object()
    return [k for k in keys if k not in _IGNORED and k != "model.backbone"
            and len({repr(info.recipe.get(k, missing)) for info in runs}) > 1]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def table_rows(runs: Sequence[RunInfo]) -> tuple[list[str], list[list[Any]]]:
    """Header and one row per run: name, backbone, the differing keys, best metric and epoch, progress, state."""
    keys = differing_keys(runs)
    metrics = sorted({info.metric for info in runs if info.recipe}) or ["val_acc"]
    best = f"best {metrics[0]}" if len(metrics) == 1 else "best (train.monitor)"
    header = ["run", "backbone", *keys, best, "best epoch", "epochs", "train time", "status"]
    rows = []
    for info in runs:
        epochs = info.recipe.get("train.epochs")
        rows.append([info.name, info.recipe.get("model.backbone"), *(info.recipe.get(k) for k in keys),
                     info.best, info.best_epoch, f"{info.epochs_done}/{epochs}", _duration(info.seconds),
                     info.status])
    return header, rows


def _sort(header: list[str], rows: list[list[Any]], column: str) -> list[list[Any]]:
    """Numbers high to low (the best run first), text A to Z; empty cells last."""
    names = {h.lower(): i for i, h in enumerate(header)}
    if column.lower() == "best":
        column = header[[h.startswith("best ") and h != "best epoch" for h in header].index(True)]
    index = names.get(column.lower())
    if index is None:
        raise FinetuneError(f"--sort {column}: no such column; columns are: {', '.join(header)}")
    numeric = [r for r in rows if isinstance(r[index], (int, float)) and not isinstance(r[index], bool)]
    if len(numeric) == len([r for r in rows if r[index] is not None]) and numeric:
        metric = header[index].removeprefix("best ")
        descending = not (metric in METRICS and lower_is_better(metric))
        present = sorted(numeric, key=lambda r: r[index], reverse=descending)
    else:
        present = sorted((r for r in rows if r[index] is not None), key=lambda r: str(r[index]))
    return present + [r for r in rows if r[index] is None]


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned with spaces, as the terminal shows them."""
    cells = [list(header)] + [[_text(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def runs_table(
    root: Union[str, Path] = "runs",
    sort: Optional[str] = None,
    csv_out: Optional[Union[str, Path]] = None,
    html_out: Optional[Union[str, Path]] = None,
    log: Log = print,
) -> tuple[list[str], list[list[Any]]]:
    """Print the table of every run under `root`; optionally write it as CSV, or as an HTML page with all curves.

    Args:
        root: folder to look in, sub-folders included.
        sort: sort by a column: best, run, a recipe key such as train.lr... (numbers high to low).
        csv_out: also write the table as CSV.
        html_out: also write one HTML page: the table and all validation curves.
        log: where the table goes.
    """
    root = Path(root).expanduser()
    runs = [read_run(run, root) for run in find_runs(root)]
    if not runs:
        raise FinetuneError(f"no run folders under {root}: a run folder is one `finetune train` wrote "
                            f"(it holds {RunDir(root).recipe.name})")
    header, rows = table_rows(runs)
    if sort:
        rows = _sort(header, rows, sort)
    log(format_table(header, rows))
    if csv_out:
        path = Path(csv_out).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            csv.writer(handle).writerows([header, *[["" if v is None else v for v in r] for r in rows]])
        log(f"wrote {path}")
    if html_out:
        path = Path(html_out).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        curves = plot_runs({info.name: info.history for info in runs})
        path.write_text(render_runs_page(root, header, [[_text(v) for v in r] for r in rows], curves),
                        encoding="utf-8")
        log(f"wrote {path}")
    return header, rows

