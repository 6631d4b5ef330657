"""Loggers: where each epoch's history row goes besides history.csv — TensorBoard and MLflow.

`RunDir` owns them: it hands every row it appends to history.csv to each logger too, so all of them
read one source. A logger's package is an optional extra; a recipe naming a missing one fails
before training starts, with the `pip install` line that fixes it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol, Sequence

import yaml

from finetune.errors import FinetuneError
from finetune.config.recipe import Recipe, flatten

__all__ = ["Logger", "TensorBoardLogger", "MlflowLogger", "check_loggers", "create_loggers"]

# logger name -> (module it imports, extra that installs it)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


class Logger(Protocol):
    """What RunDir calls: one row per epoch (and per optimiser step), then the final metrics and figures, then close."""

    def log_epoch(self, row: dict) -> None: ...

    def log_step(self, values: dict) -> None: ...

    def finish(self, metrics: dict, images: dict[str, Path]) -> None: ...

    def close(self) -> None: ...


def check_loggers(names: Sequence[str]) -> None:
    """Fail (one line naming the extra) when a logger's package is not installed."""
    for name in names:
        if name in _PACKAGES:
            module, extra = _PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                raise FinetuneError(f"train.loggers includes {name}, but the {module} package is not installed: "
                                    f"pip install 'finetune[{extra}]' (or drop {name} from train.loggers)")


def _numbers(row: dict) -> dict[str, float]:
    """The numeric values of a row (history.csv holds learning rates as text)."""
    values = {}
    for key, value in row.items():
        try:
            values[key] = float(value)
        except (TypeError, ValueError):
            continue
    return values


def _scalar_tag(key: str) -> str:
    """history.csv column → TensorBoard tag: train_loss → train/loss, lr_layer4 → lr/layer4, lr → lr/base."""
    for prefix in ("train", "val", "lr"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return {"lr": "lr/base", "seconds": "time/epoch_seconds"}.get(key, key)


def _hparam_value(value: Any) -> Any:
    """TensorBoard's hparams take numbers, strings and booleans; anything else is shown as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class TensorBoardLogger:
    """Event files in the run's tensorboard_events/ folder: `tensorboard --logdir runs/` shows every run live.

    Per epoch: losses, accuracies, the learning rate of every stage, epoch time; per optimiser step:
    the training loss and rate (step/...). At the end: the confusion matrix and curves as images, the
    recipe as text, and hparams with the final metrics.
    """

    def __init__(self, folder: Path, recipe: Recipe) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.recipe = recipe
        # Epoch scalars use the epoch as their step, step/ scalars the optimiser step since the run began.
        # A resumed run appends to the same folder: rows never run ahead of last.pt, so no epoch repeats.
        self._writer = SummaryWriter(str(folder))
        text = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
        self._writer.add_text("recipe", "\n".join("    " + line for line in text.splitlines()), 0)

    def log_step(self, values: dict) -> None:
        step = int(values["step"])
        self._writer.add_scalar("step/train_loss", float(values["train_loss"]), step)
        self._writer.add_scalar("step/lr", float(values["lr"]), step)

    def log_epoch(self, row: dict) -> None:
        epoch = int(row["epoch"])
        for key, value in _numbers(row).items():
            if key != "epoch":
                self._writer.add_scalar(_scalar_tag(key), value, epoch)
        self._writer.flush()  # an interrupted run keeps every epoch it finished

    def finish(self, metrics: dict, images: dict[str, Path]) -> None:
        import numpy as np
        from PIL import Image

        for tag, path in images.items():
            if path.is_file():
                with Image.open(path) as image:
                    self._writer.add_image(tag, np.asarray(image.convert("RGB")), dataformats="HWC")
        final = {f"hparam/{k}": float(v) for k, v in _numbers(metrics).items()}
        params = {k: _hparam_value(v) for k, v in flatten(self.recipe.to_dict()).items()}
        # run_name "." keeps the hparams summary in this run's folder rather than a timestamped sub-folder.
        self._writer.add_hparams(params, final, run_name=".")

    def close(self) -> None:
        self._writer.close()


class MlflowLogger:
    """One MLflow run per training run: the flattened recipe as params, each row as metrics, the folder as artifacts.

    It uses MLflow's own configuration (MLFLOW_TRACKING_URI; ./mlruns when unset).
    """

    def __init__(self, folder: Path, recipe: Recipe) -> None:
        import mlflow

        self._mlflow = mlflow
        self.folder = folder
        self._run = mlflow.start_run(run_name=folder.name)
        # MLflow caps a param's text; settings are short, lists and mappings are shown as text.
        mlflow.log_params({k: str(v)[:250] for k, v in flatten(recipe.to_dict()).items()})

    def log_epoch(self, row: dict) -> None:
        values = _numbers(row)
        epoch = int(values.pop("epoch"))
        self._mlflow.log_metrics(values, step=epoch)

    def log_step(self, values: dict) -> None:
        pass  # MLflow gets epochs: a metric per batch would flood its store

    def finish(self, metrics: dict, images: dict[str, Path]) -> None:
        self._mlflow.log_metrics({f"final_{k}": v for k, v in _numbers(metrics).items()})
        self._mlflow.log_artifacts(str(self.folder))

    def close(self) -> None:
        self._mlflow.end_run()


def create_loggers(names: Sequence[str], recipe: Recipe, folder: Path, tensorboard_folder: Path) -> list[Logger]:
    """The loggers `train.loggers` names (csv is history.csv itself, written by RunDir)."""
    check_loggers(names)
    loggers: list[Logger] = []
    for name in names:
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(tensorboard_folder, recipe))
        elif name == "mlflow":
            loggers.append(MlflowLogger(folder, recipe))
    return loggers
