"""ResNets for 32x32 inputs (CIFAR), driven by a config table as in torchvision's ``models/resnet.py``.

He et al. 2016, section 4.2: a 3x3 stem at stride 1 (no max-pool), stages of torchvision's
``BasicBlock`` whose first block halves the resolution (except in the first stage), global average
pooling and one linear layer. Where a block changes shape, its shortcut is a 1x1 conv with BatchNorm
(the paper's option B). torchvision's ``ResNet`` is not reused: its ImageNet stem (7x7 at stride 2 and
a max-pool) leaves 1x1 maps after the second stage of a 32x32 image, and it has four stages only.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

# Blocks per stage and the width of each stage.
CFGS: dict[str, tuple[list[int], list[int]]] = {
    "resnet20": ([3, 3, 3], [16, 32, 64]),
    "resnet56": ([9, 9, 9], [16, 32, 64]),
    "resnet18": ([2, 2, 2, 2], [64, 128, 256, 512]),
}


class ResNet(nn.Module):
    """Stem, stages of ``BasicBlock`` and a linear head; ``widths`` scaled by ``width_mult``."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int = 100, width_mult: float = 1.0) -> None:
        super().__init__()
        if len(blocks) != len(widths) or width_mult <= 0:
            raise ValueError("blocks and widths need one entry per stage, and width_mult must be positive")
        widths = [max(1, round(w * width_mult)) for w in widths]
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages, channels = [], widths[0]
        for index, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(count):
                downsample = None
                if block == 0 and (stride != 1 or channels != width):
                    downsample = nn.Sequential(
                        nn.Conv2d(channels, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
                    )
                layers.append(BasicBlock(channels, width, stride if block == 0 else 1, downsample))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def resnet20(num_classes: int = 100, width_mult: float = 1.0) -> ResNet:
    """CIFAR ResNet-20 (3 stages of 3 blocks, 16-32-64 channels): 278,324 parameters for 100 classes."""
    return ResNet(*CFGS["resnet20"], num_classes=num_classes, width_mult=width_mult)


def resnet56(num_classes: int = 100, width_mult: float = 1.0) -> ResNet:
    """CIFAR ResNet-56 (3 stages of 9 blocks, 16-32-64 channels): 861,620 parameters for 100 classes."""
    return ResNet(*CFGS["resnet56"], num_classes=num_classes, width_mult=width_mult)


def resnet18(num_classes: int = 100, width_mult: float = 1.0) -> ResNet:
    """ResNet-18 with a CIFAR stem (4 stages of 2 blocks, 64-512 channels): 11,220,132 parameters for 100
    classes."""
    return ResNet(*CFGS["resnet18"], num_classes=num_classes, width_mult=width_mult)
