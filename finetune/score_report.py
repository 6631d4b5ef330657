"""`finetune score`: a submission scored against the true labels, one label per image or several, as console lines."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from finetune.evaluation import format_report
from finetune.multilabel_eval import multilabel_summary_lines
from finetune.multilabel_submission import score_multilabel_csv
from finetune.scoring import score_csv

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
    if multilabel:
        metrics = score_multilabel_csv(submission, truth, out_dir=out, id_column=id_column,
                                       label_column=label_column, sep=label_sep)
        return "\n".join([*multilabel_summary_lines(metrics, metrics["class_names"]),
                          f"mean F1 per image {metrics['samples_f1']:.4f} on {metrics['images']} images; files in "
                          f"{metrics['out_dir']}"])
    metrics = score_csv(Path(submission), Path(truth), out_dir=Path(out) if out else None, id_column=id_column,
                        label_column=label_column)
    return (f"{format_report(metrics['report'], metrics['class_names'])}\n"
            f"accuracy {metrics['accuracy']:.4f} on {metrics['images']} images; files in {metrics['out_dir']}")
