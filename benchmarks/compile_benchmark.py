"""What `train.compile: true` costs and gains: compile time, then training and prediction images/s, eager vs compiled.

    python benchmarks/compile_benchmark.py [--size 96] [--batch-size 32] [--steps 20] [--repeats 3]

The demo recipe's model (EfficientNet-Lite0, blocks.3-6 and the head trainable, channels_last) on random
tensors, so only the model is timed. The compiled model is made by the same call `train.compile: true`
makes (`finetune.engine.step.compile_model`); its first training and eval calls, which compile, are timed
apart. Then `--steps` AdamW training steps and as many eval forwards, eager and compiled alternating,
median of `--repeats`. The last line says after how many demo-sized epochs (900 images) compiling pays off.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from finetune.workflows.demo import DEMO_RECIPE
from finetune.engine.step import compile_model
from finetune.models import build_model
from finetune.config.recipe import load_recipe

DEMO_TRAIN_IMAGES = 900


def build(size: int) -> torch.nn.Module:
    """A fresh demo-recipe Lite0 with a 10-class head, channels_last."""
    recipe = load_recipe(DEMO_RECIPE, [f"data.image_size={size}"])
    model, _ = build_model(recipe.model, 10, size)
    return model.to(memory_format=torch.channels_last)


def main() -> None:
    """Time compilation, then eager vs compiled steps; print images/s and the break-even point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(args.batch_size) % 10
    models = {"eager": build(args.size), "compiled": build(args.size)}
    models["compiled"].load_state_dict(models["eager"].state_dict())
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for name, m in models.items()}

    def train_steps(name: str, steps: int) -> None:
        model, optimizer = models[name], optimizers[name]
        model.train()
        for _ in range(steps):
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def predict_steps(name: str, steps: int) -> None:
        models[name].eval()
        for _ in range(steps):
            models[name](images)

    start = time.perf_counter()
    compiled = compile_model(models["compiled"], images, log=print)  # compiles the eval graph
    eval_compile = time.perf_counter() - start
    start = time.perf_counter()
    train_steps("compiled", 1)  # the first training call compiles the training graph
    train_compile = time.perf_counter() - start
    print(f"Lite0 (demo recipe), {args.size}px, batch {args.batch_size}, torch threads {torch.get_num_threads()}; "
          f"compiled: {compiled}; first eval call {eval_compile:.1f} s, first training step {train_compile:.1f} s")
    train_steps("eager", 1)
    rates = {}
    for kind, fn in (("train", train_steps), ("predict", predict_steps)):
        spent: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for name in spent:
                start = time.perf_counter()
                fn(name, args.steps)
                spent[name].append(time.perf_counter() - start)
        for name, times in spent.items():
            rates[kind, name] = args.steps * args.batch_size / statistics.median(times)
        print(f"  {kind:<8} eager {rates[kind, 'eager']:7.1f} images/s  compiled {rates[kind, 'compiled']:7.1f} "
              f"images/s  ratio {rates[kind, 'compiled'] / rates[kind, 'eager']:.2f}")
    saved = DEMO_TRAIN_IMAGES / rates["train", "eager"] - DEMO_TRAIN_IMAGES / rates["train", "compiled"]
    cost = eval_compile + train_compile
    if saved > 0:
        print(f"  compiling ({cost:.0f} s) pays off after {cost / saved:.0f} demo-sized training epochs "
              f"({saved:.2f} s saved per epoch)")
    else:
        print(f"  compiling ({cost:.0f} s) never pays off here: compiled training is not faster")


if __name__ == "__main__":
    main()
