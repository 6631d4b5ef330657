"""The Task contract: everything that differs between one label per image and several.

A task is chosen once, from `data.task`, and named in every checkpoint (`"task"`). The workflows,
the training loop, inference, the report and the CLI hold a `Task` and call it; none of them asks
which task it is. The line follows fastai's `CategoryBlock` / `MultiCategoryBlock` (how targets are
read and encoded, the loss, the decoding of outputs) and Hugging Face's `problem_type` (the loss and
the activation follow from it), extended to what this toolkit does after training: the decision
state fitted on validation (a temperature, or per-class thresholds), the evaluation bundle, the
submission cell and scoring a submission.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # hints only: a task's methods import what they use
    import torch
    from torch import nn

    from finetune.data.images import SkippedImage
    from finetune.data.loaders import Targets
    from finetune.data.sources import DatasetSplits, Keep, Sample
    from finetune.engine.fit import EpochScorer, Mixer
    from finetune.inference.predict import LoadedModel
    from finetune.config.recipe import AugmentConfig, DataConfig, Recipe
    from finetune.outputs.run_dir import EvalFiles
    from finetune.config.options import InferenceOptions, SubmissionOptions
    from finetune.outputs.submission import SubmissionFiles, SubmissionPlan

__all__ = ["Task", "Log", "LabelIssue", "import_cleanlab"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class LabelIssue:
    """One image's label as the out-of-sample probabilities judge it: its index, the label's quality (0: surely
    wrong, 1: surely right), the target the probabilities suggest, and whether confident learning flags it."""

    index: int
    quality: float
    suggested: object
    flagged: bool


def import_cleanlab():
    """The cleanlab package (confident learning), or one clear error naming the extra that installs it."""
    try:
        import cleanlab
        import cleanlab.filter
        import cleanlab.rank
    except ImportError:
        from finetune.errors import FinetuneError

        raise FinetuneError("the data audit needs cleanlab, which is not installed: pip install 'finetune[audit]'"
                            ) from None
    return cleanlab


class Task(abc.ABC):
    """What a classification task decides: targets, split, loss, metrics, probabilities, decisions, outputs."""

    name: str  # the data.task value
    activation: str  # "softmax" or "sigmoid": logits → probabilities
    headline: str  # the evaluation metric a run, a fold or a trial is summarised by
    label_column: str  # the submission's default label column
    split_kind: str  # how the validation split is stratified, for the log

    # ---- data -------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def discover(self, cfg: "DataConfig", seed: int, keep: "Keep") -> "DatasetSplits":
        """The recipe's training and validation samples (the validation part held out if there is no folder)."""

    @abc.abstractmethod
    def labelled_samples(self, data: Path, cfg: "DataConfig",
                         classes: Sequence[str]) -> tuple[list["Sample"], list["SkippedImage"]]:
        """Labelled samples to evaluate a checkpoint on (labels mapped to its `classes`), and what was left out."""

    @abc.abstractmethod
    def encode(self, num_classes: int) -> Callable[["Sample"], object]:
        """A sample's target as the loss takes it (a class index, or a multi-hot vector)."""

    @abc.abstractmethod
    def balance_weights(self, samples: Sequence["Sample"], num_classes: int) -> np.ndarray:
        """Per-sample drawing weights for `data.balance: sampler`."""

    @abc.abstractmethod
    def folds(self, samples: list["Sample"], classes: list[str], folds: int,
              seed: int) -> list[tuple[list["Sample"], list["Sample"]]]:
        """(train, val) per fold; every sample is validated exactly once."""

    def targets(self, num_classes: int) -> "Targets":
        """What the loaders need of the task: the target encoding and the balanced-drawing weights."""
        from finetune.data.loaders import Targets

        return Targets(num_classes, self.encode(num_classes), lambda samples: self.balance_weights(samples, num_classes))

    # ---- training ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def criterion(self, recipe: "Recipe", train: Sequence["Sample"], num_classes: int,
                  device: "torch.device") -> "nn.Module":
        """The training loss, class-weighted as `data.balance: loss` asks."""

    @abc.abstractmethod
    def mixer(self, cfg: "AugmentConfig", num_classes: int) -> Optional["Mixer"]:
        """Batch mixing (mixup / cutmix) on images and targets, or None when off."""

    @abc.abstractmethod
    def scorer(self) -> "EpochScorer":
        """Per-batch correct count and per-pass metrics (`metrics` names) for the training loop."""

    # ---- after training: probabilities and decisions ----------------------------------------------------------
    @abc.abstractmethod
    def fit_decision(self, raw_probs: np.ndarray, samples: Sequence["Sample"], num_classes: int,
                     log: Log) -> dict:
        """The decision state fitted on validation probabilities (stored in best.pt): temperature or thresholds."""

    @abc.abstractmethod
    def ensemble_decision(self, models: Sequence["LoadedModel"], threshold: Optional[float] = None) -> dict:
        """The decision state an ensemble (or one model) predicts with, `threshold` overriding a stored one."""

    # ---- outputs ----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def evaluate(self, loaded: "LoadedModel", samples: Sequence["Sample"], files: "EvalFiles",
                 inference: "InferenceOptions", log: Log, threshold: Optional[float] = None,
                 skipped: Optional[list] = None, raw_probs: Optional[np.ndarray] = None) -> dict:
        """Score labelled samples, write the evaluation bundle into `files`, log its summary; the metrics.

        `raw_probs` (uncalibrated, already computed) saves running the model again; images that fail to
        decode are left out of the metrics and appended to `skipped`.
        """

    @abc.abstractmethod
    def check_submission(self, options: "SubmissionOptions", classes: Sequence[str]) -> None:
        """Refuse submission options that mean nothing for this task (or would mislead), saying why."""

    @abc.abstractmethod
    def write_submission(self, plan: "SubmissionPlan", batches, classes: Sequence[str], decision: dict,
                         files: "SubmissionFiles", options: "SubmissionOptions", log: Log) -> int:
        """Stream the submission (and its side files) row by row; the number of rows."""

    @abc.abstractmethod
    def score_csv(self, submission: Path, truth: Path, out_dir: Optional[Path], id_column: Optional[str],
                  label_column: Optional[str], sep: Optional[str]) -> tuple[dict, list[str]]:
        """Score a submission CSV against the true labels: the metrics and the console lines."""

    @abc.abstractmethod
    def decision_text(self, probs: np.ndarray, classes: Sequence[str], decision: dict,
                      reject_below: Optional[float] = None) -> str:
        """One image's decision in words, from its calibrated probabilities (C,): what the app shows."""

    @abc.abstractmethod
    def confidence(self, probs: np.ndarray) -> np.ndarray:
        """How sure the model is of each image's decision (N,), the figure pseudo-label thresholds apply to."""

    @abc.abstractmethod
    def target_text(self, target: object, classes: Sequence[str]) -> str:
        """A target as a CSV cell (a class name, or the names joined by a space)."""

    @abc.abstractmethod
    def parse_target(self, text: str, classes: Sequence[str]) -> object:
        """A CSV cell back to a target, refusing names that are not among `classes`."""

    fits_class_folders: bool  # whether its samples can be written as one folder per class

    # ---- auditing the data ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def cross_validated_probs(self, features: np.ndarray, samples: Sequence["Sample"], num_classes: int,
                              folds: int, seed: int) -> np.ndarray:
        """Out-of-sample probabilities (N, C) from a linear classifier on frozen `features`, `folds`-fold
        cross-validated: each image is scored by a classifier that never saw its label."""

    @abc.abstractmethod
    def judge_labels(self, probs: np.ndarray, samples: Sequence["Sample"], num_classes: int) -> list[LabelIssue]:
        """Every image's label judged by the out-of-sample `probs` (cleanlab's confident learning flags the
        doubtful ones), worst first."""

    @abc.abstractmethod
    def select_confident(self, probs: np.ndarray, decision: dict, threshold: float,
                         max_per_class: Optional[int]) -> tuple[list[int], list[object]]:
        """Pseudo-labels: indices of the confidently predicted images and the target each gets."""
