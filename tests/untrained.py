"""A finetune checkpoint without training: for tests of inference plumbing, not of accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from finetune.engine.checkpoint import save_checkpoint
from finetune.models import build_model
from finetune.config.recipe import load_recipe


def untrained_checkpoint(path: Path, classes: list[str], backbone: str = "test_resnet", size: int = 32,
                         seed: int = 0, overrides: Optional[list[str]] = None) -> Path:
    """Save a randomly initialised `backbone` for `classes` as a regular finetune checkpoint."""
    torch.manual_seed(seed)
    recipe = load_recipe(None, [f"model.backbone={backbone}", f"data.image_size={size}", *(overrides or [])])
    model, preprocessing = build_model(recipe.model, len(classes), size)
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"classes": classes, "preprocessing": preprocessing.to_dict(), "recipe": recipe.to_dict(),
                           "model_state": model.state_dict(), "epoch": 0, "metrics": {}})
    return path
