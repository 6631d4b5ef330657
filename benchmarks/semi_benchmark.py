"""Labels only vs pseudo-label rounds: Fashion-MNIST with few labels and an unlabeled pool (HW03 2021 layout).

    .venv/bin/python benchmarks/semi_benchmark.py [--seeds 0 1 2] [--per-class 30] [--unlabeled 5000]
        [--test-limit K] [--rounds 2] [--threshold 0.9] [--max-per-class 100] [--set KEY=VALUE ...]

The issue's setting is the default: 30 labelled images per class (+ 20 per class for validation),
5 000 unlabeled training images, all 10 000 test images, 2 rounds, seeds 0 1 2. One export (data seed
0) in the 2021 layout (`finetune datasets fashion-mnist --layout hw03-2021 --unlabeled N`), then for
each training seed one `semi:` run of the demo recipe (demo_fashion_mnist_lite0, pretrained Lite0,
offline): round 0 is the labels-only teacher, round r a student trained from the same pretrained
weights with the same recipe and epochs on the labels plus round r-1's pseudo-labels. Every round's
best checkpoint is scored on the test images: accuracy, and ECE before and after its temperature.
Prints the table (medians over seeds, and each round's gain over labels only in points) and writes
it to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from finetune.data.sources import Sample
from finetune.workflows.datasets import FashionMNISTSplit, export_fashion_mnist
from finetune.engine.temperature import apply_temperature
from finetune.inference.predict import ProbsSettings, load_model, predict_probs
from finetune.outputs.figures.calibration import calibration_bins
from finetune.workflows.semi import train_semi

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = "demo_fashion_mnist_lite0"


def test_answers(export) -> list[tuple[Path, str]]:
    """The test images with their answers (test_truth.csv): (path, class name)."""
    lines = export.truth_csv.read_text().splitlines()[1:]
    return [(export.test_dir / f"{i}.png", c) for i, c in (line.split(",") for line in lines)]


def score(checkpoint: Path, answers: list[tuple[Path, str]], workers: int) -> dict:
    """Test accuracy and ECE before and after the checkpoint's temperature (one model, no TTA)."""
    loaded = load_model(checkpoint, "cpu")
    index = {c: i for i, c in enumerate(loaded.classes)}  # the model's order (sorted), not the export's
    samples = [Sample(path, index[name]) for path, name in answers]
    raw = predict_probs(loaded, samples, ProbsSettings(128, workers, calibrated=False))
    calibrated = apply_temperature(raw, loaded.temperature)
    labels = [s.target for s in samples]
    return {"accuracy": float((raw.argmax(1) == np.array(labels)).mean()), "temperature": loaded.temperature,
            "ece_raw": calibration_bins(raw, labels).ece, "ece_calibrated": calibration_bins(calibrated, labels).ece}


def main() -> None:
    """Export once, one semi run per seed, score every round on the test images, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--unlabeled", type=int, default=5000)
    parser.add_argument("--test-limit", type=int, default=None, help="first K test images (default all 10 000)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--max-per-class", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 on a shared, busy CPU: a second thread mostly waits)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every round, e.g. --set train.epochs=10")
    parser.add_argument("--out", default=None, help="work folder (default benchmarks/results/semi-<time>)")
    parser.add_argument("--combine", nargs="+", metavar="JSON", default=None,
                        help="print the table of earlier runs' semi_benchmark.json files together (seeds run "
                             "as parallel processes) instead of running")
    args = parser.parse_args()
    if args.combine:
        rows = [row for path in args.combine for row in json.loads(Path(path).read_text())["rows"]]
        print_table(rows)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.out) if args.out else RESULTS / f"semi-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    split = FashionMNISTSplit(args.per_class, args.val_per_class, args.test_limit)
    export = export_fashion_mnist(folder / "data", split, unlabeled=args.unlabeled, layout="hw03-2021", reuse=True)
    samples = test_answers(export)
    rows = []
    for seed in args.seeds:
        overrides = [f"train.seed={seed}", f"data.num_workers={args.workers}", f"output={folder / 'runs'}",
                     f"name=seed{seed}", f"semi.rounds={args.rounds}", f"semi.threshold={args.threshold}",
                     f"semi.max_per_class={args.max_per_class}", f"semi.truth={export.unlabeled_truth}", *args.set]
        start = time.perf_counter()
        result = train_semi(RECIPE, data=export.root, overrides=overrides)
        seconds = time.perf_counter() - start
        for summary, trained in zip(result.summary["rounds"], result.rounds):
            rows.append({"seed": seed, "round": summary["round"], "pseudo_labels": summary["pseudo_labels"],
                         "pseudo_label_accuracy": summary.get("pseudo_label_accuracy"),
                         "val_accuracy": summary["val_score"], **score(trained.best_checkpoint, samples,
                                                                           args.workers),
                         "semi_run_seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"Fashion-MNIST, {args.per_class} labelled/class, {args.unlabeled} unlabeled, {len(samples)} test images, "
          f"seeds {args.seeds}, threshold {args.threshold}, max {args.max_per_class}/class, overrides {args.set}")
    table = print_table(rows)
    meta = {"command": " ".join(sys.argv), "machine": platform.platform(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "test_images": len(samples)}
    (folder / "semi_benchmark.json").write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2))
    print(f"written to {folder / 'semi_benchmark.json'}")


def print_table(rows: list[dict]) -> list[dict]:
    """Medians over seeds per round: test accuracy, gain over labels only (points), ECE, pseudo-labels."""
    table = []
    for r in sorted({row["round"] for row in rows}):
        mine = [row for row in rows if row["round"] == r]
        base = {row["seed"]: row["accuracy"] for row in rows if row["round"] == 0}
        gain = [100 * (row["accuracy"] - base[row["seed"]]) for row in mine]
        table.append({"round": r, "median_test_accuracy": statistics.median(row["accuracy"] for row in mine),
                      "median_gain_points": statistics.median(gain),
                      "median_ece_raw": statistics.median(row["ece_raw"] for row in mine),
                      "median_ece_calibrated": statistics.median(row["ece_calibrated"] for row in mine),
                      "median_pseudo_labels": statistics.median(row["pseudo_labels"] for row in mine)})
    print(f"seeds {sorted({row['seed'] for row in rows})}; medians over seeds")
    print("round  test_acc  gain(points)  ECE raw -> calibrated  pseudo-labels")
    for t in table:
        print(f"{t['round']:>5}  {t['median_test_accuracy']:.4f}  {t['median_gain_points']:+12.2f}  "
              f"{t['median_ece_raw']:.4f} -> {t['median_ece_calibrated']:.4f}  {t['median_pseudo_labels']:>13}")
    return table


if __name__ == "__main__":
    main()
