"""Command line: argument parsing only; every command calls one API function."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Callable, Optional

from finetune.errors import FinetuneError

__all__ = ["main", "build_parser"]

RECIPE_HELP = "recipe: a YAML path, or the name of a shipped recipe (`finetune recipes` lists them)"


def _train(args: argparse.Namespace) -> None:
    from finetune.api import train

    if not args.recipe and not args.resume:
        raise FinetuneError("give a recipe to train (a YAML path or a shipped recipe's name: `finetune recipes` "
                            "lists them), or --resume RUN_DIR to continue a run")
    if args.folds is not None:
        from finetune.kfold import train_kfold

        if args.resume:
            raise FinetuneError("--folds and --resume do not combine; resume one fold with --resume RUN_DIR/foldN")
        from finetune.semi import semi_requested

        if semi_requested(args.recipe, args.overrides):
            raise FinetuneError("--folds and a semi: section (semi.rounds) do not combine; train the rounds without "
                                "--folds, or set semi.rounds=0")
        train_kfold(args.recipe, args.folds, data=args.data, overrides=args.overrides)
        return
    if not args.resume:
        from finetune.semi import semi_requested, train_semi

        if semi_requested(args.recipe, args.overrides):
            train_semi(args.recipe, data=args.data, overrides=args.overrides)
            return
    train(args.recipe, data=args.data, overrides=args.overrides, resume=args.resume)


def _augment(args: argparse.Namespace) -> None:
    from finetune.preview import augment_preview

    augment_preview(**_given(args))


def _lr_find(args: argparse.Namespace) -> None:
    from finetune.preview import lr_find

    lr_find(**_given(args))


def _given(args: argparse.Namespace) -> dict:
    """The options the user gave, by API parameter name: the API function alone holds the defaults."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "func")}


def _evaluate(args: argparse.Namespace) -> None:
    from finetune.api import evaluate

    evaluate(**_given(args))


def _predict(args: argparse.Namespace) -> None:
    from finetune.api import predict

    predict(**_given(args))


def _pseudo_label(args: argparse.Namespace) -> None:
    from finetune.semi import pseudo_label

    pseudo_label(**_given(args))


def _score(args: argparse.Namespace) -> None:
    from finetune.evaluation import format_report
    from finetune.scoring import score_csv

    if args.multilabel:
        from finetune.multilabel_eval import multilabel_summary_lines
        from finetune.multilabel_submission import score_multilabel_csv

        metrics = score_multilabel_csv(args.submission, args.truth, out_dir=args.out, id_column=args.id_column,
                                       label_column=args.label_column, sep=args.label_sep)
        print("\n".join(multilabel_summary_lines(metrics, metrics["class_names"])))
        print(f"mean F1 per image {metrics['samples_f1']:.4f} on {metrics['images']} images; files in "
              f"{metrics['out_dir']}")
        return
    metrics = score_csv(args.submission, args.truth, out_dir=args.out, id_column=args.id_column,
                        label_column=args.label_column)
    print(format_report(metrics["report"], metrics["class_names"]))
    print(f"accuracy {metrics['accuracy']:.4f} on {metrics['images']} images; files in {metrics['out_dir']}")


def _report(args: argparse.Namespace) -> None:
    from finetune.api import report

    print(f"wrote {report(args.run_dir, eval_dir=args.eval_dir)}")


def _export(args: argparse.Namespace) -> None:
    from finetune.export import export_model

    export_model(args.checkpoint, args.format, out=args.out, tolerance=args.tolerance, force=args.force)


def _inspect(args: argparse.Namespace) -> None:
    from finetune.engine.optim import stage_lr_multipliers
    from finetune.models import build_model, format_summary, stage_summary
    from finetune.recipe import HeadConfig, ModelConfig, TrainConfig

    cfg = ModelConfig(backbone=args.backbone, trainable=args.trainable, trainable_last=args.trainable_last,
                      freeze_to=args.freeze_to, head=HeadConfig(hidden=args.hidden, pool=args.pool))
    train_cfg = TrainConfig(layer_decay=args.layer_decay)
    model, pre = build_model(cfg, args.num_classes, args.image_size)
    print(f"{args.backbone}: input {pre.size}px, mean {pre.mean}, std {pre.std}, {pre.interpolation}")
    print("stages from input to output (the names model.trainable, trainable_last and freeze_to use):")
    multipliers = stage_lr_multipliers(model, train_cfg) if args.layer_decay is not None else None
    print(format_summary(stage_summary(model), multipliers))


def _recipes(args: argparse.Namespace) -> None:
    from finetune.recipe_library import copy_recipe, shipped_recipe, shipped_recipes

    if args.action == "show":
        print(shipped_recipe(args.name).path.read_text(encoding="utf-8"), end="")
    elif args.action == "copy":
        path = copy_recipe(args.name, args.dest)
        print(f"wrote {path}; edit it, then: finetune train {path} --data DIR")
    else:
        recipes = shipped_recipes()
        width = max(len(name) for name in recipes)
        for name, recipe in recipes.items():
            print(f"{name:<{width}}  {recipe.purpose}")
        print("\nfinetune recipes show NAME | finetune recipes copy NAME [DEST] | finetune train NAME --data DIR")


def _tune(args: argparse.Namespace) -> None:
    from finetune.tune import tune

    if not args.recipe and not args.resume:
        raise FinetuneError("give a recipe to tune and --space SPACE.yaml, or --resume STUDY_DIR to continue a study")
    tune(args.recipe, space=args.space, trials=args.trials, data=args.data, overrides=args.overrides,
         folds=args.folds, resume=args.resume, startup_trials=args.startup_trials)


def _add_tune_command(commands: argparse._SubParsersAction) -> None:
    """`finetune tune RECIPE --space SPACE.yaml --trials N [--folds K] | --resume STUDY_DIR`."""
    tune = commands.add_parser("tune", help="hyper-parameter search with Optuna: one run folder per trial, "
                                            "the best recipe at the end")
    tune.add_argument("recipe", nargs="?", help=f"{RECIPE_HELP}; not needed with --resume")
    _recipe_options(tune)
    tune.add_argument("--space", metavar="SPACE_YAML",
                      help="recipe keys and their ranges, e.g. train.lr: {log_uniform: [1e-4, 1e-2]}, "
                           "augment.preset: {choice: [light, medium]}, model.trainable_last: {int: [1, 4]}")
    tune.add_argument("--trials", type=int, default=20, help="finished trials the study should have (default 20)")
    tune.add_argument("--folds", type=int, default=None, metavar="K",
                      help="score each trial by K-fold cross-validation accuracy instead of the validation split")
    tune.add_argument("--resume", metavar="STUDY_DIR", help="continue an interrupted study (its saved recipe, "
                                                            "space and finished trials)")
    tune.add_argument("--startup-trials", type=int, default=3, metavar="N",
                      help="trials run in full before the median pruner may stop one (default 3)")
    tune.set_defaults(func=_tune)


def _runs(args: argparse.Namespace) -> None:
    from finetune.runs_table import runs_table

    runs_table(args.dir, sort=args.sort, csv_out=args.csv, html_out=args.html)


def _add_runs_command(commands: argparse._SubParsersAction) -> None:
    """`finetune runs [DIR] [--sort COLUMN] [--csv OUT] [--html OUT]`."""
    runs = commands.add_parser("runs", help="a table of every run under a folder: what differed, best metric, status")
    runs.add_argument("dir", nargs="?", default="runs", help="folder to look in, sub-folders included (default runs/)")
    runs.add_argument("--sort", metavar="COLUMN",
                      help="sort by a column: best, run, a recipe key such as train.lr... (numbers high to low)")
    runs.add_argument("--csv", metavar="OUT", help="also write the table as CSV")
    runs.add_argument("--html", metavar="OUT", help="also write one HTML page: the table and all validation curves")
    runs.set_defaults(func=_runs)


def _add_recipes_command(commands: argparse._SubParsersAction) -> None:
    """`finetune recipes [show NAME | copy NAME [DEST]]`."""
    recipes = commands.add_parser("recipes", help="list the shipped recipes; show one; copy one to edit")
    actions = recipes.add_subparsers(dest="action", metavar="ACTION")
    show = actions.add_parser("show", help="print a shipped recipe")
    show.add_argument("name")
    copy = actions.add_parser("copy", help="write an editable copy of a shipped recipe (never overwrites)")
    copy.add_argument("name")
    copy.add_argument("dest", nargs="?", help="file or folder (default ./NAME.yaml)")
    recipes.set_defaults(func=_recipes)


class _VersionAction(argparse.Action):
    """`finetune --version`: the versions a bug report needs, and the device training would use."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import timm
        import torch
        import torchvision

        from finetune.version import __version__

        if torch.cuda.is_available():
            device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
        else:
            device = "cpu (no CUDA device found)"
        print(f"finetune {__version__}\ntorch {torch.__version__}\ntorchvision {torchvision.__version__}\n"
              f"timm {timm.__version__}\ndevice {device}")
        parser.exit()


def _datasets_fashion_mnist(args: argparse.Namespace) -> None:
    from finetune.datasets import describe, export_fashion_mnist

    export = export_fashion_mnist(args.out, per_class=args.per_class, val_per_class=args.val_per_class,
                                  test_limit=args.test_limit, seed=args.seed, source=args.source,
                                  unlabeled=args.unlabeled, layout=args.layout)
    print(describe(export))
    print(f"train on it with: finetune train RECIPE --data {export.root}")


def _datasets_fashion_mnist_multilabel(args: argparse.Namespace) -> None:
    from finetune.datasets import describe_mosaics, export_fashion_mnist_mosaics

    export = export_fashion_mnist_mosaics(args.out, train=args.train, test=args.test, seed=args.seed,
                                          source=args.source)
    print(describe_mosaics(export))
    print(f"train on it with: finetune train multilabel_lite0 --data {export.root}")


def _demo(args: argparse.Namespace) -> None:
    from finetune.demo import run_demo

    run_demo(args.out, per_class=args.per_class, val_per_class=args.val_per_class, test_limit=args.test_limit,
             epochs=args.epochs, recipe=args.recipe, overrides=args.set, tta=args.tta)


def _add_demo_commands(commands: argparse._SubParsersAction) -> None:
    """`finetune datasets fashion-mnist` and `finetune demo`."""
    from finetune.datasets import DEFAULT_PER_CLASS, DEFAULT_VAL_PER_CLASS

    per_class_help = f"training images per class (default {DEFAULT_PER_CLASS})"
    val_help = f"validation images per class (default {DEFAULT_VAL_PER_CLASS})"
    datasets = commands.add_parser("datasets", help="write a ready-made data set as an image folder")
    sources = datasets.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    fashion = sources.add_parser("fashion-mnist", help="Fashion-MNIST: train/<class>/, val/<class>/, test/, "
                                                       "test_truth.csv (offline from Debian's dataset-fashion-mnist)")
    fashion.add_argument("--out", required=True, help="folder to create")
    fashion.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS, help=per_class_help)
    fashion.add_argument("--val-per-class", type=int, default=DEFAULT_VAL_PER_CLASS, help=val_help)
    fashion.add_argument("--test-limit", type=int, default=None, help="first K test images (default: all 10 000)")
    fashion.add_argument("--seed", type=int, default=0)
    fashion.add_argument("--source", default=None,
                         help="folder with the four *-ubyte.gz files (default /usr/share/datasets/fashion-mnist)")
    fashion.add_argument("--unlabeled", type=int, default=0, metavar="N",
                         help="also N more training images without labels (answers in unlabeled_truth.csv)")
    fashion.add_argument("--layout", choices=["folders", "hw03-2021"], default="folders",
                         help="folders (default): train/ val/ test/; hw03-2021: training/labeled/<class>/, "
                              "training/unlabeled/00/, validation/<class>/, testing/00/")
    fashion.set_defaults(func=_datasets_fashion_mnist)
    mosaics = sources.add_parser("fashion-mnist-multilabel",
                                 help="2x2 mosaics of 1-4 Fashion-MNIST garments, labels = the garments present: "
                                      "images/, labels.csv (image_name,tags), test/, test_truth.csv")
    mosaics.add_argument("--out", required=True, help="folder to create")
    mosaics.add_argument("--train", type=int, default=600, help="labelled mosaics (default 600; 20%% are held out "
                                                                "for validation by the recipe)")
    mosaics.add_argument("--test", type=int, default=400, help="test mosaics (default 400)")
    mosaics.add_argument("--seed", type=int, default=0)
    mosaics.add_argument("--source", default=None,
                         help="folder with the four *-ubyte.gz files (default /usr/share/datasets/fashion-mnist)")
    mosaics.set_defaults(func=_datasets_fashion_mnist_multilabel)

    demo = commands.add_parser("demo", help="offline end to end: Fashion-MNIST, fine-tune Lite0, submission, score")
    demo.add_argument("--out", default="demo", help="folder for the data set and runs (default ./demo)")
    demo.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS, help=per_class_help)
    demo.add_argument("--val-per-class", type=int, default=DEFAULT_VAL_PER_CLASS, help=val_help)
    demo.add_argument("--test-limit", type=int, default=None, help="first K test images (default: all 10 000)")
    demo.add_argument("--epochs", type=int, default=None, help="override the recipe's train.epochs")
    demo.add_argument("--recipe", default=None, help="another recipe: a YAML path or a shipped recipe's name (default demo_fashion_mnist_lite0)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a recipe value, e.g. --set data.image_size=64 (repeatable)")
    demo.add_argument("--tta", default="flip", help="test-time augmentation for the submission: flip (default) "
                                                   "or none")
    demo.set_defaults(func=_demo)


def _inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, help="images per batch (default 64)")
    parser.add_argument("--workers", type=int, dest="num_workers", help="data-loading processes (default 2)")
    parser.add_argument("--device", help="auto (default) | cpu | cuda | cuda:N")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                        help="fp32 (default) | bf16 (autocast: faster on recent CPUs/GPUs) | fp16 (CUDA only)")


def _recipe_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="dataset folder (overrides data.root)")
    parser.add_argument("--set", action="append", dest="overrides", metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set train.epochs=5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """The `finetune` argument parser with one sub-command per task."""
    from finetune.submission import ID_FORMATS, VALUE_KINDS

    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune pretrained image classifiers.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the finetune, torch, torchvision and timm versions and the device, then exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="fine-tune a backbone as a recipe says")
    train.add_argument("recipe", nargs="?", help=f"{RECIPE_HELP}; not needed with --resume")
    _recipe_options(train)
    train.add_argument("--resume", metavar="RUN_DIR_OR_LAST_PT",
                       help="continue an interrupted run in its folder, with its saved recipe")
    train.add_argument("--folds", type=int, default=None, metavar="K",
                       help="stratified K-fold cross-validation on train+val merged: K runs, CV accuracy, "
                            "and the predict command for their ensemble")
    train.add_argument("--devices", type=int, default=1, metavar="N",
                       help="train on N processes of this machine (one per GPU) with DDP: runs the same command under "
                            "`python -m torch.distributed.run --standalone --nproc-per-node=N`; data.batch_size is "
                            "per process. With --folds: N folds at a time, one per device, without DDP")
    train.set_defaults(func=_train)

    # augment, lr-find, evaluate and predict pass on only the options given (argument_default=SUPPRESS): the
    # defaults live in the API functions' signatures.
    augment = commands.add_parser("augment", help="write a PNG grid of augmented training images",
                                  argument_default=argparse.SUPPRESS)
    augment.add_argument("recipe", help=f"{RECIPE_HELP} (its augment section is shown)")
    _recipe_options(augment)
    augment.add_argument("--out", help="PNG to write (default augment_grid.png)")
    augment.add_argument("--n", type=int, help="number of images (default 16)")
    augment.set_defaults(func=_augment)

    lr_find = commands.add_parser("lr-find", help="learning-rate range test: plot and a suggested train.lr",
                                  argument_default=argparse.SUPPRESS)
    lr_find.add_argument("recipe", help=RECIPE_HELP)
    _recipe_options(lr_find)
    lr_find.add_argument("--out", help="PNG to write (default lr_find.png)")
    lr_find.add_argument("--steps", type=int, help="batches in the sweep, default 100 (stops early on divergence)")
    lr_find.set_defaults(func=_lr_find)

    evaluate = commands.add_parser("evaluate", help="confusion matrix and per-class report on labelled images",
                                   argument_default=argparse.SUPPRESS)
    evaluate.add_argument("checkpoint", help="a run folder's best (or last) checkpoint")
    evaluate.add_argument("--data", required=True, help="labelled folder (class sub-folders or 3_120.jpg names); "
                                                        "multi-label: a manifest CSV")
    evaluate.add_argument("--threshold", type=float,
                          help="multi-label: one threshold for every class (default: the checkpoint's per-class ones)")
    evaluate.add_argument("--out", help="output folder (default: eval/ next to the checkpoint)")
    evaluate.add_argument("--tta", metavar="VIEWS",
                          help="test-time augmentation: flip, crops or flip,crops")
    _inference_options(evaluate)
    evaluate.set_defaults(func=_evaluate)

    predict = commands.add_parser("predict", help="write a Kaggle-style submission CSV for a folder of images",
                                  argument_default=argparse.SUPPRESS)
    predict.add_argument("checkpoint", nargs="+", help="a run's best checkpoint; several are averaged as an ensemble")
    predict.add_argument("--images", required=True, help="folder of unlabeled test images")
    predict.add_argument("--out", help="CSV to write (default submission.csv)")
    predict.add_argument("--id-column", help="header of the Id column (default Id)")
    predict.add_argument("--label-column", help="header of the label column (default Category; multi-label Tags)")
    predict.add_argument("--threshold", type=float,
                         help="multi-label: one threshold for every class (default: the checkpoint's per-class ones)")
    predict.add_argument("--label-sep", help="multi-label: separator between labels (default a space)")
    predict.add_argument("--value", choices=VALUE_KINDS, help="write the class name (default) or its index")
    predict.add_argument("--tta", metavar="VIEWS",
                         help="test-time augmentation averaged per image: flip (2 views), crops (5), flip,crops (10)")
    predict.add_argument("--probs", action="store_true", help="also write OUT_probs.csv: Id and one column per class")
    predict.add_argument("--topk", type=int, metavar="K",
                         help="also write OUT_topK.csv: the K likeliest classes and their probabilities")
    predict.add_argument("--sample-submission", metavar="CSV",
                         help="Kaggle sample submission: its Ids, row order and header are used (every image must "
                              "match one Id); per-class columns get probabilities")
    predict.add_argument("--id-format", choices=ID_FORMATS,
                         help="Id of an image: file stem (0001.jpg → 0001, default), file name, or its position "
                              "in file-name order zero-padded (HW03 sample code: pad4 from 1)")
    predict.add_argument("--id-width", type=int, help="--id-format index: digits, zero-padded (default 4; 0: none)")
    predict.add_argument("--index-start", type=int, help="--id-format index: number of the first image (default 1)")
    predict.add_argument("--reject-below", type=float, metavar="P",
                         help="write --reject-label for images whose calibrated top probability is below P "
                              "(evaluate's accuracy-coverage curve suggests P for a target accuracy)")
    predict.add_argument("--reject-label", help="label written for rejected images (default unknown)")
    predict.add_argument("--force", action="store_true",
                         help="replace an existing --out file that is not an earlier prediction CSV (never an input)")
    _inference_options(predict)
    predict.set_defaults(func=_predict)

    pseudo = commands.add_parser("pseudo-label", help="label the confident predictions on unlabeled images "
                                                      "(self-training): a class folder or a CSV manifest",
                                 argument_default=argparse.SUPPRESS)
    pseudo.add_argument("checkpoint", help="a run's best checkpoint (its fitted temperature calibrates the threshold)")
    pseudo.add_argument("--images", required=True, help="folder of unlabeled images (sub-folders included)")
    pseudo.add_argument("--out", required=True,
                        help="folder to create (--format folder: OUT/<class>/) or CSV file (--format csv)")
    pseudo.add_argument("--threshold", type=float, help="keep images whose calibrated top probability is at least "
                                                        "this (default 0.9)")
    pseudo.add_argument("--max-per-class", type=int, metavar="K",
                        help="keep at most K per class, the most confident (keeps classes balanced)")
    pseudo.add_argument("--format", choices=["folder", "csv"],
                        help="folder (default): copies in OUT/<class>/; csv: path,label,probability manifest")
    pseudo.add_argument("--link", action="store_true", help="--format folder: symlink instead of copying")
    pseudo.add_argument("--truth", help="CSV of the true labels (file stem or name, class): adds the pseudo-labels' "
                                        "accuracy")
    pseudo.add_argument("--force", action="store_true", help="--format csv: replace an existing --out file")
    _inference_options(pseudo)
    pseudo.set_defaults(func=_pseudo_label)

    score = commands.add_parser("score", help="accuracy and evaluation bundle of a submission against true labels")
    score.add_argument("submission", help="submission CSV (Id,Category)")
    score.add_argument("--truth", required=True, help="CSV with the true labels, same Ids")
    score.add_argument("--out", help="output folder (default: SUBMISSION_score/ next to the submission)")
    score.add_argument("--id-column", default=None, help="Id column in both files (default: the first)")
    score.add_argument("--label-column", default=None, help="label column in both files (default: the second)")
    score.add_argument("--multilabel", action="store_true",
                       help="several labels per cell (e.g. Id,Tags): score by mean F1 per image (Kaggle's Planet)")
    score.add_argument("--label-sep", default=None,
                       help="--multilabel: separator between labels (default: any of space, comma, |)")
    score.set_defaults(func=_score)

    report = commands.add_parser("report", help="(re)build a run folder's self-contained HTML report")
    report.add_argument("run_dir", help="run folder (or a k-fold parent folder)")
    report.add_argument("--eval-dir", default=None, help="evaluation folder to show (default: RUN_DIR/eval)")
    report.set_defaults(func=_report)

    export = commands.add_parser("export", help="export a checkpoint to ONNX or TorchScript, checked against PyTorch")
    export.add_argument("checkpoint")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    export.add_argument("--out", default=None, help="output file (default: next to the checkpoint)")
    export.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest allowed difference between exported and PyTorch logits")
    export.add_argument("--force", action="store_true",
                        help="replace an existing --out file that is not an earlier export of this format "
                             "(never the checkpoint)")
    export.set_defaults(func=_export)

    inspect = commands.add_parser("inspect", help="show a backbone's stages and parameter counts")
    inspect.add_argument("backbone", help="timm name, tv/<torchvision name>, or lenet / nin / hw03net")
    inspect.add_argument("--trainable", nargs="*", default=None, help="stages left trainable (none: head only)")
    inspect.add_argument("--trainable-last", type=int, default=None, metavar="N", help="train the last N stages")
    inspect.add_argument("--freeze-to", default=None, metavar="STAGE",
                         help="freeze every stage up to and including STAGE")
    inspect.add_argument("--pool", default="avg", help="global pool: avg | max | avgmax | catavgmax")
    inspect.add_argument("--layer-decay", type=float, default=None,
                         help="show each stage's learning-rate multiplier for train.layer_decay")
    inspect.add_argument("--hidden", nargs="*", type=int, default=[], help="head hidden widths")
    inspect.add_argument("--num-classes", type=int, default=10)
    inspect.add_argument("--image-size", type=int, default=None)
    inspect.set_defaults(func=_inspect)
    _add_tune_command(commands)
    _add_runs_command(commands)
    _add_recipes_command(commands)
    _add_demo_commands(commands)
    return parser


def _under_torchrun() -> bool:
    """Whether torchrun started this process (it sets LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _relaunch(argv: list[str], devices: int) -> int:
    """`train ... --devices N`: the same command under torchrun on this machine; its exit status.

    N processes train one run with DDP, or with --folds, N folds side by side (one per device, no DDP).
    """
    if devices < 1:
        raise FinetuneError(f"--devices {devices}: give the number of processes (GPUs) to train on, e.g. --devices 2")
    rest, skip = [], False
    for arg in argv:  # drop --devices N / --devices=N so the workers do not relaunch again
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
               "-m", "finetune", *rest]
    print("running: " + " ".join(command[1:]), flush=True)
    return subprocess.run(command).returncode


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI; user mistakes print one `error:` line and exit with status 2.

    Under torchrun only rank 0 prints (the other ranks' stdout is discarded; errors still reach stderr).
    """
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    torchrun = _under_torchrun()
    if torchrun and os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")
    try:
        if getattr(args, "devices", 1) != 1 and not torchrun:
            return _relaunch(list(sys.argv[1:] if argv is None else argv), args.devices)
        func(args)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if torchrun:
            from finetune.engine.distributed import cleanup

            cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
