"""Backbones: registered by name, any torchvision classifier, or any ``nn.Module`` by class path."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torchvision
from torch import nn

from qlight.class_path import import_object, one_line
from qlight.errors import QlightError
from qlight.models.mobilenet import mobilenet_v2
from qlight.models.resnet import ResNet, resnet18, resnet20, resnet56
from qlight.models.vgg import VGG, vgg11_bn, vgg13_bn, vgg16_bn

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": mobilenet_v2,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg11_bn": vgg11_bn,
    "vgg13_bn": vgg13_bn,
    "vgg16_bn": vgg16_bn,
}
TORCHVISION = "torchvision:"
BACKBONE_FORMS = (
    f"a registered name ({', '.join(BACKBONES)}), {TORCHVISION}<name> (torchvision.models.list_models()), "
    "a class path package.module.Class (or a function that builds one), or {class_path: ..., init_args: {...}}"
)


def build_backbone(spec: str | Mapping[str, Any], num_classes: int) -> nn.Module:
    """Build the backbone ``spec`` names, with ``num_classes`` outputs.

    Args:
        spec: a name in :data:`BACKBONES`; ``"torchvision:<name>"`` for a torchvision classifier (random
            weights); the class path of an ``nn.Module`` subclass or of a function that returns one
            (``qlight.models.resnet20``); or ``{"class_path": ..., "init_args": {...}}`` as LightningCLI
            writes it.
        num_classes: passed to the constructor unless ``init_args`` gives it or it takes no ``num_classes``.

    Raises:
        QlightError: one line naming the fix, for any spec that does not build a module.
    """
    if isinstance(spec, Mapping):
        if not isinstance(spec.get("class_path"), str) or set(spec) - {"class_path", "init_args"}:
            raise QlightError(f"backbone {dict(spec)} needs the keys class_path and (optionally) init_args")
        return _from_class_path(spec["class_path"], dict(spec.get("init_args") or {}), num_classes)
    if not isinstance(spec, str):
        raise QlightError(f"backbone {spec!r} is not a name or class path: give {BACKBONE_FORMS}")
    if spec in BACKBONES:
        return BACKBONES[spec](num_classes=num_classes)
    if spec.startswith(TORCHVISION):
        name = spec.removeprefix(TORCHVISION)
        if name not in torchvision.models.list_models(torchvision.models):
            raise QlightError(f"torchvision has no classification model {name!r}: see torchvision.models.list_models()")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if backbone_class_path(spec):
        return _from_class_path(spec, {}, num_classes)
    raise QlightError(f"unknown backbone {spec!r}: give {BACKBONE_FORMS}")


def backbone_class_path(spec: Any) -> str | None:
    """The class path that :func:`build_backbone` imports for ``spec``; ``None`` for a registered name,
    ``torchvision:<name>`` or a spec it refuses without importing anything."""
    if isinstance(spec, Mapping):
        return spec["class_path"] if isinstance(spec.get("class_path"), str) else None
    if isinstance(spec, str) and spec not in BACKBONES and not spec.startswith(TORCHVISION) and "." in spec:
        return spec
    return None


def backbone_name(spec: str | Mapping[str, Any]) -> str:
    """``resnet20``, ``torchvision:resnet18`` or a class path: the backbone as a spec names it."""
    return spec if isinstance(spec, str) else str(spec.get("class_path"))


def _from_class_path(class_path: str, init_args: dict[str, Any], num_classes: int) -> nn.Module:
    builder = import_object(class_path, "backbone")
    is_module_class = isinstance(builder, type) and issubclass(builder, nn.Module)
    if not is_module_class and (isinstance(builder, type) or not callable(builder)):
        raise QlightError(
            f"backbone {class_path} is not an nn.Module subclass: give the class of your network, or a function "
            "that builds it"
        )
    if "num_classes" not in init_args and "num_classes" in inspect.signature(builder).parameters:
        init_args["num_classes"] = num_classes
    try:
        model = builder(**init_args)
    except QlightError:
        raise
    except Exception as err:  # the user's constructor: its error, in one line
        raise QlightError(f"cannot build backbone {class_path} with init_args {init_args}: {one_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise QlightError(f"backbone {class_path} returned a {type(model).__name__}, not an nn.Module")
    return model


__all__ = [
    "BACKBONES",
    "BACKBONE_FORMS",
    "VGG",
    "ResNet",
    "backbone_class_path",
    "backbone_name",
    "build_backbone",
    "mobilenet_v2",
    "resnet18",
    "resnet20",
    "resnet56",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
]
