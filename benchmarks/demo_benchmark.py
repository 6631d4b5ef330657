"""Pretrained vs from-scratch: the demo recipe end to end, as a user runs it (`finetune demo`).

    .venv/bin/python benchmarks/demo_benchmark.py [--repeats 3] [--test-limit K] [--per-class N]

Each run is a fresh `python -m finetune.cli demo` process in its own folder (export, train, predict,
score), timed from the outside; repeat k trains with train.seed=k on the same data. The from-scratch
runs use the same recipe with `model.weights` unset and every stage trainable.
Prints a table (medians over repeats) and writes it to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# From scratch every stage trains: a frozen, randomly initialised stem would only handicap the baseline.
MODES = {"pretrained": [], "scratch": ["--set", "model.weights=null", "--set", "model.trainable_last=null"]}


def run_once(mode: str, seed: int, out: Path, args: argparse.Namespace) -> dict:
    """One demo run in a fresh process; its accuracy (from score.json) and wall time."""
    command = [sys.executable, "-m", "finetune.cli", "demo", "--out", str(out), "--per-class", str(args.per_class),
               "--set", f"train.seed={seed}"]
    if args.test_limit:
        command += ["--test-limit", str(args.test_limit)]
    start = time.perf_counter()
    log = out.with_suffix(".log")
    with log.open("w") as handle:
        subprocess.run(command + MODES[mode], check=True, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    (score_file,) = (out / "runs").glob("*/test_eval/score.json")
    score = json.loads(score_file.read_text())
    for exported in out.glob("fashion_mnist_*"):
        shutil.rmtree(exported)  # 10 000+ PNGs per run; the run folder (minus checkpoints) and log stay
    for checkpoint in out.glob("runs/*/*.pt"):
        checkpoint.unlink()
    return {"mode": mode, "seed": seed, "accuracy": score["accuracy"], "images": score["images"],
            "seconds": round(seconds, 1), "log": str(log)}


def main() -> None:
    """Run both modes `--repeats` times, print the table and save it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--test-limit", type=int, default=None)
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = RESULTS / f"demo-{stamp}"
    folder.mkdir(parents=True)
    runs = []
    for repeat in range(args.repeats):
        for mode in MODES:
            run = run_once(mode, repeat, folder / f"{mode}-{repeat + 1}", args)
            print(f"{mode:<10}  seed {repeat}: accuracy {run['accuracy']:.4f}  {run['seconds']:.0f} s", flush=True)
            runs.append(run)
    summary = {
        mode: {key: statistics.median(r[key] for r in runs if r["mode"] == mode) for key in ("accuracy", "seconds")}
        for mode in MODES
    }
    pre, scratch = summary["pretrained"]["accuracy"], summary["scratch"]["accuracy"]
    lines = [
        (f"demo benchmark {stamp}: {os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}, "
         f"{args.per_class} training images/class, test images: {runs[0]['images']}, repeats: {args.repeats}"),
        f"{'mode':<10}  {'accuracy':>8}  {'wall s':>7}",
        *(f"{mode:<10}  {s['accuracy']:8.4f}  {s['seconds']:7.0f}" for mode, s in summary.items()),
        f"pretrained / scratch accuracy ratio: {pre / scratch:.2f} (+{pre - scratch:.3f})",
    ]
    print("\n".join(lines))
    (folder / "summary.txt").write_text("\n".join(lines) + "\n")
    (folder / "runs.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")
    print(f"results in {folder}")


if __name__ == "__main__":
    main()
