"""Random streams and resumption: seeding, capturing/restoring every stream, and reading a run's last checkpoint.

Everything is stored as tensors, lists, dicts and plain numbers so that checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from finetune.data.transforms import set_transform_rng_state, transform_rng_state
from finetune.engine import distributed
from finetune.engine.checkpoint import read_checkpoint
from finetune.errors import FinetuneError
from finetune.config.recipe import Recipe, TrainConfig, apply_overrides

__all__ = ["seed_everything", "capture_rng_state", "restore_rng_state", "capture_all_ranks", "restore_this_rank",
           "check_resumable", "read_resume"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch for repeatable runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _sampler_generator(loader: DataLoader) -> Optional[torch.Generator]:
    """The sampler's own generator (a balanced sampler's), when it is not the loader's."""
    generator = getattr(loader.sampler, "generator", None)
    return generator if generator is not None and generator is not loader.generator else None


def capture_rng_state(loader: DataLoader) -> dict[str, Any]:
    """Global torch/CUDA/numpy/python streams plus the training loader's shuffling and augmentation streams."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    sampler_generator = _sampler_generator(loader)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), py_gauss],
        "loader": loader.generator.get_state() if loader.generator is not None else None,
        "sampler": sampler_generator.get_state() if sampler_generator is not None else None,
        "transform": transform_rng_state(getattr(loader.dataset, "transform", None)),
    }


def restore_rng_state(state: dict[str, Any], loader: DataLoader) -> None:
    """Put back what `capture_rng_state` saved, so the next epoch draws what it would have drawn."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if state["loader"] is not None and loader.generator is not None:
        loader.generator.set_state(state["loader"])
    sampler_generator = _sampler_generator(loader)
    if state["sampler"] is not None and sampler_generator is not None:
        sampler_generator.set_state(state["sampler"])
    set_transform_rng_state(getattr(loader.dataset, "transform", None), state["transform"])


def capture_all_ranks(loader: DataLoader) -> dict[str, Any]:
    """For last.pt: this process's streams as "rng"; under torchrun every rank's, in rank order, as "rng_ranks".

    A collective call: every rank must make it (only rank 0's payload is written).
    """
    states = distributed.gather_objects(capture_rng_state(loader))
    return {"rng": states[0], **({"rng_ranks": states} if len(states) > 1 else {})}


def restore_this_rank(state: dict[str, Any], loader: DataLoader, log: Callable[[str], None] = print) -> None:
    """Put back this rank's streams from a last.pt "resume" entry written by `capture_all_ranks`.

    Under the world size that wrote it the run continues exactly; under another one each rank that
    has a saved stream takes it, the others keep their fresh per-rank seeds, and the log says so.
    """
    saved = state.get("rng_ranks") or [state["rng"]]
    world, rank = distributed.world_size(), distributed.rank()
    if len(saved) != world:
        log(f"note: the run was saved by {len(saved)} process(es) and resumes on {world}: training continues "
            "from the same weights, optimiser and epoch, but the random streams (augmentation, sampling order per "
            "process) differ from an uninterrupted run; resume with the same number of processes to continue exactly")
    if rank < len(saved):
        restore_rng_state(saved[rank], loader)


def check_resumable(payload: dict[str, Any], cfg: TrainConfig) -> None:
    """Raise unless `payload` is a last checkpoint with training state and epochs left to train under `cfg`."""
    state = payload.get("resume")
    if not isinstance(state, dict):
        raise FinetuneError("the checkpoint holds no training state (a run's best checkpoint never does); "
                            "pass the run folder, or its last checkpoint, to resume")
    done = int(payload["epoch"])
    stopped = cfg.patience is not None and state["monitor"]["bad_epochs"] >= cfg.patience
    if done >= cfg.epochs or stopped:
        raise FinetuneError(
            f"the run already finished: {done} of {cfg.epochs} epoch(s){', stopped early' if stopped else ''}; "
            "to train further, resume with --set train.epochs=N" + (" or a larger train.patience" if stopped else "")
        )


def read_resume(checkpoint: Path, overrides: Optional[list[str]] = None) -> tuple[dict[str, Any], Recipe]:
    """A last checkpoint's payload and the run's saved recipe with `overrides` applied, checked resumable.

    Checked before any data is scanned or model built, so a finished run fails in a second.
    """
    payload = read_checkpoint(checkpoint)
    recipe = Recipe.from_dict(apply_overrides(payload["recipe"], list(overrides or [])))
    check_resumable(payload, recipe.train)
    return payload, recipe
