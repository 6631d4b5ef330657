"""Self-training on unlabeled images: confident pseudo-labels from a calibrated model, and teacher → student rounds.

`pseudo_label` writes a checkpoint's confident predictions on a folder of unlabeled images as a
labelled folder (or a CSV manifest with the probability). `train_semi` runs what a recipe's
`semi:` section asks: a labels-only teacher, then `semi.rounds` students, each trained with the
same recipe and budget on the labelled images plus the pseudo-labels of the model before it,
each round in its own run folder inside one parent folder.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from finetune.workflows.api import TrainResult, train
from finetune.data.images import SkippedImage, check_images, list_images
from finetune.data.loaders import class_counts
from finetune.data.prepare import Prepared
from finetune.data.sources import Sample
from finetune.errors import FinetuneError
from finetune.engine import distributed
from finetune.engine.files import check_writable, mark_written, replace_atomically, temporary_beside, was_written_here
from finetune.inference.predict import LoadedModel, ProbsSettings, load_model, resolve_device, sharded_probs
from finetune.workflows.opening import inference_cores, open_training
from finetune.config.options import PSEUDO_FORMATS, InferenceOptions, PseudoLabelOptions
from finetune.config.recipe import Recipe, load_recipe
from finetune.outputs.run_dir import RunDir, check_output
from finetune.tasks import Task, task_named, task_of_model
from finetune.tasks.single_label import select_confident

__all__ = ["FORMATS", "PseudoLabels", "SemiResult", "select_confident", "pseudo_label", "read_truth",
           "semi_requested", "train_semi"]

Log = Callable[[str], None]
FORMATS = PSEUDO_FORMATS


@dataclass
class PseudoLabels:
    """The confident predictions kept from a pool of unlabeled images, with the target the task gives each."""

    classes: list[str]
    pool: list[Path]  # every readable image of the pool, in order
    probs: np.ndarray  # (len(pool), C) calibrated probabilities
    kept: list[int]  # indices into `pool` of the images kept, most confident first within a class
    targets: list  # the pseudo-label of each kept image (a class index, or a tuple of them)
    task: Task
    truth: dict[int, object] = field(default_factory=dict)  # pool index → true target, where known
    skipped: list[SkippedImage] = field(default_factory=list)

    def per_class(self) -> dict[str, int]:
        """Images kept per class (an image with several labels counts once for each)."""
        return dict(zip(self.classes, class_counts(self.samples(), len(self.classes))))

    def accuracy(self) -> Optional[float]:
        """Share of the kept images whose pseudo-label is their true one (None when no truth covers them)."""
        known = [(self.truth[i], target) for i, target in zip(self.kept, self.targets) if i in self.truth]
        return float(np.mean([t == p for t, p in known])) if known else None

    def samples(self) -> list[Sample]:
        """The kept images as labelled training samples."""
        return [Sample(self.pool[i], target) for i, target in zip(self.kept, self.targets)]

    def rows(self) -> list[list]:
        """CSV rows: path, label, probability (the task's confidence; and the true label when known)."""
        header = ["path", "label", "probability"] + (["true_label"] if self.truth else [])
        confidence = self.task.confidence(self.probs)
        rows: list[list] = [header]
        for i, target in zip(self.kept, self.targets):
            row = [str(self.pool[i].absolute()), self.task.target_text(target, self.classes), f"{confidence[i]:.6f}"]
            if self.truth:
                row.append(self.task.target_text(self.truth[i], self.classes) if i in self.truth else "")
            rows.append(row)
        return rows

    def describe(self) -> str:
        """One line: how many kept of how many, per class, and their accuracy when known."""
        accuracy = self.accuracy()
        counts = ", ".join(f"{c} {n}" for c, n in self.per_class().items())
        text = f"kept {len(self.kept)} of {len(self.pool)} unlabeled images ({counts})"
        return text + (f"; pseudo-label accuracy {accuracy:.4f} against the truth given" if accuracy is not None
                       else "")


def read_truth(path: Union[str, Path], pool: Sequence[Path], classes: Sequence[str],
               task: Optional[Task] = None) -> dict[int, object]:
    """Pool index → true target from a CSV whose first column is a file stem or name and second its label(s)."""
    task = task or task_named("single")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FinetuneError(f"truth CSV not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle) if len(row) >= 2][1:]
    try:
        labels = {row[0].strip(): task.parse_target(row[1].strip(), classes) for row in rows}
    except FinetuneError as err:
        raise FinetuneError(f"{path}: {err}") from None
    truth = {}
    for i, image in enumerate(pool):
        target = labels.get(image.stem, labels.get(image.name))
        if target is not None:
            truth[i] = target
    if not truth:
        raise FinetuneError(f"no row of {path} names an image of the unlabeled folder (first column: file stem "
                            "or name, e.g. 00001 or 00001.png)")
    return truth


def _pool(folder: Path, log: Log) -> tuple[list[Path], list[SkippedImage]]:
    if not folder.is_dir():
        raise FinetuneError(f"unlabeled image folder not found: {folder}")
    paths = list_images(folder, recursive=True)
    if not paths:
        raise FinetuneError(f"no images in {folder} (sub-folders included)")
    skipped = check_images(paths)
    if skipped:
        log(f"warning: {len(skipped)} unreadable image(s) in {folder} left out of the pseudo-labels")
    bad = {s.path for s in skipped}
    return [p for p in paths if p not in bad], skipped


def _label_pool(loaded: LoadedModel, pool: list[Path], skipped: list[SkippedImage], threshold: float,
                max_per_class: Optional[int], truth_csv: Optional[Union[str, Path]], batch_size: int,
                num_workers: int) -> PseudoLabels:
    # Under torchrun each process scores its share of the pool; every process gets every row.
    chunks = list(sharded_probs([loaded], pool, ProbsSettings(batch_size, num_workers)))
    probs = np.concatenate(chunks) if chunks else np.zeros((0, len(loaded.classes)), dtype=np.float32)
    task = task_of_model(loaded)
    truth = read_truth(truth_csv, pool, loaded.classes, task) if truth_csv else {}
    kept, targets = task.select_confident(probs, task.ensemble_decision([loaded]), threshold, max_per_class)
    return PseudoLabels(loaded.classes, pool, probs, kept, targets, task, truth, skipped)


def _unique_names(paths: Sequence[Path], root: Path) -> list[str]:
    """File names for the output folder: the name, or the path below the pool joined by `__` where names clash."""
    names = [p.name for p in paths]
    clashes = {n for n in names if names.count(n) > 1}
    return ["__".join(p.relative_to(root).parts) if n in clashes else n for p, n in zip(paths, names)]


def _write_folder(labels: PseudoLabels, images: Path, out: Path, link: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FinetuneError(f"{out} exists and is not an empty folder; choose another --out")
    chosen = [labels.pool[i] for i in labels.kept]
    for path, name, label in zip(chosen, _unique_names(chosen, images), labels.targets):
        target = out / labels.classes[label] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            os.symlink(path.resolve(), target)
        else:
            shutil.copy2(path, target)


def _write_csv(labels: PseudoLabels, out: Path, force: bool) -> None:
    """The pseudo-label list, written atomically; only a list written here earlier is replaced without --force."""
    check_output(out, labels.pool, "pseudo-label CSV", was_written_here, force)
    fd, tmp = temporary_beside(out)
    with os.fdopen(fd, "w", newline="") as handle:
        csv.writer(handle).writerows(labels.rows())
    replace_atomically(tmp, out)
    mark_written(out)


def pseudo_label(
    checkpoint: Union[str, Path],
    images: Union[str, Path],
    out: Union[str, Path],
    options: Optional[PseudoLabelOptions] = None,
    inference: Optional[InferenceOptions] = None,
    log: Log = print,
) -> PseudoLabels:
    """Label the images under `images` (any depth) that the model predicts confidently (self-training).

    Under torchrun each process scores its share of the pool and one process writes.

    Args:
        checkpoint: a run's best checkpoint (its fitted temperature calibrates the threshold).
        images: folder of unlabeled images (sub-folders included).
        out: folder to create (format folder: OUT/<class>/) or CSV file (format csv).
        options: the threshold, the per-class cap, the output format, links, the truth CSV, overwriting.
        inference: batching, workers and device (precision and tta are not used here).
        log: where progress lines go.
    """
    options, inference = options or PseudoLabelOptions(), inference or InferenceOptions()
    folder, out = Path(images).expanduser(), Path(out).expanduser()
    if options.format == "folder" and out.resolve().is_relative_to(folder.resolve()):
        raise FinetuneError(f"--out {out} is inside --images {folder}: the copies would join the unlabeled pool; "
                            "choose a folder outside it")
    device = distributed.setup(resolve_device(inference.device))
    inference = inference_cores(inference, device, log)
    loaded = load_model(checkpoint, device)
    if options.format == "folder" and not task_of_model(loaded).fits_class_folders:
        raise FinetuneError("a class folder holds one label per image and this checkpoint gives several; write its "
                            "pseudo-labels as a manifest with --format csv (data.layout: csv reads it)")
    if distributed.is_main():
        check_writable(out.parent, "choose an --out you can write to")
    pool, skipped = _pool(folder, log)
    labels = _label_pool(loaded, pool, skipped, options.threshold, options.max_per_class, options.truth,
                         inference.batch_size, inference.num_workers)
    if loaded.temperature == 1.0 and task_of_model(loaded).activation == "softmax":
        log("note: this checkpoint holds no fitted temperature (trained before calibration existed, or its "
            "validation had no mistake): the threshold applies to uncalibrated probabilities")
    if distributed.is_main():  # under torchrun: one process writes
        if options.format == "folder":
            _write_folder(labels, folder, out, options.link)
        else:
            _write_csv(labels, out, options.force)
    distributed.barrier()
    log(labels.describe())
    log(f"wrote {out}")
    return labels


@dataclass
class SemiResult:
    """A self-training run: its parent folder, one training result per round (0 = the teacher), the summary."""

    run_dir: Path
    rounds: list[TrainResult]
    summary: dict

    @property
    def final_checkpoint(self) -> Path:
        """The last student's best checkpoint."""
        return self.rounds[-1].best_checkpoint


def semi_requested(recipe: Union[Recipe, str, Path, None], overrides: Optional[list[str]] = None) -> bool:
    """Whether a recipe (with overrides) asks for pseudo-label rounds (`semi.rounds` ≥ 1)."""
    if recipe is None:
        return False
    resolved = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    return resolved.semi.rounds >= 1


def _pool_folder(recipe: Recipe, dataset: Prepared) -> Path:
    if recipe.semi.unlabeled:
        folder = Path(recipe.semi.unlabeled).expanduser()
        return folder if folder.is_absolute() else Path(recipe.data.root or ".").expanduser() / folder
    if dataset.unlabeled_dir is None:
        raise FinetuneError("semi.rounds is set but there are no unlabeled images: set semi.unlabeled (or "
                            "data.unlabeled) to their folder, e.g. training/unlabeled")
    return dataset.unlabeled_dir


def _round_recipe(recipe: Recipe, parent: RunDir, name: str, augment: Optional[str]) -> Recipe:
    settings: dict[str, object] = {"semi.rounds": 0}  # a round is a plain training run
    if augment is not None:
        settings["augment.preset"] = augment
    return recipe.derive(name=name, output=str(parent.path), settings=settings)


def train_semi(
    recipe: Union[Recipe, str, Path, None],
    data: Optional[Union[str, Path]] = None,
    overrides: Optional[list[str]] = None,
    log: Log = print,
) -> SemiResult:
    """Teacher on the labels, then `semi.rounds` students on labels + the previous model's pseudo-labels.

    Every round uses the same recipe and budget (the students' augmentation may be `semi.student_augment`)
    and the same labelled validation images; each model labels the whole pool afresh for the next one.
    """
    opening = open_training(recipe, data, overrides, log)
    recipe, dataset, semi = opening.recipe, opening.dataset, opening.recipe.semi
    if semi.rounds < 1:
        raise FinetuneError("semi.rounds is 0: set it to the number of pseudo-label rounds, e.g. --set semi.rounds=2")
    folder = _pool_folder(recipe, dataset)
    pool, skipped = _pool(folder, log)
    parent = RunDir.create(recipe.output, recipe.name)
    parent.write_recipe(recipe)
    log(f"self-training: a labels-only teacher, then {semi.rounds} pseudo-label round(s) on {len(pool)} unlabeled "
        f"images in {folder}; runs in {parent.path}")
    device = opening.device

    def tagged(r: int) -> Log:
        return lambda line: log(f"[round {r}] {line}")

    results = [train(_round_recipe(recipe, parent, "round0", None), log=tagged(0), prepared=dataset)]
    metric = opening.task.headline  # each round's validation score
    rows = [{"round": 0, "run_dir": str(results[0].run_dir), "val_score": results[0].evaluation[metric],
             "train_images": len(dataset.train), "pseudo_labels": 0}]
    for r in range(1, semi.rounds + 1):
        teacher = results[-1]
        loaded = load_model(teacher.best_checkpoint, device)
        labels = _label_pool(loaded, pool, skipped, semi.threshold, semi.max_per_class, semi.truth,
                             recipe.data.batch_size, recipe.data.num_workers)
        RunDir(teacher.run_dir).write_pseudo_labels(labels.rows())
        log(f"[round {r}] round {r - 1}'s model (T = {loaded.temperature:.3f}): {labels.describe()}")
        student_data = Prepared(dataset.classes, dataset.train + labels.samples(), dataset.val, dataset.skipped,
                                dataset.val_source, dataset.test_dir, dataset.unlabeled_dir)
        results.append(train(_round_recipe(recipe, parent, f"round{r}", semi.student_augment), log=tagged(r),
                             prepared=student_data))
        rows.append({"round": r, "run_dir": str(results[-1].run_dir), "val_score": results[-1].evaluation[metric],
                     "train_images": len(student_data.train), "pseudo_labels": len(labels.kept),
                     "pseudo_labels_per_class": labels.per_class(), "pseudo_label_accuracy": labels.accuracy()})
    summary = {"unlabeled": str(folder), "pool": len(pool), "threshold": semi.threshold,
               "max_per_class": semi.max_per_class, "student_augment": semi.student_augment,
               "classes": dataset.classes, "metric": metric, "rounds": rows,
               "final_checkpoint": str(results[-1].best_checkpoint)}
    parent.write_semi_summary(summary)
    log(f"round  {'val ' + metric:>13}  train_images  pseudo_labels  pseudo_label_acc")
    for row in rows:
        accuracy = row.get("pseudo_label_accuracy")
        log(f"{row['round']:>5}  {row['val_score']:13.4f}  {row['train_images']:>12}  {row['pseudo_labels']:>13}  "
            f"{'-' if accuracy is None else f'{accuracy:.4f}':>16}")
    log(f"summary in {parent.semi_summary}; the last student: {results[-1].best_checkpoint}")
    return SemiResult(parent.path, results, summary)
