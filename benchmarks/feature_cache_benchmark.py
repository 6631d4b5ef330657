"""Head-only training with and without cached backbone features (train.cache_features), same data, same seed.

    python benchmarks/feature_cache_benchmark.py [--epochs 4] [--image-size 96] [--per-class 90] [--repeats 1]

Fashion-MNIST (`--per-class` training and 10 validation images per class), the demo recipe's Lite0 with
ImageNet weights and only the head trainable (`model.trainable: []`), deterministic preprocessing
(augment.preset none, no mixup/cutmix). The same recipe runs with train.cache_features false (today: the
frozen backbone runs on every image every epoch) and unset (auto: features computed once). Prints each run's
epoch times (history.csv), the ratio of the median epoch 2+ times and of the whole head-only phase (the
first epoch of the cached run includes computing the features), and both validation accuracies.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

from finetune.workflows.api import train
from finetune.workflows.datasets import FashionMNISTSplit, export_fashion_mnist


def run(root: Path, out: Path, args: argparse.Namespace, cache: str, seed: int) -> dict:
    """One head-only training run; its epoch times, total time and best validation accuracy."""
    settings = [f"output={out}", f"train.epochs={args.epochs}", f"data.image_size={args.image_size}",
                f"train.seed={seed}", "model.trainable_last=null", "model.trainable=[]", "augment.ops=null",
                "augment.preset=none", "augment.mixup=0", "augment.cutmix=0", "train.warmup_epochs=0",
                "train.lr=0.01", f"train.cache_features={cache}", "train.monitor=val_acc"]
    start = time.perf_counter()
    result = train("demo_fashion_mnist_lite0", data=root, overrides=settings, log=lambda _: None)
    total = time.perf_counter() - start
    with (result.run_dir / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return {"epochs": [float(r["seconds"]) for r in rows], "total": total,
            "fit": sum(float(r["seconds"]) for r in rows), "val_acc": [float(r["val_acc"]) for r in rows]}


def main() -> None:
    """Run both settings, print epoch times, ratios and accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--per-class", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export = export_fashion_mnist(Path(tmp) / "fmnist", FashionMNISTSplit(args.per_class, 10, test_limit=10))
        results: dict[str, list[dict]] = {"false": [], "null": []}
        for k in range(args.repeats):
            for cache in ("false", "null") if k % 2 == 0 else ("null", "false"):
                results[cache].append(run(export.root, Path(tmp) / f"runs-{cache}-{k}", args, cache, k))
    print(f"head-only Lite0, {args.image_size}px, {args.epochs} epochs, {export.counts['train']} training / "
          f"{export.counts['val']} validation images, medians of {args.repeats}")
    summary = {}
    for cache, label in (("false", "cache_features false"), ("null", "cache_features auto")):
        runs = results[cache]
        later = statistics.median(s for r in runs for s in r["epochs"][1:])
        fit = statistics.median(r["fit"] for r in runs)
        summary[cache] = (later, fit)
        print(f"  {label:<20} epochs {' '.join(f'{s:.2f}' for s in runs[0]['epochs'])} s  (epoch 2+ median "
              f"{later:.2f} s, all epochs {fit:.1f} s, whole run {statistics.median(r['total'] for r in runs):.1f} s)"
              f"  val_acc {' '.join(f'{a:.3f}' for a in runs[0]['val_acc'])}")
    print(f"  epoch 2+: {summary['false'][0] / max(summary['null'][0], 1e-3):.0f}x faster with cached features; "
          f"the {args.epochs} head-only epochs together: {summary['false'][1] / summary['null'][1]:.1f}x")


if __name__ == "__main__":
    main()
