"""Backbones, looked up by name so that configs and checkpoints can name them."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from qlight.errors import QlightError
from qlight.models.vgg import VGG, vgg11_bn, vgg13_bn, vgg16_bn

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "vgg11_bn": vgg11_bn,
    "vgg13_bn": vgg13_bn,
    "vgg16_bn": vgg16_bn,
}


def build_backbone(name: str, num_classes: int) -> nn.Module:
    """Build a registered backbone; raises :class:`QlightError` naming the valid choices."""
    if name not in BACKBONES:
        raise QlightError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](num_classes=num_classes)


__all__ = ["BACKBONES", "VGG", "build_backbone", "vgg11_bn", "vgg13_bn", "vgg16_bn"]
