"""audit.html: the data audit on one self-contained page — every doubted label beside typical images of its given
and its suggested class, duplicate pairs side by side, outliers, the class balance, and the files that list it all.

Thumbnails are small JPEGs embedded as base64 (no server, no JS), rendered from the audit folder's CSV lists.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from finetune.data.images import load_rgb
from finetune.data.sources import Sample
from finetune.errors import FinetuneError
from finetune.outputs.report_page import PAGE_CSS
from finetune.outputs.run_dir import AuditFiles

__all__ = ["AuditPage", "render_audit", "SHOWN", "THUMB"]

SHOWN = 60  # rows of each list drawn on the page; the CSV files hold them all
THUMB = 112  # thumbnail side in pixels
EXAMPLES = 3  # typical images shown for a given and a suggested class

_MORE_CSS = """
.row{display:flex;gap:14px;align-items:flex-start;background:#fff;border:1px solid #d8dde3;border-radius:8px;
padding:8px;margin:8px 0;flex-wrap:wrap}
.cell{display:flex;flex-direction:column;gap:4px;font-size:.8rem;color:#5b6672;max-width:380px}
.thumbs{display:flex;gap:4px} .thumbs img,.flag img{width:112px;height:112px;object-fit:contain;background:#eef1f4;
border-radius:4px} .flag img{outline:3px solid #c44e52} .path{word-break:break-all;font-size:.75rem}
.grid{display:flex;flex-wrap:wrap;gap:10px}
"""


@dataclass
class AuditPage:
    """What the page is drawn from: the audit folder (its CSV lists and audit.json's summary) and the labelled
    samples with their labels in words, to show typical images of a class."""

    files: AuditFiles
    summary: dict
    samples: Sequence[Sample]
    given: Sequence[str]  # each sample's label as text
    classes: Sequence[str]
    encode: Callable[[Sample], object]  # the task's target encoding: a class index or a multi-hot vector


def _esc(value: object) -> str:
    return html.escape(str(value))


def _thumb(path: Path) -> str:
    """An <img> of `path` as a small embedded JPEG, or a note when it does not decode."""
    try:
        image = Image.fromarray(load_rgb(Path(path), min_side=THUMB))
    except (FinetuneError, OSError, ValueError) as err:
        return f'<span title="{_esc(err)}">(unreadable)</span>'
    image.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" alt="{_esc(Path(path).name)}" title="{_esc(path)}">'


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _examples(page: AuditPage, doubted: set[str]) -> dict[str, list[Path]]:
    """Up to EXAMPLES images of each class whose label nobody doubts, in data order."""
    chosen: dict[str, list[Path]] = {name: [] for name in page.classes}
    for sample in page.samples:
        if str(sample.path) in doubted:
            continue
        target = np.asarray(page.encode(sample))
        members = [int(target)] if target.ndim == 0 else np.flatnonzero(target).tolist()
        for index in members:
            if len(chosen[page.classes[index]]) < EXAMPLES:
                chosen[page.classes[index]].append(sample.path)
    return chosen


def _class_thumbs(label: str, examples: dict[str, list[Path]]) -> str:
    """Typical images of each class named in `label` (one name, or several separated by spaces)."""
    names = [name for name in (label.split(" ") if label not in examples else [label]) if name in examples]
    paths = [path for name in names for path in examples[name]][:EXAMPLES]
    return "".join(_thumb(path) for path in paths) or "<span>(no example)</span>"


def _label_section(page: AuditPage, issues: list[dict]) -> str:
    if not issues:
        return "<h2>Doubtful labels</h2><p>None: every label agrees with the out-of-sample probabilities.</p>"
    examples = _examples(page, {row["path"] for row in issues})
    rows = []
    for row in issues[:SHOWN]:
        rows.append(
            f'<div class="row label-issue"><div class="cell flag">{_thumb(Path(row["path"]))}'
            f'<span class="path">{_esc(row["path"])}</span><span>label quality {_esc(row["quality"])}</span></div>'
            f'<div class="cell"><b>given: {_esc(row["given"])}</b><div class="thumbs">'
            f'{_class_thumbs(row["given"], examples)}</div></div>'
            f'<div class="cell"><b>suggested: {_esc(row["suggested"] or "(none)")}</b><div class="thumbs">'
            f'{_class_thumbs(row["suggested"], examples)}</div></div></div>')
    more = f"<p class='sub'>and {len(issues) - SHOWN} more in label_issues.csv</p>" if len(issues) > SHOWN else ""
    return (f"<h2>Doubtful labels ({len(issues)})</h2><p class='sub'>Worst first. Each flagged image (red) beside "
            "typical images of its given class and of the class the out-of-sample probabilities suggest.</p>"
            + "".join(rows) + more)


def _duplicate_section(pairs: list[dict]) -> str:
    if not pairs:
        return "<h2>Duplicates and leaks</h2><p>None found.</p>"
    rows = []
    for row in pairs[:SHOWN]:
        leak = " <b>leak</b>" if row["split_a"] != row["split_b"] else ""
        rows.append(
            f'<div class="row duplicate"><div class="thumbs">{_thumb(Path(row["path_a"]))}'
            f'{_thumb(Path(row["path_b"]))}</div><div class="cell"><span>{_esc(row["split_a"])} / '
            f'{_esc(row["split_b"])}{leak}: {_esc(row["kind"])}, similarity {_esc(row["similarity"])}</span>'
            f'<span class="path">{_esc(row["path_a"])}</span>'
            f'<span class="path">{_esc(row["path_b"])}</span></div></div>')
    more = f"<p class='sub'>and {len(pairs) - SHOWN} more in duplicates.csv</p>" if len(pairs) > SHOWN else ""
    return f"<h2>Duplicates and leaks ({len(pairs)} pairs)</h2>" + "".join(rows) + more


def _outlier_section(outliers: list[dict]) -> str:
    if not outliers:
        return "<h2>Outliers</h2><p>None: no image is far from all the others.</p>"
    cells = [f'<div class="cell outlier">{_thumb(Path(row["path"]))}<span>{_esc(row["split"])}, distance '
             f'{_esc(row["score"])}</span><span class="path">{_esc(Path(row["path"]).name)}</span></div>'
             for row in outliers[:SHOWN]]
    return (f"<h2>Outliers ({len(outliers)})</h2><p class='sub'>Farthest from their nearest neighbours in the "
            "backbone's embedding space: blank frames, screenshots, another domain.</p>"
            f"<div class='grid'>{''.join(cells)}</div>")


def _balance_section(summary: dict) -> str:
    counts = summary.get("class_counts", {})
    top = max(counts.values(), default=1) or 1
    rows = "".join(f"<tr><td>{_esc(name)}</td><td>{count}<span class='bar' style='width:{160 * count / top:.0f}px'>"
                   "</span></td></tr>" for name, count in counts.items())
    return (f"<h2>Class balance</h2><p class='sub'>largest / smallest class: {summary.get('imbalance')}</p>"
            f"<table><tr><th>class</th><th>images</th></tr>{rows}</table>")


def _files_section(files: AuditFiles, summary: dict) -> str:
    names = [files.label_issues, files.label_quality, files.duplicates, files.outliers, files.excluded, files.summary, files.skipped]
    items = "".join(f"<li><code>{_esc(p.name)}</code></li>" for p in names if p.is_file())
    manifest = summary.get("manifest")
    act = (f"<p>Train on the cleaned manifest: <code>--set data.layout=csv data.csv={_esc(manifest)}</code></p>"
           if manifest else "")
    return (f"<h2>Files</h2><ul>{items}</ul>{act}<p>Leave images out of training without touching the data: edit "
            f"<code>{_esc(files.excluded.name)}</code> and set <code>data.exclude: {_esc(files.excluded)}</code>.</p>"
            f"<pre>{_esc(summary.get('settings'))}</pre>")


def render_audit(page: AuditPage, title: Optional[str] = None) -> str:
    """The audit page's HTML."""
    files, summary = page.files, page.summary
    counts = summary.get("counts", {})
    shown = (("images", "labelled images"), ("label_issues", "doubtful labels"), ("duplicate_pairs", "duplicate pairs"),
             ("leaks", "across splits"), ("outliers", "outliers"), ("skipped_images", "skipped images"))
    cards = "".join(f'<div class="card"><b>{_esc(counts.get(key, 0))}</b><span>{_esc(label)}</span></div>'
                    for key, label in shown)
    source = summary.get("source", {})
    heading = title or f"Data audit: {source.get('data')}"
    sections = [_label_section(page, _rows(files.label_issues)), _duplicate_section(_rows(files.duplicates)),
                _outlier_section(_rows(files.outliers)), _balance_section(summary), _files_section(files, summary)]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(heading)}</title>"
            f"<style>{PAGE_CSS}{_MORE_CSS}</style></head><body><main><h1>{_esc(heading)}</h1>"
            f"<div class='sub'>method {_esc(summary.get('settings', {}).get('method'))}, backbone "
            f"{_esc(source.get('backbone'))}, task {_esc(source.get('task'))}</div><div class='cards'>{cards}</div>"
            + "".join(sections) + "</main></body></html>")
