"""`finetune audit`: where the data fails, not only the model — doubtful labels, the same picture twice (within
training, or leaking across training / validation / test), outliers and the class balance.

Labels are judged by cleanlab's confident learning on out-of-sample probabilities, which come from one of two
places: `features` (the recipe's pretrained backbone, frozen: a cross-validated linear classifier on its pooled
features) or `kfold` (the recipe fine-tuned on K folds; a k-fold run folder given instead of a recipe is reused,
its models only predicting their held-out fold). Duplicates are byte-identical files (a content hash), images
whose tiny grey thumbnails coincide (a resized or re-encoded copy) and embedding neighbours far closer than their
other neighbours (an edited copy); outliers are the images farthest from their nearest
neighbours. Everything is written to the audit folder (`AuditFiles`); the data folder is never touched — acting
on the audit is a cleaned manifest (`write_manifest`) or an edited excluded.csv fed back as `data.exclude`.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from finetune.config.options import AuditOptions, InferenceOptions
from finetune.config.recipe import Recipe, load_recipe
from finetune.data.duplicates import (KINDS, DuplicatePair, close_pairs, flag_outliers, identical_files,
                                      outlier_scores, similar_pairs, thumbnails)
from finetune.data.images import SkippedImage, list_images
from finetune.data.prepare import Prepared
from finetune.data.sources import Sample
from finetune.engine import distributed
from finetune.errors import FinetuneError
from finetune.inference.embeddings import embed_images
from finetune.inference.predict import ProbsSettings, load_model, predict_probs, resolve_device
from finetune.models import build_model
from finetune.outputs.audit_page import AuditPage, render_audit
from finetune.outputs.run_dir import AuditFiles, RunDir
from finetune.tasks import Task, task_of
from finetune.tasks.base import LabelIssue, import_cleanlab
from finetune.workflows.kfold import train_kfold
from finetune.workflows.opening import inference_cores, open_training, prepare_data

__all__ = ["AuditResult", "audit"]

Log = Callable[[str], None]


@dataclass
class AuditResult:
    """Where the audit wrote its files and what it found."""

    folder: Path
    method: str
    images: int  # labelled images audited
    label_issues: int
    duplicate_pairs: int
    leaks: int  # duplicate pairs across splits (train / val / test)
    outliers: int
    manifest: Optional[Path]
    page: Path


@dataclass
class _Material:
    """What the audit judges: labelled samples with their split and out-of-sample probabilities, the test images,
    every image's embedding (labelled first, then test), and where they came from."""

    recipe: Recipe
    task: Task
    classes: list[str]
    samples: list[Sample]
    splits: list[str]
    probs: np.ndarray
    test: list[Path]
    embeddings: np.ndarray
    skipped: list[SkippedImage] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        """Every image audited: the labelled ones, then the test images."""
        return [s.path for s in self.samples] + self.test


@dataclass
class _Findings:
    judged: list[LabelIssue]  # every labelled image, worst label first
    issues: list[LabelIssue]  # the flagged ones
    pairs: list[DuplicatePair]
    outliers: list[tuple[int, float]]  # (index into _Material.paths, distance score), worst first


def audit(
    source: Union[Recipe, str, Path, None] = None,
    data: Optional[Union[str, Path]] = None,
    out: Union[str, Path] = "audit",
    options: Optional[AuditOptions] = None,
    overrides: Optional[list[str]] = None,
    write_manifest: Optional[Union[str, Path]] = None,
    log: Log = print,
) -> AuditResult:
    """Audit a labelled data set: doubtful labels, near-duplicates and leaks, outliers, class balance.

    Writes label_issues.csv, label_quality.csv, duplicates.csv, outliers.csv, excluded.csv, audit.json and
    audit.html into `out`; the data folder is never written.

    Args:
        source: a recipe (YAML file or shipped name; default: the built-in defaults), or a k-fold run folder
            (`finetune train --folds K`) whose fold models give the out-of-fold probabilities without training
            again.
        data: the labelled data folder (train/, val/, test/ as for training; default: the recipe's data.root).
        out: the audit folder (created if needed; not inside the data).
        overrides: recipe settings KEY=VALUE, as for train.
        write_manifest: also write a CSV manifest of the training images with the doubted labels dropped or
            relabelled (--fix); train on it with --set data.layout=csv data.csv=FILE.
    """
    import_cleanlab()  # one line, before any scan or training, when the extra is missing
    options = options or AuditOptions()
    files = AuditFiles(out)
    files.prepare()
    start = time.perf_counter()
    run_folder = _kfold_run_folder(source)
    if run_folder is not None:
        material = _from_run_folder(run_folder, data, overrides, options, log)
    else:
        material = _from_recipe(source, data, overrides, options, log)
    if material is None:  # another torchrun process: its folds are trained, process 0 audits
        return AuditResult(files.folder, options.method, 0, 0, 0, 0, 0, None, files.page)
    manifest = _manifest_target(write_manifest, material.recipe)
    findings = _find(material, options, log)
    material.seconds["total"] = round(time.perf_counter() - start, 1)
    return _write(files, material, findings, options, manifest, log)


def _kfold_run_folder(source: Union[Recipe, str, Path, None]) -> Optional[RunDir]:
    """The k-fold parent run folder `source` names, or None when it is a recipe."""
    if source is None or isinstance(source, Recipe) or not Path(source).expanduser().is_dir():
        return None
    run = RunDir(source)
    if run.read_cv_summary() is None:
        raise FinetuneError(f"{run.path} is a folder but not a k-fold run folder (no {run.cv_summary.name}); give "
                            "a recipe, or the folder `finetune train RECIPE --folds K` wrote")
    return run


def _from_recipe(source: Union[Recipe, str, Path, None], data, overrides, options: AuditOptions,
                 log: Log) -> Optional[_Material]:
    """Out-of-sample probabilities from the recipe: K fine-tuned folds, or a linear classifier on frozen features."""
    opening = open_training(source, data, overrides, log)
    recipe, task, dataset = opening.recipe, opening.task, opening.dataset
    _refuse_shards(recipe)
    log(dataset.describe())
    if options.method == "kfold":
        started = time.perf_counter()
        result = train_kfold(recipe, options.folds, log=log, prepared=dataset)
        if not distributed.is_main():
            return None
        material = _from_folds(RunDir(result.run_dir), recipe, task, dataset, options, log)
        material.seconds["kfold_training"] = round(time.perf_counter() - started, 1)
        return material
    if not distributed.is_main():
        return None
    return _from_features(recipe, task, dataset, options, log)


def _from_run_folder(run: RunDir, data, overrides, options: AuditOptions, log: Log) -> Optional[_Material]:
    """A finished k-fold run: its recipe, its data (or `data`), its fold models' held-out probabilities."""
    recipe = load_recipe(run.recipe, overrides)
    if data is not None:
        recipe.data.root = str(Path(data).expanduser().resolve())
    _refuse_shards(recipe)
    log(f"reusing the k-fold run {run.path}: its fold models score their held-out images (no training)")
    if not distributed.is_main():
        return None
    dataset = prepare_data(recipe, log)
    return _from_folds(run, recipe, task_of(recipe), dataset, options, log)


def _refuse_shards(recipe: Recipe) -> None:
    """The audit compares image files (hashes, thumbnails, a cleaned manifest of paths): it reads folders."""
    if recipe.data.layout == "shards":
        raise FinetuneError("finetune audit reads image folders (it hashes files and writes a manifest of their "
                            "paths); run it on the folder the shards were written from, then shard the cleaned data")


def _test_images(dataset: Prepared) -> list[Path]:
    return list_images(dataset.test_dir, recursive=True) if dataset.test_dir else []


def _splits_of(samples: Sequence[Sample], dataset: Prepared) -> list[str]:
    val = {s.path for s in dataset.val}
    return ["val" if s.path in val else "train" for s in samples]


def _from_features(recipe: Recipe, task: Task, dataset: Prepared, options: AuditOptions, log: Log) -> _Material:
    """Embeddings from the recipe's backbone (pretrained, frozen); a cross-validated linear classifier on them."""
    started = time.perf_counter()
    device = resolve_device(recipe.train.device)
    model, preprocessing = build_model(recipe.model, len(dataset.classes), recipe.data.image_size,
                                       recipe.data.crop_pct)
    model.to(device)
    samples, test = [*dataset.train, *dataset.val], _test_images(dataset)
    unreadable: dict[Path, str] = {}
    embeddings = embed_images(model, preprocessing, [s.path for s in samples] + test, options.batch_size,
                              recipe.data.num_workers or 0, unreadable)
    material = _readable(_Material(recipe, task, dataset.classes, samples, _splits_of(samples, dataset),
                                   np.zeros((len(samples), len(dataset.classes))), test, embeddings,
                                   list(dataset.skipped)), unreadable)
    log(f"embedded {len(material.paths)} images with the pretrained {recipe.model.backbone} "
        f"({material.embeddings.shape[1]} features) in {time.perf_counter() - started:.1f} s")
    labelled = material.embeddings[:len(material.samples)]
    material.probs = task.cross_validated_probs(labelled, material.samples, len(material.classes), options.folds,
                                                recipe.train.seed)
    material.seconds["probabilities"] = round(time.perf_counter() - started, 1)
    return material


def _readable(material: _Material, unreadable: dict[Path, str]) -> _Material:
    """`material` without the images that did not decode (their embeddings are a blank image's), listed as skipped."""
    if not unreadable:
        return material
    keep = [i for i, path in enumerate(material.paths) if path not in unreadable]
    labelled = [i for i in keep if i < len(material.samples)]
    material.skipped += [SkippedImage(path, reason) for path, reason in unreadable.items()]
    material.embeddings = material.embeddings[keep]
    material.probs = material.probs[labelled]
    material.splits = [material.splits[i] for i in labelled]
    material.test = [p for p in material.test if p not in unreadable]
    material.samples = [material.samples[i] for i in labelled]
    return material


def _fold_samples(predictions: Path, task: Task, classes: Sequence[str]) -> list[Sample]:
    """A fold's held-out samples, from its evaluation's predictions.csv (path, true label, ...)."""
    if not predictions.is_file():
        raise FinetuneError(f"{predictions} is missing: the k-fold run did not finish its fold evaluations; "
                            "train it again or audit with a recipe")
    with predictions.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    missing = [row["path"] for row in rows if not Path(row["path"]).exists()]
    if missing:
        raise FinetuneError(f"{len(missing)} image(s) of the k-fold run are not where it read them (e.g. "
                            f"{missing[0]}); run the audit where the data is, or pass --data")
    return [Sample(Path(row["path"]), task.parse_target(row["true"], classes)) for row in rows]


def _from_folds(run: RunDir, recipe: Recipe, task: Task, dataset: Prepared, options: AuditOptions,
                log: Log) -> _Material:
    """Each fold model's probabilities on its held-out images (calibrated by its temperature or thresholds), and
    the embeddings of the first fold's fine-tuned backbone."""
    started = time.perf_counter()
    summary = run.read_cv_summary() or {}
    device = resolve_device(recipe.train.device)
    inference = inference_cores(InferenceOptions(options.batch_size, recipe.data.num_workers), device, log)
    settings = ProbsSettings(options.batch_size, inference.num_workers or 0)
    samples, parts, first = [], [], None
    for row in summary.get("folds", []):
        loaded = load_model(row["best_checkpoint"], device)
        first = first or loaded
        held_out = _fold_samples(RunDir(row["run_dir"]).eval.predictions, task, loaded.classes)
        samples += held_out
        parts.append(predict_probs(loaded, held_out, settings))
    if first is None:
        raise FinetuneError(f"{run.cv_summary} lists no folds; train the k-fold run again")
    test, unreadable = _test_images(dataset), {}
    embeddings = embed_images(first.model, first.preprocessing, [s.path for s in samples] + test,
                              options.batch_size, settings.num_workers, unreadable)
    material = _readable(_Material(recipe, task, first.classes, samples, _splits_of(samples, dataset),
                                   np.concatenate(parts), test, embeddings, list(dataset.skipped)), unreadable)
    log(f"out-of-fold probabilities of {len(samples)} images from {len(parts)} fold models, embeddings from fold 1's "
        f"fine-tuned backbone, in {time.perf_counter() - started:.1f} s")
    material.seconds["probabilities"] = round(time.perf_counter() - started, 1)
    return material


def _find(material: _Material, options: AuditOptions, log: Log) -> _Findings:
    """Label issues (cleanlab), duplicate pairs (content hash, grey thumbnails, embedding neighbours), outliers
    (neighbour distance)."""
    judged = material.task.judge_labels(material.probs, material.samples, len(material.classes))
    issues = [judgement for judgement in judged if judgement.flagged]
    paths = material.paths
    splits = [*material.splits, *(["test"] * len(material.test))]
    by_split: dict[str, list[Path]] = {}
    for path, split in zip(paths, splits):
        by_split.setdefault(split, []).append(path)
    pairs: dict[frozenset, DuplicatePair] = {}
    for pair in (*identical_files(by_split), *close_pairs(thumbnails(paths), paths, splits,
                                                          options.thumbnail_similarity),
                 *similar_pairs(material.embeddings, paths, splits, options.similarity, options.ratio)):
        pairs.setdefault(frozenset((pair.path_a, pair.path_b)), pair)  # the surest way it was found
    scores = outlier_scores(material.embeddings)
    outliers = [(int(i), float(scores[i])) for i in flag_outliers(scores, options.outlier_spread)]
    ordered = sorted(pairs.values(), key=lambda p: (KINDS.index(p.kind), -p.similarity))
    found = _Findings(judged, issues, ordered, outliers)
    leaks = sum(p.leak for p in found.pairs)
    log(f"audit: {len(issues)} doubtful label(s) among {len(material.samples)} images, {len(found.pairs)} duplicate "
        f"pair(s) ({leaks} across splits), {len(outliers)} outlier(s)")
    return found


def _manifest_target(write_manifest: Optional[Union[str, Path]], recipe: Recipe) -> Optional[Path]:
    """The cleaned manifest's path, refused inside the data folder (the audit never writes there)."""
    if write_manifest is None:
        return None
    target = Path(write_manifest).expanduser().absolute()
    root = Path(recipe.data.root or ".").expanduser().absolute()
    if target == root or root in target.parents:
        raise FinetuneError(f"--write-manifest {target} is inside the data folder {root}; the audit never writes "
                            "there: give a path outside it (e.g. audit/cleaned.csv)")
    if target.is_dir():
        raise FinetuneError(f"--write-manifest {target} is a folder; give a file name such as cleaned.csv")
    return target


def _write(files: AuditFiles, material: _Material, found: _Findings, options: AuditOptions,
           manifest: Optional[Path], log: Log) -> AuditResult:
    """Every file of the audit folder, the manifest when asked, and the summary lines."""
    classes, task = material.classes, material.task
    text = [task.target_text(s.target, classes) for s in material.samples]
    for path, judged in ((files.label_issues, found.issues), (files.label_quality, found.judged)):
        files.write_csv(path, [["path", "given", "suggested", "quality"], *(
            [str(material.samples[i.index].path), text[i.index], task.target_text(i.suggested, classes),
             f"{i.quality:.4f}"] for i in judged)])
    files.write_csv(files.duplicates, [["path_a", "path_b", "split_a", "split_b", "similarity", "kind"], *(
        [str(p.path_a), str(p.path_b), p.split_a, p.split_b, f"{p.similarity:.4f}", p.kind] for p in found.pairs)])
    paths, splits = material.paths, [*material.splits, *(["test"] * len(material.test))]
    files.write_csv(files.outliers, [["path", "split", "score"],
                                     *([str(paths[i]), splits[i], f"{score:.4f}"] for i, score in found.outliers)])
    files.write_csv(files.excluded, [["path", "reason"], *_exclusions(material, found)])
    files.write_csv(files.skipped, [["path", "reason"], *([str(s.path), s.reason] for s in material.skipped)])
    if manifest is not None:
        files.write_manifest(manifest, _manifest_rows(material, found, options.fix))
        log(f"cleaned manifest ({options.fix}: {len(found.issues)} doubted label(s)) in {manifest}; train on it with "
            f"--set data.layout=csv data.csv={manifest} (validation is then split from it)")
    summary = _summary(material, found, options, manifest)
    files.write_summary(summary)
    page = files.write_page(render_audit(AuditPage(files, summary, material.samples, text, classes,
                                                   task.encode(len(classes)))))
    log(f"audit page: {page}")
    return AuditResult(files.folder, options.method, len(material.samples), len(found.issues), len(found.pairs),
                       summary["counts"]["leaks"], len(found.outliers), manifest, page)


def _exclusions(material: _Material, found: _Findings) -> list[list[str]]:
    """excluded.csv's rows: every labelled image the audit would leave out, and why (the user edits the list)."""
    classes, task = material.classes, material.task
    reasons: dict[Path, str] = {}
    for issue in found.issues:
        sample = material.samples[issue.index]
        reasons[sample.path] = (f"label issue: given {task.target_text(sample.target, classes)}, suggested "
                                f"{task.target_text(issue.suggested, classes)}")
    labelled = {s.path for s in material.samples}
    for pair in found.pairs:
        # keep one of each pair: a labelled copy of a test image goes (it leaks), else the second of the two
        drop = pair.path_a if pair.split_b == "test" else pair.path_b
        if drop in labelled and drop not in reasons:
            other = pair.path_b if drop == pair.path_a else pair.path_a
            reasons[drop] = f"copy of {other} ({pair.split_a}/{pair.split_b}, {pair.kind} {pair.similarity:.4f})"
    for index, score in found.outliers:
        path = material.paths[index]
        if path in labelled and path not in reasons:
            reasons[path] = f"outlier (neighbour distance {score:.3f})"
    return [[str(path), reason] for path, reason in reasons.items()]


def _manifest_rows(material: _Material, found: _Findings, fix: str) -> list[list[str]]:
    """The labelled images as a manifest (path, label): doubted labels dropped or replaced by the suggestion."""
    suggested = {issue.index: issue.suggested for issue in found.issues}
    rows = [["path", "label"]]
    for index, sample in enumerate(material.samples):
        target = sample.target
        if index in suggested:
            if fix == "drop":
                continue
            target = suggested[index]
        rows.append([str(sample.path.absolute()), material.task.target_text(target, material.classes)])
    return rows


def _summary(material: _Material, found: _Findings, options: AuditOptions, manifest: Optional[Path]) -> dict:
    """audit.json: the counts, the class balance, the settings and the time each part took."""
    encode = material.task.encode(len(material.classes))
    counts = np.zeros(len(material.classes), dtype=int)
    for sample in material.samples:
        target = np.asarray(encode(sample))  # a class index, or a multi-hot vector
        if target.ndim == 0:
            counts[int(target)] += 1
        else:
            counts += target.astype(int)
    leaks = [p for p in found.pairs if p.leak]
    return {
        "source": {"backbone": material.recipe.model.backbone, "data": material.recipe.data.root,
                   "task": material.task.name},
        "settings": {"method": options.method, "folds": options.folds,
                     "thumbnail_similarity": options.thumbnail_similarity, "similarity": options.similarity,
                     "ratio": options.ratio, "outlier_spread": options.outlier_spread, "fix": options.fix},
        "counts": {"images": len(material.samples), "test_images": len(material.test),
                   "label_issues": len(found.issues), "duplicate_pairs": len(found.pairs),
                   "identical_pairs": sum(p.kind == KINDS[0] for p in found.pairs), "leaks": len(leaks),
                   "leaks_into_test": sum("test" in (p.split_a, p.split_b) for p in leaks),
                   "outliers": len(found.outliers), "skipped_images": len(material.skipped)},
        "class_counts": dict(zip(material.classes, counts.tolist())),
        "imbalance": round(float(counts.max() / max(counts.min(), 1)), 2),
        "manifest": str(manifest) if manifest else None,
        "seconds": material.seconds,
    }
