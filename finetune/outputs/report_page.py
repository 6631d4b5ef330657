"""report.html: one self-contained HTML page per run folder (figures embedded as base64, no server, no JS).

It is rendered from the files a `RunDir` and its `EvalFiles` name, and written by the RunDir.
"""

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
from finetune.outputs.run_dir import EvalFiles, RunDir

__all__ = ["PAGE_CSS", "build_report", "render_report", "render_runs_page", "single_label_sections",
           "multilabel_sections"]

PAGE_CSS = """
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
    with path.open(newline="", encoding="utf-8-sig") as handle:
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


def _evaluation_sections(files: EvalFiles) -> tuple[list[str], list[str]]:
    """(summary cards, body sections) from an evaluation folder, as the task that wrote it lays them out."""
    metrics = _read_json(files.metrics) or {}
    # The bundle says which task wrote it (metrics.json "task"); bundles from before that are single-label.
    return _SECTIONS.get(metrics.get("task"), single_label_sections)(files, metrics)


def single_label_sections(files: EvalFiles, metrics: dict) -> tuple[list[str], list[str]]:
    """(cards, sections) of a one-label-per-image evaluation."""
    report = _read_json(files.report_json)
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
        if "ece_uncalibrated" in metrics:
            cards.append(_card(f"{metrics['ece_uncalibrated']:.3f}",
                               f"ECE before temperature scaling (T = {metrics.get('temperature', 1.0):.2f})"))
    parts.append("<h2>Confusion matrix</h2>" + _img(files.confusion_png, "confusion matrix",
                                                    "rows: true class; columns: predicted class"))
    confused = _read_csv(files.most_confused)[1:11]
    if confused:
        parts.append("<p>Most confused pairs:</p>" + _table([[_esc(c) for c in row] for row in confused],
                                                            ["true", "predicted", "images"]))
    for figure, alt, caption in ((files.most_confused_png, "most confused pairs", "the most frequent mistakes"),
                                 (files.class_recall_png, "per-class recall", "classes with the lowest recall first")):
        image = _img(figure, alt, caption)
        if image:
            parts.append(image)
    if report:
        parts.append("<h2>Per-class results</h2>" + _per_class(report))
    gallery = _img(files.misclassified, "misclassified images",
                   "each tile: file, true class (its probability), predicted class (confidence)")
    if gallery:
        parts.append("<h2>Misclassified, most confident first</h2>" + gallery)
    cam = _img(files.gradcam, "Grad-CAM overlays",
               "red: regions that pushed the model towards its (wrong) answer")
    if cam:
        parts.append("<h2>Grad-CAM of the worst mistakes</h2>" + cam)
    reliability = _img(files.reliability, "reliability diagram",
                       "bar below its red confidence mark: over-confident; above: under-confident")
    if reliability:
        parts.append("<h2>Calibration</h2>" + reliability)
    coverage = _img(files.coverage_png, "accuracy against coverage",
                    "keeping only predictions above a confidence threshold (predict --reject-below)")
    if coverage:
        parts.append("<h2>Accuracy against coverage</h2>" + coverage)
    return cards, parts


def multilabel_sections(files: EvalFiles, metrics: dict) -> tuple[list[str], list[str]]:
    """(cards, sections) of a multi-label evaluation (data.task: multilabel)."""
    cards = [_card(f"{metrics['map']:.3f}", f"mAP on {metrics.get('images', '?')} images")] if "map" in metrics else []
    cards += [_card(f"{metrics[key]:.3f}", label) for key, label in (
        ("samples_f1", "mean F1 per image"), ("micro_f1", "micro F1"), ("macro_f1", "macro F1"),
        ("exact_match", "exact label set")) if key in metrics]
    parts = []
    report = _read_json(files.report_json) or {}
    rows = []
    for name, row in report.items():
        if isinstance(row, dict):
            ap = row.get("average_precision")
            rows.append([f"<i>{_esc(name)}</i>" if name.endswith(" avg") else _esc(name), f"{row['precision']:.3f}",
                         f"{row['recall']:.3f}", f"{row['f1-score']:.3f}", "–" if ap is None else f"{ap:.3f}",
                         f"{metrics.get('thresholds', {}).get(name, ''):.2f}" if name in metrics.get("thresholds", {})
                         else "", int(row["support"])])
    if rows:
        parts.append("<h2>Per-label results</h2>" + _table(rows, ["label", "precision", "recall", "f1",
                                                                  "average precision", "threshold", "images"]))
    parts.append("<h2>Per-label confusion</h2>" + _img(files.label_confusion_png, "per-label confusion matrices",
                                                     "rows: label present or not; columns: predicted or not"))
    errors = _read_csv(files.label_errors)[1:11]
    if errors:
        parts.append("<p>Labels most often wrongly added (false positives) or missed (false negatives):</p>"
                     + _table([[_esc(c) for c in row] for row in errors], ["label", "added", "missed", "images"]))
    curves = _img(files.pr_curves_png, "precision-recall curves", "one curve per label; AP is the area under it")
    if curves:
        parts.append("<h2>Precision-recall</h2>" + curves)
    gallery = _img(files.misclassified, "worst label sets", "each tile: file, its F1, labels missed and added")
    if gallery:
        parts.append("<h2>Worst images</h2>" + gallery)
    return cards, parts


def _run_sections(run: RunDir) -> tuple[list[str], list[str]]:
    cards, parts = [], []
    history = _read_csv(run.history)
    if len(history) > 1:
        header, rows = history[0], history[1:]
        if "val_acc" in header:
            k = header.index("val_acc")
            best = max(rows, key=lambda r: float(r[k]))
            cards.append(_card(_pct(float(best[k])), f"best val accuracy (epoch {best[0]} of {len(rows)})"))
        if "val_map" in header:  # a task with mAP per epoch
            k = header.index("val_map")
            best = max(rows, key=lambda r: float(r[k]))
            cards.append(_card(f"{float(best[k]):.3f}", f"best val mAP (epoch {best[0]} of {len(rows)})"))
        parts.append("<h2>Training curves</h2>" + _img(run.curves, "training curves")
                     + f"<details><summary>{_esc(run.history.name)}</summary>{_table([[_esc(c) for c in r] for r in rows], header)}"
                     "</details>")
    counts = _read_csv(run.class_counts)
    if len(counts) > 1:
        parts.append("<h2>Data</h2>" + _table([[_esc(c) for c in r] for r in counts[1:]], counts[0]))
    skipped = _read_csv(run.skipped)[1:]
    if skipped:
        parts.append(f"<p>{len(skipped)} unusable image(s) skipped ({_esc(run.skipped.name)}):</p>"
                     + _table([[_esc(c) for c in r] for r in skipped[:20]], ["path", "reason"]))
    recipe = run.recipe
    if recipe.is_file():
        parts.append(f"<h2>Recipe</h2><pre>{_esc(recipe.read_text())}</pre>")
    return cards, parts


def _cv_sections(run: RunDir, summary: dict) -> tuple[list[str], list[str]]:
    metric = summary.get("metric", "accuracy")  # the task's headline metric
    cards = [_card(f"{100 * summary['mean']:.2f} ± {100 * summary['std']:.2f}%",
                   f"{len(summary['folds'])}-fold CV {metric} (mean ± std)")]
    if summary.get("oof_score") is not None:
        cards.append(_card(_pct(summary["oof_score"]), f"out-of-fold {metric} (all images)"))
    rows = []
    for fold in summary["folds"]:
        name = Path(fold["run_dir"]).name
        link = Path(fold["report"]).relative_to(run.path) if "report" in fold else Path(name)
        rows.append([f'<a href="{_esc(link.as_posix())}">{_esc(name)}</a>', _pct(fold["score"]),
                     fold.get("best_epoch", ""), fold.get("train_images", ""), fold.get("val_images", "")])
    parts = ["<h2>Folds</h2>" + _table(rows, ["fold", f"val {metric}", "best epoch", "train images", "val images"]),
             f"<p>Predict with the ensemble of all folds (out-of-fold predictions: {_esc(run.oof_predictions.name)}):</p>"
             f"<pre class=\"cmd\">{_esc(summary.get('predict_command', ''))}</pre>"]
    return cards, parts


def _recipe_line(run: RunDir) -> str:
    try:
        recipe = yaml.safe_load(run.recipe.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    model, data, train = recipe.get("model") or {}, recipe.get("data") or {}, recipe.get("train") or {}
    bits = [f"backbone {model.get('backbone')}", f"{data.get('image_size')} px",
            f"{train.get('epochs')} epoch(s)", f"data {data.get('root')}"]
    return " · ".join(_esc(b) for b in bits)


def render_report(run: RunDir, evaluation: EvalFiles) -> str:
    """The self-contained report page of a run folder (or a k-fold parent folder) and one evaluation."""
    cv = run.read_cv_summary()
    cards, parts = _cv_sections(run, cv) if cv else ([], [])
    run_cards, run_parts = _run_sections(run)
    shown = evaluation.folder.is_dir()
    eval_cards, eval_parts = _evaluation_sections(evaluation) if shown else ([], [])
    when = datetime.now().strftime("%Y-%m-%d %H:%M")
    body = "".join([
        f"<h1>{_esc(run.path.name)}</h1>",
        f'<div class="sub">{_recipe_line(run)}</div>',
        f'<div class="sub">{_esc(run.path.resolve())}'
        f'{f" · evaluation: {_esc(evaluation.folder)}" if shown else ""} · built {when}</div>',
        f'<div class="cards">{"".join(cards + run_cards + eval_cards)}</div>',
        *parts, *eval_parts, *run_parts,
    ])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(run.path.name)} · finetune '
            f'report</title><meta name="viewport" content="width=device-width, initial-scale=1"><style>{PAGE_CSS}</style>'
            f"</head><body><main>{body}</main></body></html>\n")


def build_report(run: RunDir, evaluation: Optional[EvalFiles] = None) -> Path:
    """Render and write the report page of `run` with `evaluation` (default: the run's eval/); returns its path."""
    evaluation = evaluation or run.eval
    if run.is_main and not (run.is_run() or evaluation.exists()):
        raise FinetuneError(f"{run.path} is not a run folder (no {run.recipe.name}, {run.eval.folder.name}/ or "
                            f"{run.cv_summary.name}); pass the folder `finetune train` created")
    page = render_report(run, evaluation) if run.is_main else ""
    return run.write_report(page, evaluation)


def render_runs_page(root: Path, header: list[str], rows: list[list[str]], curves_png: bytes) -> str:
    """One page for `finetune runs --html`: the runs table and every run's validation curves overlaid."""
    data = base64.b64encode(curves_png).decode("ascii")
    when = datetime.now().strftime("%Y-%m-%d %H:%M")
    body = "".join([
        f"<h1>runs in {_esc(root)}</h1>",
        f'<div class="sub">{len(rows)} run(s) · columns between backbone and the best metric are the recipe '
        f"values that differ between them · built {when}</div>",
        "<h2>Runs</h2>", _table([[_esc(c) for c in row] for row in rows], header),
        "<h2>Validation curves</h2>",
        f'<figure><img src="data:image/png;base64,{data}" alt="validation curves of every run"></figure>',
    ])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>runs · finetune</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{PAGE_CSS}</style>'
            f"</head><body><main>{body}</main></body></html>\n")


_SECTIONS = {"multilabel": multilabel_sections}  # a bundle's layout by the "task" its metrics.json names
