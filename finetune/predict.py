"""Kaggle-style submission files: one row per test image, Ids as strings, sorted."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from finetune.errors import FinetuneError

__all__ = ["VALUE_KINDS", "image_id", "order_by_id", "write_submission"]

VALUE_KINDS = ("name", "index")


def image_id(path: Path) -> str:
    """The Kaggle Id of an image: its file stem, as text (`0001.jpg` → `0001`)."""
    return path.stem


def order_by_id(ids: Sequence[str]) -> list[int]:
    """Row order: numeric when every Id is digits (so 2 < 10), else by text."""
    if ids and all(i.isdigit() for i in ids):
        return sorted(range(len(ids)), key=lambda k: (int(ids[k]), ids[k]))
    return sorted(range(len(ids)), key=lambda k: ids[k])


def write_submission(
    paths: Sequence[Path],
    probs: np.ndarray,
    classes: Sequence[str],
    out: Path,
    id_column: str = "Id",
    label_column: str = "Category",
    value: str = "name",
) -> int:
    """Write `Id,Category` rows (predicted class name or index) and return the row count."""
    if value not in VALUE_KINDS:
        raise FinetuneError(f"--value must be one of {', '.join(VALUE_KINDS)}, got {value!r}")
    if len(paths) != len(probs):
        raise FinetuneError(f"internal mismatch: {len(paths)} images but {len(probs)} predictions")
    ids = [image_id(p) for p in paths]
    seen: dict[str, Path] = {}
    for i, path in zip(ids, paths):
        if i in seen:
            raise FinetuneError(f"two test images share the Id '{i}': {seen[i].name} and {path.name}; rename one")
        seen[i] = path
    predicted = probs.argmax(axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([id_column, label_column])
        for k in order_by_id(ids):
            writer.writerow([ids[k], classes[predicted[k]] if value == "name" else int(predicted[k])])
    return len(ids)
