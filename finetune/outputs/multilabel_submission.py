"""Multi-label submissions: `Id,Tags` rows with the predicted labels joined, and scoring them (mean per-image F1).

Rows stream to disk in the plan's order exactly as single-label submissions do (finetune.outputs.submission).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from finetune.data.multilabel import split_labels
from finetune.data.sources import sort_class_names
from finetune.errors import FinetuneError
from finetune.outputs.multilabel_evaluation import write_multilabel_evaluation
from finetune.outputs.run_dir import EvalFiles
from finetune.outputs.scoring import read_matching
from finetune.config.options import SubmissionOptions
from finetune.outputs.submission import SubmissionFiles, SubmissionPlan, stream_rows

__all__ = ["write_multilabel_rows", "score_multilabel_csv"]


def write_multilabel_rows(plan: SubmissionPlan, batches: Iterable[np.ndarray], classes: Sequence[str],
                          thresholds: np.ndarray, files: SubmissionFiles, options: SubmissionOptions) -> int:
    """Write `Id,<labels>` rows (each class whose probability reaches its threshold, joined by `label_sep`).

    With a per-class sample submission (`plan.label_column` None) the rows hold the probabilities.
    `batches` yields (B, C) sigmoid probabilities in `plan` order; returns the number of rows written.
    """
    sep = options.label_sep
    if not sep:
        raise FinetuneError("--label-sep must not be empty (Kaggle's multi-label format uses a space)")
    names = list(classes) if options.value == "name" else [str(i) for i in range(len(classes))]
    return stream_rows(plan, batches, classes, files.writers(),
                       lambda p: [sep.join(names[k] for k in np.flatnonzero(p >= thresholds))])


def score_multilabel_csv(
    submission: Path,
    truth: Path,
    out_dir: Optional[Path] = None,
    classes: Optional[Sequence[str]] = None,
    id_column: Optional[str] = None,
    label_column: Optional[str] = None,
    sep: Optional[str] = None,
) -> dict:
    """Mean per-image F1 (Kaggle's Planet metric) of a multi-label submission, plus the bundle in `out_dir`."""
    submission, truth = Path(submission).expanduser(), Path(truth).expanduser()
    predicted, answers = read_matching(submission, truth, id_column, label_column)
    ids = sorted(answers)
    pred_sets = {i: split_labels(predicted[i], sep) for i in ids}
    true_sets = {i: split_labels(answers[i], sep) for i in ids}
    names = list(classes) if classes else sort_class_names({n for s in true_sets.values() for n in s}
                                                            | {n for s in pred_sets.values() for n in s})
    index = {name: k for k, name in enumerate(names)}
    unknown = sorted({n for s in list(pred_sets.values()) + list(true_sets.values()) for n in s if n not in index})
    if unknown:
        raise FinetuneError(f"labels {unknown[:5]} are not among the classes {names[:20]}")

    def matrix(sets: dict[str, list[str]]) -> np.ndarray:
        out = np.zeros((len(ids), len(names)))
        for row, i in enumerate(ids):
            out[row, [index[n] for n in sets[i]]] = 1.0
        return out

    files = EvalFiles(Path(out_dir) if out_dir else submission.with_name(submission.stem + "_score"))
    metrics = write_multilabel_evaluation(matrix(true_sets), matrix(pred_sets), np.full(len(names), 0.5), names,
                                          files, scores=False)
    score = {"samples_f1": metrics["samples_f1"], "micro_f1": metrics["micro_f1"], "macro_f1": metrics["macro_f1"],
             "exact_match": metrics["exact_match"], "images": len(ids), "submission": str(submission),
             "truth": str(truth)}
    files.write_json(files.score, score)
    return {**metrics, "class_names": names, "score_file": str(files.score)}
