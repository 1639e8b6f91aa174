"""CIFAR-10 and CIFAR-100 from their python archives, as uint8 tensors (or an offline synthetic stand-in)."""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_url, extract_archive

from qlight.data.augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from qlight.data.in_memory import InMemoryImageDataModule, Split
from qlight.data.synthetic import synthetic_images
from qlight.errors import QlightError

MAX_SYNTHETIC = 1_000_000  # 3 GB of images: beyond that a typo, not a test
OFFLINE_HINT = "to run without the dataset use --config configs/smoke.yaml (synthetic data)"
# Per dataset: torchvision's reader (it names the files, checksums and URL), the key of the labels in
# its pickles, and the number of classes.
FORMATS: dict[str, tuple[type[CIFAR10], str, int]] = {
    "cifar10": (CIFAR10, "labels", 10),
    "cifar100": (CIFAR100, "fine_labels", 100),
}


def _format(dataset: str) -> tuple[type[CIFAR10], str, int]:
    if dataset not in FORMATS:
        raise ValueError(f"dataset is one of {', '.join(FORMATS)}, not {dataset!r}")
    return FORMATS[dataset]


def ensure_cifar(
    data_dir: str | Path, dataset: str = "cifar100", download: bool = True, verify_checksums: bool = True
) -> None:
    """Make ``data_dir/cifar-100-python`` (or ``cifar-10-batches-py``) exist, from the archive in
    ``data_dir`` or by downloading.

    Raises :class:`QlightError` with the fix when the data is missing, corrupt or cannot be fetched.
    A corrupt archive is reported and left where it is.
    """
    reader = _format(dataset)[0]
    title = dataset.upper().replace("CIFAR", "CIFAR-")
    root = Path(data_dir)
    folder = root / reader.base_folder
    archive = root / reader.filename
    files = reader.train_list + reader.test_list + [[reader.meta["filename"], reader.meta["md5"]]]
    if all((folder / name).is_file() for name, _ in files):
        if verify_checksums and not all(check_integrity(str(folder / name), md5) for name, md5 in files):
            raise QlightError(
                f"{folder} does not match {title}'s checksums: replace it with a fresh copy, "
                "or set data.verify_checksums false for a subset in the same format"
            )
        return
    if archive.is_file():
        if verify_checksums and not check_integrity(str(archive), reader.tgz_md5):
            raise QlightError(
                f"{archive} is corrupt (MD5 mismatch); it was left in place: delete it and download {reader.url} again"
            )
        _extract(archive, root, reader)
        return
    where = f"put {reader.filename} (or its extracted {reader.base_folder}/ folder) in {root}/"
    if not download:
        raise QlightError(f"{title} not found in {root} and data.download is false: {where}; {OFFLINE_HINT}")
    try:
        download_url(reader.url, str(root), filename=reader.filename, md5=reader.tgz_md5)
    except Exception as err:  # urllib and torchvision raise many types for "no network"
        raise QlightError(
            f"{title} could not be downloaded ({type(err).__name__}: {err}); {where}; {OFFLINE_HINT}"
        ) from None
    _extract(archive, root, reader)


def _extract(archive: Path, root: Path, reader: type[CIFAR10]) -> None:
    # Into a scratch folder first, then renamed: a stopped extraction leaves no half dataset behind.
    scratch = root / f".extracting-{os.getpid()}"
    try:
        extract_archive(str(archive), str(scratch))
        os.replace(scratch / reader.base_folder, root / reader.base_folder)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise QlightError(
            f"{archive} cannot be extracted ({type(err).__name__}); it was left in place: delete it and "
            f"download {reader.url} again"
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _plain_dtype(spec: str, *args: Any) -> np.dtype:
    dtype = np.dtype(spec, *args)
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"dtype {dtype} is not a plain number type")
    return dtype


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    return text.encode("latin1")


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays of numbers, and no other object: a
    pickle runs code through the globals it names, and these are all it may name."""

    # numpy's array rebuilder, under its numpy 1 and numpy 2 module names (read off an array's reduce).
    GLOBALS: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
        ("_codecs", "encode"): _latin1,  # how protocol 2 writes bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not plain data")
        return self.GLOBALS[module, name]


def _labels(value: Any, count: int, key: str) -> np.ndarray:
    """``count`` whole numbers, from a flat list of ints or a 1-D integer array: checked before numpy
    sees it, because nested lists that share one sublist unfold into gigabytes from a few bytes."""
    flat = isinstance(value, list) and all(type(v) is int for v in value)
    labels = np.asarray(value) if flat or isinstance(value, np.ndarray) else None
    if labels is None or labels.shape != (count,) or labels.dtype.kind not in "iu":  # "O": ints beyond int64
        raise ValueError(f"{key} is not one whole number per image")
    return labels


def load_cifar(data_dir: str | Path, train: bool, dataset: str = "cifar100") -> Split:
    """One split as ``(uint8 (N, 3, 32, 32), int64 (N,))``, read with an unpickler that builds plain
    data only (whether or not the checksums were verified) and checked for the format's shapes and labels."""
    reader, key, classes = _format(dataset)
    folder = Path(data_dir) / reader.base_folder
    parts = []
    for name, _ in reader.train_list if train else reader.test_list:
        path = folder / name
        try:
            with open(path, "rb") as file:
                entry = _PlainUnpickler(file, encoding="latin1").load()
            data = entry["data"]
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError("data is not uint8 rows of 3,072 pixels")
            labels = _labels(entry[key], len(data), key)
            if len(labels) and not 0 <= labels.min() <= labels.max() < classes:
                raise ValueError(f"labels outside 0..{classes - 1} ({labels.min()}..{labels.max()})")
        except (
            pickle.UnpicklingError,
            EOFError,
            OSError,
            KeyError,
            ValueError,
            TypeError,
            IndexError,
            MemoryError,
        ) as err:
            raise QlightError(
                f"{path} cannot be read as {dataset} ({type(err).__name__}: {str(err)[:200]}): delete "
                f"{folder} and extract the archive again"
            ) from None
        parts.append((data, labels))
    images = torch.from_numpy(np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(np.concatenate([lab for _, lab in parts]).astype(np.int64))


class CIFAR100DataModule(InMemoryImageDataModule):
    """CIFAR-100 (or an offline synthetic stand-in) in memory, augmented on the training device (see
    :class:`~qlight.data.in_memory.InMemoryImageDataModule`: on-device batches, DDP shards, resumption).

    Args:
        data_dir: holds ``cifar-100-python.tar.gz`` or its extracted ``cifar-100-python/`` folder.
        batch_size: training and evaluation batch size (per device).
        val_size: images held out of the training set for validation (seeded); 0 validates on test.
        seed: seeds the validation split and the training order (``seed + epoch``).
        download: fetch the dataset when it is not in ``data_dir``.
        verify_checksums: check the dataset's MD5s; switch off for subsets in the same format.
        augment_on_device: keep the data on the training device and augment whole batches there.
        num_workers: DataLoader workers for CPU augmentation (unused when augmenting on the device).
        synthetic: use generated images with class structure instead of the dataset (no files needed).
        synthetic_train_size: synthetic training images (validation is taken from these).
        synthetic_test_size: synthetic test images.
    """

    dataset = "cifar100"
    num_classes = FORMATS[dataset][2]
    mean, std = CIFAR100_MEAN, CIFAR100_STD

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 256,
        val_size: int = 5000,
        seed: int = 0,
        download: bool = True,
        verify_checksums: bool = True,
        augment_on_device: bool = True,
        num_workers: int = 2,
        synthetic: bool = False,
        synthetic_train_size: int = 50000,
        synthetic_test_size: int = 10000,
    ) -> None:
        super().__init__(batch_size, val_size, seed, augment_on_device, num_workers)
        sizes = {"synthetic_train_size": synthetic_train_size, "synthetic_test_size": synthetic_test_size}
        for name, size in sizes.items():
            if synthetic and not 1 <= size <= MAX_SYNTHETIC:
                raise QlightError(f"data.{name} must be between 1 and {MAX_SYNTHETIC:,}, got {size}")
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        if not self.hparams.synthetic:
            ensure_cifar(self.hparams.data_dir, self.dataset, self.hparams.download, self.hparams.verify_checksums)

    def load(self) -> tuple[Split, Split]:
        hp = self.hparams
        if hp.synthetic:
            train = synthetic_images(hp.synthetic_train_size, self.num_classes, hp.seed, split_seed=0)
            return train, synthetic_images(hp.synthetic_test_size, self.num_classes, hp.seed, split_seed=1)
        return load_cifar(hp.data_dir, True, self.dataset), load_cifar(hp.data_dir, False, self.dataset)


class CIFAR10DataModule(CIFAR100DataModule):
    """CIFAR-10 (``data_dir`` holds ``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/``); arguments as
    :class:`CIFAR100DataModule`."""

    dataset = "cifar10"
    num_classes = FORMATS[dataset][2]
    mean, std = CIFAR10_MEAN, CIFAR10_STD
