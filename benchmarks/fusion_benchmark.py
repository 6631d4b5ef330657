"""BatchNorm folded into the convolutions (what `finetune predict` runs) against the model as trained.

    python benchmarks/fusion_benchmark.py [--size 96] [--batch-size 128] [--batches 8] [--repeats 5]

The demo recipe's Lite0 (ImageNet weights, a 10-class head), eval mode, channels_last, fp32, no_grad, on
random tensors: the bare forward of the model as trained and of `fused_copy(model)`, alternating within each
round, median of --repeats; then the largest difference between their logits.
"""

from __future__ import annotations

import argparse

import torch
from throughput_benchmark import median_seconds

from finetune.workflows.demo import DEMO_RECIPE
from finetune.models import build_model
from finetune.models.fusion import fused_copy
from finetune.config.recipe import load_recipe


def main() -> None:
    """Time both forwards and print images/s, the ratio and the largest logit difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    recipe = load_recipe(DEMO_RECIPE, [f"data.image_size={args.size}"])
    model, _ = build_model(recipe.model, 10, args.size)
    model.eval().to(memory_format=torch.channels_last)
    batches = [torch.randn(args.batch_size, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
               for _ in range(args.batches)]
    fused = fused_copy(model, batches[0][:2])
    folded = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) - sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())

    @torch.no_grad()
    def forward(net: torch.nn.Module) -> None:
        for batch in batches:
            net(batch)

    plain, folded_time = median_seconds(lambda: forward(model), lambda: forward(fused), repeats=args.repeats)
    with torch.no_grad():
        difference = max(float((model(b) - fused(b)).abs().max()) for b in batches)
    n = args.batch_size * args.batches
    print(f"Lite0 (demo recipe), {args.size}px, {n} images in batches of {args.batch_size}, channels_last fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; {folded} BatchNorm layers folded")
    print(f"  as trained       {n / plain:7.1f} images/s")
    print(f"  BatchNorm folded {n / folded_time:7.1f} images/s  ratio {plain / folded_time:.2f}x")
    print(f"  largest logit difference {difference:.2e}")


if __name__ == "__main__":
    main()
