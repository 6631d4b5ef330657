"""The public API: train, evaluate, predict, report — what the CLI and notebooks call.

Each function reads top to bottom: recipe → prepare data → build model → RunDir → fit → evaluate → report.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from finetune.data.images import SkippedImage, check_headers, list_images
from finetune.data.loaders import eval_loader, image_reader, tensor_train_loader, train_loader
from finetune.data.transforms import eval_decode_side
from finetune.data.mixing import create_mixer
from finetune.data.prepare import Prepared, labelled, prepare
from finetune.engine.features import FeatureCache
from finetune.engine.fit import EpochHook, FitState, fit
from finetune.engine.loss import create_criterion
from finetune.engine.resume import read_resume, seed_everything
from finetune.engine.step import check_precision, compile_model, train_precision
from finetune.errors import FinetuneError
from finetune.evaluation import evaluate_samples
from finetune.inference import load_ensemble, load_model, resolve_device, stream_probs
from finetune.loggers import check_loggers
from finetune.models import build_model, format_summary, stage_summary
from finetune.models.backbones import check_backbone_name
from finetune.recipe import Recipe, resolve_recipe
from finetune.report_page import build_report
from finetune.run import EvalFiles, RunDir, check_output, write_skipped_list
from finetune.submission import plan_submission, write_rows
from finetune.tta import parse_tta, view_count

__all__ = ["TrainResult", "train", "evaluate", "predict", "report", "load_model"]

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


def train(
    recipe: Union[Recipe, str, Path, None] = None,
    data: Optional[Union[str, Path]] = None,
    overrides: Optional[list[str]] = None,
    log: Log = print,
    prepared: Optional[Prepared] = None,
    resume: Optional[Union[str, Path]] = None,
    on_epoch: Optional[EpochHook] = None,
) -> TrainResult:
    """Fine-tune as the recipe says; writes a new run folder and returns where it is.

    `prepared` replaces the recipe's data discovery with explicit train/val samples (k-fold uses it).
    `resume` (a run folder or its last.pt) continues that run in its folder with its saved recipe.
    `on_epoch` is called with each epoch's history row; returning True stops training after that epoch
    (the best checkpoint is still evaluated) — `finetune tune` prunes trials with it.
    """
    payload = None
    if resume is not None:
        if recipe is not None:
            log("note: resuming uses the run's saved recipe; the recipe given is ignored (change settings with --set)")
        checkpoint = RunDir.resume_checkpoint(resume)
        payload, recipe = read_resume(checkpoint, overrides)
    else:
        recipe = resolve_recipe(recipe, overrides)
    if data is not None:
        recipe.data.root = str(Path(data).expanduser().resolve())
    check_backbone_name(recipe.model.backbone)  # fail before scanning thousands of images
    check_loggers(recipe.train.loggers)
    seed_everything(recipe.train.seed)
    dataset = prepared or prepare(recipe, log)
    log(dataset.describe())
    if payload is not None and list(payload["classes"]) != dataset.classes:
        raise FinetuneError(f"the data has classes {dataset.classes[:20]} but the run being resumed was trained on "
                            f"{list(payload['classes'])[:20]}; resume with the run's own data")

    device = resolve_device(recipe.train.device)
    # A resumed run's weights come from its checkpoint: no download, no weights file.
    model_cfg = replace(recipe.model, pretrained=False, weights=None) if payload else recipe.model
    model, preprocessing = build_model(model_cfg, len(dataset.classes), recipe.data.image_size)
    recipe.data.image_size = preprocessing.size
    log(f"backbone {recipe.model.backbone}: input {preprocessing.size}px, mean {preprocessing.mean}")
    log(format_summary(stage_summary(model)))
    memory_format = torch.channels_last if recipe.train.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    train_precision(recipe.train, device)  # fp16 on a CPU stops here, before the run folder exists
    if recipe.train.compile:
        example = torch.zeros(2, 3, preprocessing.size, preprocessing.size, device=device)
        if compile_model(model, example.contiguous(memory_format=memory_format), log):
            log("train.compile: the model runs compiled (torch.compile)")

    run = RunDir.open(checkpoint) if payload is not None else RunDir.create(recipe.output, recipe.name)
    run.write_recipe(recipe)
    run.write_data_summary(dataset.classes, dataset.train_counts, dataset.val_counts)
    run.write_skipped(dataset.skipped, log)

    cfg = recipe.data
    extras = {"classes": dataset.classes, "preprocessing": preprocessing.to_dict(), "recipe": recipe.to_dict()}
    log(f"training on {device} for {recipe.train.epochs} epoch(s); run folder {run.path}")
    run.start_loggers(recipe)

    def on_skip(item: SkippedImage) -> None:
        log(f"warning: skipped {item.path}, which does not decode ({item.reason}); it is listed in {run.skipped}")

    # Each image is decoded once per pass, by the loaders: what fails there is dropped from its batch and listed.
    val_read = image_reader(cfg, eval_decode_side(preprocessing), [s.path for s in dataset.val])
    loaders = (train_loader(recipe, dataset.train, preprocessing, len(dataset.classes), on_skip=on_skip),
               eval_loader(dataset.val, preprocessing, cfg.batch_size, cfg.num_workers, val_read, on_skip))
    mixer = create_mixer(recipe.augment, len(dataset.classes))
    features = None
    if _caches_features(recipe, mixer is not None):
        # One pass over the training images (the validation loader serves both): no image cache needed.
        features = FeatureCache(eval_loader(dataset.train, preprocessing, cfg.batch_size, cfg.num_workers),
                                loaders[1], lambda d: tensor_train_loader(recipe, d, len(dataset.classes)))
    try:
        state: FitState = fit(
            model, *loaders, create_criterion(recipe, dataset.train_counts, device), recipe.train, run, device, extras,
            log=log, mixer=mixer, resume=payload, on_epoch=on_epoch, feature_cache=features,
        )
        unreadable = {path: item for loader in loaders for path, item in getattr(loader, "skipped", {}).items()}
        skipped = [*dataset.skipped, *unreadable.values()]  # a shared Prepared (k-fold, tune) stays as it was
        if unreadable:
            run.write_skipped(skipped, log=lambda _: None)
            log(f"{len(unreadable)} image(s) failed to decode during training and were left out; "
                f"{len(skipped)} skipped file(s) in all are listed in {run.skipped}")
        val_samples = [s for s in dataset.val if s.path not in unreadable]
        evaluation = evaluate_samples(load_model(state.best_path, device), val_samples, run.eval, cfg.batch_size,
                                      cfg.num_workers, log)
    except BaseException:
        run.close_loggers()  # what was logged so far stays readable
        raise
    log(f"report: {build_report(run)}")
    run.finish_loggers({"best_val_acc": state.best_accuracy, "best_epoch": state.best_epoch, **evaluation})
    log(f"best validation accuracy {state.best_accuracy:.4f} (epoch {state.best_epoch}); files in {run.path}")
    return TrainResult(run.path, state.best_path, state.last_path, state.best_accuracy, state.best_epoch,
                       dataset.classes, skipped, evaluation)


def _caches_features(recipe: Recipe, mixes: bool) -> bool:
    """Whether head-only epochs may train on cached backbone features (train.cache_features)."""
    aug, choice = recipe.augment, recipe.train.cache_features
    if choice is False or mixes:  # mixup/cutmix blend images, not features
        return False
    # Features of un-augmented images stand in for random augmentation only when the recipe accepts it.
    deterministic = aug.preset == "none" and not aug.ops and aug.policy == "none"
    return bool(choice) or (deterministic and recipe.model.bn == "frozen")


def evaluate(
    checkpoint: Union[str, Path],
    data: Union[str, Path],
    out: Optional[Union[str, Path]] = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    log: Log = print,
    tta: Union[str, Sequence[str], None] = None,
    precision: str = "fp32",
) -> dict:
    """Score a checkpoint on a labelled folder; writes the evaluation bundle and report.html, returns metrics.

    `precision` bf16 runs the model under bf16 autocast (faster on recent CPUs and GPUs; see benchmarks/).
    """
    views = parse_tta(tta)
    check_precision(precision, resolve_device(device), "--precision")
    loaded = load_model(checkpoint, resolve_device(device))
    data_cfg = loaded.recipe.data
    samples, skipped = labelled(Path(data).expanduser(), loaded.classes, data_cfg.layout, data_cfg.label_regex)
    if not samples:
        raise FinetuneError(f"no readable labelled images in {data}")
    run = RunDir.open(checkpoint)
    files = EvalFiles(out) if out else run.eval
    if files.folder.resolve().is_relative_to(Path(data).expanduser().resolve()):
        # Its PNGs would sit among the images being evaluated (and be read as images the next time).
        raise FinetuneError(f"the evaluation folder {files.folder} is inside the data folder {data}; give --out a "
                            "folder outside the data")
    files.prepare()
    write_skipped_list(files.skipped, skipped, log)
    metrics = evaluate_samples(loaded, samples, files, batch_size, num_workers, log, views, precision)
    log(f"report: {build_report(run, files)}")
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
    force: bool = False,
    precision: str = "fp32",
) -> Path:
    """Predict every image in a folder and write a Kaggle-style CSV with one row per image.

    Several checkpoints are an ensemble (probabilities averaged); `tta` adds flips/crops; `probs`
    and `topk` also write `<out>_probs.csv` and `<out>_top<K>.csv`; `sample_submission` fixes the
    Ids, their order and the columns. Outputs never replace a file the command reads; an existing
    file that is not an earlier CSV of the same kind is replaced only with `force`. `precision` bf16
    runs the models under bf16 autocast.
    """
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    views = parse_tta(tta)
    check_precision(precision, resolve_device(device), "--precision")
    models = load_ensemble(checkpoints, resolve_device(device))
    classes = models[0].classes
    folder = Path(images).expanduser()
    paths = list_images(folder)
    _refuse_nested_images(folder, paths)
    if not paths:
        raise FinetuneError(f"no images in {images} (looked for .jpg/.png/... files, hidden files ignored)")
    out = Path(out).expanduser()
    sample = Path(sample_submission).expanduser() if sample_submission else None
    plan = plan_submission(paths, classes, id_format, id_width, index_start, id_column, label_column, sample)
    outputs = {out: plan.id_column, out.with_name(out.stem + "_unreadable.csv"): "path"}
    probs_out = out.with_name(out.stem + "_probs.csv") if probs else None
    topk_out = out.with_name(f"{out.stem}_top{topk}.csv") if topk else None
    outputs.update({path: plan.id_column for path in (probs_out, topk_out) if path is not None})
    inputs = [*map(Path, checkpoints), *paths, *([sample] if sample else [])]
    replaced = [path for path, first in outputs.items()
                if check_output(path, inputs, "prediction CSV", _csv_starting_with(first), force)]
    skipped = check_headers(paths)  # the pixels are decoded once, while predicting
    if len(models) > 1 or views:
        log(f"averaging {len(models)} model(s) x {view_count(views)} view(s) per image")
    failed: dict[Path, str] = {}
    batches = stream_probs(models, plan.paths, batch_size, num_workers, views, {s.path for s in skipped}, precision,
                           failed)
    rows_written = write_rows(plan, batches, classes, out, value, probs_out, topk, topk_out)
    skipped = sorted([*skipped, *(SkippedImage(path, reason) for path, reason in failed.items())],
                     key=lambda item: str(item.path))
    if skipped:
        # Still one row per image: an unreadable image is scored as a blank (mean-colour) input.
        listing = out.with_name(out.stem + "_unreadable.csv")
        write_skipped_list(listing, skipped, log)
        log(f"warning: {len(skipped)} unreadable image(s) got a blank-image prediction; listed in {listing}")
    log(f"wrote {rows_written} predictions for {len(paths)} images to {out}")
    written = {out, probs_out, topk_out, out.with_name(out.stem + "_unreadable.csv") if skipped else None}
    for path in replaced:
        if path in written:
            log(f"note: replaced the earlier {path}")
    return out


def _refuse_nested_images(folder: Path, top_level: Sequence[Path]) -> None:
    """Images in sub-folders would get no row: refuse rather than leave them out silently."""
    nested = sorted(set(list_images(folder, recursive=True)) - set(top_level))
    if nested:
        raise FinetuneError(
            f"{len(nested)} image(s) sit in sub-folders of {folder} (e.g. {nested[0].relative_to(folder)}) and "
            f"would get no prediction; only images directly in --images are read. Move them into {folder} itself "
            "(Ids are file names, so they must be unique), or run predict on each sub-folder"
        )


def _csv_starting_with(first_column: str) -> Callable[[Path], bool]:
    """Whether a file is a CSV whose header starts with `first_column`: an earlier output of predict."""
    def earlier(path: Path) -> bool:
        if path.suffix.lower() != ".csv":
            return False
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:
                header = next(csv.reader(handle), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            return False
        return bool(header) and header[0].strip() == first_column
    return earlier


def report(run_dir: Union[str, Path], eval_dir: Optional[Union[str, Path]] = None) -> Path:
    """(Re)build a run folder's self-contained report.html (with another evaluation folder if given)."""
    run = RunDir.open(run_dir)
    return build_report(run, EvalFiles(eval_dir) if eval_dir else None)
