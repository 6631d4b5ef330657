"""Command line: argument parsing only; every command calls one API function."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from finetune.errors import FinetuneError

__all__ = ["main", "build_parser"]


def _train(args: argparse.Namespace) -> None:
    from finetune.api import train

    train(args.recipe, data=args.data, overrides=args.set)


def _evaluate(args: argparse.Namespace) -> None:
    from finetune.api import evaluate

    evaluate(args.checkpoint, args.data, out=args.out, batch_size=args.batch_size, num_workers=args.workers,
             device=args.device)


def _predict(args: argparse.Namespace) -> None:
    from finetune.api import predict

    predict(args.checkpoint, args.images, out=args.out, id_column=args.id_column, label_column=args.label_column,
            value=args.value, batch_size=args.batch_size, num_workers=args.workers, device=args.device)


def _inspect(args: argparse.Namespace) -> None:
    from finetune.models import build_model, format_summary, stage_summary
    from finetune.recipe import HeadConfig, ModelConfig

    cfg = ModelConfig(backbone=args.backbone, trainable=args.trainable, head=HeadConfig(hidden=args.hidden))
    cfg.validate()
    model, pre = build_model(cfg, args.num_classes, args.image_size)
    print(f"{args.backbone}: input {pre.size}px, mean {pre.mean}, std {pre.std}, {pre.interpolation}")
    print(format_summary(stage_summary(model)))


def _inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def build_parser() -> argparse.ArgumentParser:
    """The `finetune` argument parser with one sub-command per task."""
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune pretrained image classifiers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="fine-tune a backbone as a recipe says")
    train.add_argument("recipe", help="recipe YAML (see recipes/)")
    train.add_argument("--data", help="dataset folder (overrides data.root)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set train.epochs=5 (repeatable)")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("evaluate", help="confusion matrix and per-class report on labelled images")
    evaluate.add_argument("checkpoint", help="best.pt / last.pt from a run folder")
    evaluate.add_argument("--data", required=True, help="labelled folder (class sub-folders or 3_120.jpg names)")
    evaluate.add_argument("--out", help="output folder (default: eval/ next to the checkpoint)")
    _inference_options(evaluate)
    evaluate.set_defaults(func=_evaluate)

    predict = commands.add_parser("predict", help="write a Kaggle-style submission CSV for a folder of images")
    predict.add_argument("checkpoint")
    predict.add_argument("--images", required=True, help="folder of unlabeled test images")
    predict.add_argument("--out", default="submission.csv")
    predict.add_argument("--id-column", default="Id")
    predict.add_argument("--label-column", default="Category")
    predict.add_argument("--value", choices=["name", "index"], default="name",
                         help="write the class name (default) or its index")
    _inference_options(predict)
    predict.set_defaults(func=_predict)

    inspect = commands.add_parser("inspect", help="show a backbone's stages and parameter counts")
    inspect.add_argument("backbone", help="timm name, tv/<torchvision name>, or lenet / nin / hw03net")
    inspect.add_argument("--trainable", nargs="*", default=None, help="stages left trainable")
    inspect.add_argument("--hidden", nargs="*", type=int, default=[], help="head hidden widths")
    inspect.add_argument("--num-classes", type=int, default=10)
    inspect.add_argument("--image-size", type=int, default=None)
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI; user mistakes print one `error:` line and exit with status 2."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
