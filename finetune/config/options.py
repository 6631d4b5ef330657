"""Options objects for the wide API functions: how to run inference, and how to write a submission.

They are validated on construction, so a bad value fails with a message before any model loads,
whether it came from Python or from the command line (whose flags are generated from these fields;
a field's `choices` metadata is the tuple its validation uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from finetune.errors import FinetuneError
from finetune.config.recipe import PRECISIONS

__all__ = ["ID_FORMATS", "VALUE_KINDS", "PSEUDO_FORMATS", "InferenceOptions", "SubmissionOptions",
           "PseudoLabelOptions", "AuditOptions", "AUDIT_METHODS", "AUDIT_FIXES"]

VALUE_KINDS = ("name", "index")  # what a submission's label cell holds
ID_FORMATS = ("stem", "name", "index")  # how a submission names an image
PSEUDO_FORMATS = ("folder", "csv")  # how pseudo-labels are written
AUDIT_METHODS = ("features", "kfold")  # where the audit's out-of-sample probabilities come from
AUDIT_FIXES = ("drop", "relabel")  # what a cleaned manifest does with images whose label is doubted


def _one_of(flag: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise FinetuneError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _at_least(flag: str, value: int, low: int, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FinetuneError(f"{flag} must be a whole number of at least {low}, got {value!r}; e.g. {flag} {example}")


@dataclass
class InferenceOptions:
    """How a model runs over images: batching, loading, device, precision and test-time augmentation.

    Attributes:
        batch_size: images per batch.
        num_workers: data-loading processes (0 loads in the main process; default: the core budget's choice).
        threads: the model's intra-op threads (default: the cores this process may use, less the loader's).
        device: auto | cpu | cuda | cuda:N.
        precision: fp32; bf16 runs the model under bf16 autocast (faster on recent CPUs and GPUs);
            fp16 is CUDA only.
        tta: test-time augmentation averaged per image: flip (2 views), crops (5) or flip,crops (10).
    """

    batch_size: int = 64
    num_workers: Optional[int] = None
    threads: Optional[int] = None
    device: str = "auto"
    precision: str = field(default="fp32", metadata={"choices": PRECISIONS})
    tta: Optional[str] = None

    def __post_init__(self) -> None:
        _at_least("--batch-size", self.batch_size, 1, "32")
        if self.num_workers is not None:
            _at_least("--workers", self.num_workers, 0, "2 (0: load in the main process)")
        if self.threads is not None:
            _at_least("--threads", self.threads, 1, "2")
        _one_of("--precision", self.precision, PRECISIONS)


@dataclass
class SubmissionOptions:
    """How a prediction CSV is laid out: Ids, label cells, extra files, rejection and overwriting.

    Attributes:
        id_column: header of the Id column.
        label_column: header of the label column (None: Category; multi-label Tags).
        value: write the class name or its index.
        id_format: Id of an image: its file stem (0001.jpg → 0001), file name, or its position in file-name
            order zero-padded (HW03 sample code: index with width 4 from 1).
        id_width: id_format index: digits, zero-padded (0: no padding).
        index_start: id_format index: number of the first image.
        probs: also write OUT_probs.csv: Id and one column per class.
        topk: also write OUT_topK.csv: the K likeliest classes and their probabilities (0: not written).
        sample_submission: a Kaggle sample submission CSV: its Ids, row order and header are used (every image
            must match one Id); per-class columns get probabilities.
        threshold: multi-label: one threshold for every class (None: the checkpoint's per-class ones).
        label_sep: multi-label: separator between labels.
        reject_below: write reject_label for images whose calibrated top probability is below this
            (evaluate's accuracy-coverage curve suggests one for a target accuracy).
        reject_label: label written for rejected images.
        force: replace an existing output file that is not an earlier prediction CSV (never an input).
    """

    id_column: str = "Id"
    label_column: Optional[str] = None
    value: str = field(default="name", metadata={"choices": VALUE_KINDS})
    id_format: str = field(default="stem", metadata={"choices": ID_FORMATS})
    id_width: int = 4
    index_start: int = 1
    probs: bool = False
    topk: int = 0
    sample_submission: Optional[Union[str, Path]] = None
    threshold: Optional[float] = None
    label_sep: str = " "
    reject_below: Optional[float] = None
    reject_label: str = "unknown"
    force: bool = False

    def __post_init__(self) -> None:
        _one_of("--value", self.value, VALUE_KINDS)
        _one_of("--id-format", self.id_format, ID_FORMATS)
        _at_least("--id-width", self.id_width, 0, "4")
        _at_least("--topk", self.topk, 0, "3")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise FinetuneError(f"--threshold is a probability between 0 and 1, got {self.threshold}")
        if self.reject_below is not None and not 0.0 < self.reject_below <= 1.0:
            raise FinetuneError(f"--reject-below is a probability between 0 and 1 (e.g. 0.8), got {self.reject_below}")


@dataclass
class PseudoLabelOptions:
    """Which confident predictions become pseudo-labels, and how they are written.

    Attributes:
        threshold: keep images whose calibrated top probability is at least this (a multi-label model: every
            class decided at least this surely, either way).
        max_per_class: keep at most this many per class, the most confident (keeps classes balanced).
        format: folder: copies in OUT/<class>/, ready for `finetune train`; csv: a path,label,probability
            manifest that `data.layout: csv` reads (the only format for several labels per image).
        link: format folder: symlink instead of copying.
        truth: CSV of the true labels (file stem or name, label): adds the pseudo-labels' accuracy.
        force: format csv: replace an existing OUT file.
    """

    threshold: float = 0.9
    max_per_class: Optional[int] = None
    format: str = field(default="folder", metadata={"choices": PSEUDO_FORMATS})
    link: bool = False
    truth: Optional[Union[str, Path]] = None
    force: bool = False

    def __post_init__(self) -> None:
        _one_of("--format", self.format, PSEUDO_FORMATS)
        if not 0.0 < self.threshold <= 1.0:
            raise FinetuneError(f"--threshold is a probability in (0, 1], e.g. 0.9; got {self.threshold}")
        if self.max_per_class is not None:
            _at_least("--max-per-class", self.max_per_class, 1, "300")


@dataclass
class AuditOptions:
    """How the data audit finds its problems.

    Attributes:
        method: where the out-of-sample probabilities come from: features (the recipe's pretrained backbone,
            frozen; a cross-validated linear classifier on its features: seconds) or kfold (fine-tune --folds
            models with the recipe; slower, sharper). A k-fold run folder given instead of a recipe is reused.
        folds: folds of either method.
        thumbnail_similarity: cosine similarity of two images' 8x8 grey thumbnails (mean removed) from which
            they count as copies (a resized or re-encoded copy; byte-identical files are always found).
        similarity: cosine similarity of two images' embeddings from which they may count as copies (a crop or
            another edit the thumbnails miss) ...
        ratio: ... when their distance is also at most this share of their usual distance to their nearest
            neighbours (a copy stands out from merely similar images, whatever the backbone).
        outlier_spread: an image is an outlier when its distance to its nearest neighbours is this many robust
            standard deviations (median absolute deviations) above the median.
        fix: what --write-manifest does with an image whose label is doubted: drop it, or relabel it with the
            suggested label.
        batch_size: images per batch when computing embeddings and probabilities.
    """

    method: str = field(default="features", metadata={"choices": AUDIT_METHODS})
    folds: int = 5
    thumbnail_similarity: float = 0.9995
    similarity: float = 0.9
    ratio: float = 0.25
    outlier_spread: float = 6.0
    fix: str = field(default="drop", metadata={"choices": AUDIT_FIXES})
    batch_size: int = 64

    def __post_init__(self) -> None:
        _one_of("--method", self.method, AUDIT_METHODS)
        _one_of("--fix", self.fix, AUDIT_FIXES)
        _at_least("--folds", self.folds, 2, "5")
        _at_least("--batch-size", self.batch_size, 1, "64")
        if not 0.0 < self.similarity <= 1.0:
            raise FinetuneError(f"--similarity must be in (0, 1], got {self.similarity!r}; e.g. --similarity 0.9")
        if not 0.0 < self.thumbnail_similarity <= 1.0:
            raise FinetuneError("--thumbnail-similarity must be in (0, 1], got "
                                f"{self.thumbnail_similarity!r}; e.g. --thumbnail-similarity 0.9995")
        if not 0.0 < self.ratio <= 1.0:
            raise FinetuneError(f"--ratio must be in (0, 1], got {self.ratio!r}; e.g. --ratio 0.25")
        if self.outlier_spread <= 0:
            raise FinetuneError(f"--outlier-spread must be above 0, got {self.outlier_spread!r}; e.g. 6")
