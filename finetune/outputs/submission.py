"""Kaggle-style submission files: one row per test image, Ids as strings, written as batches finish.

The row order is fixed before inference (sorted by Id, or the sample submission's order), so
rows stream to disk batch by batch and memory stays flat however many images there are. Files
appear atomically (temporary file, then rename): a crash never leaves a truncated submission.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from finetune.engine.files import mark_written, replace_atomically, temporary_beside
from finetune.errors import FinetuneError
from finetune.config.options import ID_FORMATS, VALUE_KINDS, SubmissionOptions

__all__ = [
    "AtomicCSV",
    "VALUE_KINDS",
    "ID_FORMATS",
    "SubmissionPlan",
    "image_ids",
    "order_by_id",
    "plan_submission",
    "read_sample_submission",
    "write_rows",
    "SubmissionFiles",
    "stream_rows",
]


def image_ids(paths: Sequence[Path], id_format: str = "stem", width: int = 4, start: int = 1) -> list[str]:
    """Ids for `paths`: file stem, file name, or the position in file-name order as zero-padded text.

    `index` is the HW03 sample code's `pad4(i)`: images sorted by file name, numbered from `start`
    (1 there) and padded to `width` digits (4 there; 0 = no padding).
    """
    if id_format not in ID_FORMATS:
        raise FinetuneError(f"--id-format must be one of {', '.join(ID_FORMATS)}, got {id_format!r}")
    if id_format == "stem":
        ids = [p.stem for p in paths]
    elif id_format == "name":
        ids = [p.name for p in paths]
    else:
        if width < 0 or start < 0:
            raise FinetuneError("--id-width and --index-start must be 0 or more (HW03: width 4, start 1)")
        position = {k: n for n, k in enumerate(sorted(range(len(paths)), key=lambda k: (paths[k].name, str(paths[k]))))}
        ids = [f"{position[k] + start:0{width}d}" for k in range(len(paths))]
    seen: dict[str, Path] = {}
    for i, path in zip(ids, paths):
        if i in seen:
            raise FinetuneError(
                f"two test images share the Id '{i}': {seen[i].name} and {path.name}; "
                "rename one or use --id-format name"
            )
        seen[i] = path
    return ids


def order_by_id(ids: Sequence[str]) -> list[int]:
    """Row order: numeric when every Id is digits (so 2 < 10), else by text."""
    if ids and all(i.isdigit() for i in ids):
        return sorted(range(len(ids)), key=lambda k: (int(ids[k]), ids[k]))
    return sorted(range(len(ids)), key=lambda k: ids[k])


@dataclass
class SubmissionPlan:
    """What to write, in which order: Ids and their images, and the submission's columns."""

    ids: list[str]
    paths: list[Path]
    id_column: str = "Id"
    label_column: Optional[str] = "Category"  # None: the submission holds one probability column per class
    prob_columns: list[str] = field(default_factory=list)  # class names, in the sample submission's order


def read_sample_submission(path: Path) -> tuple[list[str], list[str]]:
    """(header, Ids in file order) of a Kaggle sample submission."""
    if not path.is_file():
        raise FinetuneError(f"sample submission not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a BOM is not part of the header
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise FinetuneError(f"{path} needs a header with an Id column and a label (or per-class) column")
        ids = [row[0].strip() for row in reader if row and row[0].strip()]
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise FinetuneError(f"{path} lists Id(s) {duplicates[:5]} more than once")
    if not ids:
        raise FinetuneError(f"{path} has a header but no Ids")
    return header, ids


def _id_hint(paths: Sequence[Path], wanted: set[str]) -> str:
    """An --id-format setting under which the images' Ids match `wanted` exactly, if there is one."""
    widths = sorted({len(i) for i in wanted if i.isdigit()} | {0, 4})
    options = [("stem", 4, 1), ("name", 4, 1)] + [("index", w, s) for w in widths for s in (1, 0)]
    for fmt, width, start in options:
        try:
            if set(image_ids(paths, fmt, width, start)) == wanted:
                extra = f" --id-width {width} --index-start {start}" if fmt == "index" else ""
                return f"; they match with --id-format {fmt}{extra}"
        except FinetuneError:
            continue
    return ""


def plan_submission(
    paths: Sequence[Path],
    classes: Sequence[str],
    id_format: str = "stem",
    id_width: int = 4,
    index_start: int = 1,
    id_column: str = "Id",
    label_column: str = "Category",
    sample: Optional[Path] = None,
) -> SubmissionPlan:
    """Row order and columns: sorted by Id, or exactly the sample submission's Ids, order and header."""
    ids = image_ids(paths, id_format, id_width, index_start)
    if sample is None:
        order = order_by_id(ids)
        return SubmissionPlan([ids[k] for k in order], [paths[k] for k in order], id_column, label_column)
    header, sample_ids = read_sample_submission(sample)
    by_id = dict(zip(ids, paths))
    missing = [i for i in sample_ids if i not in by_id]
    extra = sorted(set(ids) - set(sample_ids))
    if missing or extra:
        raise FinetuneError(
            f"test images and {sample.name} do not match one-to-one: {len(missing)} Id(s) in the sample have no image "
            f"(e.g. {missing[:5]}), {len(extra)} image Id(s) are not in the sample (e.g. {extra[:5]})"
            f"{_id_hint(paths, set(sample_ids))}"
        )
    columns = header[1:]
    if len(columns) == 1:
        return SubmissionPlan(sample_ids, [by_id[i] for i in sample_ids], header[0], columns[0])
    if sorted(columns) != sorted(classes):
        raise FinetuneError(
            f"{sample.name} has columns {header}: expected an Id column and one label column, or an Id column "
            f"and one column per class ({', '.join(classes[:20])})"
        )
    return SubmissionPlan(sample_ids, [by_id[i] for i in sample_ids], header[0], None, list(columns))


class AtomicCSV:
    """A csv writer on a temporary file next to `path`, renamed into place (and marked as ours) by `commit`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd, self.tmp = temporary_beside(path)
        self.handle = os.fdopen(fd, "w", newline="")
        self.writer = csv.writer(self.handle)

    def commit(self) -> None:
        self.handle.close()
        replace_atomically(self.tmp, self.path)
        mark_written(self.path)

    def discard(self) -> None:
        self.handle.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _fmt(p: float) -> str:
    return f"{p:.6g}"


@dataclass(frozen=True)
class SubmissionFiles:
    """Every file a prediction writes, named after `out`: the submission and its optional side files."""

    out: Path
    probs: Optional[Path] = None  # OUT_probs.csv: every class's probability
    topk: Optional[Path] = None  # OUT_topK.csv: the K likeliest classes

    @classmethod
    def beside(cls, out: Path, probs: bool = False, topk: int = 0) -> "SubmissionFiles":
        """The files a submission `out` asks for, next to it."""
        return cls(out, out.with_name(out.stem + "_probs.csv") if probs else None,
                   out.with_name(f"{out.stem}_top{topk}.csv") if topk else None)

    @property
    def unreadable(self) -> Path:
        """OUT_unreadable.csv: the images that did not decode (each still has its row)."""
        return self.out.with_name(self.out.stem + "_unreadable.csv")

    def writers(self) -> dict[str, "AtomicCSV"]:
        """Open the submission (`sub`) and the probability file (`probs`), each on a temporary file."""
        files = {"sub": AtomicCSV(self.out)}
        if self.probs is not None:
            files["probs"] = AtomicCSV(self.probs)
        return files


def write_rows(plan: SubmissionPlan, batches: Iterable[np.ndarray], classes: Sequence[str], files: SubmissionFiles,
               options: SubmissionOptions) -> int:
    """Write submission rows (and optional probability / top-k files) as probability batches arrive.

    `batches` yields (B, C) arrays in `plan` order; returns the number of rows written. With
    `options.reject_below`, an image whose top probability is below it gets `options.reject_label`.
    """
    reject_below, topk = options.reject_below, options.topk
    if reject_below is not None and plan.label_column is None:
        raise FinetuneError("--reject-below needs a label column; this sample submission has one column per class")
    if topk and not 1 <= topk <= len(classes):
        raise FinetuneError(f"--topk must be between 1 and the number of classes ({len(classes)}), got {topk}")
    writers = files.writers()
    if topk and files.topk is not None:
        writers["topk"] = AtomicCSV(files.topk)
        writers["topk"].writer.writerow(
            [plan.id_column] + [f"{kind}_{r}" for r in range(1, topk + 1) for kind in ("class", "score")])

    def label(p: np.ndarray) -> list:
        k = int(p.argmax())
        if reject_below is not None and p[k] < reject_below:
            return [options.reject_label]
        return [classes[k] if options.value == "name" else k]

    def extra(key: str, i: str, p: np.ndarray) -> None:
        best = np.argsort(-p, kind="stable")[:topk]
        writers[key].writer.writerow([i] + [x for c in best for x in (classes[c], _fmt(p[c]))])

    return stream_rows(plan, batches, classes, writers, label, extra)


def stream_rows(plan: SubmissionPlan, batches: Iterable[np.ndarray], classes: Sequence[str],
                files: dict[str, "AtomicCSV"], label: Callable[[np.ndarray], list],
                extra: Optional[Callable[[str, str, np.ndarray], None]] = None) -> int:
    """Write the submission (and `probs`) rows batch by batch in `plan` order, committing every file at the end.

    `label(p)` gives one image's label cells; with a per-class sample submission (`plan.label_column`
    None) the row holds the probabilities instead. `extra` writes any other file's row (top-k).
    Files in `files` after sub/probs are headed already. Returns the number of rows.
    """
    try:
        class_index = {c: i for i, c in enumerate(classes)}
        if plan.label_column is None:
            prob_order = [class_index[c] for c in plan.prob_columns]
            files["sub"].writer.writerow([plan.id_column, *plan.prob_columns])
        else:
            files["sub"].writer.writerow([plan.id_column, plan.label_column])
        if "probs" in files:
            files["probs"].writer.writerow([plan.id_column, *classes])
        row = 0
        for probs in batches:
            ids = plan.ids[row : row + len(probs)]
            if len(ids) != len(probs):
                raise FinetuneError(f"internal mismatch: {len(plan.ids)} images but more predictions than that")
            for i, p in zip(ids, probs):
                if plan.label_column is None:
                    files["sub"].writer.writerow([i, *(_fmt(p[c]) for c in prob_order)])
                else:
                    files["sub"].writer.writerow([i, *label(p)])
                if "probs" in files:
                    files["probs"].writer.writerow([i, *map(_fmt, p)])
                for key in files.keys() - {"sub", "probs"}:
                    extra(key, i, p)
            for f in files.values():
                f.handle.flush()
            row += len(probs)
        if row != len(plan.ids):
            raise FinetuneError(f"internal mismatch: {len(plan.ids)} images but {row} predictions")
        for f in files.values():
            f.commit()
    except BaseException:
        for f in files.values():  # no temporary file outlives a failed write
            f.discard()
        raise
    return row

