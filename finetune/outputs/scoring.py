"""The leaderboard view: score a submission CSV against a ground-truth CSV, matched by Id."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

from finetune.data.sources import sort_class_names
from finetune.errors import FinetuneError
from finetune.outputs.evaluation import write_evaluation
from finetune.outputs.run_dir import EvalFiles

__all__ = ["read_labels", "read_matching", "score_csv"]


def read_labels(path: Path, id_column: Optional[str] = None, label_column: Optional[str] = None) -> dict[str, str]:
    """Id → label from a CSV (default columns: the first two); duplicate Ids and missing columns are errors."""
    if not path.is_file():
        raise FinetuneError(f"CSV file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a BOM is not part of the header
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if len(columns) < 2:
            raise FinetuneError(f"{path} needs an Id column and a label column (e.g. Id,Category); found {columns}")
        id_col, label_col = id_column or columns[0], label_column or columns[1]
        for col in (id_col, label_col):
            if col not in columns:
                raise FinetuneError(f"column '{col}' not in {path}; its columns are {', '.join(columns)}")
        labels: dict[str, str] = {}
        for row in reader:
            key = (row[id_col] or "").strip()
            if key in labels:
                raise FinetuneError(f"{path} lists Id {key!r} twice")
            labels[key] = (row[label_col] or "").strip()
    if not labels:
        raise FinetuneError(f"{path} has no rows")
    return labels


def _padding_hint(missing: list[str], extra: list[str]) -> str:
    if missing and extra and all(i.isdigit() for i in missing + extra):
        if {int(i) for i in missing} == {int(i) for i in extra}:
            return ("; the Ids differ only in zero padding (e.g. '1' vs '0001'): predict with --id-format stem, "
                    "or --id-format index --id-width N")
    return ""


def read_matching(submission: Path, truth: Path, id_column: Optional[str] = None,
                  label_column: Optional[str] = None) -> tuple[dict[str, str], dict[str, str]]:
    """The labels of `submission` and of `truth` by Id; an error unless both hold exactly the same Ids."""
    submission, truth = Path(submission).expanduser(), Path(truth).expanduser()
    predicted = read_labels(submission, id_column, label_column)
    answers = read_labels(truth, id_column, label_column)
    missing = sorted(set(answers) - set(predicted))
    extra = sorted(set(predicted) - set(answers))
    if missing or extra:
        raise FinetuneError(
            f"{submission.name} does not match {truth.name} Id for Id: {len(missing)} Id(s) have no prediction "
            f"(e.g. {missing[:5]}), {len(extra)} predicted Id(s) are not in the truth (e.g. {extra[:5]})"
            f"{_padding_hint(missing, extra)}"
        )
    return predicted, answers


def score_csv(
    submission: Path,
    truth: Path,
    out_dir: Optional[Path] = None,
    classes: Optional[Sequence[str]] = None,
    id_column: Optional[str] = None,
    label_column: Optional[str] = None,
) -> dict:
    """Accuracy of `submission` against `truth` plus the evaluation bundle in `out_dir`; returns the metrics."""
    submission, truth = Path(submission).expanduser(), Path(truth).expanduser()
    predicted, answers = read_matching(submission, truth, id_column, label_column)
    names = list(classes) if classes else sort_class_names(set(answers.values()) | set(predicted.values()))
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({v for v in list(predicted.values()) + list(answers.values()) if v not in index})
    if unknown:
        raise FinetuneError(f"labels {unknown[:5]} are not among the classes {names[:20]}")
    ids = sorted(answers)
    files = EvalFiles(Path(out_dir) if out_dir else submission.with_name(submission.stem + "_score"))
    metrics = write_evaluation([index[answers[i]] for i in ids], [index[predicted[i]] for i in ids], names, files)
    score = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "images": len(ids),
             "correct": int(round(metrics["accuracy"] * len(ids))), "submission": str(submission), "truth": str(truth)}
    files.write_json(files.score, score)
    return {**metrics, "class_names": names, "score_file": str(files.score)}
