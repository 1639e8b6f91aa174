"""VGG for 32x32 inputs (CIFAR), driven by a config table as in torchvision's ``models/vgg.py``."""

from __future__ import annotations

from torch import Tensor, nn

# Numbers are conv output channels (3x3, padding 1, BatchNorm, ReLU); "M" is a 2x2 max-pool.
CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def make_layers(cfg: list[int | str], batch_norm: bool = True, in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(v)))
        layers.append(nn.ReLU(inplace=True))
        in_channels = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG feature stack on 32x32 images (five pools leave 1x1xC, C = 512 in the standard tables)
    and a C-hidden-hidden-classes head."""

    def __init__(
        self, features: nn.Sequential, num_classes: int = 100, dropout: float = 0.5, hidden: int = 512
    ) -> None:
        super().__init__()
        self.features = features
        width = [m.out_channels for m in features if isinstance(m, nn.Conv2d)][-1]
        self.classifier = nn.Sequential(
            nn.Linear(width, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def _vgg(cfg: str, num_classes: int, dropout: float) -> VGG:
    return VGG(make_layers(CFGS[cfg], batch_norm=True), num_classes=num_classes, dropout=dropout)


def vgg11_bn(num_classes: int = 100, dropout: float = 0.5) -> VGG:
    """CIFAR VGG-11 with BatchNorm: 9,802,596 parameters for 100 classes."""
    return _vgg("vgg11", num_classes, dropout)


def vgg13_bn(num_classes: int = 100, dropout: float = 0.5) -> VGG:
    """CIFAR VGG-13 with BatchNorm."""
    return _vgg("vgg13", num_classes, dropout)


def vgg16_bn(num_classes: int = 100, dropout: float = 0.5) -> VGG:
    """CIFAR VGG-16 with BatchNorm."""
    return _vgg("vgg16", num_classes, dropout)
