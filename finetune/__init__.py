"""finetune: transfer-learning image classifiers from a folder of images.

    import finetune
    result = finetune.train("recipes/quick_cpu.yaml", data="~/food11")
    finetune.evaluate(result.best_checkpoint, "~/food11/validation")
    finetune.predict(result.best_checkpoint, "~/food11/test", out="submission.csv")

The API functions load on first use, so `import finetune.recipe` (or `finetune.models`) does not
pull in the whole toolkit.
"""

from __future__ import annotations

import importlib
from typing import Any

from finetune.errors import FinetuneError
from finetune.options import InferenceOptions, SubmissionOptions
from finetune.recipe import Recipe, load_recipe
from finetune.version import __version__

__all__ = [
    "__version__",
    "FinetuneError",
    "InferenceOptions",
    "LoadedModel",
    "Recipe",
    "SubmissionOptions",
    "TrainResult",
    "evaluate",
    "load_model",
    "load_recipe",
    "predict",
    "pseudo_label",
    "report",
    "train",
    "train_semi",
]

_LAZY = {
    "TrainResult": "finetune.api",
    "train": "finetune.api",
    "evaluate": "finetune.api",
    "predict": "finetune.api",
    "report": "finetune.api",
    "pseudo_label": "finetune.semi",
    "train_semi": "finetune.semi",
    "LoadedModel": "finetune.inference",
    "load_model": "finetune.inference",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
