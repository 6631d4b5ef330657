"""Loader throughput on large JPEGs: decode once (header check + reduced-scale JPEG decode) against the old path.

    python benchmarks/loader_benchmark.py [--images 192] [--source-size 512] [--size 128] [--repeats 3]

Writes `--images` real-photo `--source-size` px JPEGs (crops of scikit-learn's sample photographs), then
times, in one process and one run:

- old: every image fully decoded once by the pre-training check (check_images), then an epoch of the
  training loader decoding each image at full size;
- new: the header-only check (check_headers), then an epoch of the training loader decoding each JPEG at the
  reduced scale the augmentation allows (load_rgb's min_side, PIL draft).

Both epochs use the same training transform (preset light at `--size` px, batch 32, workers 0 so the numbers
measure decode + augment work, not process start-up). Prints the median images/s of `--repeats` rounds and
the new/old ratios; an optional `--cache ram|disk` row times epoch 2+ from the pre-resized image cache.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.cache import ImageCache
from finetune.data.images import check_headers, check_images, load_rgb
from finetune.data.loaders import ImageDataset, make_loader
from finetune.data.preprocessing import Preprocessing
from finetune.data.sources import Sample
from finetune.data.transforms import build_train_transform, train_decode_side


def write_photos(folder: Path, count: int, size: int) -> list[Sample]:
    """Real-photo JPEGs (quality 90), 4:3 with shorter side `size`: random crops of scikit-learn's two sample
    photographs (china.jpg, flower.jpg), upscaled, flipped and colour-shifted so every file differs."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photographs, shipped with scikit-learn
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        crop_h = int(height * rng.uniform(0.7, 1.0))
        crop_w = min(width, crop_h * 4 // 3)
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize((size * 4 // 3, size),
                                                                                    Image.BICUBIC)
        array = np.asarray(image, dtype=np.int16) + rng.integers(-20, 21, size=3)
        if i % 2:
            array = array[:, ::-1]
        path = folder / f"{i % 4}_{i}.jpg"
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path, quality=90)
        samples.append(Sample(path, i % 4))
    return samples


def epoch_seconds(samples: list[Sample], transform, read, batch_size: int) -> float:
    """One pass of a training loader (shuffled, workers 0) over `samples`."""
    loader = make_loader(ImageDataset(samples, transform, read), batch_size, 0, shuffle=True, seed=0)
    start = time.perf_counter()
    for _images, _labels in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    """Time both paths `--repeats` times and print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--source-size", type=int, default=512)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pre = Preprocessing(size=args.size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                        interpolation="bilinear", crop_pct=0.875)
    transform = build_train_transform(pre, "light", seed=0)
    min_side = train_decode_side(pre, "light")
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_photos(Path(tmp), args.images, args.source_size)
        paths = [s.path for s in samples]
        rows: dict[str, list[float]] = {"old check": [], "old epoch": [], "new check": [], "new epoch": [],
                                        "ram cache fill": [], "ram cache epoch 2+": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            check_images(paths)
            rows["old check"].append(time.perf_counter() - start)
            rows["old epoch"].append(epoch_seconds(samples, transform, load_rgb, args.batch_size))
            start = time.perf_counter()
            check_headers(paths)
            rows["new check"].append(time.perf_counter() - start)
            rows["new epoch"].append(epoch_seconds(samples, transform, lambda p: load_rgb(p, min_side),
                                                   args.batch_size))
            cache = ImageCache("ram", None, min_side)
            start = time.perf_counter()
            cache.fill(paths)  # decode + resize once (threads), before the first epoch; later epochs read copies
            rows["ram cache fill"].append(time.perf_counter() - start)
            rows["ram cache epoch 2+"].append(epoch_seconds(samples, transform, cache.read, args.batch_size))
    n = args.images
    median = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{n} JPEGs {args.source_size * 4 // 3}x{args.source_size} -> {args.size}px training crops "
          f"(preset light, decoded shorter side >= {min_side}), median of {args.repeats}")
    for key, seconds in median.items():
        print(f"  {key:<20} {seconds:7.3f} s  {n / seconds:8.1f} images/s")
    old_first = median["old check"] + median["old epoch"]
    new_first = median["new check"] + median["new epoch"]
    print(f"first pass (check + epoch 1): old {n / old_first:.1f} images/s, new {n / new_first:.1f} images/s, "
          f"ratio new/old {old_first / new_first:.2f}x")
    cached_first = median["new check"] + median["ram cache fill"] + median["ram cache epoch 2+"]
    print(f"first pass with data.cache ram (check + fill + epoch 1): {n / cached_first:.1f} images/s, "
          f"ratio to old {old_first / cached_first:.2f}x")
    print(f"epoch 2+: old {n / median['old epoch']:.1f}, new {n / median['new epoch']:.1f} "
          f"({median['old epoch'] / median['new epoch']:.2f}x), ram cache {n / median['ram cache epoch 2+']:.1f} "
          f"images/s ({median['old epoch'] / median['ram cache epoch 2+']:.2f}x old)")


if __name__ == "__main__":
    main()
