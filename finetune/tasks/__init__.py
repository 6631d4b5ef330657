"""The classification tasks and the one place that maps a `data.task` value (or a checkpoint) to its Task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Union

from finetune.errors import FinetuneError
from finetune.tasks.base import Task
from finetune.tasks.multi_label import MultiLabel
from finetune.tasks.single_label import SingleLabel

if TYPE_CHECKING:
    from finetune.inference.predict import LoadedModel
    from finetune.config.recipe import Recipe

__all__ = ["Task", "TASKS", "task_named", "task_of", "task_of_checkpoint", "task_of_model"]

TASKS: dict[str, Task] = {task.name: task for task in (SingleLabel(), MultiLabel())}
DEFAULT = SingleLabel.name  # what checkpoints and metrics written before tasks were named hold


def task_named(name: str) -> Task:
    """The Task for a data.task value."""
    if name not in TASKS:
        raise FinetuneError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of(recipe: "Recipe") -> Task:
    """The recipe's task (data.task)."""
    return task_named(recipe.data.task)


def task_of_checkpoint(payload: Mapping) -> Task:
    """The task a checkpoint (or metrics.json) names, else its recipe's data.task, else one label per image."""
    name: Union[str, None] = payload.get("task")
    if name is None:
        name = ((payload.get("recipe") or {}).get("data") or {}).get("task", DEFAULT)
    return task_named(str(name))


def task_of_model(loaded: "LoadedModel") -> Task:
    """The task of a loaded checkpoint."""
    return task_named(loaded.task_name)
