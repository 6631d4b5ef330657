"""Several labels per image: the multilabel_lite0 recipe (ImageNet weights) against the same network from random init.

    .venv/bin/python benchmarks/multilabel_benchmark.py [--train 300] [--test 200] [--repeats 1] [--epochs N]

Writes Fashion-MNIST mosaics (`finetune datasets fashion-mnist-multilabel`: 2x2 grids of one to four
garments, labels = the classes present), then for each mode and seed runs, as a user would, in fresh
processes: `finetune train` (80/20 iterative-stratified split of the labelled mosaics, thresholds chosen on
the 20%), `finetune predict --probs` on the unlabeled test mosaics, `finetune score --multilabel` against
the held-back answers. Reports test mAP (from the probabilities) and mean F1 per image (from the submitted
label sets, Kaggle's Planet metric), medians over seeds, and the wall time of each train+predict.
Prints a table and writes it to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RECIPE = REPO / "recipes" / "multilabel_lite0.yaml"
# From scratch every stage trains: a frozen, randomly initialised stem would only handicap the baseline.
MODES = {"pretrained": [], "scratch": ["--set", "model.weights=null", "--set", "model.trainable_last=null"]}


def finetune(*args: str, log: Path) -> None:
    """One `python -m finetune ...` process, its output appended to `log`."""
    with log.open("a") as handle:
        subprocess.run([sys.executable, "-m", "finetune", *args], check=True, stdout=handle,
                       stderr=subprocess.STDOUT)


def test_map(probs_csv: Path, truth_csv: Path) -> float:
    """Mean average precision of a --probs file against the Id,Tags answers."""
    from finetune.engine.multilabel import mean_average_precision

    with probs_csv.open(newline="") as handle:
        rows = list(csv.reader(handle))
    classes, probs = rows[0][1:], {r[0]: [float(v) for v in r[1:]] for r in rows[1:]}
    with truth_csv.open(newline="") as handle:
        truth = {r["Id"]: r["Tags"].split() for r in csv.DictReader(handle)}
    ids = sorted(truth)
    targets = np.array([[float(c in truth[i]) for c in classes] for i in ids])
    return mean_average_precision(targets, np.array([probs[i] for i in ids]))[0]


def run_once(mode: str, seed: int, data: Path, out: Path, extra: list[str]) -> dict:
    """Train, predict and score one mode/seed; the test metrics and the wall time."""
    out.mkdir(parents=True)
    log = out / "log.txt"
    start = time.perf_counter()
    finetune("train", str(RECIPE), "--data", str(data), "--set", f"output={out}", "--set", f"train.seed={seed}",
             *MODES[mode], *extra, log=log)
    (best,) = out.glob("*/best.pt")
    submission = out / "submission.csv"
    finetune("predict", str(best), "--images", str(data / "test"), "--out", str(submission), "--probs", log=log)
    seconds = time.perf_counter() - start
    finetune("score", str(submission), "--truth", str(data / "test_truth.csv"), "--multilabel", log=log)
    score = json.loads((out / "submission_score" / "score.json").read_text())
    for checkpoint in out.glob("*/*.pt"):
        checkpoint.unlink()
    return {"mode": mode, "seed": seed, "map": test_map(out / "submission_probs.csv", data / "test_truth.csv"),
            "samples_f1": score["samples_f1"], "images": score["images"], "seconds": round(seconds, 1)}


def main() -> None:
    """Export the mosaics once, run both modes `--repeats` times, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300, help="labelled mosaics (20%% become validation)")
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's train.epochs")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = RESULTS / f"multilabel-{stamp}"
    data = folder / "data"
    folder.mkdir(parents=True)
    finetune("datasets", "fashion-mnist-multilabel", "--out", str(data), "--train", str(args.train), "--test",
             str(args.test), log=folder / "export.txt")
    extra = ["--set", f"train.epochs={args.epochs}"] if args.epochs else []
    runs = []
    for repeat in range(args.repeats):
        for mode in MODES:
            run = run_once(mode, repeat, data, folder / f"{mode}-{repeat + 1}", extra)
            print(f"{mode:<10}  seed {repeat}: test mAP {run['map']:.4f}  mean F1 per image {run['samples_f1']:.4f}  "
                  f"{run['seconds']:.0f} s", flush=True)
            runs.append(run)
    shutil.rmtree(data)  # a thousand PNGs; the command above writes them again
    summary = {mode: {key: statistics.median(r[key] for r in runs if r["mode"] == mode)
                      for key in ("map", "samples_f1", "seconds")} for mode in MODES}
    pre, scratch = summary["pretrained"], summary["scratch"]
    lines = [
        (f"multilabel benchmark {stamp}: {os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}, "
         f"{args.train} labelled mosaics (80% train / 20% validation), {runs[0]['images']} test mosaics, "
         f"repeats: {args.repeats}"),
        f"{'mode':<10}  {'test mAP':>8}  {'F1/image':>8}  {'wall s':>7}",
        *(f"{mode:<10}  {s['map']:8.4f}  {s['samples_f1']:8.4f}  {s['seconds']:7.0f}" for mode, s in summary.items()),
        f"pretrained / scratch: mAP x{pre['map'] / scratch['map']:.2f} (+{pre['map'] - scratch['map']:.3f}), "
        f"F1 per image x{pre['samples_f1'] / scratch['samples_f1']:.2f} "
        f"(+{pre['samples_f1'] - scratch['samples_f1']:.3f})",
    ]
    print("\n".join(lines))
    (folder / "summary.txt").write_text("\n".join(lines) + "\n")
    (folder / "runs.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
