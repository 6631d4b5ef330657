"""Rebuild models from checkpoints and run batched, streaming inference (TTA and ensembles)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from finetune.data.cores import core_budget
from finetune.data.images import load_rgb
from finetune.data.loaders import make_loader
from finetune.data.sources import Sample
from finetune.data.preprocessing import Preprocessing
from finetune.engine import distributed
from finetune.engine.checkpoint import read_checkpoint
from finetune.engine.step import autocast, check_precision
from finetune.errors import FinetuneError
from finetune.models import Classifier, build_model
from finetune.models.fusion import fused_copy
from finetune.config.options import InferenceOptions
from finetune.config.recipe import TASK_ACTIVATIONS, Recipe
from finetune.inference.tta import ViewTransform, average_views, parse_tta

__all__ = ["LoadedModel", "ProbsSettings", "check_finite_weights", "images_dataset", "load_model", "load_ensemble",
           "predict_probs", "stream_probs", "sharded_probs", "resolve_device"]


@dataclass
class LoadedModel:
    """A model ready for inference with everything its checkpoint knows."""

    model: Classifier
    classes: list[str]
    preprocessing: Preprocessing
    recipe: Recipe
    checkpoint: dict
    temperature: float = 1.0  # fitted on validation after training; checkpoints made before it hold none (1.0)

    @property
    def task_name(self) -> str:
        """The task the checkpoint names (older checkpoints: their recipe's data.task); finetune.tasks maps it."""
        return str(self.checkpoint.get("task", self.recipe.data.task))

    def apply_decision(self, decision: dict) -> None:
        """Take a freshly fitted decision state (temperature / thresholds), as best.pt now holds it."""
        self.checkpoint.update(decision)
        self.temperature = float(decision.get("temperature", self.temperature))


@dataclass(frozen=True)
class ProbsSettings:
    """How images are scored: batching, loading, test-time views, autocast precision, and calibration."""

    batch_size: int = 64
    num_workers: int = 2  # data-loading processes (0: the main process; always 0 for a single batch)
    tta: Sequence[str] = ()  # test-time views averaged per image (finetune.inference.tta), e.g. ("flip",)
    precision: str = "fp32"  # bf16 (or fp16 on CUDA) runs the models under autocast; probabilities stay float32
    calibrated: bool = True  # apply each checkpoint's fitted temperature (False: the raw softmax)

    @classmethod
    def of(cls, options: InferenceOptions, calibrated: bool = True) -> "ProbsSettings":
        """The settings a user's InferenceOptions ask for (its TTA spec parsed into views; workers left unset: the core
        budget's, as `finetune predict` prints it)."""
        workers = options.num_workers
        if workers is None:
            workers = core_budget("predict", resolve_device(options.device).type).workers
        return cls(options.batch_size, workers, parse_tta(options.tta), options.precision, calibrated)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FinetuneError(f"device '{name}' requested but CUDA is not available; use device: cpu or auto")
    return torch.device(name)


def check_finite_weights(path: Union[str, Path], state: dict) -> None:
    """Refuse weights holding NaN or inf: a diverged run's checkpoint would predict garbage without a word."""
    bad = [name for name, tensor in state.items()
           if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise FinetuneError(
            f"checkpoint {path} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[0]}: its "
            "run diverged; train again with a lower train.lr (or train.grad_clip)"
        )


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu", fuse: bool = False) -> LoadedModel:
    """Rebuild the architecture a checkpoint describes and load its weights (no download).

    `fuse` folds BatchNorm into the convolutions for prediction only (models/fusion.py): faster, same
    outputs, but the model can no longer train.
    """
    payload = read_checkpoint(path)
    check_finite_weights(path, payload["model_state"])
    recipe = Recipe.from_dict(payload["recipe"])
    recipe.model.pretrained, recipe.model.weights = False, None
    preprocessing = Preprocessing.from_dict(payload["preprocessing"])
    classes = list(payload["classes"])
    model, _ = build_model(recipe.model, len(classes), preprocessing.size)
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as err:
        raise FinetuneError(f"checkpoint {path} does not match its own recipe: {str(err).splitlines()[0]}") from None
    device = torch.device(device) if isinstance(device, str) else device
    model.to(device).eval()
    if fuse:
        # A private generator: loading a model must not move the global random state (seeds per rank).
        example = torch.randn(2, 3, preprocessing.size, preprocessing.size, generator=torch.Generator().manual_seed(0))
        model = fused_copy(model, example.to(device))
    return LoadedModel(model, classes, preprocessing, recipe, payload, float(payload.get("temperature", 1.0)))


def load_ensemble(paths: Sequence[Union[str, Path]], device: Union[str, torch.device] = "cpu",
                  fuse: bool = False) -> list[LoadedModel]:
    """Load one or more checkpoints whose class lists must be identical (same names, same order)."""
    if not paths:
        raise FinetuneError("no checkpoint given; pass one, or several to average them as an ensemble")
    models = [load_model(p, device, fuse) for p in paths]
    first = models[0].classes
    tasks = {loaded.task_name for loaded in models}
    if len(tasks) > 1:
        raise FinetuneError("cannot ensemble single-label and multi-label checkpoints (data.task differs); "
                            "average checkpoints of one kind")
    for path, loaded in zip(paths[1:], models[1:]):
        if loaded.classes != first:
            differ = sorted(set(first) ^ set(loaded.classes))
            detail = f"classes only in one of them: {differ[:10]}" if differ else "same classes in a different order"
            raise FinetuneError(
                f"cannot ensemble {paths[0]} and {path}: their class lists differ ({detail}); "
                "only average checkpoints trained on the same classes"
            )
    return models


class _ViewsDataset(Dataset):
    """Images decoded once and transformed for each distinct preprocessing among the models."""

    def __init__(self, paths: Sequence[Path], transforms: list[ViewTransform], blank: AbstractSet[Path]) -> None:
        self.paths = list(paths)
        self.transforms = transforms
        self.blank = blank
        self.decode_side = max(t.decode_side for t in transforms)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple:
        """One tensor per distinct preprocessing, then "" (or why the image did not decode: blank views)."""
        path = self.paths[index]
        if path in self.blank:
            return (*(t.blank() for t in self.transforms), "")
        try:
            image = load_rgb(path, min_side=self.decode_side)
        except FinetuneError as err:
            return (*(t.blank() for t in self.transforms), str(err).split(": ", 1)[-1])
        return (*(t(image) for t in self.transforms), "")


def images_dataset(paths: Sequence[Path], pre: Preprocessing) -> Dataset:
    """`paths` as (evaluation tensor, "" or why the image did not decode: a blank tensor) pairs, no TTA."""
    return _ViewsDataset(paths, [ViewTransform(pre)], frozenset())


@torch.no_grad()
def stream_probs(
    models: Sequence[LoadedModel],
    paths: Sequence[Path],
    settings: ProbsSettings = ProbsSettings(),
    blank: AbstractSet[Path] = frozenset(),
    unreadable: Optional[dict[Path, str]] = None,
) -> Iterator[np.ndarray]:
    """Yield class probabilities batch by batch, in `paths` order, averaged over models and TTA views.

    Paths in `blank` (known unreadable) are scored as a mean-colour image so every path gets a row;
    so is an image that fails to decode here, which is added to `unreadable` (path: reason) if given.
    """
    batch_size, tta = settings.batch_size, settings.tta
    groups: dict[Preprocessing, list[LoadedModel]] = {}
    for loaded in models:
        groups.setdefault(loaded.preprocessing, []).append(loaded)
    transforms = [ViewTransform(pre, tta) for pre in groups]
    loader = make_loader(_ViewsDataset(paths, transforms, blank), batch_size,
                         settings.num_workers if len(paths) > batch_size else 0)
    start = 0
    for *batch, reasons in loader:
        for offset, reason in enumerate(reasons):
            if reason and unreadable is not None:
                unreadable[paths[start + offset]] = reason
        start += len(reasons)
        total = None
        for views, members in zip(batch, groups.values()):
            for loaded in members:
                loaded.model.eval()
                device = next(loaded.model.parameters()).device
                activation = TASK_ACTIVATIONS[loaded.task_name]
                temperature = loaded.temperature if settings.calibrated else 1.0
                with autocast(device, check_precision(settings.precision, device, "--precision")):
                    probs = average_views(loaded.model, [v.to(device) for v in views], tta, activation,
                                          temperature).cpu()
                total = probs if total is None else total + probs
        yield (total / len(models)).numpy()


def sharded_probs(
    models: Sequence[LoadedModel],
    paths: Sequence[Path],
    settings: ProbsSettings = ProbsSettings(),
    blank: AbstractSet[Path] = frozenset(),
    unreadable: Optional[dict[Path, str]] = None,
) -> Iterator[np.ndarray]:
    """`stream_probs` of every path; under torchrun each rank scores a contiguous share and all ranks get every row.

    Shares are unpadded (no image scored twice, none dropped) and come back in rank order, which is
    `paths` order, so metrics and submissions equal a single process's; `unreadable` gathers every
    rank's decode failures. A collective call: every rank must consume it.
    """
    if not distributed.active():
        yield from stream_probs(models, paths, settings, blank, unreadable)
        return
    start, stop = distributed.shard_bounds(len(paths))
    failed: dict[Path, str] = {}
    chunks = list(stream_probs(models, list(paths)[start:stop], settings, blank, failed))
    part = np.concatenate(chunks) if chunks else np.zeros((0, len(models[0].classes)), dtype=np.float32)
    parts = distributed.gather_objects((part, failed))
    if unreadable is not None:
        for _, rank_failed in parts:
            unreadable.update(rank_failed)
    for rank_part, _ in parts:
        yield rank_part


def predict_probs(
    loaded: Union[LoadedModel, Sequence[LoadedModel]],
    samples: Sequence[Sample],
    settings: ProbsSettings = ProbsSettings(),
    device: Optional[torch.device] = None,
    unreadable: Optional[dict[Path, str]] = None,
) -> np.ndarray:
    """Class probabilities (N, C) for `samples`, in order (one model or an ensemble); calibrated unless asked.

    An image that fails to decode gets the mean-colour image's row and is added to `unreadable` (path: reason).
    """
    models = [loaded] if isinstance(loaded, LoadedModel) else list(loaded)
    if device is not None:
        for m in models:
            m.model.to(device)
    chunks = list(sharded_probs(models, [s.path for s in samples], settings, unreadable=unreadable))
    return np.concatenate(chunks) if chunks else np.zeros((0, len(models[0].classes)), dtype=np.float32)
