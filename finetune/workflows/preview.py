"""Look before you train: the augmented images the model will see, and a learning rate to start from."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from finetune.data.images import load_rgb
from finetune.data.loaders import train_loader, train_transform
from finetune.data.prepare import Prepared
from finetune.engine import distributed
from finetune.engine.lr_find import LrFindResult, LrSweep, lr_range_test
from finetune.engine.resume import seed_everything
from finetune.errors import FinetuneError
from finetune.models import build_model
from finetune.workflows.opening import open_training, prepare_data
from finetune.config.recipe import Recipe, resolve_recipe
from finetune.outputs.figures.augment_grid import save_augment_grid
from finetune.outputs.figures.lr_plot import plot_lr_find
from finetune.tasks import task_of

__all__ = ["augment_preview", "lr_find"]

Log = Callable[[str], None]


def _log_skipped(dataset: Prepared, log: Log) -> Prepared:
    if dataset.skipped:
        first = dataset.skipped[0]
        log(f"skipping {len(dataset.skipped)} unusable image(s), e.g. {first.path}: {first.reason}")
    return dataset


def _caption(target: torch.Tensor, classes: list[str]) -> str:
    """The classes an image's target vector holds (one-hot, multi-hot or mixed), with their shares when mixed."""
    present = [(float(target[k]), classes[k]) for k in torch.argsort(-target, stable=True).tolist()
               if float(target[k]) > 0.005]
    if all(share == 1.0 for share, _ in present):
        return ", ".join(name for _, name in present) or "(no label)"
    return " / ".join(f"{name} {share:.2f}" for share, name in present)


def _check_figure_out(out: Union[str, Path], recipe: Recipe, source: Union[Recipe, str, Path, None]) -> Path:
    """The PNG path, refused when it would land among the training images or replace the recipe being read."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise FinetuneError(f"{path} is a folder; give --out a PNG file name")
    if recipe.data.root and path.resolve().is_relative_to(Path(recipe.data.root).expanduser().resolve()):
        raise FinetuneError(f"--out {path} is inside the data folder {recipe.data.root}, where the PNG would be read "
                            "as a training image; write it outside the data")
    if isinstance(source, (str, Path)) and path.exists() and path.resolve() == Path(source).expanduser().resolve():
        raise FinetuneError(f"--out {path} is the recipe being read; choose another file name")
    return path


def augment_preview(
    recipe: Union[Recipe, str, Path, None] = None,
    data: Optional[Union[str, Path]] = None,
    overrides: Optional[list[str]] = None,
    out: Union[str, Path] = "augment_grid.png",
    n: int = 16,
    log: Log = print,
) -> Path:
    """Write a PNG grid of `n` training images as the model sees them: augmented, mixed, denormalised.

    Args:
        recipe: a YAML path, or the name of a shipped recipe (its augment section is shown).
        data: dataset folder (overrides data.root).
        overrides: override a recipe value, e.g. augment.preset=heavy (repeatable).
        out: PNG to write.
        n: number of images.
        log: where progress lines go.
    """
    if n < 1:
        raise FinetuneError("--n must be at least 1")
    source, recipe = recipe, resolve_recipe(recipe, overrides, data)
    out = _check_figure_out(out, recipe, source)
    seed_everything(recipe.train.seed)
    dataset = _log_skipped(prepare_data(recipe, log), log)
    # Only the preprocessing is needed: build the architecture without downloading weights.
    _, preprocessing = build_model(replace(recipe.model, pretrained=False, weights=None), len(dataset.classes),
                                   recipe.data.image_size, recipe.data.crop_pct)
    transform = train_transform(recipe, preprocessing)
    picked, tensors = [], []
    # Pixels are decoded only here: a damaged file that passed the header check is passed over.
    for sample in random.Random(recipe.train.seed).sample(dataset.train, len(dataset.train)):
        try:
            tensors.append(transform(image=load_rgb(sample.path))["image"])
        except FinetuneError as err:
            log(f"skipping {err}")
            continue
        picked.append(sample)
        if len(picked) == n:
            break
    if not picked:
        raise FinetuneError("no training image could be decoded; see the messages above")
    images = torch.stack(tensors)
    task, num_classes = task_of(recipe), len(dataset.classes)
    encode = task.encode(num_classes)
    targets = torch.stack([torch.as_tensor(encode(s)) for s in picked])
    mixer = task.mixer(recipe.augment, num_classes)
    if mixer is not None:
        images, targets = mixer(images, targets)
    if targets.ndim == 1:  # class indices: one-hot, as a mixer would have made them
        targets = torch.nn.functional.one_hot(targets, num_classes)
    captions = [_caption(targets[i].float(), dataset.classes) for i in range(len(picked))]
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
    """Learning-rate range test on the recipe's model and data; plots it and suggests train.lr.

    Args:
        recipe: a YAML path, or the name of a shipped recipe (`finetune recipes` lists them).
        data: dataset folder (overrides data.root).
        overrides: override a recipe value, e.g. data.batch_size=32 (repeatable).
        out: PNG to write.
        steps: batches in the sweep (it stops early on divergence).
        log: where progress lines go.
    """
    if steps < 5:
        raise FinetuneError("--steps must be at least 5 (100 is usual)")
    source, recipe = recipe, resolve_recipe(recipe, overrides, data)
    out = _check_figure_out(out, recipe, source)
    opening = open_training(recipe, log=log)
    recipe, task, dataset, device = opening.recipe, opening.task, opening.dataset, opening.device
    _log_skipped(dataset, log)
    result, path = None, Path(out).expanduser()
    # Under torchrun the sweep is one process's (the same as a plain run); the others wait for its answer.
    if distributed.is_main():
        model, preprocessing = build_model(recipe.model, len(dataset.classes), recipe.data.image_size,
                                           recipe.data.crop_pct)
        memory_format = torch.channels_last if recipe.train.channels_last else torch.contiguous_format
        model.to(device=device, memory_format=memory_format)
        loader = train_loader(recipe, dataset.train, preprocessing, task.targets(len(dataset.classes)))
        log(f"lr range test: up to {steps} batches of {recipe.data.batch_size} on {device}")
        criterion = task.criterion(recipe, dataset.train, len(dataset.classes), device)
        result = lr_range_test(model, loader, criterion, recipe.train, device, LrSweep(steps=steps))
        path = plot_lr_find(result, path)
    result = distributed.broadcast_object(result)
    steepest = f"; steepest descent at {result.steepest:.1e}" if result.steepest is not None else ""
    log(f"suggested learning rate: {result.suggestion:.1e} (a tenth of the lowest-loss rate{steepest}); "
        f"train with --set train.lr={result.suggestion:.1e}. Plot: {path}")
    return result
