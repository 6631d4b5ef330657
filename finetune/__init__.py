"""finetune: transfer-learning image classifiers from a folder of images.

    import finetune
    result = finetune.train("recipes/quick_cpu.yaml", data="~/food11")
    finetune.evaluate(result.best_checkpoint, "~/food11/validation")
    finetune.predict(result.best_checkpoint, "~/food11/test", out="submission.csv")
"""

__version__ = "0.1.0"

from finetune.api import TrainResult, evaluate, predict, train  # noqa: E402
from finetune.errors import FinetuneError  # noqa: E402
from finetune.inference import LoadedModel, load_model  # noqa: E402
from finetune.recipe import Recipe, load_recipe  # noqa: E402

__all__ = [
    "__version__",
    "FinetuneError",
    "LoadedModel",
    "Recipe",
    "TrainResult",
    "evaluate",
    "load_model",
    "load_recipe",
    "predict",
    "train",
]
