"""Rebuild a model from its checkpoint and run batched, streaming inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from finetune.data.loaders import ImageDataset, make_loader
from finetune.data.sources import Sample
from finetune.data.transforms import Preprocessing, build_eval_transform
from finetune.engine.checkpoint import read_checkpoint
from finetune.errors import FinetuneError
from finetune.models import Classifier, build_model
from finetune.recipe import Recipe

__all__ = ["LoadedModel", "load_model", "predict_probs", "resolve_device"]


@dataclass
class LoadedModel:
    """A model ready for inference with everything its checkpoint knows."""

    model: Classifier
    classes: list[str]
    preprocessing: Preprocessing
    recipe: Recipe
    checkpoint: dict


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FinetuneError(f"device '{name}' requested but CUDA is not available; use device: cpu or auto")
    return torch.device(name)


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> LoadedModel:
    """Rebuild the architecture a checkpoint describes and load its weights (no download)."""
    payload = read_checkpoint(path)
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
    return LoadedModel(model, classes, preprocessing, recipe, payload)


@torch.no_grad()
def predict_probs(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    batch_size: int = 64,
    num_workers: int = 2,
    device: Optional[torch.device] = None,
) -> np.ndarray:
    """Class probabilities (N, C) for `samples`, in order, batch by batch."""
    device = device or next(loaded.model.parameters()).device
    dataset = ImageDataset(samples, build_eval_transform(loaded.preprocessing))
    loader = make_loader(dataset, batch_size, num_workers if len(samples) > batch_size else 0)
    chunks = []
    loaded.model.to(device).eval()
    for images, _ in loader:
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        chunks.append(torch.softmax(loaded.model(images).float(), dim=1).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, len(loaded.classes)), dtype=np.float32)
