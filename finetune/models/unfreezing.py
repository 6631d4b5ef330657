"""Gradual unfreezing and discriminative learning rates, both by backbone stage.

`train.unfreeze: {3: [layer3]}` makes layer3 trainable from epoch 3 on; `train.fine_tune: N`
trains only the head for N epochs, then what `model.trainable` (default: everything) says, with
rates falling towards the stem (fastai's `fine_tune`). `train.lr_mult` and `train.layer_decay` set
a learning-rate multiplier per stage; engine/optim.py turns them into optimizer parameter groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from finetune.errors import FinetuneError
from finetune.models.freezing import HEAD, apply_freeze, select_parameters, stage_parameters, trainable_stages
from finetune.recipe import TrainConfig

__all__ = ["FINE_TUNE_LR_SPREAD", "UnfreezePlan", "plan_unfreezing", "stage_lr_multipliers"]

# fastai's fine_tune trains the body with slice(lr/100, lr): the stem at 1/100 of the head's rate.
FINE_TUNE_LR_SPREAD = 100.0


@dataclass
class UnfreezePlan:
    """Which parameters train from which epoch on; epoch 1 is the starting point."""

    steps: dict[int, set[str]]  # epoch → names of the parameters trainable from that epoch on

    @property
    def ever_trainable(self) -> set[str]:
        """Every parameter that trains at some epoch: all of them belong in the optimizer from the start."""
        return set().union(*self.steps.values())

    def trainable_at(self, epoch: int) -> set[str]:
        """Parameter names that train in `epoch` (1-based)."""
        return self.steps[max(e for e in self.steps if e <= max(epoch, 1))]

    def apply(self, model: nn.Module, epoch: int) -> list[str]:
        """Freeze/unfreeze `model` for `epoch`; returns its trainable stages if that changed, else []."""
        wanted = self.trainable_at(epoch)
        current = {n for n, p in model.named_parameters() if p.requires_grad}
        if wanted == current:
            return []
        # apply_freeze also recomputes which BatchNorm layers stay in eval mode.
        apply_freeze(model, wanted, getattr(model, "bn_policy", "frozen"))
        return trainable_stages(model)


def _require_stages(model: nn.Module, key: str) -> None:
    if not getattr(model, "stages", None):
        raise FinetuneError(f"{key} needs a model with named stages (built by finetune.models.build_model)")


def plan_unfreezing(model: nn.Module, cfg: TrainConfig) -> UnfreezePlan:
    """The plan from `train.unfreeze` / `train.fine_tune`, starting from the model's current freezing."""
    current = {n for n, p in model.named_parameters() if p.requires_grad}
    if cfg.fine_tune:
        _require_stages(model, "train.fine_tune")
        head_only = select_parameters(model, [HEAD])
        if current == head_only:
            raise FinetuneError(
                "train.fine_tune unfreezes the backbone after the head-only epochs, but model.trainable "
                "leaves it frozen; remove model.trainable/trainable_last/freeze_to or train.fine_tune"
            )
        return UnfreezePlan({1: head_only, cfg.fine_tune + 1: current})
    steps = {1: current}
    if cfg.unfreeze:
        _require_stages(model, "train.unfreeze")
        for epoch in sorted(cfg.unfreeze):
            current = current | select_parameters(model, cfg.unfreeze[epoch], f"train.unfreeze[{epoch}]")
            steps[epoch] = current
    return UnfreezePlan(steps)


def stage_lr_multipliers(model: nn.Module, cfg: TrainConfig) -> dict[str, float]:
    """Learning-rate multiplier per stage (and 'head'), from lr_mult, layer_decay or fine_tune's default."""
    stages = list(stage_parameters(model))
    body = [s for s in stages if s != HEAD]
    multipliers = {s: 1.0 for s in stages}
    if cfg.lr_mult:
        _require_stages(model, "train.lr_mult")
        unknown = [s for s in cfg.lr_mult if s not in multipliers]
        if unknown:
            raise FinetuneError(
                f"unknown stage '{unknown[0]}' in train.lr_mult; stages of this backbone: {', '.join(stages)}"
            )
        multipliers.update(cfg.lr_mult)
        return multipliers
    decay = cfg.layer_decay
    if decay is None and cfg.fine_tune and body:
        decay = (1.0 / FINE_TUNE_LR_SPREAD) ** (1.0 / len(body))
    if decay is not None:
        _require_stages(model, "train.layer_decay")
        # The stage just below the head gets decay, the one below it decay², ... the stem the smallest.
        for depth, stage in enumerate(reversed(body), start=1):
            multipliers[stage] = decay**depth
    return multipliers
