"""`finetune score`: a submission scored against the true labels, one label per image or several, as console lines."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from finetune.tasks import task_named

__all__ = ["score_command"]


def score_command(
    submission: str,
    truth: str,
    out: Optional[str] = None,
    id_column: Optional[str] = None,
    label_column: Optional[str] = None,
    multilabel: bool = False,
    label_sep: Optional[str] = None,
) -> str:
    """Accuracy and evaluation bundle of a submission against true labels, as lines for the console.

    Args:
        submission: submission CSV (Id,Category).
        truth: CSV with the true labels, same Ids.
        out: output folder (None: SUBMISSION_score/ next to the submission).
        id_column: Id column in both files (None: the first).
        label_column: label column in both files (None: the second).
        multilabel: several labels per cell (e.g. Id,Tags): score by mean F1 per image (Kaggle's Planet).
        label_sep: multilabel: separator between labels (None: any of space, comma, |).
    """
    task = task_named("multilabel" if multilabel else "single")
    _, lines = task.score_csv(Path(submission), Path(truth), Path(out) if out else None, id_column, label_column,
                              label_sep)
    return "\n".join(lines)
