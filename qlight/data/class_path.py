"""DataModules named by class path, as ``--data`` names them, checked before anything is built."""

from __future__ import annotations

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


def init_args(data: Any) -> dict[str, Any]:
    """The ``init_args`` of a parsed ``data`` config (``class_path`` + ``init_args``), as a dict."""
    args = data.get("init_args")
    return args.as_dict() if args else {}


def model_classes_from_data(config: Any) -> None:
    """Set a parsed config's ``model.num_classes`` to what its ``data`` knows, on the DataModule class or
    on an instance built from its ``init_args`` (a DataModule's ``__init__`` is cheap by Lightning's
    convention: data is read in ``setup``); leave it when the data does not say."""
    cls = datamodule_class(config.data.class_path)
    classes = getattr(cls, "num_classes", None)
    if not isinstance(classes, int):
        classes = getattr(cls(**init_args(config.data)), "num_classes", None)
    if isinstance(classes, int):
        config.model.num_classes = classes
