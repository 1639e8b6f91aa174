"""Your own images, one folder per class, decoded once into memory at a fixed size."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from qlight.data.in_memory import InMemoryImageDataModule, Split
from qlight.errors import QlightError


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_image_folder(folder: Path, classes: list[str], image_size: int) -> Split:
    """Every image under ``folder/<class>/`` (any depth, torchvision's image extensions), as RGB uint8
    resized (shorter side) and centre-cropped to ``image_size``; labels index ``classes``."""
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if not path.is_file() or not path.name.lower().endswith(IMG_EXTENSIONS):
                continue
            try:
                image = decode_image(str(path), mode=ImageReadMode.RGB)
            except (RuntimeError, OSError, ValueError) as err:
                raise QlightError(
                    f"{path} cannot be read as an image ({str(err).splitlines()[0][:120]}): remove or replace it"
                ) from None
            image = F.center_crop(F.resize(image, [image_size], antialias=True), [image_size, image_size])
            images.append(image)
            labels.append(label)
    if not images:
        raise QlightError(f"{folder} holds no images in its class folders ({', '.join(IMG_EXTENSIONS)})")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class ImageFolderDataModule(InMemoryImageDataModule):
    """Images in ``root/train/<class>/`` and ``root/val/<class>/`` (the layout of torchvision's
    ``ImageFolder`` and of ImageNet), decoded once, resized to ``image_size`` and held in memory as
    uint8 (``N * 3 * image_size**2`` bytes), then augmented on the training device like CIFAR (see
    :class:`~qlight.data.in_memory.InMemoryImageDataModule`). Classes are the sorted folder names of
    ``root/train``; images are normalized with the training set's own per-channel mean and deviation.
    The ``val`` images are the test set, and the validation set unless ``val_size`` holds some training
    images out instead.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        image_size: side of the square images (shorter side resized, then centre-cropped).
        batch_size: training and evaluation batch size (per device).
        val_size: training images held out for validation (seeded); 0 validates on ``val/``.
        seed: seeds the validation split and the training order.
        augment_on_device: keep the data on the training device and augment whole batches there.
        num_workers: DataLoader workers for CPU augmentation (unused when augmenting on the device).

    Example::

        >>> data = ImageFolderDataModule("my_images", image_size=32)  # doctest: +SKIP
        >>> data.num_classes, data.classes  # doctest: +SKIP
        (3, ['cat', 'dog', 'fox'])
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        batch_size: int = 256,
        val_size: int = 0,
        seed: int = 0,
        augment_on_device: bool = True,
        num_workers: int = 2,
    ) -> None:
        super().__init__(batch_size, val_size, seed, augment_on_device, num_workers)
        if not 8 <= image_size <= 1024:
            raise QlightError(f"data.image_size must be between 8 and 1024, got {image_size}")
        self.save_hyperparameters()
        self.root, self.image_size = Path(root), image_size
        for split in ("train", "val"):
            if not (self.root / split).is_dir():
                raise QlightError(
                    f"{self.root / split} is not a folder: data.root must hold train/<class>/<image> and "
                    "val/<class>/<image>"
                )
        self.classes = _class_folders(self.root / "train")
        if len(self.classes) < 2:
            raise QlightError(f"{self.root / 'train'} holds {len(self.classes)} class folders: a classifier needs two")
        unknown = sorted(set(_class_folders(self.root / "val")) - set(self.classes))
        if unknown:
            raise QlightError(f"{self.root / 'val'} has classes that train/ lacks: {', '.join(unknown[:5])}")
        self.num_classes = len(self.classes)
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # until load() measures them

    def load(self) -> tuple[Split, Split]:
        train = read_image_folder(self.root / "train", self.classes, self.image_size)
        pixels = train[0].transpose(0, 1).reshape(3, -1).float() / 255
        self.mean = tuple(pixels.mean(1).tolist())
        self.std = tuple(pixels.std(1).clamp_min(1e-3).tolist())
        return train, read_image_folder(self.root / "val", self.classes, self.image_size)

    def fingerprint(self) -> dict[str, Any]:
        """What the folders hold, from a stat of each file (no image is read): the study redoes its stages
        when an image is added, removed or rewritten under the same ``root``."""
        digest = hashlib.sha256()
        count = 0
        for split in ("train", "val"):
            for path in sorted((self.root / split).rglob("*")):
                if path.is_file():
                    stat = path.stat()
                    digest.update(f"{path.relative_to(self.root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
                    count += 1
        return {"files": count, "stat_sha256": digest.hexdigest()}
