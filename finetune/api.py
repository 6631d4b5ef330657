"""The public API: train, evaluate, predict, load_model — what the CLI and notebooks call."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import albumentations as A
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.data.images import SkippedImage, check_images, list_images, load_rgb
from finetune.data.loaders import ImageDataset, balanced_sampler, class_counts, make_loader
from finetune.data.mixing import create_mixer
from finetune.data.sources import VAL_NAMES, DatasetSplits, Sample, discover, read_labelled_folder
from finetune.data.transforms import Preprocessing, build_eval_transform, build_train_transform
from finetune.engine.checkpoint import read_checkpoint
from finetune.engine.fit import FitState, fit
from finetune.engine.lr_find import LrFindResult, lr_range_test
from finetune.engine.resume import check_resumable, find_resume_checkpoint
from finetune.errors import FinetuneError
from finetune.evaluate import format_report, write_evaluation
from finetune.inference import LoadedModel, load_ensemble, load_model, predict_probs, resolve_device, stream_probs
from finetune.models import build_model, format_summary, stage_summary
from finetune.models.backbones import check_backbone_name
from finetune.predict import plan_submission, write_rows
from finetune.recipe import Recipe, apply_overrides, resolve_recipe
from finetune.reports.augment_grid import save_augment_grid
from finetune.reports.html import build_report
from finetune.reports.lr_plot import plot_lr_find
from finetune.reports.plots import plot_curves
from finetune.tta import parse_tta, view_count

__all__ = ["TrainResult", "train", "evaluate", "predict", "load_model", "create_run_dir", "augment_preview", "lr_find"]

Log = Callable[[str], None]


@dataclass
class TrainResult:
    """Where a training run put its files and how well it did."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_val_accuracy: float
    best_epoch: int
    classes: list[str]
    skipped: list[SkippedImage]
    evaluation: dict


def create_run_dir(output: Union[str, Path], name: str) -> Path:
    """`output/name`, or `name-2`, `name-3`... so an earlier run is never overwritten."""
    base = Path(output).expanduser()
    base.mkdir(parents=True, exist_ok=True)
    candidate, n = base / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = base / f"{name}-{n}"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch for repeatable runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _write_skipped(path: Path, skipped: list[SkippedImage]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows((str(s.path), s.reason) for s in skipped)


def _report_skipped(skipped: list[SkippedImage], where: Path, log: Log) -> None:
    if skipped:
        log(f"skipped {len(skipped)} unusable image(s), listed in {where}:")
        for item in skipped[:5]:
            log(f"  {item.path}: {item.reason}")
        if len(skipped) > 5:
            log(f"  ... and {len(skipped) - 5} more")


def _drop_unreadable(samples: list[Sample], bad: set[Path]) -> list[Sample]:
    return [s for s in samples if s.path not in bad]


def _criterion(recipe: Recipe, counts: list[int], device: torch.device) -> nn.Module:
    weight = None
    if recipe.data.balance == "loss":
        counts_t = torch.as_tensor(counts, dtype=torch.float32).clamp(min=1)
        weight = (counts_t.sum() / (len(counts) * counts_t)).to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.train.label_smoothing)


def train(
    recipe: Union[Recipe, str, Path, None] = None,
    data: Optional[Union[str, Path]] = None,
    overrides: Optional[list[str]] = None,
    log: Log = print,
    splits: Optional[DatasetSplits] = None,
    resume: Optional[Union[str, Path]] = None,
) -> TrainResult:
    """Fine-tune as the recipe says; writes a new run folder and returns where it is.

    `splits` replaces the recipe's data discovery with explicit train/val samples (k-fold uses it).
    `resume` (a run folder or its last.pt) continues that run in its folder with its saved recipe.
    """
    resume_path, resume_payload = None, None
    if resume is not None:
        resume_path, resume_payload, recipe = _read_resume(resume, recipe, overrides, log)
    else:
        recipe = resolve_recipe(recipe, overrides)
    if data is not None:
        recipe.data.root = str(Path(data).expanduser().resolve())
    check_backbone_name(recipe.model.backbone)  # fail before scanning thousands of images
    seed_everything(recipe.train.seed)
    splits = splits or discover(recipe.data, recipe.train.seed)
    classes = splits.classes
    val_source = splits.val_source
    if val_source == "split":
        val_source = f"{recipe.data.val_fraction:.0%} stratified split"
    log(f"found {len(splits.train)} training and {len(splits.val)} validation images in {len(classes)} classes"
        f" (validation: {val_source})")
    skipped = splits.skipped + check_images([s.path for s in splits.train + splits.val])
    bad = {s.path for s in skipped}
    train_samples, val_samples = _drop_unreadable(splits.train, bad), _drop_unreadable(splits.val, bad)
    counts = class_counts(train_samples, len(classes))
    empty = [classes[i] for i, c in enumerate(counts) if c == 0]
    if empty:
        raise FinetuneError(f"class(es) {empty} have no readable training images; add images or remove them")
    if max(counts) > 5 * min(counts):
        log(f"warning: classes are imbalanced (largest {max(counts)}, smallest {min(counts)} images); "
            "consider data.balance: sampler or loss")

    device = resolve_device(recipe.train.device)
    # A resumed run's weights come from its checkpoint: no download, no weights file.
    model_cfg = replace(recipe.model, pretrained=False, weights=None) if resume_payload else recipe.model
    model, preprocessing = build_model(model_cfg, len(classes), recipe.data.image_size)
    recipe.data.image_size = preprocessing.size
    log(f"backbone {recipe.model.backbone}: input {preprocessing.size}px, mean {preprocessing.mean}")
    log(format_summary(stage_summary(model)))

    if resume_path is not None:
        run_dir = resume_path.parent
        if list(resume_payload["classes"]) != classes:
            raise FinetuneError(f"the data has classes {classes[:20]} but the run being resumed was trained on "
                                f"{list(resume_payload['classes'])[:20]}; resume with the run's own data")
    else:
        run_dir = create_run_dir(recipe.output, recipe.name)
    recipe.to_yaml(run_dir / "recipe.yaml")
    (run_dir / "classes.txt").write_text("\n".join(classes) + "\n")
    with (run_dir / "class_counts.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["class", "train", "val"]] + [
            [c, n, v] for c, n, v in zip(classes, counts, class_counts(val_samples, len(classes)))
        ])
    _write_skipped(run_dir / "skipped_images.csv", skipped)
    _report_skipped(skipped, run_dir / "skipped_images.csv", log)

    cfg = recipe.data
    train_loader = _train_loader(recipe, train_samples, preprocessing, len(classes))
    val_loader = make_loader(ImageDataset(val_samples, build_eval_transform(preprocessing)), cfg.batch_size,
                             cfg.num_workers)
    memory_format = torch.channels_last if recipe.train.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    extras = {"classes": classes, "preprocessing": preprocessing.to_dict(), "recipe": recipe.to_dict()}
    log(f"training on {device} for {recipe.train.epochs} epoch(s); run folder {run_dir}")
    state: FitState = fit(
        model, train_loader, val_loader, _criterion(recipe, counts, device), recipe.train, run_dir, device, extras,
        on_epoch_end=lambda history: plot_curves(history, run_dir / "curves.png"), log=log,
        mixer=create_mixer(recipe.augment, len(classes)), resume=resume_payload,
    )
    evaluation = _evaluate_loaded(load_model(state.best_path, device), val_samples, run_dir / "eval", cfg, log)
    log(f"report: {build_report(run_dir)}")
    log(f"best validation accuracy {state.best_accuracy:.4f} (epoch {state.best_epoch}); files in {run_dir}")
    return TrainResult(run_dir, state.best_path, state.last_path, state.best_accuracy, state.best_epoch, classes,
                       skipped, evaluation)


def _train_transform(recipe: Recipe, preprocessing: Preprocessing) -> A.Compose:
    aug = recipe.augment
    return build_train_transform(preprocessing, aug.preset, aug.ops, aug.policy, seed=recipe.train.seed)


def _train_loader(recipe: Recipe, samples: list[Sample], preprocessing: Preprocessing, num_classes: int) -> DataLoader:
    """Augmented, shuffled (or class-balanced) training batches, seeded from train.seed."""
    cfg, seed = recipe.data, recipe.train.seed
    sampler = balanced_sampler(samples, num_classes, seed) if cfg.balance == "sampler" else None
    return make_loader(ImageDataset(samples, _train_transform(recipe, preprocessing)), cfg.batch_size,
                       cfg.num_workers, shuffle=True, seed=seed, sampler=sampler,
                       drop_last=len(samples) > cfg.batch_size)


def _readable_training_samples(recipe: Recipe, log: Log) -> tuple[list[str], list[Sample], list[int]]:
    """Class names, readable training samples and per-class counts, for tools that look before training."""
    splits = discover(recipe.data, recipe.train.seed)
    skipped = splits.skipped + check_images([s.path for s in splits.train])
    if skipped:
        log(f"skipping {len(skipped)} unusable image(s), e.g. {skipped[0].path}: {skipped[0].reason}")
    samples = _drop_unreadable(splits.train, {s.path for s in skipped})
    if not samples:
        raise FinetuneError(f"no readable training images under {recipe.data.root}")
    return splits.classes, samples, class_counts(samples, len(splits.classes))


def augment_preview(
    recipe: Union[Recipe, str, Path, None] = None,
    data: Optional[Union[str, Path]] = None,
    overrides: Optional[list[str]] = None,
    out: Union[str, Path] = "augment_grid.png",
    n: int = 16,
    log: Log = print,
) -> Path:
    """Write a PNG grid of `n` training images as the model sees them: augmented, mixed, denormalised."""
    if n < 1:
        raise FinetuneError("--n must be at least 1")
    recipe = resolve_recipe(recipe, overrides, data)
    seed_everything(recipe.train.seed)
    classes, samples, _ = _readable_training_samples(recipe, log)
    # Only the preprocessing is needed: build the architecture without downloading weights.
    _, preprocessing = build_model(replace(recipe.model, pretrained=False, weights=None), len(classes),
                                   recipe.data.image_size)
    transform = _train_transform(recipe, preprocessing)
    picked = random.Random(recipe.train.seed).sample(samples, min(n, len(samples)))
    images = torch.stack([transform(image=load_rgb(s.path))["image"] for s in picked])
    labels = torch.tensor([s.label for s in picked])
    mixer = create_mixer(recipe.augment, len(classes))
    targets = None
    if mixer is not None:
        images, targets = mixer(images, labels)
    captions = []
    for i, sample in enumerate(picked):
        shares = [] if targets is None else [(float(v), classes[int(c)]) for v, c in zip(*targets[i].topk(2))]
        if len(shares) == 2 and shares[1][0] > 0.005:
            captions.append(f"{shares[0][1]} {shares[0][0]:.2f} / {shares[1][1]} {shares[1][0]:.2f}")
        else:
            captions.append(classes[sample.label])
    aug = recipe.augment
    title = (f"preset {aug.preset if not aug.ops else 'ops'}, policy {aug.policy}, mixup {aug.mixup}, "
             f"cutmix {aug.cutmix} at {preprocessing.size}px")
    path = save_augment_grid(images, captions, preprocessing.mean, preprocessing.std, Path(out).expanduser(), title)
    log(f"wrote {len(picked)} augmented training images to {path}")
    return path


def lr_find(
    recipe: Union[Recipe, str, Path, None] = None,
    data: Optional[Union[str, Path]] = None,
    overrides: Optional[list[str]] = None,
    out: Union[str, Path] = "lr_find.png",
    steps: int = 100,
    log: Log = print,
) -> LrFindResult:
    """Learning-rate range test on the recipe's model and data; plots it and suggests train.lr."""
    if steps < 5:
        raise FinetuneError("--steps must be at least 5 (100 is usual)")
    recipe = resolve_recipe(recipe, overrides, data)
    check_backbone_name(recipe.model.backbone)
    seed_everything(recipe.train.seed)
    classes, samples, counts = _readable_training_samples(recipe, log)
    device = resolve_device(recipe.train.device)
    model, preprocessing = build_model(recipe.model, len(classes), recipe.data.image_size)
    memory_format = torch.channels_last if recipe.train.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    loader = _train_loader(recipe, samples, preprocessing, len(classes))
    log(f"lr range test: up to {steps} batches of {recipe.data.batch_size} on {device}")
    result = lr_range_test(model, loader, _criterion(recipe, counts, device), recipe.train, device, steps=steps)
    path = plot_lr_find(result, Path(out).expanduser())
    steepest = f"; steepest descent at {result.steepest:.1e}" if result.steepest is not None else ""
    log(f"suggested learning rate: {result.suggestion:.1e} (a tenth of the lowest-loss rate{steepest}); "
        f"train with --set train.lr={result.suggestion:.1e}. Plot: {path}")
    return result


def _read_resume(
    path: Union[str, Path], recipe: Union[Recipe, str, Path, None], overrides: Optional[list[str]], log: Log
) -> tuple[Path, dict, Recipe]:
    """The last.pt to continue from, its payload, and the run's saved recipe with `overrides` applied."""
    checkpoint = find_resume_checkpoint(path)
    payload = read_checkpoint(checkpoint)
    resumed = Recipe.from_dict(apply_overrides(payload["recipe"], list(overrides or [])))
    check_resumable(payload, resumed.train)  # before scanning the data and building the model
    if recipe is not None:
        log("note: resuming uses the run's saved recipe; the recipe given is ignored (change settings with --set)")
    return checkpoint, payload, resumed


def _evaluate_loaded(loaded: LoadedModel, samples: list[Sample], out_dir: Path, cfg, log: Log,
                     tta: Sequence[str] = ()) -> dict:
    probs = predict_probs(loaded, samples, cfg.batch_size, cfg.num_workers, tta=tta)
    y_true = [s.label for s in samples]
    metrics = write_evaluation(y_true, probs.argmax(1), loaded.classes, out_dir, probs, [s.path for s in samples],
                               model=loaded)
    log(format_report(metrics["report"], loaded.classes))
    extras = [f"{k} {v:.4f}" for k, v in metrics.get("top_k", {}).items() if k != "top1"]
    if "ece" in metrics:
        extras.append(f"ECE {metrics['ece']:.4f}")
    if extras:
        log(", ".join(extras))
    if metrics["most_confused"]:
        log("most confused (true → predicted: count): " + ", ".join(
            f"{t} → {p}: {n}" for t, p, n in metrics["most_confused"][:5]))
    log(f"evaluation written to {out_dir}")
    return metrics


def _labelled_samples(folder: Path, loaded: LoadedModel) -> tuple[list[Sample], list[SkippedImage]]:
    """Samples from a labelled folder, with class names mapped to the checkpoint's classes."""
    if not folder.is_dir():
        raise FinetuneError(f"data folder not found: {folder}")
    for name in VAL_NAMES:
        if (folder / name).is_dir():
            folder = folder / name
            break
    labelled = read_labelled_folder(folder, loaded.recipe.data.layout if loaded.recipe.data.layout != "csv" else "auto",
                                    loaded.recipe.data.label_regex)
    index = {c: i for i, c in enumerate(loaded.classes)}
    unknown = sorted({name for _, name in labelled.items if name not in index})
    if unknown:
        raise FinetuneError(
            f"{folder} has classes {unknown[:10]} that the checkpoint does not know; it was trained on "
            f"{len(loaded.classes)} classes: {', '.join(loaded.classes[:20])}. Use the matching checkpoint or data"
        )
    samples = [Sample(path, index[name]) for path, name in labelled.items]
    return samples, labelled.skipped


def evaluate(
    checkpoint: Union[str, Path],
    data: Union[str, Path],
    out: Optional[Union[str, Path]] = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    log: Log = print,
    tta: Union[str, Sequence[str], None] = None,
) -> dict:
    """Score a checkpoint on a labelled folder; writes the evaluation bundle and report.html, returns metrics."""
    views = parse_tta(tta)
    loaded = load_model(checkpoint, resolve_device(device))
    samples, skipped = _labelled_samples(Path(data).expanduser(), loaded)
    skipped += check_images([s.path for s in samples])
    samples = _drop_unreadable(samples, {s.path for s in skipped})
    if not samples:
        raise FinetuneError(f"no readable labelled images in {data}")
    out_dir = Path(out) if out else Path(checkpoint).expanduser().parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_skipped(out_dir / "skipped_images.csv", skipped)
    _report_skipped(skipped, out_dir / "skipped_images.csv", log)
    data_cfg = replace(loaded.recipe.data, batch_size=batch_size, num_workers=num_workers)
    metrics = _evaluate_loaded(loaded, samples, out_dir, data_cfg, log, views)
    run_dir = Path(checkpoint).expanduser().parent
    # The default evaluation belongs to the run's own page; one written elsewhere gets its own page there.
    in_run = out_dir.resolve() == (run_dir / "eval").resolve()
    log(f"report: {build_report(run_dir, out_dir, None if in_run else out_dir / 'report.html')}")
    return metrics


def predict(
    checkpoint: Union[str, Path, Sequence[Union[str, Path]]],
    images: Union[str, Path],
    out: Union[str, Path] = "submission.csv",
    id_column: str = "Id",
    label_column: str = "Category",
    value: str = "name",
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    log: Log = print,
    tta: Union[str, Sequence[str], None] = None,
    probs: bool = False,
    topk: int = 0,
    sample_submission: Optional[Union[str, Path]] = None,
    id_format: str = "stem",
    id_width: int = 4,
    index_start: int = 1,
) -> Path:
    """Predict every image in a folder and write a Kaggle-style CSV with one row per image.

    Several checkpoints are an ensemble (probabilities averaged); `tta` adds flips/crops; `probs`
    and `topk` also write `<out>_probs.csv` and `<out>_top<K>.csv`; `sample_submission` fixes the
    Ids, their order and the columns.
    """
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    views = parse_tta(tta)
    models = load_ensemble(checkpoints, resolve_device(device))
    classes = models[0].classes
    paths = list_images(Path(images).expanduser())
    if not paths:
        raise FinetuneError(f"no images in {images} (looked for .jpg/.png/... files, hidden files ignored)")
    out = Path(out).expanduser()
    sample = Path(sample_submission).expanduser() if sample_submission else None
    plan = plan_submission(paths, classes, id_format, id_width, index_start, id_column, label_column, sample)
    skipped = check_images(paths)
    if len(models) > 1 or views:
        log(f"averaging {len(models)} model(s) x {view_count(views)} view(s) per image")
    batches = stream_probs(models, plan.paths, batch_size, num_workers, views, {s.path for s in skipped})
    rows_written = write_rows(plan, batches, classes, out, value,
                              out.with_name(out.stem + "_probs.csv") if probs else None,
                              topk, out.with_name(f"{out.stem}_top{topk}.csv") if topk else None)
    if skipped:
        # Still one row per image: an unreadable image is scored as a blank (mean-colour) input.
        listing = out.with_name(out.stem + "_unreadable.csv")
        _write_skipped(listing, skipped)
        log(f"warning: {len(skipped)} unreadable image(s) got a blank-image prediction; listed in {listing}")
    log(f"wrote {rows_written} predictions for {len(paths)} images to {out}")
    return out
