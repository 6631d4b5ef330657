"""A small hyper-parameter study against the demo recipe's hand-picked values, on the Fashion-MNIST few-shot folder.

    .venv/bin/python benchmarks/tune_benchmark.py [--trials 5] [--data FOLDER]

Runs `finetune tune` on the demo recipe (validation loss, the recipe's own monitor), then trains
both the study's best_recipe.yaml and the hand-picked demo recipe on the same folder, predicts the
same 10 000 test images with flip TTA and scores both against the held-back answers, all in one
run. Prints both test accuracies, their difference, and the study's wall time; writes the table
to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import finetune
from finetune.workflows.datasets import export_fashion_mnist
from finetune.outputs.scoring import score_csv
from finetune.workflows.tune import TrialBudget, tune

RESULTS = Path(__file__).resolve().parent / "results"
# Around the demo's hand-picked values (lr 0.002, label smoothing 0.1, 4 trainable blocks, mixup 0.2).
SPACE = {
    "train.lr": {"log_uniform": [5.0e-4, 5.0e-3]},
    "train.label_smoothing": {"uniform": [0.0, 0.15]},
    "model.trainable_last": {"int": [2, 6]},
    "augment.mixup": {"choice": [0.0, 0.2, 0.4]},
}


def test_accuracy(recipe, data: Path, out: Path, truth: Path, log) -> tuple[float, float]:
    """Train a recipe, predict the test folder with flip TTA, score it; (test accuracy, seconds)."""
    start = time.perf_counter()
    result = finetune.train(recipe, data=data, overrides=[f"output={out}"], log=log)
    submission = finetune.predict(result.best_checkpoint, data / "test", out / f"{result.run_dir.name}.csv",
                                  inference=finetune.InferenceOptions(tta="flip"), log=log)
    metrics = score_csv(submission, truth, out_dir=out / f"{result.run_dir.name}_score", classes=result.classes)
    return metrics["accuracy"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--data", type=Path, default=None, help="a `finetune datasets fashion-mnist` folder")
    parser.add_argument("--out", type=Path, default=RESULTS / "tune_benchmark")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or export_fashion_mnist(out / "fashion_mnist", reuse=True).root
    data, truth = Path(data).resolve(), Path(data).resolve() / "test_truth.csv"
    log_file = (out / "log.txt").open("a")

    def log(line: str) -> None:
        log_file.write(line + "\n")
        log_file.flush()

    start = time.perf_counter()
    study = tune("demo_fashion_mnist_lite0", space=SPACE, budget=TrialBudget(args.trials, startup_trials=2), data=data,
                 overrides=[f"output={out}"], log=log)
    study_seconds = time.perf_counter() - start
    tuned, tuned_seconds = test_accuracy(study.best_recipe, data, out / "tuned", truth, log)
    hand, hand_seconds = test_accuracy("demo_fashion_mnist_lite0", data, out / "hand_picked", truth, log)
    row = {"trials": args.trials, "study_seconds": round(study_seconds), "best_values": study.best_params,
           "tuned_test_accuracy": tuned, "hand_picked_test_accuracy": hand, "difference": tuned - hand,
           "train_predict_seconds": {"tuned": round(tuned_seconds), "hand_picked": round(hand_seconds)},
           "machine": f"{platform.machine()}, {platform.python_version()}"}
    print(json.dumps(row, indent=2))
    (RESULTS / "tune_benchmark.json").write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
