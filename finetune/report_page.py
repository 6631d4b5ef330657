"""report.html: one self-contained page per run folder (figures embedded as base64, no server, no JS)."""

from __future__ import annotations

import base64
import csv
import html
import json
from datetime import datetime
from pathlib import Path
from typing import Optional

import yaml

from finetune.errors import FinetuneError

__all__ = ["build_report", "REPORT_NAME"]

REPORT_NAME = "report.html"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:1.6rem;margin:0 0 4px} h2{font-size:1.2rem;margin:28px 0 10px;border-bottom:1px solid #d8dde3}
.sub{color:#5b6672;font-size:.9rem}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:16px}
.card{background:#fff;border:1px solid #d8dde3;border-radius:8px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:1.35rem} .card span{color:#5b6672;font-size:.8rem}
figure{margin:8px 0;background:#fff;border:1px solid #d8dde3;border-radius:8px;padding:8px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:#5b6672;font-size:.85rem;margin-top:4px}
table{border-collapse:collapse;background:#fff;font-size:.88rem;margin:6px 0}
th,td{border:1px solid #d8dde3;padding:4px 8px;text-align:right} th{background:#eef1f4}
td:first-child,th:first-child{text-align:left}
.bar{display:inline-block;height:8px;background:#4c72b0;border-radius:2px;vertical-align:middle;margin-left:6px}
pre{background:#fff;border:1px solid #d8dde3;border-radius:8px;padding:10px;overflow:auto;font-size:.82rem}
code{background:#eef1f4;padding:1px 4px;border-radius:3px} pre.cmd{white-space:pre-wrap;word-break:break-all}
"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _img(path: Path, alt: str, caption: str = "") -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}">{cap}</figure>'


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _read_csv(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def _table(rows: list[list[object]], header: list[str]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{_esc(value)}</b><span>{_esc(label)}</span></div>'


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _per_class(report: dict) -> str:
    rows = []
    for name, row in report.items():
        if not isinstance(row, dict) or name in ("macro avg", "weighted avg", "micro avg"):
            continue
        recall = float(row["recall"])
        rows.append([_esc(name), f"{row['precision']:.3f}",
                     f'{recall:.3f}<span class="bar" style="width:{int(80 * recall)}px"></span>',
                     f"{row['f1-score']:.3f}", int(row["support"])])
    for name in ("macro avg", "weighted avg"):
        if name in report:
            row = report[name]
            rows.append([f"<i>{name}</i>", f"{row['precision']:.3f}", f"{row['recall']:.3f}",
                         f"{row['f1-score']:.3f}", int(row["support"])])
    return _table(rows, ["class", "precision", "recall", "f1", "images"])


def _evaluation_sections(eval_dir: Path) -> tuple[list[str], list[str]]:
    """(summary cards, body sections) from an evaluation folder."""
    metrics = _read_json(eval_dir / "metrics.json") or {}
    report = _read_json(eval_dir / "classification_report.json")
    cards, parts = [], []
    if metrics or report:
        accuracy = metrics.get("accuracy", (report or {}).get("accuracy"))
        cards.append(_card(_pct(accuracy), f"accuracy on {metrics.get('images', '?')} images"))
        if "macro_f1" in metrics:
            cards.append(_card(f"{metrics['macro_f1']:.3f}", "macro F1"))
        for name, value in (metrics.get("top_k") or {}).items():
            if name != "top1":
                cards.append(_card(_pct(value), f"{name} accuracy"))
        if "ece" in metrics:
            cards.append(_card(f"{metrics['ece']:.3f}", "calibration error (ECE)"))
    parts.append("<h2>Confusion matrix</h2>" + _img(eval_dir / "confusion_matrix.png", "confusion matrix",
                                                    "rows: true class; columns: predicted class"))
    confused = _read_csv(eval_dir / "most_confused.csv")[1:11]
    if confused:
        parts.append("<p>Most confused pairs:</p>" + _table([[_esc(c) for c in row] for row in confused],
                                                            ["true", "predicted", "images"]))
    if report:
        parts.append("<h2>Per-class results</h2>" + _per_class(report))
    gallery = _img(eval_dir / "misclassified.png", "misclassified images",
                   "each tile: file, true class (its probability), predicted class (confidence)")
    if gallery:
        parts.append("<h2>Misclassified, most confident first</h2>" + gallery)
    cam = _img(eval_dir / "gradcam.png", "Grad-CAM overlays",
               "red: regions that pushed the model towards its (wrong) answer")
    if cam:
        parts.append("<h2>Grad-CAM of the worst mistakes</h2>" + cam)
    reliability = _img(eval_dir / "reliability.png", "reliability diagram",
                       "bar below its red confidence mark: over-confident; above: under-confident")
    if reliability:
        parts.append("<h2>Calibration</h2>" + reliability)
    return cards, parts


def _run_sections(run_dir: Path) -> tuple[list[str], list[str]]:
    cards, parts = [], []
    history = _read_csv(run_dir / "history.csv")
    if len(history) > 1:
        header, rows = history[0], history[1:]
        if "val_acc" in header:
            k = header.index("val_acc")
            best = max(rows, key=lambda r: float(r[k]))
            cards.append(_card(_pct(float(best[k])), f"best val accuracy (epoch {best[0]} of {len(rows)})"))
        parts.append("<h2>Training curves</h2>" + _img(run_dir / "curves.png", "training curves")
                     + f"<details><summary>history.csv</summary>{_table([[_esc(c) for c in r] for r in rows], header)}"
                     "</details>")
    counts = _read_csv(run_dir / "class_counts.csv")
    if len(counts) > 1:
        parts.append("<h2>Data</h2>" + _table([[_esc(c) for c in r] for r in counts[1:]], counts[0]))
    skipped = _read_csv(run_dir / "skipped_images.csv")[1:]
    if skipped:
        parts.append(f"<p>{len(skipped)} unusable image(s) skipped (skipped_images.csv):</p>"
                     + _table([[_esc(c) for c in r] for r in skipped[:20]], ["path", "reason"]))
    recipe = run_dir / "recipe.yaml"
    if recipe.is_file():
        parts.append(f"<h2>Recipe</h2><pre>{_esc(recipe.read_text())}</pre>")
    return cards, parts


def _cv_sections(run_dir: Path, summary: dict) -> tuple[list[str], list[str]]:
    cards = [_card(f"{100 * summary['mean']:.2f} ± {100 * summary['std']:.2f}%",
                   f"{len(summary['folds'])}-fold CV accuracy (mean ± std)")]
    if summary.get("oof_accuracy") is not None:
        cards.append(_card(_pct(summary["oof_accuracy"]), "out-of-fold accuracy (all images)"))
    rows = []
    for fold in summary["folds"]:
        link = Path(fold["run_dir"]).name
        rows.append([f'<a href="{_esc(link)}/{REPORT_NAME}">{_esc(link)}</a>', _pct(fold["accuracy"]),
                     fold.get("best_epoch", ""), fold.get("train_images", ""), fold.get("val_images", "")])
    parts = ["<h2>Folds</h2>" + _table(rows, ["fold", "val accuracy", "best epoch", "train images", "val images"]),
             f"<p>Predict with the ensemble of all folds (out-of-fold predictions: oof_predictions.csv):</p>"
             f"<pre class=\"cmd\">{_esc(summary.get('predict_command', ''))}</pre>"]
    return cards, parts


def _recipe_line(run_dir: Path) -> str:
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    model, data, train = recipe.get("model") or {}, recipe.get("data") or {}, recipe.get("train") or {}
    bits = [f"backbone {model.get('backbone')}", f"{data.get('image_size')} px",
            f"{train.get('epochs')} epoch(s)", f"data {data.get('root')}"]
    return " · ".join(_esc(b) for b in bits)


def build_report(run_dir: Path, eval_dir: Optional[Path] = None, out: Optional[Path] = None) -> Path:
    """Write a self-contained report.html for a run folder (or a k-fold parent folder); returns its path."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FinetuneError(f"run folder not found: {run_dir}")
    eval_dir = Path(eval_dir) if eval_dir else run_dir / "eval"
    cv = _read_json(run_dir / "cv_summary.json")
    if cv is None and not (run_dir / "recipe.yaml").is_file() and not (eval_dir / "metrics.json").is_file():
        raise FinetuneError(f"{run_dir} is not a run folder (no recipe.yaml, eval/ or cv_summary.json); "
                            "pass the folder `finetune train` created")
    cards, parts = _cv_sections(run_dir, cv) if cv else ([], [])
    run_cards, run_parts = _run_sections(run_dir)
    eval_cards, eval_parts = _evaluation_sections(eval_dir) if eval_dir.is_dir() else ([], [])
    when = datetime.now().strftime("%Y-%m-%d %H:%M")
    body = "".join([
        f"<h1>{_esc(run_dir.name)}</h1>",
        f'<div class="sub">{_recipe_line(run_dir)}</div>',
        f'<div class="sub">{_esc(run_dir.resolve())}'
        f'{f" · evaluation: {_esc(eval_dir)}" if eval_dir.is_dir() else ""} · built {when}</div>',
        f'<div class="cards">{"".join(cards + run_cards + eval_cards)}</div>',
        *parts, *eval_parts, *run_parts,
    ])
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(run_dir.name)} · finetune report'
            f'</title><meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f"<body><main>{body}</main></body></html>\n")
    out = Path(out) if out else run_dir / REPORT_NAME
    out.write_text(page, encoding="utf-8")
    return out
