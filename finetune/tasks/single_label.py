"""One label per image (data.task: single): class indices, softmax with a fitted temperature, argmax (or reject)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from finetune.errors import FinetuneError
from finetune.config.recipe import TASK_ACTIVATIONS
from finetune.tasks.base import LabelIssue, Log, Task, import_cleanlab

if TYPE_CHECKING:
    import torch
    from torch import nn

    from finetune.data.sources import Sample

__all__ = ["SingleLabel", "SingleLabelScorer", "stratified_folds", "select_confident"]


class SingleLabelScorer:
    """A prediction is right when its argmax is the label (with mixed targets: the label with the larger share)."""

    metrics: tuple[str, ...] = ()

    def correct(self, logits: "torch.Tensor", targets: "torch.Tensor") -> int:
        """Images whose top class is the (dominant) target."""
        from finetune.data.mixing import dominant_label

        return int((logits.argmax(1) == dominant_label(targets)).sum().item())

    def score(self, logits: "torch.Tensor", targets: "torch.Tensor") -> dict[str, float]:
        """No metric beyond loss and accuracy."""
        return {}


def stratified_folds(samples: list["Sample"], classes: list[str], folds: int,
                     seed: int) -> list[tuple[list["Sample"], list["Sample"]]]:
    """(train, val) sample lists for each of `folds` stratified folds; every image is validated exactly once."""
    from sklearn.model_selection import StratifiedKFold

    from finetune.data.loaders import class_counts

    if folds < 2:
        raise FinetuneError(f"--folds must be at least 2 (5 is usual), got {folds}")
    counts = class_counts(samples, len(classes))
    small = [f"{c} ({n})" for c, n in zip(classes, counts) if n < folds]
    if small:
        raise FinetuneError(
            f"{folds}-fold cross-validation needs at least {folds} images per class; too few in: "
            f"{', '.join(small[:10])}. Use fewer folds or add images"
        )
    labels = [s.target for s in samples]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    pairs = splitter.split(np.zeros(len(labels)), labels)
    return [([samples[i] for i in tr], [samples[i] for i in va]) for tr, va in pairs]


def check_selection(threshold: float, max_per_class: Optional[int]) -> None:
    """Refuse a pseudo-label threshold outside (0, 1] or a per-class cap below 1."""
    if not 0.0 < threshold <= 1.0:
        raise FinetuneError(f"--threshold is a probability in (0, 1], e.g. 0.9; got {threshold}")
    if max_per_class is not None and max_per_class < 1:
        raise FinetuneError(f"--max-per-class must be at least 1, got {max_per_class}")


def select_confident(probs: np.ndarray, threshold: float, max_per_class: Optional[int] = None) -> list[int]:
    """Indices whose top probability is at least `threshold`, at most `max_per_class` (the most confident) per class."""
    check_selection(threshold, max_per_class)
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    kept: list[int] = []
    for label in range(probs.shape[1]):
        members = np.flatnonzero((predicted == label) & (confidence >= threshold))
        members = members[np.argsort(-confidence[members], kind="stable")]
        kept.extend(int(i) for i in members[:max_per_class])
    return kept


class SingleLabel(Task):
    """Class indices; cross-entropy; softmax / temperature; argmax with an optional reject label."""

    name = "single"
    activation = TASK_ACTIVATIONS["single"]
    headline = "accuracy"
    label_column = "Category"
    split_kind = "stratified"

    def discover(self, cfg, seed, keep):
        """Class folders, file-name labels or a one-label-per-row manifest (a multi-label one is refused)."""
        from finetune.data.multilabel import check_single_label
        from finetune.data.sources import discover

        if cfg.layout == "csv" and cfg.root:
            check_single_label(cfg, Path(cfg.root).expanduser())
        return discover(cfg, seed, keep=keep)

    def labelled_samples(self, data, cfg, classes):
        """The class folders (or labelled file names) under `data`, labelled by the checkpoint's classes."""
        from finetune.data.prepare import labelled

        return labelled(Path(data).expanduser(), classes, cfg.layout, cfg.label_regex)

    def encode(self, num_classes: int) -> Callable[["Sample"], object]:
        """The class index (-1 when unlabeled)."""
        return _class_index

    def balance_weights(self, samples, num_classes):
        """Inverse class frequency: each class drawn equally often."""
        from finetune.data.loaders import class_counts

        counts = np.asarray(class_counts(samples, num_classes), dtype=np.float64)
        weights = 1.0 / np.maximum(counts, 1.0)
        return np.array([weights[s.target] for s in samples], dtype=np.float64)

    def folds(self, samples, classes, folds, seed):
        """Stratified k-fold (scikit-learn)."""
        return stratified_folds(samples, classes, folds, seed)

    def criterion(self, recipe, train, num_classes, device) -> "nn.Module":
        """Cross-entropy with label smoothing (class weights with data.balance: loss)."""
        from finetune.data.loaders import class_counts
        from finetune.engine.loss import create_criterion

        return create_criterion(recipe, class_counts(train, num_classes), device)

    def mixer(self, cfg, num_classes):
        """torchvision's MixUp / CutMix with soft one-hot targets."""
        from finetune.data.mixing import create_mixer

        return create_mixer(cfg, num_classes)

    def scorer(self) -> SingleLabelScorer:
        """Argmax accuracy."""
        return SingleLabelScorer()

    def fit_decision(self, raw_probs: np.ndarray, samples: Sequence["Sample"], num_classes: int, log: Log) -> dict:
        """One temperature fitted on the validation NLL (LBFGS over log T)."""
        from finetune.engine.temperature import fit_temperature, nll

        labels = [s.target for s in samples]
        logits = np.log(np.clip(raw_probs.astype(np.float64), 1e-45, 1.0))  # log-probabilities: logits up to a shift
        temperature = fit_temperature(logits, labels)
        log(f"temperature scaling: T = {temperature:.3f} fitted on {len(labels)} validation images (NLL "
            f"{nll(logits, labels):.4f} → {nll(logits, labels, temperature):.4f}); every probability written is "
            "calibrated")
        return {"temperature": float(temperature)}

    def ensemble_decision(self, models, threshold=None) -> dict:
        """Each model's temperature is applied before averaging; the decision is the argmax."""
        return {}

    def evaluate(self, loaded, samples, files, inference, log, threshold=None, skipped=None, raw_probs=None) -> dict:
        """Confusion matrix, per-class report, top-k, calibration, gallery and Grad-CAM."""
        from finetune.outputs.evaluation import evaluate_samples

        if threshold is not None:
            raise FinetuneError("--threshold is for multi-label checkpoints (a cut per class); this checkpoint "
                                "predicts one label per image")
        return evaluate_samples(loaded, samples, files, inference, log, raw_probs, skipped)

    def check_submission(self, options, classes) -> None:
        """A per-class threshold has no meaning for one label per image; a reject label must not pass for a class."""
        if options.threshold is not None:
            raise FinetuneError("--threshold is for multi-label checkpoints (a cut per class); this checkpoint "
                                "predicts one label per image: use --reject-below P to leave out unsure images")
        if options.reject_below is None:
            return
        if options.reject_label in classes:
            raise FinetuneError(f"--reject-label '{options.reject_label}' is one of the model's classes: rejected "
                                "rows would read as real predictions; choose a label that is not a class")
        if options.value == "index" and options.reject_label.lstrip("-").isdigit():
            raise FinetuneError(f"--reject-label '{options.reject_label}' is a number, which reads as a class index "
                                "with --value index; choose a label that is not a number")

    def write_submission(self, plan, batches, classes, decision, files, options, log) -> int:
        """`Id,Category` with the argmax (or `reject_label` below `reject_below`), top-k and probability files."""
        from finetune.outputs.submission import write_rows

        reject_below, rejected = options.reject_below, [0]

        def counted(stream):
            for probs in stream:
                if reject_below is not None:
                    rejected[0] += int((probs.max(axis=1) < reject_below).sum())
                yield probs

        rows = write_rows(plan, counted(batches), classes, files, options)
        if reject_below is not None:
            log(f"{rejected[0]} of {rows} image(s) have a top probability below {reject_below:g}: "
                f"labelled '{options.reject_label}'")
        return rows

    def score_csv(self, submission, truth, out_dir, id_column, label_column, sep):
        """Accuracy and the single-label bundle of a submission."""
        from finetune.outputs.evaluation import format_report
        from finetune.outputs.scoring import score_csv

        metrics = score_csv(submission, truth, out_dir=out_dir, id_column=id_column, label_column=label_column)
        return metrics, [format_report(metrics["report"], metrics["class_names"]),
                         f"accuracy {metrics['accuracy']:.4f} on {metrics['images']} images; files in "
                         f"{metrics['out_dir']}"]

    fits_class_folders = True

    def decision_text(self, probs, classes, decision, reject_below=None) -> str:
        """The top class and its probability, or why it is rejected (top probability below `reject_below`)."""
        top = int(np.argmax(probs))
        if reject_below is not None and probs[top] < reject_below:
            return (f"unknown: the top class, {classes[top]}, has probability {probs[top]:.3f}, below the "
                    f"rejection threshold {reject_below:g}")
        return f"{classes[top]} (probability {probs[top]:.3f})"

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        """The top (calibrated) probability."""
        return probs.max(axis=1) if len(probs) else np.zeros(0)

    def target_text(self, target, classes) -> str:
        """The class name."""
        return classes[int(target)]

    def parse_target(self, text, classes):
        """The index of a class name."""
        if text not in classes:
            raise FinetuneError(f"label {text!r} is not a class of the model ({', '.join(list(classes)[:20])})")
        return list(classes).index(text)

    def select_confident(self, probs, decision, threshold, max_per_class):
        """The images whose calibrated top probability reaches `threshold`; the target is the top class."""
        kept = select_confident(probs, threshold, max_per_class)
        return kept, [int(probs[i].argmax()) for i in kept]

    def cross_validated_probs(self, features, samples, num_classes, folds, seed):
        """Multinomial logistic regression on standardised features, stratified folds."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        labels = np.array([_class_index(s) for s in samples])
        smallest = int(np.bincount(labels, minlength=num_classes).min())
        if smallest < 2:
            raise FinetuneError("every class needs at least 2 images to audit its labels by cross-validation; "
                                f"one has {smallest}")
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
        splitter = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
        return cross_val_predict(model, features, labels, cv=splitter, method="predict_proba")

    def judge_labels(self, probs, samples, num_classes):
        """cleanlab estimates how many labels are wrong (confident learning's calibrated joint) and flags that many
        with the lowest self-confidence (the label's probability, also the quality: the top-loss ranking); the
        suggestion is the top class. On the audit benchmark that ranking beat cleanlab's pruning rules (by noise
        rate, by class, both) at every count, so the flags take the count from confident learning and the order
        from the ranking."""
        cleanlab = import_cleanlab()
        labels = np.array([_class_index(s) for s in samples])
        flagged = cleanlab.filter.find_label_issues(labels, probs, filter_by="low_self_confidence", n_jobs=1)
        quality = cleanlab.rank.get_label_quality_scores(labels, probs)
        order = np.argsort(quality, kind="stable")
        return [LabelIssue(int(i), float(quality[i]), int(probs[i].argmax()), bool(flagged[i])) for i in order]


def _class_index(sample: "Sample") -> int:
    return -1 if sample.target is None else int(sample.target)  # type: ignore[arg-type]
