"""DataModules named by class path, as ``--data`` names them, checked before anything is built."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningDataModule

from qlight.class_path import import_object
from qlight.errors import QlightError

BUILT_IN = ("CIFAR100DataModule", "CIFAR10DataModule", "ImageFolderDataModule")
DEFAULT_DATA = "qlight.data.CIFAR100DataModule"


def datamodule_class(class_path: str) -> type[LightningDataModule]:
    """The class ``class_path`` names (``package.module.Class``, or a built-in's short name); one line
    naming the fix when it cannot be imported or is not a LightningDataModule."""
    if "." not in class_path:
        if class_path not in BUILT_IN:
            raise QlightError(
                f"unknown DataModule {class_path!r}: give its class path (package.module.Class) or one of "
                f"{', '.join(BUILT_IN)}"
            )
        class_path = f"qlight.data.{class_path}"
    cls = import_object(class_path, "DataModule")
    if not (isinstance(cls, type) and issubclass(cls, LightningDataModule)):
        raise QlightError(f"{class_path} is not a LightningDataModule: --data takes a LightningDataModule subclass")
    return cls


def known_classes(cls: type[LightningDataModule], init_args: Mapping[str, Any] | None) -> int | None:
    """The ``num_classes`` the data knows, on its class or on an instance built from ``init_args`` (a
    DataModule's ``__init__`` is cheap by Lightning's convention: data is read in ``setup``)."""
    classes = getattr(cls, "num_classes", None)
    if not isinstance(classes, int):
        classes = getattr(cls(**dict(init_args or {})), "num_classes", None)
    return classes if isinstance(classes, int) else None
