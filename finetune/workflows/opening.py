"""The opening every training workflow shares: resolve the recipe and data → checks → seed → prepare → device →
core budget.

`train`, `train_kfold`, `train_semi`, `tune` and `lr_find` all start here, so a check added here (or
the task chosen here) holds for every one of them. `inference_cores` is the same last step for evaluate and predict.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from finetune.data.cores import CoreBudget, apply_threads, core_budget
from finetune.data.duplicates import identical_files
from finetune.data.images import list_images
from finetune.data.prepare import Prepared, prepare
from finetune.engine import distributed
from finetune.engine.resume import seed_everything
from finetune.inference.predict import resolve_device
from finetune.outputs.loggers import check_loggers
from finetune.models.backbones import check_backbone_name
from finetune.config.options import InferenceOptions
from finetune.config.recipe import Recipe, resolve_recipe
from finetune.tasks import Task, task_of

__all__ = ["Opening", "open_training", "prepare_data", "training_cores", "inference_cores", "warn_test_copies"]

Log = Callable[[str], None]


@dataclass
class Opening:
    """What a training workflow starts from: the recipe, its task, the prepared data, the device and the core budget."""

    recipe: Recipe
    task: Task
    dataset: Prepared
    device: torch.device
    cores: CoreBudget


def prepare_data(recipe: Recipe, log: Log = print) -> Prepared:
    """The recipe's data, read as its task reads it (discovered, header-checked, counted)."""
    return prepare(recipe, task_of(recipe), log)


def open_training(
    recipe: Union[Recipe, str, Path, None],
    data: Optional[Union[str, Path]] = None,
    overrides: Optional[list[str]] = None,
    log: Log = print,
    prepared: Optional[Prepared] = None,
    join_group: bool = True,
) -> Opening:
    """Resolve the recipe (with `data` and `overrides`), check what fails fast, seed, prepare the data, pick the device.

    `prepared` skips discovery (k-fold folds and tuning trials reuse one scan). `join_group` joins the
    torchrun process group (False for an opening that only reads, e.g. before folds run side by side).
    """
    recipe = resolve_recipe(recipe, overrides, data)  # a copy: the workflow may fill in values (image size)
    task = task_of(recipe)
    check_backbone_name(recipe.model.backbone)  # fail before scanning thousands of images
    check_loggers(recipe.train.loggers)
    seed_everything(recipe.train.seed)
    device = resolve_device(recipe.train.device)
    if join_group:
        device = distributed.setup(device)  # under torchrun: join the group before naming folders
    dataset = prepared or prepare(recipe, task, log)
    if prepared is None and distributed.is_main():
        warn_test_copies(dataset, recipe.data.root, log)
    cores = training_cores(recipe, device, log)
    # Filled in like data.image_size: the worker count decides the augmentation streams, so the run's recipe.yaml
    # (and a resume from it) keeps the split this run trained with.
    recipe.data.num_workers = cores.workers
    return Opening(recipe, task, dataset, device, cores)


def warn_test_copies(dataset: Prepared, root: Optional[str], log: Log = print) -> int:
    """Warn when test images are byte-identical to training or validation images (a leak that flatters every test
    score); the number of such test images. Cheap: only files of a size both sides share are read."""
    if dataset.test_dir is None:
        return 0
    labelled = [s.path for s in (*dataset.train, *dataset.val)]
    pairs = identical_files({"train": labelled, "test": list_images(dataset.test_dir, recursive=True)},
                            across_only=True)
    copies = {p.path_b if p.split_b == "test" else p.path_a for p in pairs}
    if copies:
        first = pairs[0]
        log(f"warning: {len(copies)} test image(s) are byte-identical copies of training or validation images (e.g. "
            f"{first.path_a} = {first.path_b}): scores on the test images will flatter the model. Find every copy "
            f"and near-copy with: finetune audit RECIPE --data {root or 'DATA'} --method features --out audit")
    return len(copies)


def training_cores(recipe: Recipe, device: torch.device, log: Log = print) -> CoreBudget:
    """This process's core budget for training (train.threads / data.num_workers win); its threads applied, its
    line printed by the main process."""
    cores = core_budget("train", device.type, recipe.train.threads, recipe.data.num_workers)
    apply_threads(cores)
    if distributed.is_main():
        log(cores.describe())
    return cores


def inference_cores(inference: InferenceOptions, device: torch.device, log: Log = print) -> InferenceOptions:
    """The options with the core budget for prediction filled in (--threads / --workers win); its threads applied,
    its line printed by the main process."""
    cores = core_budget("predict", device.type, inference.threads, inference.num_workers, ("--threads", "--workers"))
    apply_threads(cores)
    if distributed.is_main():
        log(cores.describe())
    return replace(inference, num_workers=cores.workers, threads=cores.threads)
