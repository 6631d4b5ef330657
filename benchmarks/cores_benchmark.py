"""The core budget under load: the demo recipe's epoch time and predict's images/s, today's thread settings vs the
core budget, on a quiet machine, beside 1 and 2 CPU-bound processes, and under a CPU affinity of 1 core.

    python benchmarks/cores_benchmark.py [--repeats 3] [--epochs 3] [--per-class 100] [--predict-images 2000]
        [--scenarios quiet busy1 busy2 affinity1 quota1] [--settings today budget passive] [--json cores.json]
    python benchmarks/cores_benchmark.py --quick      # a smoke run: 20 images per class, 2 epochs, 256, 1 repeat

Every measurement runs in a fresh Python process (OpenMP reads its wait policy once, when torch loads):

- today: what finetune did before the core budget: torch's own thread count (one per core it sees),
  data.num_workers 2 (2 workers for predict too), OpenMP's default waits (GNU libgomp: spin, then sleep);
- budget: the default, as `finetune train` / `finetune predict` run: threads and workers from the core budget
  (finetune/data/cores.py), OpenMP's default waits, and in training the thread governor (finetune/engine/threads.py:
  the faster of the budget's threads and one, timed on the running steps); its log line is printed below the table;
- passive: the first core budget (the budget's threads and workers fixed, OMP_WAIT_POLICY=PASSIVE set before torch
  loads): what sleeping waits alone give, quiet and under load;
- bare forward: the fused model's forward + softmax on ready-made tensors, torch's defaults: the ceiling for predict.

Training is `finetune.train` with the demo recipe (Lite0 from the packaged ImageNet weights, 96 px, batch 32) on
Fashion-MNIST (`--per-class` training and `--val-per-class` validation images per class; Debian's
dataset-fashion-mnist when installed, else generated 28 px greyscale PNGs of the same size — the output says
which); an epoch's time is the history's `seconds` (train + validate + checkpoints), median of epochs 2.. of a run.
Prediction scores `--predict-images` test images with `predict_probs` (decode, preprocess, batch, forward, softmax)
after the budget is applied as `finetune predict` applies it. Scenarios: quiet; busy1 / busy2: 1 or 2
`python -c "while True: pass"` processes started before and stopped after each measurement; affinity1: the child
pinned to one CPU (as `taskset -c 0`); quota1: the child in a new cgroup allowed 1 core of CPU time while it sees
every core (as `docker run --cpus 1`; needs root and a cpu controller, else skipped with a note). Each figure is the
median of `--repeats` runs, the settings' order rotating from one repeat to the next; ratios are against the quiet
run of the same setting (epochs) and the bare forward of the same scenario (predict: the bare forward runs with
torch's defaults, spinning waits included, so under load it can fall below the pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
# This checkout's demo recipe (not the installed package's, which an editable install of another checkout serves).
DEMO = ROOT / "recipes" / "demo_fashion_mnist_lite0.yaml"
SCENARIOS = {"quiet": "quiet", "busy1": "beside 1 busy process", "busy2": "beside 2 busy processes",
             "affinity1": "CPU affinity 1 core", "quota1": "cgroup CPU quota 1 core"}
QUOTA_GROUP = "finetune-cores-benchmark"  # the cgroup the quota1 scenario makes (and removes)
SETTINGS = ("today", "budget", "passive")
TODAY_WORKERS = 2  # data.num_workers and InferenceOptions.num_workers before the core budget
BUSY = "while True: pass"


def child_env(setting: str) -> dict:
    """The environment of a measuring process: no OpenMP settings of ours (the budget child sets its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                                                               "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def measure(kind: str, setting: str, scenario: str, args: argparse.Namespace, folder: Path) -> dict:
    """Run one measurement in a fresh process under `scenario`; its JSON result."""
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range({"busy1": 1, "busy2": 2}.get(scenario, 0))]
    command = [sys.executable, __file__, "--child", kind, "--setting", setting, "--folder", str(folder),
               "--epochs", str(args.epochs), "--predict-images", str(args.predict_images)]
    try:
        time.sleep(0.5 if busy else 0)  # the competitors are running before the measurement starts
        done = subprocess.run(command, env=child_env(setting), capture_output=True, text=True,
                              preexec_fn=confine(scenario, args.quota_group), timeout=3600)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    if done.returncode != 0:
        raise SystemExit(f"{kind} {setting} {scenario} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def confine(scenario: str, quota_group: Optional[Path]) -> Optional[Callable[[], None]]:
    """What the measuring process does before it starts: pin itself to one CPU, or join the quota cgroup."""
    if scenario == "affinity1":
        return partial(os.sched_setaffinity, 0, {min(os.sched_getaffinity(0))})
    if scenario == "quota1" and quota_group is not None:
        return lambda: (quota_group / "cgroup.procs").write_text(str(os.getpid()))
    return None


def quota_cgroup(cores: float, root: Path = Path("/sys/fs/cgroup")) -> Optional[Path]:
    """A new cgroup allowed `cores` of CPU time (v2 cpu.max, or v1 cfs quota), or None where it cannot be made
    (not root, no cpu controller): as `docker run --cpus` limits a container that still sees every core."""
    period = 100000
    try:
        if (root / "cgroup.controllers").is_file():
            if "cpu" not in (root / "cgroup.subtree_control").read_text().split():
                return None
            group = root / QUOTA_GROUP
            group.mkdir(exist_ok=True)
            (group / "cpu.max").write_text(f"{int(cores * period)} {period}")
        elif (root / "cpu" / "cpu.cfs_quota_us").is_file():
            group = root / "cpu" / QUOTA_GROUP
            group.mkdir(exist_ok=True)
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(int(cores * period)))
        else:
            return None
    except OSError:
        return None
    return group


def child(args: argparse.Namespace) -> dict:
    """In the measuring process: train or predict once with `args.setting`, or time the bare forward."""
    if args.setting == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch loads: OpenMP reads it once
    import torch

    folder = Path(args.folder)
    lines: list[str] = []
    today = args.setting == "today"
    if args.child == "train":
        from finetune.workflows.api import train

        settings = [f"train.epochs={args.epochs}", f"output={folder / 'runs'}", "train.loggers=[csv]"]
        if today:
            settings += [f"data.num_workers={TODAY_WORKERS}", f"train.threads={torch.get_num_threads()}"]
        elif args.setting == "passive":  # the budget's own split, fixed: no governor
            from finetune.data.cores import core_budget

            settings.append(f"train.threads={core_budget('train', 'cpu').threads}")
        result = train(DEMO, data=folder / "data", overrides=settings, log=lines.append)
        import csv

        with (result.run_dir / "history.csv").open() as handle:
            seconds = [float(row["seconds"]) for row in csv.DictReader(handle)]
        return {"epoch_seconds": statistics.median(seconds[1:] or seconds), "epochs": seconds,
                "budget": next((line for line in lines if line.startswith("core budget:")), ""),
                "threads": [line for line in lines if line.startswith("model threads:")]}
    return predict_child(args, folder, today, lines)


def predict_child(args: argparse.Namespace, folder: Path, today: bool, lines: list[str]) -> dict:
    """Images/s of predict_probs with the budget applied as `finetune predict` applies it, or of the bare forward."""
    import torch

    from finetune.config.options import InferenceOptions
    from finetune.data.loaders import eval_loader
    from finetune.data.sources import Sample
    from finetune.inference.predict import ProbsSettings, load_model, predict_probs
    from finetune.workflows.opening import inference_cores

    paths = sorted((folder / "data" / "test").iterdir())[: args.predict_images]
    samples = [Sample(p, None) for p in paths]
    options = InferenceOptions(batch_size=128)
    if args.child == "predict":
        options = InferenceOptions(batch_size=128, num_workers=TODAY_WORKERS if today else None,
                                   threads=torch.get_num_threads() if today else None)
        options = inference_cores(options, torch.device("cpu"), lines.append)
    loaded = load_model(next((folder / "runs").rglob("best.pt")), "cpu", fuse=True)
    if args.child == "predict":
        predict_probs(loaded, samples[:256], ProbsSettings.of(options))  # warm-up: oneDNN primitives, page cache
        start = time.perf_counter()
        predict_probs(loaded, samples, ProbsSettings.of(options))
    else:
        tensors = [images for images, _ in eval_loader(samples, loaded.preprocessing, 128, 0)]
        with torch.no_grad():  # channels_last as predict feeds the model (as throughput_benchmark.py times it)
            loaded.model(tensors[0].contiguous(memory_format=torch.channels_last))
            start = time.perf_counter()
            for batch in tensors:
                torch.softmax(loaded.model(batch.contiguous(memory_format=torch.channels_last)).float(), 1)
    seconds = time.perf_counter() - start
    return {"images_per_second": len(samples) / seconds,
            "budget": next((line for line in lines if line.startswith("core budget:")), "")}


def prepare(folder: Path, args: argparse.Namespace) -> str:
    """The data set in folder/data and a checkpoint to predict with in folder/runs; which images they are."""
    from finetune.workflows.datasets import FashionMNISTSplit, export_fashion_mnist

    split = FashionMNISTSplit(args.per_class, args.val_per_class, args.predict_images)
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        export_fashion_mnist(folder / "data", split)
        source = "Fashion-MNIST (Debian dataset-fashion-mnist)"
    else:
        write_generated(folder / "data", args)
        source = "generated 28 px greyscale PNGs (Fashion-MNIST not installed)"
    command = [sys.executable, "-m", "finetune", "train", str(DEMO), "--data", str(folder / "data"),
               "--set", "train.epochs=1", "--set", f"output={folder / 'runs'}"]
    subprocess.run(command, env=child_env("budget"), check=True, capture_output=True, text=True, timeout=3600)
    return source


def write_generated(root: Path, args: argparse.Namespace) -> None:
    """Fashion-MNIST's shape without its pixels: 10 classes of 28 px greyscale PNGs, train/val/test."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", args.per_class), ("val", args.val_per_class)):
        for label in range(10):
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (28, 28), dtype=np.uint8) // (label + 1)
                Image.fromarray(pixels, "L").save(root / split / str(label) / f"{i:05d}.png")
    (root / "test").mkdir(parents=True, exist_ok=True)
    for i in range(args.predict_images):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L").save(root / "test" / f"{i:05d}.png")


def run(args: argparse.Namespace, folder: Path) -> dict:
    """Every scenario's medians: epoch seconds and predict images/s for today and the budget, and the bare forward."""
    results: dict = {}
    for scenario in args.scenarios:
        settings = tuple(args.settings)
        runs: dict = {(kind, setting): [] for kind in ("train", "predict") for setting in settings}
        runs[("bare", "today")] = []
        for repeat in range(args.repeats):
            order = settings[repeat % len(settings):] + settings[:repeat % len(settings)]
            for kind in ("train", "predict"):
                for setting in order:
                    runs[(kind, setting)].append(measure(kind, setting, scenario, args, folder))
            runs[("bare", "today")].append(measure("bare", "today", scenario, args, folder))
            print(f"  {scenario} repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        results[scenario] = {
            "epoch_seconds": {s: statistics.median(r["epoch_seconds"] for r in runs[("train", s)]) for s in settings},
            "images_per_second": {s: statistics.median(r["images_per_second"] for r in runs[("predict", s)])
                                  for s in settings},
            "bare_images_per_second": statistics.median(r["images_per_second"] for r in runs[("bare", "today")]),
            "budget_line": runs[("train", "budget")][-1]["budget"],
            "predict_budget_line": runs[("predict", "budget")][-1]["budget"],
            "governor": [r.get("threads") for r in runs[("train", "budget")]],  # each run's thread choices
            "runs": {f"{kind} {setting}": value for (kind, setting), value in runs.items()},
        }
    return results


def table(results: dict) -> str:
    """The markdown table the README quotes, and each scenario's budget lines."""
    quiet = results.get("quiet", {}).get("epoch_seconds")
    settings = [s for s in SETTINGS if s in next(iter(results.values()))["epoch_seconds"]]
    names = {"today": "today", "budget": "budget", "passive": "budget, passive waits"}
    header = ([f"epoch: {names[s]}" for s in settings] + ["budget / today", "bare forward"]
              + [f"predict: {names[s]}" for s in settings])
    rows = ["| machine | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for scenario, r in results.items():
        epoch, ips, bare = r["epoch_seconds"], r["images_per_second"], r["bare_images_per_second"]
        cells = [SCENARIOS[scenario]]
        cells += [f"{epoch[s]:.2f} s" + (f" ({epoch[s] / quiet[s]:.2f}x quiet)" if quiet else "") for s in settings]
        cells.append(f"{epoch['budget'] / epoch['today']:.2f}" if {'budget', 'today'} <= set(settings) else "-")
        cells.append(f"{bare:.0f} images/s")
        cells += [f"{ips[s]:.0f} images/s ({ips[s] / bare:.2f}x bare)" for s in settings]
        rows.append("| " + " | ".join(cells) + " |")
    lines = [f"- {SCENARIOS[s]}: `{r['budget_line']}`; predict: `{r['predict_budget_line']}`; the governor's "
             f"choices per run: {r.get('governor')}" for s, r in results.items()]
    return "\n".join(rows + [""] + lines)


def main() -> None:
    """Prepare the data and a checkpoint, measure every scenario, print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="per training run; epochs 2.. are timed")
    parser.add_argument("--per-class", type=int, default=100, help="training images per class (the demo's 100)")
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--predict-images", type=int, default=2000)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="which settings to measure (today and budget are what the README quotes)")
    parser.add_argument("--quick", action="store_true", help="20 images per class, 2 epochs, 256 to predict, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("--child", choices=("train", "predict", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, default="budget", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.per_class, args.val_per_class, args.epochs, args.predict_images, args.repeats = 20, 5, 2, 256, 1
    args.quota_group = quota_cgroup(1.0) if "quota1" in args.scenarios else None
    if "quota1" in args.scenarios and args.quota_group is None:
        args.scenarios.remove("quota1")
        print("note: no cgroup CPU quota scenario: this user cannot make a cgroup with a cpu controller here")
    with tempfile.TemporaryDirectory() as tmp:
        source = prepare(Path(tmp), args)
        print(f"demo recipe (Lite0, 96 px, batch 32) on {source}: {10 * args.per_class} training and "
              f"{10 * args.val_per_class} validation images, {args.epochs} epochs per run (epochs 2.. timed); "
              f"predict {args.predict_images} images at batch 128; {os.cpu_count()} CPUs, affinity "
              f"{len(os.sched_getaffinity(0))}; median of {args.repeats}", flush=True)
        try:
            results = run(args, Path(tmp))
        finally:
            if args.quota_group is not None:
                args.quota_group.rmdir()  # its processes have all exited
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
