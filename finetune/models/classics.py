"""Classic from-scratch networks from the course material, written as feature extractors.

Each returns a feature vector; the project's MLP head is the classifier. Layer names are the
stage names a recipe's `trainable` list uses. NiN and HW03Net end in a global pool that
`model.head.pool` chooses; LeNet ends in fully connected layers, so no pool applies to it.
"""

from __future__ import annotations

from collections import OrderedDict

from timm.layers import SelectAdaptivePool2d
from torch import nn

__all__ = ["LeNet", "NiN", "HW03Net", "CLASSIC_BUILDERS", "CLASSIC_STAGES"]


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
