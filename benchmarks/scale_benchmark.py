"""How `finetune train`'s start-up and memory grow with the number of images, per data layout.

    python benchmarks/scale_benchmark.py [--sizes 10000 100000 1000000] [--layouts folder csv shards] [--work DIR]

For each size the benchmark writes tiny images once (16x16 PNGs in 10 class folders, `--variants` distinct
images copied byte for byte under new names: writing a million files takes minutes, encoding a million PNGs
would take far longer, and start-up reads only names, sizes and headers) plus a CSV manifest of the same files.
The shards layout is that folder written once by `finetune datasets shard` (1 000 images per shard; the time it
took is printed). Then, per layout, it runs the command a user types,

    finetune train scale.yaml --data DIR --set model.backbone=test_resnet --set data.image_size=32 ... --set train.progress_every=5

as a child process, and reads its log as it comes: the seconds from starting the command to each line (to the
first training step: the start-up), the peak memory of the process tree (sampled every 50 ms: the main process and
its loader workers, proportional set sizes summed, so that the pages they share count once), and the images/s of the progress lines over the first `--train-seconds` of
the first epoch. Then it stops the run. Printed: one table row per layout and size, and the slowest phases.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"class_{k}" for k in range(10)]
VAL_PER_CLASS = 20
TRAIN_SETTINGS = ["model.backbone=test_resnet", "data.image_size=32", "data.batch_size=64", "train.epochs=1",
                  "augment.preset=light", "train.loggers=[csv]", "train.progress_every=5"]


def tiny_pngs(variants: int) -> list[bytes]:
    """`variants` distinct 16x16 PNG files' bytes."""
    images = []
    for k in range(variants):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (k * 37 % 256, k * 91 % 256, k * 13 % 256)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def write_images(root: Path, count: int, variants: int) -> Path:
    """`count` training images in class folders under root/train, VAL_PER_CLASS per class in root/val, and
    root/manifest.csv (path,label) listing both; kept between runs (a finished folder has root/done)."""
    if (root / "done").exists():
        return root
    blobs = tiny_pngs(variants)
    rows = []
    for split, per_class in (("train", count // len(CLASSES)), ("val", VAL_PER_CLASS)):
        for label in CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                name = f"{split}/{label}/{label}_{k:07d}.png"
                (root / name).write_bytes(blobs[k % variants])
                rows.append((name, label))
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    (root / "done").write_text("")
    return root


def write_shards(root: Path) -> tuple[Path, float]:
    """root's class folders as shards (`finetune datasets shard`, 1 000 images each) in root/shards, once; the
    folder and the seconds the command took (0 when they were already written)."""
    shards = root / "shards"
    if (shards / "done").exists():
        return shards, 0.0
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune", "datasets", "shard", str(root), "--out", str(shards),
                    "--set", "data.layout=folder"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    (shards / "done").write_text("")
    return shards, time.perf_counter() - began


def layout_settings(layout: str, root: Path) -> list[str]:
    """The recipe settings that read `root` with `layout`."""
    if layout == "folder":
        return ["data.layout=folder"]
    if layout == "shards":
        return ["data.layout=shards"]
    if layout == "csv":
        share = VAL_PER_CLASS * len(CLASSES) / sum(1 for _ in (root / "manifest.csv").open()) - 1e-6
        return ["data.layout=csv", f"data.csv={root / 'manifest.csv'}", f"data.val_fraction={max(share, 0.001):.6f}"]
    raise ValueError(layout)


class TreeMemory(threading.Thread):
    """The peak memory of a process and its children (proportional set sizes, summed), sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, sum(_pss(p) for p in _tree(self.pid)))
            time.sleep(0.05)


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as handle:
                todo += [int(child) for child in handle.read().split()]
        except OSError:
            pass
    return found


def _pss(pid: int) -> int:
    """A process's proportional set size: pages shared with its forked workers count once over the tree."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def run_once(layout: str, root: Path, out: Path, train_seconds: float) -> dict:
    """One `finetune train` until `train_seconds` after its first step: start-up, peak memory, images/s."""
    recipe = out.parent / "scale.yaml"
    recipe.write_text("name: scale\n")
    root = root / "shards" if layout == "shards" else root
    command = [sys.executable, "-m", "finetune", "train", str(recipe), "--data", str(root), "--set", f"output={out}",
               *[arg for value in [*TRAIN_SETTINGS, *layout_settings(layout, root)] for arg in ("--set", value)]]
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    memory = TreeMemory(child.pid)
    memory.start()
    lines, first_step, rates = [], None, []
    for line in child.stdout:
        now = time.perf_counter() - started
        lines.append((now, line.rstrip()))
        if line.startswith("first training step done"):
            first_step = now
        match = re.search(r"step \d+/\d+ \(\d+%\), (\d+) images/s", line)
        if match and first_step is not None:
            rates.append(int(match.group(1)))
            if now - first_step >= train_seconds:
                break
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    memory.running = False
    memory.join()
    if first_step is None:
        raise SystemExit(f"{layout} at {root}: no first step; its log:\n" + "\n".join(text for _, text in lines))
    return {"startup": first_step, "peak_gib": memory.peak / 2**30, "images_per_s": rates[-1] if rates else None,
            "lines": lines}


def phases(lines: list[tuple[float, str]]) -> str:
    """The three longest gaps between log lines before the first step: where start-up goes."""
    gaps = []
    previous = 0.0
    for when, text in lines:
        gaps.append((when - previous, text))
        previous = when
        if text.startswith("first training step done"):
            break
    gaps.sort(reverse=True)
    return "; ".join(f"{seconds:.1f} s before '{text[:60]}'" for seconds, text in gaps[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--layouts", nargs="+", default=["folder", "csv", "shards"],
                        choices=["folder", "csv", "shards"])
    parser.add_argument("--repeats", type=int, default=1, help="runs per layout and size (medians)")
    parser.add_argument("--variants", type=int, default=64, help="distinct images among the copies")
    parser.add_argument("--train-seconds", type=float, default=15.0, help="training time measured after the first step")
    parser.add_argument("--work", type=Path, help="keep the generated images here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        work = args.work or Path(tmp)
        print("| layout | images | start-up (s) | peak memory (GiB) | images/s (first epoch) | longest phases |")
        print("|---|---|---|---|---|---|")
        for size in args.sizes:
            began = time.perf_counter()
            root = write_images(work / f"images{size}", size, args.variants)
            print(f"<!-- {size} images ready in {time.perf_counter() - began:.0f} s -->", flush=True)
            if "shards" in args.layouts:
                _, seconds = write_shards(root)
                print(f"<!-- {size} images written as shards in {seconds:.0f} s (0: written before) -->", flush=True)
            for layout in args.layouts:
                runs = [run_once(layout, root, work / "runs", args.train_seconds) for _ in range(args.repeats)]
                startup = statistics.median(r["startup"] for r in runs)
                peak = statistics.median(r["peak_gib"] for r in runs)
                rates = [r["images_per_s"] for r in runs if r["images_per_s"]]
                rate = f"{statistics.median(rates):.0f}" if rates else "-"
                print(f"| {layout} | {size:,} | {startup:.1f} | {peak:.2f} | {rate} | {phases(runs[0]['lines'])} |",
                      flush=True)


if __name__ == "__main__":
    main()
