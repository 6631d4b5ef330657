"""The data audit against planted problems: flipped labels and test images leaked into training.

    python benchmarks/audit_benchmark.py [--seeds 0 1 2] [--noise 0.05 0.10 0.20] [--methods features kfold]
        [--per-class 100] [--leaks 10] [--folds 5] [--kfold-noise 0.10] [--train-noise 0.10] [--json audit.json]
        [--kfold-set train.epochs=10] [--train-set train.epochs=10] [--work DIR]
    python benchmarks/audit_benchmark.py --quick      # features only, one seed, no training

Each seed writes Fashion-MNIST with `finetune datasets` (Debian's dataset-fashion-mnist when installed:
`--per-class` training and `--val-per-class` validation images per class, `--test-images` test images), then for
each noise level copies it and:

- flips a seeded share of the training images' labels (each moved into another, random class folder);
- copies `--leaks` test images into training, in their true class, as PNGs resized from 28 to 30 px under new
  names (a slight resize: not byte-identical, so only the embeddings can find them).

`finetune.audit` then runs with each `--method` (the demo recipe: Lite0 from the packaged ImageNet weights, 96 px;
`kfold` fine-tunes `--folds` folds, only at `--kfold-noise`, with `--kfold-set` overrides). Reported: precision and
recall of the flagged images against the flipped ones; the same for today's baseline (rank every image by its
out-of-sample loss, i.e. its label's probability, and flag as many as the audit did); recall of the planted leak
pairs and the number of other pairs reported; the audit's time. At `--train-noise`, the demo recipe is trained on
the noisy folder, on the manifests `--fix drop` and `--fix relabel` wrote from the `--train-method` audit, and on the
clean folder; test accuracy of each. Figures are medians over the seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune import AuditOptions, audit, predict, train  # noqa: E402
from finetune.workflows.datasets import FashionMNISTSplit, export_fashion_mnist  # noqa: E402

DEMO = ROOT / "recipes" / "demo_fashion_mnist_lite0.yaml"
quiet = lambda line: None  # noqa: E731


def plant(clean: Path, noisy: Path, noise: float, leaks: int, seed: int) -> tuple[set[Path], set[tuple[Path, Path]]]:
    """Copy `clean` to `noisy`, flip `noise` of its training labels and leak `leaks` resized test images into
    training: the flipped paths, and the (leaked copy, test original) pairs."""
    shutil.copytree(clean, noisy)
    rng = random.Random(seed)
    classes = sorted(p.name for p in (noisy / "train").iterdir())
    images = sorted((noisy / "train").rglob("*.png"))
    flipped = set()
    for path in rng.sample(images, round(noise * len(images))):
        target = noisy / "train" / rng.choice([c for c in classes if c != path.parent.name]) / f"flip_{path.name}"
        path.rename(target)
        flipped.add(target)
    with (noisy / "test_truth.csv").open() as handle:
        truth = {row["Id"]: row["Category"] for row in csv.DictReader(handle)}
    planted = set()
    for k, test in enumerate(rng.sample(sorted((noisy / "test").glob("*.png")), leaks)):
        copy = noisy / "train" / truth[test.stem] / f"holiday_{k:03d}.png"
        with Image.open(test) as image:
            image.resize((30, 30), Image.BICUBIC).save(copy)
        planted.add((copy, test))
    return flipped, planted


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def precision_recall(flagged: set[Path], truth: set[Path]) -> tuple[float, float]:
    hits = len(flagged & truth)
    return hits / max(len(flagged), 1), hits / max(len(truth), 1)


def score_audit(folder: Path, flipped: set[Path], planted: set[tuple[Path, Path]]) -> dict:
    """Precision/recall of the audit's flags and of the top-loss baseline, leak recall and other pairs."""
    flagged = {Path(r["path"]) for r in rows(folder / "label_issues.csv")}
    ranking = [Path(r["path"]) for r in rows(folder / "label_quality.csv")]  # lowest label probability first
    baseline = set(ranking[:len(flagged)])
    pairs = {frozenset((Path(r["path_a"]), Path(r["path_b"]))) for r in rows(folder / "duplicates.csv")}
    wanted = {frozenset(pair) for pair in planted}
    precision, recall = precision_recall(flagged, flipped)
    base_precision, base_recall = precision_recall(baseline, flipped)
    summary = json.loads((folder / "audit.json").read_text())
    return {"flagged": len(flagged), "precision": precision, "recall": recall, "baseline_precision": base_precision,
            "baseline_recall": base_recall, "leak_recall": len(pairs & wanted) / max(len(wanted), 1),
            "false_pairs": len(pairs - wanted), "seconds": summary["seconds"]["total"]}


def test_accuracy(recipe_settings: list[str], data: Path, out: Path, truth: Path) -> float:
    """Train the demo recipe as `recipe_settings` say and score its predictions on data/test."""
    result = train(DEMO, data=data, overrides=[f"output={out}", "train.loggers=[csv]", *recipe_settings], log=quiet)
    submission = out / "submission.csv"
    predict(result.best_checkpoint, data / "test", out=submission, log=quiet)
    answers = {r["Id"]: r["Category"] for r in rows(truth)}
    predicted = {r["Id"]: r["Category"] for r in rows(submission)}
    return sum(predicted[k] == v for k, v in answers.items()) / len(answers)


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> list[dict]:
    """Every noise level and method for one seed; the training comparison at --train-noise."""
    split = FashionMNISTSplit(per_class=args.per_class, val_per_class=args.val_per_class, test_limit=args.test_images)
    shutil.rmtree(work / f"clean{seed}", ignore_errors=True)  # a kept --work folder: written again, identically
    clean = export_fashion_mnist(work / f"clean{seed}", split, seed=seed).root
    results = []
    for noise in args.noise:
        noisy = work / f"noisy{seed}_{noise}"
        shutil.rmtree(noisy, ignore_errors=True)
        flipped, planted = plant(clean, noisy, noise, args.leaks, seed)
        for method in args.methods:
            if method == "kfold" and noise != args.kfold_noise:
                continue
            folder = work / f"audit{seed}_{noise}_{method}"
            settings = [f"output={work / 'runs'}", f"name=kfold{seed}_{noise}", "train.loggers=[csv]",
                        *(args.kfold_set if method == "kfold" else [])]
            # The folds of a kept --work folder are reused, as `finetune audit RUN_FOLDER` does: no second training.
            folds = work / "runs" / f"kfold{seed}_{noise}"
            source = folds if method == "kfold" and (folds / "cv_summary.json").is_file() else DEMO
            start = time.perf_counter()
            audit(source, data=noisy, out=folder, overrides=settings, write_manifest=folder / "drop.csv",
                  options=AuditOptions(method=method, folds=args.folds), log=quiet)
            row = {"seed": seed, "noise": noise, "method": method, **score_audit(folder, flipped, planted),
                   "wall_seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps(row), flush=True)
            results.append(row)
        if noise == args.train_noise and args.train_method in args.methods:
            results.append(train_comparison(seed, noise, clean, noisy, work, args))
    return results


def train_comparison(seed: int, noise: float, clean: Path, noisy: Path, work: Path, args: argparse.Namespace) -> dict:
    """Test accuracy trained on the noisy folder, the two cleaned manifests and the clean folder."""
    folder = work / f"audit{seed}_{noise}_{args.train_method}"
    relabel = folder / "relabel.csv"
    _relabel_from(folder, relabel)
    truth = noisy / "test_truth.csv"
    seeds = [f"train.seed={seed}", *args.train_set]
    # A manifest holds train + val; its validation share is split off again, as many as the folder's val/ holds.
    share = args.val_per_class / (args.per_class + args.val_per_class)
    manifest = [*seeds, "data.layout=csv", f"data.val_fraction={share:.4f}"]
    row = {"seed": seed, "noise": noise, "method": f"train on ({args.train_method} audit)",
           "noisy": test_accuracy(seeds, noisy, work / f"t_noisy{seed}", truth),
           "drop": test_accuracy([*manifest, f"data.csv={folder / 'drop.csv'}"], noisy, work / f"t_drop{seed}", truth),
           "relabel": test_accuracy([*manifest, f"data.csv={relabel}"], noisy, work / f"t_relabel{seed}", truth),
           "clean": test_accuracy(seeds, clean, work / f"t_clean{seed}", truth)}
    print(json.dumps(row), flush=True)
    return row


def _relabel_from(folder: Path, out: Path) -> None:
    """What `--fix relabel` writes, from the audit's label_quality.csv and label_issues.csv (a second audit
    would fine-tune the folds again)."""
    issues = {r["path"]: r["suggested"] for r in rows(folder / "label_issues.csv")}
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for r in rows(folder / "label_quality.csv"):
            writer.writerow([r["path"], issues.get(r["path"], r["given"])])


def summarise(results: list[dict]) -> list[str]:
    """Markdown: medians per noise level and method, and the training comparison."""
    lines = ["| noise | method | flagged | precision | recall | top-loss precision | top-loss recall | leak recall "
             "| other pairs | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["noise"], r["method"]) for r in results if "precision" in r})
    for noise, method in keys:
        group = [r for r in results if r.get("noise") == noise and r["method"] == method and "precision" in r]
        m = {k: statistics.median(r[k] for r in group) for k in ("flagged", "precision", "recall",
                                                               "baseline_precision", "baseline_recall",
                                                               "leak_recall", "false_pairs", "seconds")}
        lines.append(f"| {noise:.0%} | {method} | {m['flagged']:.0f} | {m['precision']:.3f} | {m['recall']:.3f} | "
                     f"{m['baseline_precision']:.3f} | {m['baseline_recall']:.3f} | {m['leak_recall']:.2f} | "
                     f"{m['false_pairs']:.0f} | {m['seconds']:.0f} |")
    trained = [r for r in results if "noisy" in r]
    if trained:
        m = {k: statistics.median(r[k] for r in trained) for k in ("noisy", "drop", "relabel", "clean")}
        recovered = {k: (m[k] - m["noisy"]) / max(m["clean"] - m["noisy"], 1e-9) for k in ("drop", "relabel")}
        lines += ["", f"Test accuracy ({trained[0]['method']}, medians of {len(trained)} seed(s)): noisy "
                  f"{m['noisy']:.4f}, --fix drop {m['drop']:.4f} ({recovered['drop']:.0%} of the loss recovered), "
                  f"--fix relabel {m['relabel']:.4f} ({recovered['relabel']:.0%}), clean {m['clean']:.4f}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    parser.add_argument("--methods", nargs="+", default=["features", "kfold"], choices=["features", "kfold"])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--leaks", type=int, default=10)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--kfold-noise", type=float, default=0.10, help="the noise level the kfold method runs at")
    parser.add_argument("--kfold-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for the kfold method's folds, e.g. train.epochs=10")
    parser.add_argument("--train-noise", type=float, default=0.10,
                        help="the noise level trained on noisy / cleaned / clean data (-1: no training)")
    parser.add_argument("--train-method", default="kfold", choices=["features", "kfold"],
                        help="whose manifests the training comparison uses")
    parser.add_argument("--train-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for the training comparison, e.g. train.epochs=10")
    parser.add_argument("--quick", action="store_true", help="features only, seed 0, 10%% noise, no training")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--work", type=Path, help="keep the data, audits and runs here (default: a temporary folder)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.noise, args.methods, args.train_noise = [0], [0.10], ["features"], -1
    results = []
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        work = args.work or Path(tmp)
        for seed in args.seeds:
            results += run_seed(seed, args, work)
    print("\n".join(summarise(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
