"""What each recipe choice is worth: the fastai benchmark's few-shot task, one setting switched at a time.

    python benchmarks/ablation_benchmark.py [--variants demo no_mix fine_tune ...] [--seeds 0 1 2]
        [--epochs 20] [--image-size 96] [--per-class 90] [--recipe NAME] [--json ablation.json]

The task, data and finetune side are those of `fastai_benchmark.py` (Fashion-MNIST, 90 + 10 images per
class, the first 2 000 test images, Lite0 ImageNet weights, the demo recipe with its crops scaled to
--image-size, predict without TTA, scored on the test folder). Each variant is a list of recipe overrides
on top of the demo recipe (`VARIANTS` below, `{size}` standing for --image-size; `--set NAME KEY=VALUE ...`
adds one of your own; `--recipe` starts every variant from another shipped recipe instead). Every
variant runs once per seed; the table gives the median test accuracy and wall time of each and its
accuracy change against the first variant. Rows are printed as they finish and, with --json, written
after every run, so an interrupted ablation keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from fastai_benchmark import run_finetune

from finetune.workflows.datasets import FashionMNISTSplit, export_fashion_mnist

NO_MIX = ["augment.mixup=0", "augment.cutmix=0"]
NO_REGULARISATION = [*NO_MIX, "train.label_smoothing=0"]
# fastai's head: concat pool -> BN -> Dropout -> Linear(512) -> ReLU -> BN -> Dropout -> Linear.
FASTAI_HEAD = ["model.head.pool=catavgmax", "model.head.hidden=[512]", "model.head.dropout=0.25"]
WHOLE_NETWORK = ["model.trainable_last=null"]
# fastai's fit_one_cycle warms up over the first 25-30 % of the steps, then anneals by cosine.
ONE_CYCLE = ["train.warmup_epochs=6"]
# The demo recipe's framing before this ablation: the backbone's 0.875 centre crop at evaluation, random
# crops at that scale in training (`--base centre_crop` puts every variant on top of it).
CENTRE_CROP = ["data.crop_pct=null", "augment.ops=[{{name: SmallestMaxSize, max_size: {crop_side}}}, "
               "{{name: RandomCrop, height: {size}, width: {size}}}, {{name: HorizontalFlip}}]"]
# The whole image at evaluation (no centre crop) and in training (a plain resize), as fastai's Resize does.
WHOLE_IMAGE = ["data.crop_pct=1.0", "augment.ops=[{{name: Resize, height: {size}, width: {size}}}, {{name: HorizontalFlip}}]"]
# fastai's aug_transforms in albumentations: flip, rotate +-10 degrees, zoom up to 1.1, lighting 0.2 (p 0.75 each).
FASTAI_AUGMENT = ["data.crop_pct=1.0",
                  "augment.ops=[{{name: Resize, height: {size}, width: {size}}}, {{name: HorizontalFlip}}, "
                  "{{name: Affine, rotate: [-10, 10], scale: [1.0, 1.1], p: 0.75}}, "
                  "{{name: RandomBrightnessContrast, brightness_limit: 0.2, contrast_limit: 0.2, p: 0.75}}]"]

# fine_tune's rates before they went flat: lr at the head falling to lr/100 at the stem over Lite0's 8 body
# stages (0.01 ** (1/8) per stage); 0.75 per stage falls to lr/10.
FASTAI_SPREAD = ["train.layer_decay=0.562"]
TENFOLD_SPREAD = ["train.layer_decay=0.75"]
BODY_AT_ONE_HUNDREDTH = ("train.lr_mult={{" + ", ".join(f"{s}: 0.01" for s in ["stem", *(f"blocks.{i}" for i in range(7))])
                         + "}}")  # doubled braces: variants are str.format-ed with {size}

VARIANTS: dict[str, list[str]] = {
    "demo": [],  # the demo recipe as it is: blocks.3-6 + head train, BN frozen, mixup/cutmix, smoothing 0.1
    "centre_crop": CENTRE_CROP,
    "no_mix": NO_MIX,
    "no_label_smoothing": ["train.label_smoothing=0"],
    "no_regularisation": NO_REGULARISATION,
    "fastai_head": FASTAI_HEAD,
    "bn_train": ["model.bn=train"],
    "one_cycle": ONE_CYCLE,
    "augment_light": ["augment.ops=null", "augment.preset=light"],
    "whole_image": WHOLE_IMAGE,
    "fastai_augment": FASTAI_AUGMENT,
    "compile": ["train.compile=true"],
    "whole_image_one_cycle": [*WHOLE_IMAGE, *ONE_CYCLE],
    # fine_tune up to the recipe's own trainable stages (blocks.3-6): one head-only epoch first
    "fine_tune_frozen_stages": ["train.fine_tune=1"],
    "fine_tune_frozen_stages_spread_100": ["train.fine_tune=1", *FASTAI_SPREAD],
    # fastai's split for a timm body: two groups, slice(lr/100, lr) -> the whole body at lr/100
    "fine_tune_whole_image_body_lr_100": [*WHOLE_NETWORK, "train.fine_tune=1", *WHOLE_IMAGE, BODY_AT_ONE_HUNDREDTH],
    "whole_network": WHOLE_NETWORK,
    "fine_tune": [*WHOLE_NETWORK, "train.fine_tune=1"],
    "fine_tune_spread_10": [*WHOLE_NETWORK, "train.fine_tune=1", *TENFOLD_SPREAD],
    "fine_tune_spread_100": [*WHOLE_NETWORK, "train.fine_tune=1", *FASTAI_SPREAD],
    # every backbone BatchNorm keeps its ImageNet statistics (model.bn: fixed)
    "fine_tune_bn_fixed": [*WHOLE_NETWORK, "train.fine_tune=1", "model.bn=fixed"],
    "fine_tune_no_regularisation": [*WHOLE_NETWORK, "train.fine_tune=1", *NO_REGULARISATION],
    "fine_tune_fastai_like": [*WHOLE_NETWORK, "train.fine_tune=1", *NO_REGULARISATION, *FASTAI_HEAD,
                              "model.bn=train", *ONE_CYCLE],
}


def expand(overrides: list[str], size: int) -> list[str]:
    """Fill in the image size (and the centre crop's resize side, size / 0.875) of each override."""
    return [o.format(size=size, crop_side=round(size / 0.875)) for o in overrides]


def summarise(runs: list[dict], names: list[str]) -> list[dict]:
    """Median accuracy and seconds per variant, and the accuracy change against the first one."""
    rows = []
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        if mine:
            rows.append({"variant": name, "runs": len(mine),
                         "accuracy": statistics.median(r["accuracy"] for r in mine),
                         "seconds": statistics.median(r["seconds"] for r in mine),
                         "accuracies": [round(r["accuracy"], 4) for r in mine]})
    for row in rows:
        row["change"] = row["accuracy"] - rows[0]["accuracy"]
    return rows


def main() -> None:
    """Run every chosen variant for every seed and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS),
                        help=f"from: {', '.join(VARIANTS)} (none given: only the --set ones)")
    parser.add_argument("--set", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                        help="a variant of your own: its name, then its overrides (repeatable)")
    parser.add_argument("--recipe", default="demo_fashion_mnist_lite0",
                        help="the recipe every variant starts from (default: the demo's)")
    parser.add_argument("--base", default=None, metavar="VARIANT",
                        help="apply this variant's overrides first, under every variant (e.g. centre_crop)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=90)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write the runs and the table here")
    args = parser.parse_args()
    variants = dict(VARIANTS)
    for name, *overrides in args.set:
        variants[name] = overrides
    unknown = [v for v in [*args.variants, *([args.base] if args.base else [])] if v not in variants]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(variants)}")
    names = args.variants + [name for name, *_ in args.set if name not in args.variants]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        split = FashionMNISTSplit(args.per_class, args.val_per_class, args.test_images)
        export = export_fashion_mnist(work / "fashion_mnist", split, reuse=True)
        for name in names:
            for seed in args.seeds:
                overrides = expand([*(variants[args.base] if args.base else []), *variants[name]], args.image_size)
                settings = argparse.Namespace(**vars(args), finetune_recipe=args.recipe, finetune_set=overrides)
                run = run_finetune(export, settings, seed, work / f"{name}-{seed}")
                runs.append({**run, "variant": name})
                print(f"  {name:<30} seed {seed}: accuracy {run['accuracy']:.4f}, {run['seconds']:.1f} s", flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "variants": {n: variants[n] for n in names}, "runs": runs,
                                                     "table": summarise(runs, names)}, indent=2))
    base = f", every variant on top of {args.base}" if args.base else ""
    print(f"\n{export.counts['train']} training / {export.counts['val']} validation / {export.counts['test']} test "
          f"images, {args.image_size}px, {args.epochs} epochs, seeds {args.seeds}{base}; medians:\n")
    print(f"| variant | overrides on recipe {args.recipe} | test accuracy | change | wall time (s) |")
    print("|---|---|---|---|---|")
    for row in summarise(runs, names):
        overrides = " ".join(expand(variants[row["variant"]], args.image_size)) or "(none)"
        print(f"| {row['variant']} | `{overrides}` | {row['accuracy']:.4f} | {row['change']:+.4f} | "
              f"{row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
