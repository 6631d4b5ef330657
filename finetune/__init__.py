"""finetune: transfer-learning image classifiers from a folder of images.

    import finetune
    result = finetune.train("recipes/quick_cpu.yaml", data="~/food11")
    finetune.evaluate(result.best_checkpoint, "~/food11/validation")
    finetune.predict(result.best_checkpoint, "~/food11/test", out="submission.csv")

The API functions load on first use, so `import finetune.config.recipe` (or `finetune.models`) does not
pull in the whole toolkit.
"""

from __future__ import annotations

import importlib
from typing import Any

from finetune.errors import FinetuneError
from finetune.config.options import AuditOptions, InferenceOptions, PseudoLabelOptions, SubmissionOptions
from finetune.config.recipe import Recipe, load_recipe
from finetune.version import __version__

__all__ = [
    "__version__",
    "AuditOptions",
    "FinetuneError",
    "InferenceOptions",
    "LoadedModel",
    "PseudoLabelOptions",
    "Recipe",
    "SubmissionOptions",
    "TrainResult",
    "audit",
    "evaluate",
    "export",
    "load_model",
    "load_recipe",
    "predict",
    "pseudo_label",
    "report",
    "train",
    "train_semi",
]

_LAZY = {
    "TrainResult": "finetune.workflows.api",
    "train": "finetune.workflows.api",
    "evaluate": "finetune.workflows.api",
    "predict": "finetune.workflows.api",
    "report": "finetune.workflows.api",
    "export": "finetune.workflows.sharing",
    "audit": "finetune.workflows.audit",
    "pseudo_label": "finetune.workflows.semi",
    "train_semi": "finetune.workflows.semi",
    "LoadedModel": "finetune.inference.predict",
    "load_model": "finetune.inference.predict",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
