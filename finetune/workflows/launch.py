"""The commands that are more than one API call: `finetune train` (plain, semi, k-fold, N processes), backbone
inspection, the recipe library, ready-made data sets and reports. Each returns what the console shows.

`finetune/cli.py` generates its options from these signatures and `Args:` sections, so the help a user
reads on the command line is the documentation here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from finetune.workflows.datasets import DEFAULT_PER_CLASS, DEFAULT_VAL_PER_CLASS
from finetune.errors import FinetuneError

__all__ = ["RECIPE_ACTIONS", "StageFreezing", "train_command", "inspect_backbone", "recipes_command",
           "fashion_mnist_command", "fashion_mnist_multilabel_command", "report_command"]

RECIPE_ACTIONS = ("show", "copy")


def train_command(
    recipe: Optional[str] = None,
    data: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    resume: Optional[str] = None,
    folds: Optional[int] = None,
    devices: int = 1,
) -> int:
    """Fine-tune a backbone as a recipe says: one run, semi-supervised rounds (semi:), or K folds.

    Args:
        recipe: a YAML path, or the name of a shipped recipe (`finetune recipes` lists them); not needed with
            resume.
        data: dataset folder (overrides data.root).
        overrides: override a recipe value, e.g. train.epochs=5 (repeatable).
        resume: a run folder or its last.pt: continue an interrupted run in its folder, with its saved recipe.
        folds: stratified K-fold cross-validation on train+val merged: K runs, CV accuracy, and the predict
            command for their ensemble.
        devices: train on N processes of this machine (one per GPU) with DDP: runs the same command under
            `python -m torch.distributed.run --standalone --nproc-per-node=N`; data.batch_size is per process.
            With folds: N folds at a time, one per device, without DDP.
    """
    from finetune.engine import distributed

    if recipe is None and resume is None:
        raise FinetuneError("give a recipe to train (a YAML path or a shipped recipe's name: `finetune recipes` "
                            "lists them), or --resume RUN_DIR to continue a run")
    if devices != 1 and not distributed.launched_by_torchrun():
        # The same command, once per device (without --devices, so the workers do not relaunch again).
        argv = ["train", *([recipe] if recipe else []), *(["--data", str(data)] if data else []),
                *(arg for value in overrides or [] for arg in ("--set", value)),
                *(["--resume", str(resume)] if resume else []), *(["--folds", str(folds)] if folds else [])]
        return distributed.relaunch(argv, devices)
    from finetune.workflows.semi import semi_requested

    semi = resume is None and semi_requested(recipe, overrides)
    if folds is not None:
        if resume is not None:
            raise FinetuneError("--folds and --resume do not combine; resume one fold with --resume RUN_DIR/foldN")
        if semi:
            raise FinetuneError("--folds and a semi: section (semi.rounds) do not combine; train the rounds without "
                                "--folds, or set semi.rounds=0")
        from finetune.workflows.kfold import train_kfold

        train_kfold(recipe, folds, data=data, overrides=overrides)
    elif semi:
        from finetune.workflows.semi import train_semi

        train_semi(recipe, data=data, overrides=overrides)
    else:
        from finetune.workflows.api import train

        train(recipe, data=data, overrides=overrides, resume=resume)
    return 0


@dataclass(frozen=True)
class StageFreezing:
    """Which backbone stages train, as model.trainable, model.trainable_last and model.freeze_to say.

    Attributes:
        trainable: stages left trainable (none: head only).
        trainable_last: train the last N stages.
        freeze_to: freeze every stage up to and including this one.
    """

    trainable: Optional[list[str]] = None
    trainable_last: Optional[int] = None
    freeze_to: Optional[str] = None


def inspect_backbone(
    backbone: str,
    freezing: Optional[StageFreezing] = None,
    pool: str = "avg",
    layer_decay: Optional[float] = None,
    hidden: Optional[list[int]] = None,
    num_classes: int = 10,
    image_size: Optional[int] = None,
) -> str:
    """Show a backbone's stages and parameter counts.

    Args:
        backbone: timm name, tv/<torchvision name>, or lenet / nin / hw03net.
        freezing: the stages left trainable (StageFreezing).
        pool: global pool of the head.
        layer_decay: show each stage's learning-rate multiplier for train.layer_decay.
        hidden: head hidden widths.
        num_classes: classes of the head.
        image_size: input size (None: the backbone's own).
    """
    from finetune.engine.optim import stage_lr_multipliers
    from finetune.models import build_model, format_summary, stage_summary
    from finetune.config.recipe import HeadConfig, ModelConfig, TrainConfig

    freezing = freezing or StageFreezing()
    cfg = ModelConfig(backbone=backbone, trainable=freezing.trainable, trainable_last=freezing.trainable_last,
                      freeze_to=freezing.freeze_to, head=HeadConfig(hidden=list(hidden or []), pool=pool))
    model, pre = build_model(cfg, num_classes, image_size)
    multipliers = stage_lr_multipliers(model, TrainConfig(layer_decay=layer_decay)) if layer_decay is not None else None
    return "\n".join([f"{backbone}: input {pre.size}px, mean {pre.mean}, std {pre.std}, {pre.interpolation}",
                      "stages from input to output (the names model.trainable, trainable_last and freeze_to use):",
                      format_summary(stage_summary(model), multipliers)])


def recipes_command(action: Optional[str] = None, name: Optional[str] = None, dest: Optional[str] = None) -> str:
    """List the shipped recipes; show one; copy one to edit.

    Args:
        action: show: print a shipped recipe; copy: write an editable copy (never overwrites); none: list them.
        name: the shipped recipe to show or copy.
        dest: copy: file or folder (None: ./NAME.yaml).
    """
    from finetune.config.recipe_library import copy_recipe, shipped_recipe, shipped_recipes

    if action is not None and action not in RECIPE_ACTIONS:
        raise FinetuneError(f"finetune recipes ACTION: one of {', '.join(RECIPE_ACTIONS)}, got {action!r}")
    if action is not None and name is None:
        raise FinetuneError(f"finetune recipes {action} needs a recipe name; `finetune recipes` lists them")
    if action == "show":
        return shipped_recipe(name).path.read_text(encoding="utf-8").rstrip("\n")
    if action == "copy":
        path = copy_recipe(name, dest)
        return f"wrote {path}; edit it, then: finetune train {path} --data DIR"
    recipes = shipped_recipes()
    width = max(len(recipe) for recipe in recipes)
    return "\n".join([f"{key:<{width}}  {recipe.purpose}" for key, recipe in recipes.items()] + [
        "\nfinetune recipes show NAME | finetune recipes copy NAME [DEST] | finetune train NAME --data DIR"])


def fashion_mnist_command(
    out: str,
    per_class: int = DEFAULT_PER_CLASS,
    val_per_class: int = DEFAULT_VAL_PER_CLASS,
    test_limit: Optional[int] = None,
    seed: int = 0,
    source: Optional[str] = None,
    unlabeled: int = 0,
    layout: str = "folders",
) -> str:
    """Fashion-MNIST: train/<class>/, val/<class>/, test/, test_truth.csv (offline from Debian's dataset-fashion-mnist).

    Args:
        out: folder to create.
        per_class: training images per class.
        val_per_class: validation images per class.
        test_limit: first K test images (None: all 10 000).
        seed: seed of the random choice of images.
        source: folder with the four *-ubyte.gz files (None: /usr/share/datasets/fashion-mnist).
        unlabeled: also N more training images without labels (answers in unlabeled_truth.csv).
        layout: folders: train/ val/ test/; hw03-2021: training/labeled/<class>/, training/unlabeled/00/,
            validation/<class>/, testing/00/.
    """
    from finetune.workflows.datasets import FashionMNISTSplit, describe, export_fashion_mnist

    export = export_fashion_mnist(out, FashionMNISTSplit(per_class, val_per_class, test_limit), seed=seed,
                                  source=source, unlabeled=unlabeled, layout=layout)
    return f"{describe(export)}\ntrain on it with: finetune train RECIPE --data {export.root}"


def fashion_mnist_multilabel_command(out: str, train: int = 600, test: int = 400, seed: int = 0,
                                     source: Optional[str] = None) -> str:
    """2x2 mosaics of 1-4 Fashion-MNIST garments, labels = the garments present: images/, labels.csv, test/.

    Args:
        out: folder to create.
        train: labelled mosaics (20% are held out for validation by the recipe).
        test: test mosaics (answers in test_truth.csv).
        seed: seed of the random mosaics.
        source: folder with the four *-ubyte.gz files (None: /usr/share/datasets/fashion-mnist).
    """
    from finetune.workflows.datasets import describe_mosaics, export_fashion_mnist_mosaics

    export = export_fashion_mnist_mosaics(out, train=train, test=test, seed=seed, source=source)
    return f"{describe_mosaics(export)}\ntrain on it with: finetune train multilabel_lite0 --data {export.root}"


def report_command(run_dir: Union[str, Path], eval_dir: Optional[Union[str, Path]] = None) -> str:
    """(Re)build a run folder's self-contained HTML report.

    Args:
        run_dir: run folder (or a k-fold parent folder).
        eval_dir: evaluation folder to show (None: RUN_DIR/eval).
    """
    from finetune.workflows.api import report

    return f"wrote {report(run_dir, eval_dir=eval_dir)}"
