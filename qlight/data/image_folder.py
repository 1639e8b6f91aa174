"""Your own images, one folder per class, decoded once into memory at a fixed size."""

from __future__ import annotations

import hashlib
import re
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from qlight.data.in_memory import InMemoryImageDataModule, Split
from qlight.errors import QlightError

MAX_PIXELS = 50_000_000  # per image, read from its header before decoding (Pillow warns above 89 million)
MAX_SIDE = 65_535  # JPEG's own limit; a longer strip is no photograph
TORCHVISION_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # decoded by torchvision; Pillow decodes the rest (BMP, TIFF)
STATS_CHUNK_BYTES = 1 << 24  # of images per step of the mean and deviation: the memory they take beyond the images


def _shown(path: Path) -> str:
    """``path`` for an error line: escaped when its name holds a newline or another unprintable character."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _reason(err: BaseException) -> str:
    """A decoder's message on one line, whole words, without torchvision's ``function, file.cpp:line, `` prefix."""
    if isinstance(err, UnidentifiedImageError):
        return "not in a format that torchvision or Pillow decodes"
    text = re.sub(r"^[^,]*, \S+:\d+, ", "", " ".join(str(err).split()))
    return textwrap.shorten(text, 160, placeholder=" ...") or type(err).__name__


def _pillow_pixels(image: Image.Image) -> Tensor:
    if image.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert("RGB") would clip at 255
        return torch.from_numpy(np.asarray(image).astype(np.uint16)).expand(3, -1, -1)
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def read_image(path: Path, image_size: int) -> Tensor:
    """One image as RGB uint8 ``(3, image_size, image_size)``: its centre square, resized. The size in the
    file's header is checked before anything is decoded (a 50 KB PNG can declare billions of pixels);
    16-bit images keep their top 8 bits. One line naming the file for anything that cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with our limit
            image = Image.open(path)  # reads the header only
        with image:
            width, height = image.size
            if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
                raise Image.DecompressionBombError(f"{width}x{height} pixels")
            if image.format in TORCHVISION_FORMATS:
                pixels = decode_image(str(path), mode=ImageReadMode.RGB)
                pixels = pixels[0] if pixels.dim() == 4 else pixels  # an animated GIF: its first frame
            else:
                pixels = _pillow_pixels(image)
        pixels = F.to_dtype(pixels, torch.uint8, scale=True)
        side = min(pixels.shape[-2:])  # crop first: resizing a 1x999999 strip's short side to 32 takes 3 GB
        return F.resize(F.center_crop(pixels, [side, side]), [image_size, image_size], antialias=True)
    except Image.DecompressionBombError as err:  # ours, or Pillow's own beyond twice its limit
        size = re.search(r"\d+(x\d+)? pixels", str(err))
        raise QlightError(
            f"{_shown(path)} is {size.group() if size else 'too many pixels'}, over the limit of {MAX_PIXELS:,} "
            f"pixels ({MAX_SIDE:,} a side): shrink it or remove it"
        ) from None
    except (RuntimeError, OSError, ValueError, SyntaxError) as err:
        raise QlightError(f"{_shown(path)} cannot be read as an image ({_reason(err)}): remove or replace it") from None


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS)]


def read_image_folder(folder: Path, classes: list[str], image_size: int, every_class: bool = False) -> Split:
    """Every image under ``folder/<class>/`` (any depth, torchvision's image extensions), as RGB uint8
    centre-cropped and resized to ``image_size`` (:func:`read_image`); labels index ``classes``. With
    ``every_class``, a class folder without images is refused, as torchvision's ``ImageFolder`` does."""
    files = {name: _image_files(folder / name) if (folder / name).is_dir() else [] for name in classes}
    empty = [name for name, paths in files.items() if not paths]
    if every_class and empty:
        raise QlightError(
            f"{_shown(folder)} has class folders without images ({', '.join(IMG_EXTENSIONS)}): "
            f"{', '.join(map(repr, empty[:5]))}: add images to them or remove them"
        )
    paths = [path for name in classes for path in files[name]]
    if not paths:
        raise QlightError(f"{_shown(folder)} holds no images in its class folders ({', '.join(IMG_EXTENSIONS)})")
    images = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)  # filled in place: no copy
    for index, path in enumerate(paths):
        images[index] = read_image(path, image_size)
    labels = [label for label, name in enumerate(classes) for _ in files[name]]
    return images, torch.tensor(labels, dtype=torch.int64)


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation in [0, 1] of uint8 ``(N, C, H, W)`` images, exact, from a
    histogram of each channel counted a few images at a time (:data:`STATS_CHUNK_BYTES`; no float copy of the data)."""
    counts = torch.zeros(images.shape[1], 256, dtype=torch.float64)
    for chunk in images.split(max(1, STATS_CHUNK_BYTES // images[0].numel())):
        for channel in range(images.shape[1]):
            counts[channel] += torch.bincount(chunk[:, channel].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255
    total = counts.sum(1)
    mean = (counts * values).sum(1) / total
    var = (counts * (values - mean[:, None]) ** 2).sum(1) / (total - 1).clamp_min(1)
    return tuple(mean.tolist()), tuple(var.sqrt().clamp_min(1e-3).tolist())


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
        image_size: side of the square images (the centre square of each image, resized).
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
        train = read_image_folder(self.root / "train", self.classes, self.image_size, every_class=True)
        self.mean, self.std = channel_stats(train[0])
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
