"""Sharing a model: the demo checkpoint as PyTorch fp32, ONNX fp32 and ONNX int8 on the same test images, and its
timm model folder used without finetune against `finetune predict`.

    python benchmarks/sharing_benchmark.py [--test-images 2000] [--repeats 3] [--batch-size 64]
        [--checkpoint runs/x/best.pt --data DIR]     # an existing run instead of training the demo recipe

Without --checkpoint it trains the demo recipe (Lite0 from the packaged ImageNet weights, 96 px, 20 epochs) on
the Fashion-MNIST export `finetune demo` uses (100 training and 20 validation images per class, the first
`--test-images` test images). Then `finetune export --format onnx` and `finetune export --quantize int8`
(onnxruntime's static quantization, calibrated on 300 of the run's training images, checked against fp32 on its
validation images). All three models score the same preprocessed test tensors (decoding and resizing are done
once, before timing, so the figures compare the models): images/s is the median of `--repeats` passes, the
three alternating within each pass, after one warm-up pass; accuracy against the export's answers; file sizes
on disk. PyTorch runs the model `finetune predict` runs (BatchNorm folded into the convolutions).

Then `finetune export --format timm`, and the model card's code run in a fresh process where finetune cannot be
imported (timm, its preprocess.py) on the same test images: the largest difference from `finetune predict`'s
calibrated probabilities, and whether the top class ever differs.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from finetune.data.images import list_images
from finetune.inference.export import export_model
from finetune.inference.predict import ProbsSettings, load_model, predict_probs
from finetune.data.sources import Sample
from finetune.inference.quantize import preprocessed
from finetune.workflows.api import train
from finetune.workflows.datasets import FashionMNISTSplit, export_fashion_mnist
from finetune.workflows.demo import DEMO_RECIPE
from finetune.workflows.sharing import export

quiet = lambda line: None  # noqa: E731


def demo_checkpoint(work: Path, test_images: int) -> tuple[Path, Path, Path]:
    """Train the demo recipe on its Fashion-MNIST export: (best checkpoint, test folder, answers CSV)."""
    data = export_fashion_mnist(work / "fashion_mnist", FashionMNISTSplit(test_limit=test_images), reuse=True)
    result = train(str(DEMO_RECIPE), data=data.root, overrides=[f"output={work / 'runs'}"], log=quiet)
    return result.best_checkpoint, data.test_dir, data.truth_csv


def timed(runs: dict[str, Callable[[np.ndarray], np.ndarray]], batches: list[np.ndarray],
          repeats: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Median seconds of one pass over `batches` for each model (alternating), and each model's logits."""
    logits = {name: np.concatenate([run(b) for b in batches]) for name, run in runs.items()}  # warm-up pass
    spent: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            for batch in batches:
                run(batch)
            spent[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in spent.items()}, logits


def main() -> None:
    """Train (or take) a checkpoint, export fp32 and int8 ONNX, time and score all three, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="an existing run's best.pt (default: train the demo)")
    parser.add_argument("--data", type=Path, help="with --checkpoint: a folder holding test/ and test_truth.csv")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.checkpoint:
            checkpoint, test_dir, truth = args.checkpoint, args.data / "test", args.data / "test_truth.csv"
        else:
            checkpoint, test_dir, truth = demo_checkpoint(work, args.test_images)
        fp32 = export_model(checkpoint, "onnx", out=work / "model.onnx", log=quiet).path
        lines: list[str] = []
        int8 = export(checkpoint, quantize="int8", out=work / "model.int8.onnx", log=lines.append).path
        loaded = load_model(checkpoint, fuse=True)
        paths = list_images(test_dir)[: args.test_images]
        batches = [b for b in _batches(loaded.preprocessing, paths, args.batch_size)]
        runs = {"PyTorch fp32 (BatchNorm folded)": _torch_run(loaded.model), "ONNX fp32": _onnx_run(fp32),
                "ONNX int8": _onnx_run(int8)}
        seconds, logits = timed(runs, batches, args.repeats)
        answers = {row["Id"]: row["Category"] for row in csv.DictReader(truth.open())}
        truth_index = np.array([loaded.classes.index(answers[p.stem]) for p in paths])
        sizes = {"PyTorch fp32 (BatchNorm folded)": checkpoint.stat().st_size, "ONNX fp32": fp32.stat().st_size,
                 "ONNX int8": int8.stat().st_size}
        base = len(paths) / seconds["PyTorch fp32 (BatchNorm folded)"]
        print(f"{len(paths)} test images at {loaded.preprocessing.size} px, batch {args.batch_size}, "
              f"{torch.get_num_threads()} torch threads, median of {args.repeats} passes; {lines[-1]}\n")
        print("| model | file | images/s | vs PyTorch fp32 | test accuracy |\n|---|---|---|---|---|")
        for name in runs:
            rate = len(paths) / seconds[name]
            accuracy = float(np.mean(logits[name].argmax(1) == truth_index))
            print(f"| {name} | {sizes[name] / 1e6:.1f} MB | {rate:.0f} | {rate / base:.2f}x | {accuracy:.4f} |")
        print("\n(PyTorch's file is the checkpoint finetune predict reads, best.pt.)\n")
        print(timm_folder_check(checkpoint, paths, work))


def timm_folder_check(checkpoint: Path, paths: list[Path], work: Path) -> str:
    """The timm folder's probabilities (the card's code, finetune not importable) against finetune's."""
    folder = export(checkpoint, "timm", out=work / "timm_model", log=quiet).path
    card = (folder / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('folder = "."', f"folder = {str(folder)!r}")
    code = code.replace('images = ["photo.jpg"]', f"images = {[str(p) for p in paths]!r}")
    code = code.replace("for path, p in zip(images, probs):\n    print(", "for path, p in []:\n    print(")
    dump = work / "timm_probs.json"
    script = work / "use_timm_folder.py"
    script.write_text("import sys\nsys.modules['finetune'] = None\n" + code
                      + f"\njson.dump(probs.tolist(), open({str(dump)!r}, 'w'))\n")
    subprocess.run([sys.executable, str(script)], cwd=work, check=True)
    theirs = np.array(json.loads(dump.read_text()))
    ours = predict_probs(load_model(checkpoint, fuse=True), [Sample(p) for p in paths], ProbsSettings())
    return (f"timm folder (finetune not importable) vs finetune predict on {len(paths)} test images: largest "
            f"probability difference {np.abs(theirs - ours).max():.2e}, top class differs on "
            f"{int((theirs.argmax(1) != ours.argmax(1)).sum())}")


def _batches(pre, paths: list[Path], batch_size: int) -> list[np.ndarray]:
    """The test images preprocessed once, regrouped to `batch_size`."""
    whole = np.concatenate(list(preprocessed(pre, paths)))
    return [whole[i:i + batch_size] for i in range(0, len(whole), batch_size)]


def _torch_run(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    model.eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch)).numpy()
    return run


def _onnx_run(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"input": batch})[0]


if __name__ == "__main__":
    main()
