"""MobileNetV2 for 32x32 inputs (CIFAR): torchvision's network with two strides lowered to 1.

torchvision's ``MobileNetV2`` takes its (expansion t, channels c, blocks n, stride s) table as an
argument but fixes the first conv's stride at 2; on 32x32 images the usual CIFAR variant keeps the
first conv and the second stage at stride 1, so the last feature map is 4x4 instead of 1x1.
"""

from __future__ import annotations

from torchvision.models import MobileNetV2

# torchvision's table (t, c, n, s) with the second stage at stride 1.
CIFAR_SETTING: list[list[int]] = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def mobilenet_v2(num_classes: int = 100, width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV2:
    """CIFAR MobileNetV2 (ReLU6, depthwise 3x3 convs): 2,351,972 parameters for 100 classes."""
    model = MobileNetV2(
        num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=CIFAR_SETTING, dropout=dropout
    )
    model.features[0][0].stride = (1, 1)
    return model
