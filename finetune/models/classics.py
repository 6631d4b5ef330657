"""Classic from-scratch networks from the course material, written as feature extractors.

Each returns a feature vector; the project's MLP head is the classifier. Layer names are the
stage names a recipe's `trainable` list uses. NiN and HW03Net end in a global pool that
`model.head.pool` chooses; LeNet ends in fully connected layers, so no pool applies to it.
`create` builds one as a backbone: the body, its stages and the preprocessing it expects.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from finetune.data.preprocessing import Preprocessing
from finetune.errors import FinetuneError
from finetune.models.weights import load_matching, read_state_dict, resolve_weights_path
from finetune.config.recipe import ModelConfig

__all__ = ["LeNet", "NiN", "HW03Net", "CLASSIC_BUILDERS", "CLASSIC_STAGES", "CLASSICS", "GrayscaleInput", "create"]


class LeNet(nn.Sequential):
    """LeNet-5 as in the source (sigmoid, average pooling); 84 features from a 1-channel image.

    The source's last Linear(84, 10) is the classifier; the MLP head replaces it.
    """

    in_chans = 1

    def __init__(self) -> None:
        super().__init__(
            OrderedDict(
                conv1=nn.Sequential(nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2, 2)),
                conv2=nn.Sequential(nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(), nn.AvgPool2d(2, 2)),
                # Adaptive pooling keeps the 16x5x5 layout of the 28x28 original at any input size.
                fc=nn.Sequential(
                    nn.AdaptiveAvgPool2d(5),
                    nn.Flatten(),
                    nn.Linear(16 * 5 * 5, 120),
                    nn.Sigmoid(),
                    nn.Linear(120, 84),
                    nn.Sigmoid(),
                ),
            )
        )


def _nin_block(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU(),
    )


class NiN(nn.Sequential):
    """Network in Network: three NiN blocks, global average pool → 384 features.

    The source's last NiN block (384 → num_classes channels) is the classifier; the MLP head
    replaces it.
    """

    in_chans = 3

    def __init__(self, pool: str = "avg") -> None:
        super().__init__(
            OrderedDict(
                block1=nn.Sequential(_nin_block(3, 96, 11, 4, 0), nn.MaxPool2d(3, stride=2)),
                block2=nn.Sequential(_nin_block(96, 256, 5, 1, 2), nn.MaxPool2d(3, stride=2)),
                # ceil_mode (the source floors) lets the net run from 51 px instead of 67 px.
                block3=nn.Sequential(_nin_block(256, 384, 3, 1, 1), nn.MaxPool2d(3, stride=2, ceil_mode=True)),
                pool=nn.Sequential(nn.Dropout(0.5), SelectAdaptivePool2d(pool_type=pool, flatten=True)),
            )
        )


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with a projected shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class HW03Net(nn.Sequential):
    """The HW03 from-scratch residual classifier: 64→128→256→512 at stride 2, GAP → 512 features.

    The source's 512-1024-512-N MLP is the head (recipe: `head.hidden: [1024, 512]`).
    """

    in_chans = 3

    def __init__(self, pool: str = "avg") -> None:
        super().__init__(
            OrderedDict(
                stem=nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)),
                layer1=ResidualBlock(64, 64, 2),
                layer2=ResidualBlock(64, 128, 2),
                layer3=ResidualBlock(128, 256, 2),
                layer4=ResidualBlock(256, 512, 2),
                pool=SelectAdaptivePool2d(pool_type=pool, flatten=True),
            )
        )


CLASSIC_BUILDERS = {"lenet": LeNet, "nin": NiN, "hw03net": HW03Net}
CLASSIC_STAGES = {
    "lenet": ["conv1", "conv2", "fc"],
    "nin": ["block1", "block2", "block3"],
    "hw03net": ["stem", "layer1", "layer2", "layer3", "layer4"],
}
CLASSICS = tuple(CLASSIC_BUILDERS)


class GrayscaleInput(nn.Module):
    """Turns RGB input into the single luminance channel a 1-channel network expects."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("weights", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x * self.weights).sum(dim=1, keepdim=True))


def create(cfg: ModelConfig, image_size: Optional[int]) -> tuple[nn.Module, dict[str, list[str]], Preprocessing]:
    """(body, stages, preprocessing) for a classic (`lenet`, `nin`, `hw03net`), trained from scratch."""
    if cfg.pretrained:
        raise FinetuneError(f"'{cfg.backbone}' is trained from scratch: it has no pretrained weights")
    if cfg.backbone == "lenet":
        if cfg.head.pool != "avg":
            raise FinetuneError("lenet ends in fully connected layers, so model.head.pool does not apply; leave it avg")
        net = CLASSIC_BUILDERS["lenet"]()
    else:
        net = CLASSIC_BUILDERS[cfg.backbone](pool=cfg.head.pool)
    if cfg.weights:
        load_matching(net, read_state_dict(resolve_weights_path(cfg.weights)[0]))
    stages = {name: [name] for name in CLASSIC_STAGES[cfg.backbone]}
    size = image_size or (28 if cfg.backbone == "lenet" else 224 if cfg.backbone == "nin" else 128)
    preprocessing = Preprocessing(size=size, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    if net.in_chans == 1:
        net = GrayscaleInput(net)
        stages = {name: [f"body.{p}" for p in prefixes] for name, prefixes in stages.items()}
    return net, stages, preprocessing
