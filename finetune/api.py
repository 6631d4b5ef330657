"""The public API: train, evaluate, predict, load_model — what the CLI and notebooks call."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from finetune.data.images import SkippedImage, check_images, list_images
from finetune.data.loaders import ImageDataset, balanced_sampler, class_counts, make_loader, unlabeled_samples
from finetune.data.sources import VAL_NAMES, Sample, discover, read_labelled_folder
from finetune.data.transforms import build_eval_transform, build_train_transform
from finetune.engine.fit import FitState, fit
from finetune.errors import FinetuneError
from finetune.evaluate import format_report, write_evaluation
from finetune.inference import LoadedModel, load_model, predict_probs, resolve_device
from finetune.models import build_model, format_summary, stage_summary
from finetune.models.backbones import check_backbone_name
from finetune.predict import write_submission
from finetune.recipe import Recipe, apply_overrides, load_recipe
from finetune.reports.plots import plot_curves

__all__ = ["TrainResult", "train", "evaluate", "predict", "load_model", "create_run_dir"]

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


def _as_recipe(recipe: Union[Recipe, str, Path, None], overrides: Optional[list[str]]) -> Recipe:
    if isinstance(recipe, Recipe):
        return Recipe.from_dict(apply_overrides(recipe.to_dict(), list(overrides or [])))
    return load_recipe(recipe, overrides)


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
) -> TrainResult:
    """Fine-tune as the recipe says; writes a new run folder and returns where it is."""
    recipe = _as_recipe(recipe, overrides)
    if data is not None:
        recipe.data.root = str(Path(data).expanduser().resolve())
    check_backbone_name(recipe.model.backbone)  # fail before scanning thousands of images
    seed_everything(recipe.train.seed)
    splits = discover(recipe.data, recipe.train.seed)
    classes = splits.classes
    log(f"found {len(splits.train)} training and {len(splits.val)} validation images in {len(classes)} classes"
        f" (validation: {'folder' if splits.val_source == 'folder' else f'{recipe.data.val_fraction:.0%} stratified split'})")
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
    model, preprocessing = build_model(recipe.model, len(classes), recipe.data.image_size)
    recipe.data.image_size = preprocessing.size
    log(f"backbone {recipe.model.backbone}: input {preprocessing.size}px, mean {preprocessing.mean}")
    log(format_summary(stage_summary(model)))

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
    train_tf = build_train_transform(preprocessing, recipe.augment.preset, recipe.augment.ops)
    sampler = balanced_sampler(train_samples, len(classes), recipe.train.seed) if cfg.balance == "sampler" else None
    train_loader = make_loader(
        ImageDataset(train_samples, train_tf), cfg.batch_size, cfg.num_workers, shuffle=True,
        seed=recipe.train.seed, sampler=sampler, drop_last=len(train_samples) > cfg.batch_size,
    )
    val_loader = make_loader(ImageDataset(val_samples, build_eval_transform(preprocessing)), cfg.batch_size,
                             cfg.num_workers)
    memory_format = torch.channels_last if recipe.train.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    extras = {"classes": classes, "preprocessing": preprocessing.to_dict(), "recipe": recipe.to_dict()}
    log(f"training on {device} for {recipe.train.epochs} epoch(s); run folder {run_dir}")
    state: FitState = fit(
        model, train_loader, val_loader, _criterion(recipe, counts, device), recipe.train, run_dir, device, extras,
        on_epoch_end=lambda history: plot_curves(history, run_dir / "curves.png"), log=log,
    )
    evaluation = _evaluate_loaded(load_model(state.best_path, device), val_samples, run_dir / "eval", cfg, log)
    log(f"best validation accuracy {state.best_accuracy:.4f} (epoch {state.best_epoch}); files in {run_dir}")
    return TrainResult(run_dir, state.best_path, state.last_path, state.best_accuracy, state.best_epoch, classes,
                       skipped, evaluation)


def _evaluate_loaded(loaded: LoadedModel, samples: list[Sample], out_dir: Path, cfg, log: Log) -> dict:
    probs = predict_probs(loaded, samples, cfg.batch_size, cfg.num_workers)
    y_true = [s.label for s in samples]
    metrics = write_evaluation(y_true, probs.argmax(1), loaded.classes, out_dir, probs, [s.path for s in samples])
    log(format_report(metrics["report"], loaded.classes))
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
) -> dict:
    """Score a checkpoint on a labelled folder; writes the evaluation bundle and returns metrics."""
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
    return _evaluate_loaded(loaded, samples, out_dir, data_cfg, log)


def predict(
    checkpoint: Union[str, Path],
    images: Union[str, Path],
    out: Union[str, Path] = "submission.csv",
    id_column: str = "Id",
    label_column: str = "Category",
    value: str = "name",
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    log: Log = print,
) -> Path:
    """Predict every image in a folder and write a Kaggle-style CSV with one row per image."""
    loaded = load_model(checkpoint, resolve_device(device))
    paths = list_images(Path(images).expanduser())
    if not paths:
        raise FinetuneError(f"no images in {images} (looked for .jpg/.png/... files, hidden files ignored)")
    skipped = check_images(paths)
    bad = {s.path for s in skipped}
    good = [p for p in paths if p not in bad]
    probs = np.zeros((len(paths), len(loaded.classes)), dtype=np.float32)
    if good:
        good_probs = predict_probs(loaded, unlabeled_samples(good), batch_size, num_workers)
        rows = {p: i for i, p in enumerate(paths)}
        probs[[rows[p] for p in good]] = good_probs
    if skipped:
        # Still one row per image: an unreadable image is scored as a blank (mean-colour) input.
        size = loaded.preprocessing.size
        with torch.no_grad():
            param = next(loaded.model.parameters())
            blank = torch.softmax(loaded.model(torch.zeros(1, 3, size, size, device=param.device)), 1)[0].cpu().numpy()
        for i, p in enumerate(paths):
            if p in bad:
                probs[i] = blank
    out = Path(out).expanduser()
    rows_written = write_submission(paths, probs, loaded.classes, out, id_column, label_column, value)
    if skipped:
        listing = out.with_name(out.stem + "_unreadable.csv")
        _write_skipped(listing, skipped)
        log(f"warning: {len(skipped)} unreadable image(s) got a blank-image prediction; listed in {listing}")
    log(f"wrote {rows_written} predictions for {len(paths)} images to {out}")
    return out
