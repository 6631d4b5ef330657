"""Pipeline overhead and precision: finetune's prediction and training throughput against the bare model.

    python benchmarks/throughput_benchmark.py [--size 128] [--batch-size 64] [--images 512] [--repeats 3]
        [--workers 2] [--threads N]
        [--checkpoint runs/x/best.pt --images-dir DIR --truth truth.csv]

In one process, on the same images, median of `--repeats` (raw and finetune alternate within each round):

- raw forward: the model's forward on ready-made, normalised tensors (eval, no_grad) — the ceiling;
- finetune predict: `stream_probs` (decode the files, preprocess, batch, forward, softmax) — the pipeline;
- raw train step: forward + backward + AdamW step on ready-made tensors; finetune train: one epoch of
  `train_one_epoch` with the training loader over the files (decode, augment, batch, the same step);
- each in fp32 and in bf16 autocast; channels_last throughout (the default, train.channels_last: true),
  and fp32 also in the default contiguous layout, to show what channels_last is worth.

Without --checkpoint the model is the demo recipe's Lite0 (ImageNet weights, a 10-class head) and the
images are generated PNGs. With --checkpoint, --images-dir and --truth (Id,Category, as `finetune datasets`
writes), it also prints the test accuracy of fp32 and bf16 prediction and their difference.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from finetune.data.loaders import eval_loader, train_loader
from finetune.data.sources import Sample
from finetune.workflows.demo import DEMO_RECIPE
from finetune.engine.fit import OptimState, TrainingParts, train_one_epoch
from finetune.engine.optim import create_optimizer, create_scheduler
from finetune.engine.step import autocast
from finetune.inference.predict import LoadedModel, ProbsSettings, load_model, predict_probs
from finetune.models import build_model
from finetune.config.recipe import load_recipe
from finetune.tasks.single_label import SingleLabelScorer


def median_seconds(*fns, repeats: int) -> list[float]:
    """Median wall time of each of `fns` over `repeats` rounds, after one warm-up call each.

    The functions alternate within each round, so a change in the machine's load hits all of them alike.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def write_images(folder: Path, count: int, size: int) -> list[Sample]:
    """Textured RGB PNGs of `size` px, labels 0..9."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        array = rng.integers(0, 255, size=(size // 4, size // 4, 3), dtype=np.uint8)
        path = folder / f"{i:05d}.png"
        Image.fromarray(array).resize((size, size), Image.BILINEAR).save(path)
        samples.append(Sample(path, i % 10))
    return samples


def main() -> None:
    """Measure and print images/s for every path and precision, and the ratios to the bare model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the model (default: torch's, one per core); with fewer threads than "
                             "cores the loader workers decode on cores the model does not use")
    parser.add_argument("--skip-train", action="store_true", help="prediction only")
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint, for the fp32 vs bf16 accuracy")
    parser.add_argument("--images-dir", type=Path, help="its test images")
    parser.add_argument("--truth", type=Path, help="CSV Id,Category of those images")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(DEMO_RECIPE, [f"data.image_size={args.size}", f"data.batch_size={args.batch_size}",
                                       f"data.num_workers={args.workers}", "augment.ops=null", "augment.preset=light",
                                       "augment.mixup=0", "augment.cutmix=0", "train.epochs=1",
                                       "train.warmup_epochs=0"])
    device = torch.device("cpu")
    model, pre = build_model(recipe.model, 10, args.size)
    model.to(memory_format=torch.channels_last)
    print(f"Lite0 (demo recipe: trainable_last 4), {args.size}px, batch {args.batch_size}, {args.images} images, "
          f"workers {args.workers}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_images(Path(tmp), args.images, args.size)
        tensors = [images for images, _ in eval_loader(samples, pre, args.batch_size, 0)]
        loaded = LoadedModel(model, [str(i) for i in range(10)], pre, recipe, {})
        n = args.images
        for precision in ("fp32", "bf16"):
            for layout in ((torch.channels_last, torch.contiguous_format) if precision == "fp32"
                           else (torch.channels_last,)):
                model.to(memory_format=layout)
                model.eval()

                @torch.no_grad()
                def raw_forward() -> None:
                    with autocast(device, precision):
                        for batch in tensors:
                            torch.softmax(model(batch.contiguous(memory_format=layout)).float(), 1)

                name = f"{precision}{', channels_last' if layout == torch.channels_last else ', contiguous'}"
                if layout == torch.channels_last:  # finetune's prediction always runs channels_last
                    raw, pipeline = median_seconds(
                        raw_forward, lambda: predict_probs(loaded, samples, ProbsSettings(
                            args.batch_size, args.workers, precision=precision)), repeats=args.repeats)
                    line = (f"  predict {name:<24} raw forward {n / raw:7.1f} images/s  finetune predict "
                            f"{n / pipeline:7.1f} images/s  ratio {raw / pipeline:.2f}")
                else:
                    (raw,) = median_seconds(raw_forward, repeats=args.repeats)
                    line = f"  predict {name:<24} raw forward {n / raw:7.1f} images/s"
                print(line, flush=True)
        model.to(memory_format=torch.channels_last)
        if not args.skip_train:
            for precision in ("fp32", "bf16"):
                cfg = replace(recipe.train, precision=precision)
                optimizer = create_optimizer(model, cfg)
                scheduler = create_scheduler(optimizer, cfg, 10**6)
                criterion = torch.nn.CrossEntropyLoss()
                labels = [torch.arange(len(b)) % 10 for b in tensors]

                def raw_steps() -> None:
                    model.train()
                    for batch, target in zip(tensors, labels):
                        with autocast(device, precision):
                            loss = criterion(model(batch.contiguous(memory_format=torch.channels_last)), target)
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)

                loader = train_loader(recipe, samples, pre, 10)
                raw, ours = median_seconds(raw_steps, lambda: train_one_epoch(
                    model, TrainingParts(loader, loader, criterion, SingleLabelScorer()),
                    OptimState(optimizer, scheduler), device, cfg, "bench"), repeats=args.repeats)
                print(f"  train   {precision + ', channels_last':<24} raw step    {n / raw:7.1f} images/s  "
                      f"finetune epoch   {len(loader) * args.batch_size / ours:7.1f} images/s  "
                      f"ratio {raw / ours * len(loader) * args.batch_size / n:.2f}", flush=True)
    if args.checkpoint:
        trained = load_model(args.checkpoint)
        with args.truth.open(newline="") as handle:
            truth = {row[0]: row[1] for row in list(csv.reader(handle))[1:]}
        files = sorted(p for p in args.images_dir.iterdir() if p.stem in truth)
        index = {c: i for i, c in enumerate(trained.classes)}
        test = [Sample(p, index[truth[p.stem]]) for p in files]
        y = np.array([s.target for s in test])
        scores = {}
        for precision in ("fp32", "bf16"):
            start = time.perf_counter()
            probs = predict_probs(trained, test, ProbsSettings(args.batch_size, args.workers, precision=precision))
            scores[precision] = (float((probs.argmax(1) == y).mean()), time.perf_counter() - start, probs.argmax(1))
        agree = float((scores["fp32"][2] == scores["bf16"][2]).mean())
        print(f"accuracy on {len(test)} images of {args.images_dir}: fp32 {scores['fp32'][0]:.4f} "
              f"({scores['fp32'][1]:.1f} s), bf16 {scores['bf16'][0]:.4f} ({scores['bf16'][1]:.1f} s); "
              f"change {scores['bf16'][0] - scores['fp32'][0]:+.4f}, same prediction for {agree:.2%} of images")


if __name__ == "__main__":
    main()
