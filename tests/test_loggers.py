"""Loggers: TensorBoard event files that TensorBoard's own reader parses; a missing package is one clear error."""

from __future__ import annotations

import csv
import importlib.util
import sys
import types
from pathlib import Path

import pytest

from finetune.workflows.api import train
from finetune.errors import FinetuneError
from finetune.config.recipe import Recipe
from finetune.outputs.run_dir import RunDir
from tests.conftest import QUICK_CPU

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_loggers_are_validated_and_csv_is_the_default() -> None:
    assert Recipe().train.loggers == ["csv"]
    with pytest.raises(FinetuneError, match="train.loggers"):
        Recipe.from_dict({"train": {"loggers": ["wandb"]}})


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs finetune[tensorboard]")
def test_tensorboard_logs_the_history_rows_stage_rates_images_recipe_and_hparams(
        folder_dataset: Path, tiny_overrides: list[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(QUICK_CPU, data=folder_dataset, log=lambda _: None,
                   overrides=tiny_overrides + ["train.loggers=[csv, tensorboard]", "train.layer_decay=0.5"])
    run = RunDir(result.run_dir)
    events = EventAccumulator(str(run.tensorboard), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "lr/base", "lr/head", "time/epoch_seconds"):
        assert tag in tags["scalars"], tag
    assert {"confusion_matrix", "curves"} <= set(tags["images"])
    steps = [e.step for e in events.Scalars("step/train_loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 2  # every optimiser step of both epochs
    # One source: the logged scalars are history.csv's numbers.
    rows = list(csv.DictReader(run.history.open()))
    assert [e.step for e in events.Scalars("val/acc")] == [int(r["epoch"]) for r in rows]
    assert [e.value for e in events.Scalars("val/acc")] == pytest.approx([float(r["val_acc"]) for r in rows])
    stages = [k for k in rows[0] if k.startswith("lr_")]
    assert len(stages) > 1 and all(f"lr/{k[3:]}" in tags["scalars"] for k in stages)
    text = [t for t in tags["tensors"] if t.startswith("recipe")]
    assert text, tags["tensors"]
    recipe_text = events.Tensors(text[0])[0].tensor_proto.string_val[0].decode()
    assert "test_resnet" in recipe_text
    # hparams: the flattened recipe in the plugin's session summary, the final metrics under hparam/.
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.backbone"].string_value == "test_resnet"
    assert hparams["train.layer_decay"].number_value == 0.5
    assert {"hparam/best_val_acc", "hparam/accuracy"} <= set(tags["scalars"])


def test_a_missing_logger_package_is_one_error_naming_the_extra(
        folder_dataset: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(FinetuneError, match=r"pip install 'finetune\[mlflow\]'"):
        train(QUICK_CPU, data=folder_dataset, log=lambda _: None, overrides=tiny_overrides + ["train.loggers=[mlflow]"])
    assert not (Path(tiny_overrides[-1].split("=", 1)[1])).exists()  # it failed before creating a run folder


def test_mlflow_gets_params_per_epoch_metrics_and_the_folder(
        folder_dataset: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    fake = types.ModuleType("mlflow")
    for name in ("start_run", "log_params", "log_metrics", "log_artifacts", "end_run"):
        setattr(fake, name, lambda *a, _name=name, **k: calls.append((_name, a, k)))
    fake.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    result = train(QUICK_CPU, data=folder_dataset, log=lambda _: None,
                   overrides=tiny_overrides + ["train.loggers=[csv, mlflow]"])
    names = [c[0] for c in calls]
    assert names[0] == "start_run" and names[-1] == "end_run"
    params = next(c[1][0] for c in calls if c[0] == "log_params")
    assert params["model.backbone"] == "test_resnet" and params["train.epochs"] == "2"
    steps = [c[2]["step"] for c in calls if c[0] == "log_metrics" and "step" in c[2]]
    assert steps == [1, 2]
    assert ("log_artifacts", (str(result.run_dir),), {}) in calls


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs finetune[tensorboard]")
def test_a_resumed_run_logs_each_epoch_once_to_tensorboard(folder_dataset: Path, tiny_overrides: list[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def stop_after_epoch_1(message: str) -> None:
        if message.startswith("epoch 1/3"):
            raise KeyboardInterrupt

    overrides = tiny_overrides + ["train.loggers=[csv, tensorboard]", "train.epochs=3", "train.warmup_epochs=0"]
    with pytest.raises(KeyboardInterrupt):
        train(QUICK_CPU, data=folder_dataset, overrides=overrides, log=stop_after_epoch_1)
    run_dir = next(Path(tiny_overrides[-1].split("=", 1)[1]).iterdir())
    train(resume=run_dir, log=lambda _: None)
    events = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [1, 2, 3]
    steps = [e.step for e in events.Scalars("step/train_loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) % 3 == 0  # the resumed steps follow on
