"""The public API: train, evaluate, predict, report — what the CLI and notebooks call.

Each function reads top to bottom: recipe → prepare data → build model → RunDir → fit → evaluate → report.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from finetune.data.images import SkippedImage, check_headers, list_images
from finetune.data.loaders import eval_loader, image_reader, tensor_train_loader, train_loader
from finetune.data.preprocessing import Preprocessing
from finetune.data.transforms import eval_decode_side
from finetune.data.prepare import Prepared
from finetune.data.shard_members import ShardSamples
from finetune.data.shards import INDEX_SUFFIX, is_shard_spec, load_index
from finetune.data.sources import Sample, shard_set_samples, single_image_subfolder
from finetune.engine import distributed
from finetune.engine.features import FeatureCache
from finetune.engine.files import check_writable, mark_written, was_written_here
from finetune.engine.fit import EpochHook, FitState, TrainingParts, fit
from finetune.engine.resume import read_resume, seed_everything
from finetune.engine.step import check_precision, compile_model, train_precision
from finetune.errors import FinetuneError
from finetune.inference.predict import ProbsSettings, load_ensemble, load_model, predict_probs, resolve_device, sharded_probs
from finetune.models import build_model, format_summary, stage_summary
from finetune.workflows.opening import Opening, inference_cores, open_training
from finetune.config.options import InferenceOptions, SubmissionOptions
from finetune.config.recipe import DataConfig, Recipe
from finetune.outputs.report_page import build_report
from finetune.outputs.run_dir import EvalFiles, RunDir, check_output, write_skipped_list
from finetune.outputs.submission import SubmissionFiles, plan_submission
from finetune.tasks import Task, task_of_model
from finetune.inference.tta import parse_tta, view_count

__all__ = ["TrainResult", "train", "evaluate", "predict", "report", "load_model"]

Log = Callable[[str], None]


@dataclass
class TrainResult:
    """Where a training run put its files and how well it did."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    monitor: str  # train.monitor: the validation metric that chose best.pt
    best_value: float  # its value at the best epoch
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
    Under torchrun every process calls this: DDP training, `data.batch_size` per process, rank 0 writes.
    """
    payload = checkpoint = None
    if resume is not None:
        checkpoint = RunDir.resume_checkpoint(resume)
        RunDir.open(checkpoint).check_writable()
        payload, recipe, overrides = *_resumed(checkpoint, recipe, overrides, log), None
    opening = open_training(recipe, data, overrides, log, prepared)
    recipe, task, dataset, device = opening.recipe, opening.task, opening.dataset, opening.device
    log(dataset.describe())
    if payload is not None and list(payload["classes"]) != dataset.classes:
        raise FinetuneError(f"the data has classes {dataset.classes[:20]} but the run being resumed was trained on "
                            f"{list(payload['classes'])[:20]}; resume with the run's own data")
    model, preprocessing = _build_for_training(recipe, len(dataset.classes), device, payload is not None, log)
    if not distributed.is_main():  # every rank built the same model; from here each draws its own augmentation
        seed_everything(distributed.rank_seed(recipe.train.seed))

    run = RunDir.open(checkpoint) if checkpoint is not None else RunDir.create(recipe.output, recipe.name)
    _start_run(run, opening, log)
    extras = {"task": task.name, "classes": dataset.classes, "preprocessing": preprocessing.to_dict(),
              "recipe": recipe.to_dict(), "world_size": distributed.world_size()}

    def on_skip(item: SkippedImage) -> None:
        log(f"warning: skipped {item.path}, which does not decode ({item.reason}); it is listed in {run.skipped}")

    parts = training_parts(recipe, task, dataset, preprocessing, device, on_skip)
    try:
        state: FitState = fit(model, parts, recipe.train, run, extras, log=log, resume=payload, on_epoch=on_epoch)
        distributed.barrier()  # rank 0 has written best.pt
        skipped, unreadable = _decode_failures(run, dataset, parts, log)
        val_samples = [s for s in dataset.val if s.path not in unreadable]
        evaluation = evaluate_after_training(run, task, state.best_path, val_samples, device, recipe.data, log)
    except BaseException:
        run.close_loggers()  # what was logged so far stays readable
        raise
    if run.is_main:
        log(f"report: {build_report(run)}")
    monitor = recipe.train.monitor  # its value at the best epoch, as history.csv holds it
    best = next((float(row[monitor]) for row in state.history if row["epoch"] == state.best_epoch), float("nan"))
    run.finish_loggers({f"best_{monitor}": best, "best_epoch": state.best_epoch, **evaluation})
    log(f"best {monitor} {best:.4f} (epoch {state.best_epoch}); files in {run.path}")
    return TrainResult(run.path, state.best_path, state.last_path, monitor, best, state.best_epoch,
                       dataset.classes, skipped, evaluation)


def _resumed(checkpoint: Path, recipe: object, overrides: Optional[list[str]], log: Log) -> tuple[dict, Recipe]:
    """A run's last.pt payload and its saved recipe (with `overrides`): what resuming continues from."""
    if recipe is not None:
        log("note: resuming uses the run's saved recipe; the recipe given is ignored (change settings with --set)")
    return read_resume(checkpoint, overrides)


def _start_run(run: RunDir, opening: Opening, log: Log) -> None:
    """The run folder's first files (recipe with the effective batch, class counts, skipped files); loggers open."""
    recipe, dataset, world = opening.recipe, opening.dataset, distributed.world_size()
    cfg = recipe.data
    scale = (f"{world} process(es) x data.batch_size {cfg.batch_size} x train.accumulate {recipe.train.accumulate} = "
             f"effective batch {world * cfg.batch_size * recipe.train.accumulate}, train.lr {recipe.train.lr:g}")
    log(scale)
    run.write_recipe(recipe, note=f"trained with {scale}")
    run.write_data_summary(dataset.classes, dataset.train_counts, dataset.val_counts)
    run.write_skipped(dataset.skipped, log)
    log(f"training on {opening.device} for {recipe.train.epochs} epoch(s); run folder {run.path}")
    run.start_loggers(recipe)


def _build_for_training(recipe: Recipe, num_classes: int, device: torch.device, resumed: bool,
                        log: Log) -> tuple[torch.nn.Module, Preprocessing]:
    """The model on its device and memory format (SyncBN, compiled as the recipe asks); fills data.image_size."""
    # A resumed run's weights come from its checkpoint: no download, no weights file.
    model_cfg = replace(recipe.model, pretrained=False, weights=None) if resumed else recipe.model
    model, preprocessing = build_model(model_cfg, num_classes, recipe.data.image_size, recipe.data.crop_pct)
    recipe.data.image_size = preprocessing.size
    log(f"backbone {recipe.model.backbone}: input {preprocessing.size}px, mean {preprocessing.mean}")
    log(format_summary(stage_summary(model)))
    memory_format = torch.channels_last if recipe.train.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    if recipe.train.sync_bn and distributed.active():
        model = distributed.convert_sync_bn(model, device)
    elif recipe.train.sync_bn:
        log("note: train.sync_bn only changes anything when several processes train together (torchrun)")
    train_precision(recipe.train, device)  # fp16 on a CPU stops here, before the run folder exists
    if recipe.train.compile:
        example = torch.zeros(2, 3, preprocessing.size, preprocessing.size, device=device)
        if compile_model(model, example.contiguous(memory_format=memory_format), log):
            log("train.compile: the model runs compiled (torch.compile)")
    return model, preprocessing


def training_parts(recipe: Recipe, task: Task, dataset: Prepared, preprocessing: Preprocessing,
                   device: torch.device, on_skip: Optional[Callable[[SkippedImage], None]] = None) -> TrainingParts:
    """The loaders (this rank's shares), the task's loss, mixer and scorer, and the feature cache when it applies.

    Each image is decoded once per pass, by the loaders: what fails there is dropped from its batch and listed.
    Under torchrun each rank trains on its strided share and validates an unpadded contiguous one.
    """
    cfg, world, rank = recipe.data, distributed.world_size(), distributed.rank()
    targets = task.targets(len(dataset.classes))
    val_share = distributed.shard(dataset.val)
    val_read = image_reader(cfg, eval_decode_side(preprocessing), [s.path for s in val_share])
    train = train_loader(recipe, dataset.train, preprocessing, targets, rank, world,
                         distributed.rank_seed(recipe.train.seed), on_skip=on_skip)
    val = eval_loader(val_share, preprocessing, cfg.batch_size, cfg.num_workers, val_read, on_skip, targets.encode)
    mixer = task.mixer(recipe.augment, len(dataset.classes))
    features = None
    if _caches_features(recipe, mixer is not None) and not distributed.active():
        # One pass over the training images (the validation loader serves both): no image cache needed.
        features = FeatureCache(eval_loader(dataset.train, preprocessing, cfg.batch_size, cfg.num_workers,
                                            encode=targets.encode),
                                val, lambda d: tensor_train_loader(recipe, d, targets))
    return TrainingParts(train, val, task.criterion(recipe, dataset.train, len(dataset.classes), device),
                         task.scorer(), mixer, features)


def _decode_failures(run: RunDir, dataset: Prepared, parts: TrainingParts,
                     log: Log) -> tuple[list[SkippedImage], dict[Path, SkippedImage]]:
    """Every rank's decode failures met while training, listed with the run's skipped files; (all, the new ones)."""
    unreadable: dict = {}
    for part in distributed.gather_objects({path: item for loader in (parts.train_loader, parts.val_loader)
                                            for path, item in getattr(loader, "skipped", {}).items()}):
        unreadable.update(part)
    skipped = [*dataset.skipped, *unreadable.values()]  # a shared Prepared (k-fold, tune) stays as it was
    if unreadable:
        run.write_skipped(skipped, log=lambda _: None)
        log(f"{len(unreadable)} image(s) failed to decode during training and were left out; "
            f"{len(skipped)} skipped file(s) in all are listed in {run.skipped}")
    return skipped, unreadable


def _caches_features(recipe: Recipe, mixes: bool) -> bool:
    """Whether head-only epochs may train on cached backbone features (train.cache_features)."""
    aug, choice = recipe.augment, recipe.train.cache_features
    if choice is False or mixes:  # mixup/cutmix blend images, not features
        return False
    # Features of un-augmented images stand in for random augmentation only when the recipe accepts it.
    deterministic = aug.preset == "none" and not aug.ops and aug.policy == "none"
    return bool(choice) or (deterministic and recipe.model.bn != "train")


def evaluate_after_training(run: RunDir, task: Task, checkpoint: Path, val: Sequence[Sample], device: torch.device,
                            cfg: DataConfig, log: Log = print) -> dict:
    """Fit the task's decision state (temperature / thresholds) on validation, store it in best.pt, write eval/."""
    best = load_model(checkpoint, device)
    raw = predict_probs(best, val, ProbsSettings(cfg.batch_size, cfg.num_workers, calibrated=False))
    decision = task.fit_decision(raw, val, len(best.classes), log)
    run.store_decision(decision)
    best.apply_decision(decision)
    inference = InferenceOptions(batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    return task.evaluate(best, val, run.eval, inference, log, raw_probs=raw)


def evaluate(
    checkpoint: Union[str, Path],
    data: Union[str, Path],
    out: Optional[Union[str, Path]] = None,
    threshold: Optional[float] = None,
    inference: Optional[InferenceOptions] = None,
    log: Log = print,
) -> dict:
    """Score a checkpoint on a labelled folder; writes the evaluation bundle and report.html, returns metrics.

    A multi-label checkpoint reads a manifest CSV (or a folder holding one named as in its recipe) and
    decides with its stored per-class thresholds, or `threshold` for every class.

    Args:
        checkpoint: a run folder's best (or last) checkpoint.
        data: labelled folder (class sub-folders or 3_120.jpg names); multi-label: a manifest CSV.
        out: output folder (None: eval/ next to the checkpoint).
        threshold: multi-label: one threshold for every class (None: the checkpoint's per-class ones).
        inference: batching, workers, device, precision and test-time augmentation.
        log: where progress lines go.
    """
    inference = inference or InferenceOptions()
    parse_tta(inference.tta)  # a bad spec fails before the model loads
    device = _inference_device(inference)
    inference = inference_cores(inference, device, log)
    loaded = load_model(checkpoint, device, fuse=True)
    task = task_of_model(loaded)
    if is_shard_spec(data):  # a shard set: its index's classes mapped onto the checkpoint's
        samples, skipped = shard_set_samples(data, loaded.classes)
    else:
        _refuse_shard_folder(Path(data).expanduser(), "val", "--data")
        samples, skipped = task.labelled_samples(Path(data).expanduser(), loaded.recipe.data, loaded.classes)
    if not samples:
        raise FinetuneError(f"no labelled images that open in {data}")
    run = RunDir.open(checkpoint)
    files = EvalFiles(out) if out else run.eval
    if files.folder.resolve().is_relative_to(Path(data).expanduser().resolve()):
        # Its PNGs would sit among the images being evaluated (and be read as images the next time).
        raise FinetuneError(f"the evaluation folder {files.folder} is inside the data folder {data}; give --out a "
                            "folder outside the data")
    files.prepare()
    try:  # decodes each image once, adding the ones that fail to `skipped`
        metrics = task.evaluate(loaded, samples, files, inference, log, threshold, skipped)
    finally:
        write_skipped_list(files.skipped, skipped, log)
    if files.writes:
        log(f"report: {build_report(run, files)}")
    return metrics


def predict(
    checkpoint: Union[str, Path, Sequence[Union[str, Path]]],
    images: Union[str, Path],
    out: Union[str, Path] = "submission.csv",
    submission: Optional[SubmissionOptions] = None,
    inference: Optional[InferenceOptions] = None,
    log: Log = print,
) -> Path:
    """Predict every image in a folder and write a Kaggle-style CSV with one row per image.

    Several checkpoints are an ensemble (probabilities averaged). Outputs never replace a file the command
    reads. Probabilities are calibrated (each checkpoint's temperature). A multi-label model writes `Id,Tags`
    using its stored per-class thresholds or `submission.threshold`.

    Args:
        checkpoint: a run's best checkpoint; several are averaged as an ensemble.
        images: folder of unlabeled test images.
        out: CSV to write.
        submission: the CSV's layout: Ids, label cells, extra files, rejection, overwriting.
        inference: batching, workers, device, precision and test-time augmentation.
        log: where progress lines go.
    """
    options, inference = submission or SubmissionOptions(), inference or InferenceOptions()
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    views = parse_tta(inference.tta)
    device = _inference_device(inference)
    inference = inference_cores(inference, device, log)
    models = load_ensemble(checkpoints, device, fuse=True)
    classes, task = models[0].classes, task_of_model(models[0])  # load_ensemble: one task, one class list
    task.check_submission(options, classes)
    decision = task.ensemble_decision(models, options.threshold)
    paths = test_image_paths(images, log)
    sample = Path(options.sample_submission).expanduser() if options.sample_submission else None
    plan = plan_submission(paths, classes, options.id_format, options.id_width, options.index_start,
                           options.id_column, options.label_column or task.label_column, sample)
    files = SubmissionFiles.beside(Path(out).expanduser(), options.probs, options.topk)
    replaced = _check_outputs(files, [*map(Path, checkpoints), *paths, *([sample] if sample else [])], options.force)
    check_writable(files.out.parent, "choose an --out in a folder you can write to")
    skipped = check_headers(paths)  # the pixels are decoded once, while predicting
    if len(models) > 1 or views:
        log(f"averaging {len(models)} model(s) x {view_count(views)} view(s) per image")
    failed: dict[Path, str] = {}
    batches = sharded_probs(models, plan.paths, ProbsSettings.of(inference), {s.path for s in skipped},
                            unreadable=failed)
    if not distributed.is_main():  # under torchrun: this rank scored its share; rank 0 writes every row
        deque(batches, maxlen=0)
        return files.out
    rows_written = task.write_submission(plan, batches, classes, decision, files, options, log)
    skipped = _list_unreadable(files, [*skipped, *(SkippedImage(path, why) for path, why in failed.items())],
                               files.unreadable in replaced, log)
    log(f"wrote {rows_written} predictions for {len(paths)} images to {files.out}")
    written = {files.out, files.probs, files.topk, files.unreadable if skipped else None}
    for path in replaced:
        if path in written:
            log(f"note: replaced the earlier {path}")
    return files.out


def _list_unreadable(files: SubmissionFiles, skipped: list[SkippedImage], earlier: bool,
                     log: Log) -> list[SkippedImage]:
    """Write the unreadable images' list beside the submission (sorted), and say how many there were; an
    `earlier` list of this submission's (a previous run's) is removed when every image read this time."""
    skipped = sorted(skipped, key=lambda item: str(item.path))
    if not skipped and earlier:
        # Left in place it would list images this submission scored normally.
        files.unreadable.unlink(missing_ok=True)
        log(f"note: removed the earlier {files.unreadable}: every image was read this time")
    if skipped:
        # Still one row per image: an unreadable image is scored as a blank (mean-colour) input.
        write_skipped_list(files.unreadable, skipped, log)
        mark_written(files.unreadable)
        log(f"warning: {len(skipped)} unreadable image(s) got a blank-image prediction; listed in {files.unreadable}")
    return skipped


def _inference_device(inference: InferenceOptions) -> torch.device:
    """The device inference runs on (this rank's, under torchrun), its precision checked before any model loads."""
    device = resolve_device(inference.device)
    check_precision(inference.precision, device, "--precision")
    return distributed.setup(device)


def test_image_paths(images: Union[str, Path], log: Log = print) -> list[Path]:
    """The images directly in a test folder (HW03 2021's lone sub-folder taken for it; nested images refused), or
    every sample of a shard set (an index file or a brace pattern of shards)."""
    if is_shard_spec(images):
        index = load_index(images)
        return [sample.path for sample in ShardSamples(index, len(index.classes))]
    folder = Path(images).expanduser()
    paths = list_images(folder)
    inner = single_image_subfolder(folder) if not paths else None
    if inner is not None:  # HW03 2021: --images food-11/testing means its one sub-folder, testing/00/
        log(f"reading the test images in {inner}, the one sub-folder of {folder}")
        folder, paths = inner, list_images(inner)
    _refuse_nested_images(folder, paths)
    if not paths:
        _refuse_shard_folder(folder, "test", "--images")
        raise FinetuneError(f"no images in {folder} (looked for .jpg/.png/... files, hidden files ignored)")
    return paths


def _refuse_shard_folder(folder: Path, split: str, option: str) -> None:
    """A folder of shard sets given where images were expected: say which index to name instead."""
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}")) if folder.is_dir() else []
    if indexes:
        wanted = folder / f"{split}{INDEX_SUFFIX}"
        raise FinetuneError(f"{folder} holds shard sets, not images: name one, e.g. {option} "
                            f"{wanted if wanted in indexes else indexes[0]}")


def _check_outputs(files: SubmissionFiles, inputs: Sequence[Path], force: bool) -> list[Path]:
    """Refuse outputs that would replace an input or a file predict did not write; the ones that will be replaced."""
    outputs = [files.out, files.unreadable, *(path for path in (files.probs, files.topk) if path is not None)]
    return [path for path in outputs if check_output(path, inputs, "prediction CSV", was_written_here, force)]


def _refuse_nested_images(folder: Path, top_level: Sequence[Path]) -> None:
    """Images in sub-folders would get no row: refuse rather than leave them out silently."""
    nested = sorted(set(list_images(folder, recursive=True)) - set(top_level))
    if nested:
        raise FinetuneError(
            f"{len(nested)} image(s) sit in sub-folders of {folder} (e.g. {nested[0].relative_to(folder)}) and "
            f"would get no prediction; only images directly in --images are read. Move them into {folder} itself "
            "(Ids are file names, so they must be unique), or run predict on each sub-folder"
        )


def report(run_dir: Union[str, Path], eval_dir: Optional[Union[str, Path]] = None) -> Path:
    """(Re)build a run folder's self-contained report.html (with another evaluation folder if given)."""
    run = RunDir.open(run_dir)
    return build_report(run, EvalFiles(eval_dir) if eval_dir else None)
