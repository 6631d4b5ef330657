"""Several labels per image (data.task: multilabel): multi-hot targets, sigmoid, per-class F1-best thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from finetune.errors import FinetuneError
from finetune.config.recipe import TASK_ACTIVATIONS
from finetune.tasks.base import LabelIssue, Log, Task, import_cleanlab

if TYPE_CHECKING:
    from torch import nn

    from finetune.data.sources import Sample

__all__ = ["MultiLabel", "iterative_folds", "confident_label_sets"]


def iterative_folds(samples: list["Sample"], classes: list[str], folds: int,
                    seed: int) -> list[tuple[list["Sample"], list["Sample"]]]:
    """(train, val) per fold by iterative stratification (Sechidis et al. 2011), generalised to k folds.

    The rarest label is placed first, each of its images going to the fold that still lacks most of that
    label (then the emptiest fold); images without a label fill the emptiest folds. Every image is
    validated exactly once.
    """
    from finetune.data.multilabel import multi_hot

    if folds < 2:
        raise FinetuneError(f"--folds must be at least 2 (5 is usual), got {folds}")
    if len(samples) < 2 * folds:
        raise FinetuneError(f"{folds}-fold cross-validation of {len(samples)} images leaves too few per fold; "
                            "use fewer folds or add images")
    y = multi_hot(samples, len(classes))
    rng = np.random.default_rng(seed)
    need = np.tile(y.sum(0) / folds, (folds, 1))  # each fold's remaining wish per label
    room = np.full(folds, len(samples) / folds)
    fold = np.full(len(samples), -1)
    left = y.copy()
    while left.sum() > 0:
        remaining = left.sum(0)
        label = int(np.argmin(np.where(remaining > 0, remaining, np.inf)))
        for i in rng.permutation(np.flatnonzero(left[:, label] > 0)):
            chosen = max(range(folds), key=lambda f: (need[f, label], room[f], rng.random()))
            fold[i] = chosen
            need[chosen] -= y[i]
            room[chosen] -= 1
            left[i] = 0
    for i in rng.permutation(np.flatnonzero(fold < 0)):
        chosen = int(np.argmax(room))
        fold[i] = chosen
        room[chosen] -= 1
    return [([s for s, f in zip(samples, fold) if f != k], [s for s, f in zip(samples, fold) if f == k])
            for k in range(folds)]


def confident_label_sets(probs: np.ndarray, thresholds: np.ndarray, threshold: float,
                         max_per_class: Optional[int] = None) -> tuple[list[int], list[tuple[int, ...]]]:
    """Pseudo-labels for several labels per image: (kept indices, each one's label set).

    An image is kept when every class is decided confidently, either way: its probability is at least
    `threshold` (present) or at most 1 - `threshold` (absent). Its label set is the classes at or above
    their own decision threshold. With `max_per_class`, the most confident images are taken first and
    one is skipped when any of its labels is full.
    """
    from finetune.tasks.single_label import check_selection

    check_selection(threshold, max_per_class)
    if threshold <= 0.5:
        raise FinetuneError(f"--threshold for a multi-label model must be above 0.5 (a class is confidently present "
                            f"at ≥ threshold and absent at ≤ 1 - threshold); got {threshold}")
    certainty = np.maximum(probs, 1 - probs).min(axis=1) if len(probs) else np.zeros(0)
    order = np.argsort(-certainty, kind="stable")
    counts = np.zeros(probs.shape[1], dtype=int)
    kept, sets = [], []
    for i in order:
        if certainty[i] < threshold:
            break
        labels = tuple(int(k) for k in np.flatnonzero(probs[i] >= thresholds))
        if max_per_class is not None and any(counts[k] >= max_per_class for k in labels):
            continue
        counts[list(labels)] += 1
        kept.append(int(i))
        sets.append(labels)
    return kept, sets


class MultiLabel(Task):
    """Multi-hot targets; binary cross-entropy; sigmoid; per-class F1-best thresholds."""

    name = "multilabel"
    activation = TASK_ACTIVATIONS["multilabel"]
    headline = "samples_f1"
    label_column = "Tags"
    split_kind = "iterative-stratified"

    def discover(self, cfg, seed, keep):
        """A manifest with a label-list column or one 0/1 column per class; validation held out iteratively."""
        from finetune.data.multilabel import discover_multilabel

        return discover_multilabel(cfg, seed, keep=keep)

    def labelled_samples(self, data, cfg, classes):
        """A manifest CSV (or a folder holding the recipe's one), labels mapped to the checkpoint's classes."""
        from finetune.outputs.multilabel_evaluation import manifest_samples

        return manifest_samples(Path(data).expanduser(), cfg, classes)

    def encode(self, num_classes: int) -> Callable[["Sample"], object]:
        """A multi-hot float vector (C,)."""
        from finetune.data.multilabel import MultiHot

        return MultiHot(num_classes)

    def balance_weights(self, samples, num_classes):
        """An image is drawn as often as its rarest label asks."""
        from finetune.data.multilabel import multi_hot

        counts = np.maximum(multi_hot(samples, num_classes).sum(0), 1.0)
        return np.array([max((1.0 / counts[i] for i in (s.target or ())), default=1.0 / counts.max())
                         for s in samples], dtype=np.float64)

    def folds(self, samples, classes, folds, seed):
        """Iteratively stratified k-fold."""
        return iterative_folds(samples, classes, folds, seed)

    def criterion(self, recipe, train, num_classes, device) -> "nn.Module":
        """Binary cross-entropy (positives weighted by negatives / positives with data.balance: loss)."""
        from finetune.data.loaders import class_counts
        from finetune.engine.multilabel import create_multilabel_criterion

        return create_multilabel_criterion(recipe, class_counts(train, num_classes), len(train), device)

    def mixer(self, cfg, num_classes):
        """Mixup / CutMix on multi-hot targets."""
        from finetune.data.multilabel import create_multihot_mixer

        return create_multihot_mixer(cfg)

    def scorer(self):
        """Exact-match accuracy per batch; mAP and per-image F1 per pass."""
        from finetune.engine.multilabel import MultiLabelScorer

        return MultiLabelScorer()

    def fit_decision(self, raw_probs: np.ndarray, samples: Sequence["Sample"], num_classes: int, log: Log) -> dict:
        """Each class's F1-best threshold on the validation images."""
        from finetune.data.multilabel import multi_hot
        from finetune.engine.multilabel import best_thresholds

        thresholds = best_thresholds(multi_hot(samples, num_classes), raw_probs)
        log(f"per-class thresholds chosen on {len(samples)} validation images (F1-best, range "
            f"{thresholds.min():.2f}-{thresholds.max():.2f}), stored with the best checkpoint")
        return {"thresholds": [float(t) for t in thresholds]}

    def ensemble_decision(self, models, threshold=None) -> dict:
        """`threshold` for every class if given, else the mean of the models' per-class thresholds (0.5 without).

        The ensemble averages the models' probabilities, so it cuts them where the models cut on average:
        each threshold is F1-best for its own model's probabilities, and a mean of probabilities shifts as
        the mean of those cuts does to first order. (No labelled data is at hand to choose new ones.)
        """
        classes = len(models[0].classes)
        if threshold is not None:
            if not 0.0 < threshold < 1.0:
                raise FinetuneError(f"--threshold must be between 0 and 1 (e.g. 0.5), got {threshold}")
            return {"thresholds": np.full(classes, float(threshold))}
        stored = [m.checkpoint.get("thresholds") for m in models]
        cuts = [np.asarray(s, dtype=np.float64) if s is not None else np.full(classes, 0.5) for s in stored]
        return {"thresholds": np.mean(cuts, axis=0)}

    def evaluate(self, loaded, samples, files, inference, log, threshold=None, skipped=None, raw_probs=None) -> dict:
        """mAP, F1s, per-class report and confusion panels, PR curves, the worst label sets."""
        from finetune.outputs.multilabel_evaluation import evaluate_multilabel_samples

        thresholds = self.ensemble_decision([loaded], threshold)["thresholds"]
        return evaluate_multilabel_samples(loaded, samples, files, inference, log, thresholds, skipped, raw_probs)

    def check_submission(self, options, classes) -> None:
        """Top-k and rejection are about one label per image."""
        if options.topk:
            raise FinetuneError("--topk is for one label per image; a multi-label model writes every label above "
                                "its threshold (add --probs for each class's probability)")
        if options.reject_below is not None:
            raise FinetuneError("--reject-below is for one label per image; a multi-label model leaves out every "
                                "label below its threshold (raise it with --threshold)")

    def write_submission(self, plan, batches, classes, decision, files, options, log) -> int:
        """`Id,Tags`: every class at or above its threshold, joined by `label_sep`."""
        from finetune.outputs.multilabel_submission import write_multilabel_rows

        return write_multilabel_rows(plan, batches, classes, np.asarray(decision["thresholds"]), files, options)

    def score_csv(self, submission, truth, out_dir, id_column, label_column, sep):
        """Mean per-image F1 (Kaggle's Planet metric) and the multi-label bundle."""
        from finetune.outputs.multilabel_evaluation import multilabel_summary_lines
        from finetune.outputs.multilabel_submission import score_multilabel_csv

        metrics = score_multilabel_csv(submission, truth, out_dir=out_dir, id_column=id_column,
                                       label_column=label_column, sep=sep)
        return metrics, [*multilabel_summary_lines(metrics, metrics["class_names"]),
                         f"mean F1 per image {metrics['samples_f1']:.4f} on {metrics['images']} images; files in "
                         f"{metrics['out_dir']}"]

    fits_class_folders = False  # an image with two labels would need two folders

    def decision_text(self, probs, classes, decision, reject_below=None) -> str:
        """Every class at or above its threshold, with its probability (none: say so)."""
        thresholds = np.asarray(decision["thresholds"])
        chosen = [k for k in np.argsort(-probs) if probs[k] >= thresholds[k]]
        if not chosen:
            return "no label: every class is below its threshold"
        return "labels: " + ", ".join(f"{classes[k]} ({probs[k]:.3f} >= {thresholds[k]:.2f})" for k in chosen)

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        """How clearly the least clear class is decided: min over classes of max(p, 1 - p)."""
        return np.maximum(probs, 1 - probs).min(axis=1) if len(probs) else np.zeros(0)

    def target_text(self, target, classes) -> str:
        """The label names joined by a space (empty: no label)."""
        from finetune.outputs.multilabel_evaluation import SEPARATOR

        return SEPARATOR.join(classes[k] for k in target)

    def parse_target(self, text, classes):
        """The sorted class indices of a label list (split on spaces, commas or |)."""
        from finetune.data.multilabel import split_labels

        names = split_labels(text)
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise FinetuneError(f"labels {unknown[:5]} are not classes of the model ({', '.join(list(classes)[:20])})")
        return tuple(sorted({list(classes).index(n) for n in names}))

    def select_confident(self, probs, decision, threshold, max_per_class):
        """Images decided confidently for every class; the target is the label set at the decision thresholds."""
        return confident_label_sets(probs, np.asarray(decision["thresholds"]), threshold, max_per_class)

    def cross_validated_probs(self, features, samples, num_classes, folds, seed):
        """One logistic regression per class on standardised features (a class absent from a fold's training part
        is predicted as absent), shuffled folds."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import KFold, cross_val_predict
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from finetune.data.multilabel import multi_hot

        targets = multi_hot(samples, num_classes).astype(int)
        model = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=0.05, max_iter=2000)))
        splitter = KFold(n_splits=min(folds, len(samples)), shuffle=True, random_state=seed)
        return cross_val_predict(model, features, targets, cv=splitter, method="predict_proba")

    def judge_labels(self, probs, samples, num_classes):
        """cleanlab's multi-label `find_label_issues` flags; the quality is its multi-label self-confidence; the
        suggestion is the set of classes at probability 0.5 or above."""
        import_cleanlab()
        from cleanlab.multilabel_classification import get_label_quality_scores
        from cleanlab.multilabel_classification.filter import find_label_issues

        labels = [sorted(int(c) for c in (s.target or ())) for s in samples]
        flagged = find_label_issues(labels, probs, n_jobs=1)
        quality = get_label_quality_scores(labels, probs)
        order = np.argsort(quality, kind="stable")
        return [LabelIssue(int(i), float(quality[i]), tuple(int(c) for c in np.flatnonzero(probs[i] >= 0.5)),
                           bool(flagged[i])) for i in order]
