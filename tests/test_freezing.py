"""Freezing by stage, BatchNorm policy, discriminative learning rates and gradual unfreezing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from finetune.workflows.api import train
from finetune.cli import main
from finetune.engine.checkpoint import read_checkpoint
from finetune.engine.optim import create_optimizer, create_scheduler
from finetune.errors import FinetuneError
from finetune.engine.optim import stage_lr_multipliers
from finetune.models import build_model, plan_unfreezing, resolve_trainable
from finetune.models.freezing import select_parameters, stage_parameters
from finetune.models.unfreezing import describe_beyond
from finetune.config.recipe import HeadConfig, ModelConfig, Recipe, TrainConfig, load_recipe

STAGES = ["stem", "layer1", "layer2", "layer3", "layer4"]


def _model(**model_keys):
    model, _ = build_model(ModelConfig(backbone="test_resnet", head=HeadConfig(hidden=[8]), **model_keys), 3, 32)
    return model


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _train_config(**keys) -> TrainConfig:
    cfg = TrainConfig(**keys)
    cfg.validate()
    return cfg


def test_stages_run_from_input_to_output() -> None:
    model = _model()
    assert list(model.stages) == STAGES
    assert list(stage_parameters(model)) == STAGES + ["head"]


def test_three_ways_to_say_train_the_last_stage_agree() -> None:
    by_name = _trainable(_model(trainable=["layer4"]))
    assert by_name == _trainable(_model(trainable_last=1)) == _trainable(_model(freeze_to="layer3"))
    assert {n.split(".")[1] for n in by_name if n.startswith("backbone.")} == {"layer4"}
    assert any(n.startswith("head.") for n in by_name)


def test_head_only_and_everything() -> None:
    model = _model()
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert _trainable(model) == {n for n, _ in model.named_parameters()}
    assert _trainable(_model(trainable=[])) == head
    assert _trainable(_model(trainable_last=0)) == head
    assert _trainable(_model(freeze_to="layer4")) == head
    assert _trainable(_model(trainable_last=5)) == _trainable(model)


def test_module_paths_work_as_well_as_stage_names() -> None:
    model = _model(trainable=["layer4.0.conv2"])
    assert {n for n in _trainable(model) if n.startswith("backbone.")} == {"backbone.layer4.0.conv2.weight"}


def test_bad_stage_names_list_the_valid_ones() -> None:
    model = _model()
    with pytest.raises(FinetuneError, match="unknown stage 'layer5' in model.trainable.*stem, layer1, .*layer4"):
        resolve_trainable(model, trainable=["layer5"])
    with pytest.raises(FinetuneError, match="unknown stage 'block3' in model.freeze_to.*layer4"):
        resolve_trainable(model, freeze_to="block3")
    with pytest.raises(FinetuneError, match="trainable_last is 6 but this backbone has 5 stages: stem"):
        resolve_trainable(model, trainable_last=6)


def test_freezing_keys_are_mutually_exclusive() -> None:
    with pytest.raises(FinetuneError, match="only one of model.trainable, model.trainable_last, model.freeze_to"):
        Recipe.from_dict({"model": {"trainable": ["layer4"], "freeze_to": "layer3"}})
    with pytest.raises(FinetuneError, match="trainable_last"):
        Recipe.from_dict({"model": {"trainable_last": -1}})


def test_frozen_batchnorm_stays_in_eval_mode_under_train() -> None:
    model = _model(trainable_last=1)
    model.train()
    assert not model.backbone.layer3[0].bn1.training and not model.backbone.bn1.training
    assert model.backbone.layer4[0].bn1.training and model.head[1].training
    model = _model(trainable_last=1, bn="train")
    model.train()
    assert model.backbone.layer3[0].bn1.training


def test_fixed_batchnorm_keeps_pretrained_statistics_while_its_scale_trains() -> None:
    model = _model(bn="fixed")  # everything trainable
    model.train()
    bn = model.backbone.bn1  # the stem's (a block's first BN gets no gradient: its last BN starts at zero)
    assert not bn.training and not model.backbone.layer4[0].bn1.training
    assert model.head[1].training  # the head's own BatchNorm is new: it learns its statistics
    optimizer = create_optimizer(model, _train_config(epochs=1, lr=0.1))
    mean, scale = bn.running_mean.clone(), bn.weight.detach().clone()
    _step(model, optimizer, create_scheduler(optimizer, _train_config(epochs=1, lr=0.1), steps_per_epoch=1))
    assert torch.equal(bn.running_mean, mean) and not torch.equal(bn.weight, scale)
    # fine_tune's unfreezing keeps the policy.
    plan = plan_unfreezing(model, _train_config(epochs=3, fine_tune=1))
    plan.apply(model, 1)
    plan.apply(model, 2)
    assert model.bn_policy == "fixed" and "backbone.layer4.0.bn1" in model.frozen_bn


def test_layer_decay_falls_towards_the_stem() -> None:
    model = _model()
    multipliers = stage_lr_multipliers(model, _train_config(layer_decay=0.5))
    assert multipliers == {"head": 1.0, "layer4": 0.5, "layer3": 0.25, "layer2": 0.125, "layer1": 0.0625,
                           "stem": 0.03125}
    optimizer = create_optimizer(model, _train_config(lr=0.1, layer_decay=0.5))
    assert optimizer.param_groups[0]["stage"] == "head" and optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    by_stage = {g["stage"]: g["lr"] for g in optimizer.param_groups}
    assert by_stage["stem"] == pytest.approx(0.1 * 0.5**5)
    # Biases and norm scales go to groups without weight decay.
    for group in optimizer.param_groups:
        assert all((p.ndim <= 1) == (group["weight_decay"] == 0.0) for p in group["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_lr_mult_sets_rates_per_stage() -> None:
    model = _model(trainable_last=2)
    optimizer = create_optimizer(model, _train_config(lr=0.01, lr_mult={"layer3": 0.1, "head": 2.0}))
    lrs = {g["stage"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"head": 0.02, "layer4": 0.01, "layer3": 0.001})
    with pytest.raises(FinetuneError, match="unknown stage 'layer9' in train.lr_mult.*layer4, head"):
        create_optimizer(model, _train_config(lr_mult={"layer9": 0.1}))


def test_stage_option_validation() -> None:
    with pytest.raises(FinetuneError, match="either 'train.lr_mult' or 'train.layer_decay'"):
        _train_config(lr_mult={"layer4": 0.1}, layer_decay=0.7)
    with pytest.raises(FinetuneError, match="layer_decay"):
        _train_config(layer_decay=1.5)
    with pytest.raises(FinetuneError, match="2 or later"):
        _train_config(epochs=3, unfreeze={1: ["layer3"]})
    with pytest.raises(FinetuneError, match="fine_tune"):
        _train_config(epochs=3, fine_tune=0)
    with pytest.raises(FinetuneError, match="either 'train.unfreeze' or 'train.fine_tune'"):
        _train_config(epochs=3, fine_tune=1, unfreeze={2: ["layer3"]})


def test_unfreeze_schedule_reads_from_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  epochs: 4\n  unfreeze:\n    3: [layer3]\n  lr_mult: {layer3: 0.1, head: 1}\n")
    recipe = load_recipe(path, ["train.unfreeze.2=[layer4]"])
    assert recipe.train.unfreeze == {3: ["layer3"], 2: ["layer4"]}
    assert recipe.train.lr_mult == {"layer3": 0.1, "head": 1.0}
    with pytest.raises(FinetuneError, match="train.unfreeze"):
        load_recipe(path, ["train.unfreeze=[layer4]"])


def test_inspect_prints_stages_with_counts_and_rates(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "test_resnet", "--freeze-to", "layer3", "--layer-decay", "0.5", "--image-size", "32"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = line.split()
        if cells and cells[0] in STAGES + ["head"]:
            rows[cells[0]] = cells[1:]  # params, trainable, lr mult
    assert list(rows) == STAGES + ["head"]
    assert rows["layer3"][1] == "0" and rows["layer4"][1] == rows["layer4"][0] != "0"
    assert rows["layer4"][2] == "0.5" and rows["head"][2] == "1"
    assert main(["inspect", "test_resnet", "--freeze-to", "layer9"]) == 2
    assert "stem, layer1, layer2, layer3, layer4" in capsys.readouterr().err


def _step(model: nn.Module, optimizer, scheduler) -> None:
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def test_unfrozen_stage_joins_training_at_its_epoch() -> None:
    torch.manual_seed(0)
    model = _model(trainable_last=1)
    cfg = _train_config(epochs=2, lr=0.05, optimizer="sgd", unfreeze={2: ["layer3"]}, layer_decay=0.5)
    plan = plan_unfreezing(model, cfg)
    optimizer = create_optimizer(model, cfg, plan.ever_trainable)
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch=2)
    layer3 = select_parameters(model, ["layer3"])
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert all(id(named[n]) in in_optimizer for n in layer3)
    assert not any(id(named[n]) in in_optimizer for n in select_parameters(model, ["layer2"]))

    assert plan.apply(model, 1) == []  # epoch 1 is what model.trainable_last says
    before = {n: named[n].detach().clone() for n in layer3}
    bn = model.backbone.layer3[0].bn1
    mean = bn.running_mean.clone()
    for _ in range(2):
        _step(model, optimizer, scheduler)
    assert all(torch.equal(before[n], named[n]) for n in layer3)
    assert torch.equal(bn.running_mean, mean)

    assert plan.apply(model, 2) == ["layer3", "layer4", "head"]
    model.train()
    assert bn.training  # its BatchNorm leaves eval mode with the stage
    layer3_lr = [g["lr"] for g in optimizer.param_groups if g["stage"] == "layer3"]
    head_lr = optimizer.param_groups[0]["lr"]
    assert layer3_lr and all(lr == pytest.approx(head_lr * 0.25) for lr in layer3_lr)  # scheduled like the rest
    _step(model, optimizer, scheduler)
    _step(model, optimizer, scheduler)
    assert all(not torch.equal(before[n], named[n]) for n in layer3)
    assert not torch.equal(bn.running_mean, mean)


def test_fine_tune_trains_the_head_first_then_everything_at_one_rate() -> None:
    model = _model()
    cfg = _train_config(epochs=3, lr=0.01, fine_tune=1)
    plan = plan_unfreezing(model, cfg)
    plan.apply(model, 1)
    assert _trainable(model) == select_parameters(model, ["head"])
    assert all(not m.training for n, m in model.train().named_modules() if n in model.frozen_bn)
    assert len(model.frozen_bn) > 0
    plan.apply(model, 2)
    assert _trainable(model) == {n for n, _ in model.named_parameters()} and model.frozen_bn == []
    lrs = {g["stage"]: g["lr"] for g in create_optimizer(model, cfg, plan.ever_trainable).param_groups}
    # One rate for every stage: falling rates scored about 3 points lower in the ablation.
    assert set(lrs) == {"head", "stem", "layer1", "layer2", "layer3", "layer4"}
    assert all(lr == pytest.approx(0.01) for lr in lrs.values())
    # Falling rates stay one key away.
    decayed = _train_config(epochs=3, lr=0.01, fine_tune=1, layer_decay=0.5)
    lrs = {g["stage"]: g["lr"] for g in create_optimizer(model, decayed, plan.ever_trainable).param_groups}
    assert lrs["stem"] == pytest.approx(0.01 * 0.5**5) and lrs["stem"] < lrs["layer1"] < lrs["layer4"] < lrs["head"]
    with pytest.raises(FinetuneError, match="fine_tune unfreezes the backbone"):
        plan_unfreezing(_model(trainable=[]), cfg)


def test_unfreeze_names_are_checked_against_the_model() -> None:
    with pytest.raises(FinetuneError, match=r"unknown stage 'layer7' in train.unfreeze\[2\].*layer4"):
        plan_unfreezing(_model(trainable_last=1), _train_config(epochs=2, unfreeze={2: ["layer7"]}))


def test_training_run_unfreezes_on_schedule(folder_dataset: Path, tiny_overrides: list[str]) -> None:
    lines: list[str] = []
    result = train(None, data=folder_dataset, log=lines.append, overrides=tiny_overrides + [
        "model.trainable_last=1", "train.unfreeze={2: [layer3]}", "train.epochs=2",
    ])
    assert "epoch 2: trainable stages now layer3, layer4, head" in lines
    state = read_checkpoint(result.last_checkpoint)["model_state"]
    # Random init starts BN at weight 1, bias 0, statistics 0/1: layer3's moved once unfrozen, layer2's never.
    assert torch.all(state["backbone.layer2.0.bn1.weight"] == 1) and torch.all(state["backbone.layer2.0.bn1.bias"] == 0)
    assert torch.all(state["backbone.layer2.0.bn1.running_mean"] == 0)
    assert not torch.all(state["backbone.layer3.0.bn1.weight"] == 1)
    assert torch.count_nonzero(state["backbone.layer3.0.bn1.running_mean"]) > 0


def test_a_schedule_past_the_last_epoch_leaves_its_stages_frozen_and_says_so() -> None:
    model = _model(trainable=[])  # the head alone in epoch 1
    cfg = _train_config(epochs=2, unfreeze={2: ["layer4"], 4: ["layer3"]})
    plan = plan_unfreezing(model, cfg)
    assert plan.beyond == [4] and sorted(plan.steps) == [1, 2]
    assert not any(name.startswith("backbone.layer3") for name in plan.ever_trainable)
    assert "epoch(s) 4 comes after the last epoch (2)" in describe_beyond(plan, cfg)
    short = _train_config(epochs=1, fine_tune=1)
    plan = plan_unfreezing(_model(), short)
    assert plan.beyond == [2] and all(name.startswith("head") for name in plan.ever_trainable)
    assert "backbone stays frozen" in describe_beyond(plan, short)
