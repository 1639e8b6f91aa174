"""CIFAR-100 as uint8 tensors, with augmentation on the training device."""

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
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import CIFAR100
from torchvision.datasets.utils import check_integrity, download_url, extract_archive
from torchvision.transforms import v2

from qlight.data.augment import normalize, random_crop_flip
from qlight.data.device_batches import DeviceBatches, EpochBatches, EpochShard, to_device
from qlight.data.synthetic import synthetic_images
from qlight.errors import QlightError

OFFLINE_HINT = "to run without the dataset use --config configs/smoke.yaml (synthetic data)"


class _UnverifiedCIFAR100(CIFAR100):
    """torchvision's CIFAR-100 reader without its MD5 checks, for subsets written in the same format."""

    train_list = [["train", None]]
    test_list = [["test", None]]
    meta = {**CIFAR100.meta, "md5": None}


def _reader(verify_checksums: bool) -> type[CIFAR100]:
    return CIFAR100 if verify_checksums else _UnverifiedCIFAR100


def ensure_cifar100(data_dir: str | Path, download: bool = True, verify_checksums: bool = True) -> None:
    """Make ``data_dir/cifar-100-python`` exist, from the archive in ``data_dir`` or by downloading.

    Raises :class:`QlightError` with the fix when the data is missing, corrupt or cannot be fetched.
    A corrupt archive is reported and left where it is.
    """
    root = Path(data_dir)
    folder = root / CIFAR100.base_folder
    archive = root / CIFAR100.filename
    reader = _reader(verify_checksums)
    if all((folder / name).is_file() for name in ("train", "test", "meta")):
        files = reader.train_list + reader.test_list + [[reader.meta["filename"], reader.meta["md5"]]]
        if not all(check_integrity(str(folder / name), md5) for name, md5 in files):
            raise QlightError(
                f"{folder} does not match CIFAR-100's checksums: replace it with a fresh copy, "
                "or set data.verify_checksums false for a subset in the same format"
            )
        return
    if archive.is_file():
        if verify_checksums and not check_integrity(str(archive), CIFAR100.tgz_md5):
            raise QlightError(
                f"{archive} is corrupt (MD5 mismatch); it was left in place: delete it and download "
                f"{CIFAR100.url} again"
            )
        _extract(archive, root)
        return
    where = f"put {CIFAR100.filename} (or its extracted {CIFAR100.base_folder}/ folder) in {root}/"
    if not download:
        raise QlightError(f"CIFAR-100 not found in {root} and data.download is false: {where}; {OFFLINE_HINT}")
    try:
        download_url(CIFAR100.url, str(root), filename=CIFAR100.filename, md5=CIFAR100.tgz_md5)
    except Exception as err:  # urllib and torchvision raise many types for "no network"
        raise QlightError(
            f"CIFAR-100 could not be downloaded ({type(err).__name__}: {err}); {where}; {OFFLINE_HINT}"
        ) from None
    _extract(archive, root)


def _extract(archive: Path, root: Path) -> None:
    # Into a scratch folder first, then renamed: a stopped extraction leaves no half dataset behind.
    scratch = root / f".extracting-{os.getpid()}"
    try:
        extract_archive(str(archive), str(scratch))
        os.replace(scratch / CIFAR100.base_folder, root / CIFAR100.base_folder)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise QlightError(
            f"{archive} cannot be extracted ({type(err).__name__}); it was left in place: delete it and "
            f"download {CIFAR100.url} again"
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


def load_cifar100(data_dir: str | Path, train: bool) -> tuple[Tensor, Tensor]:
    """One split as ``(uint8 (N, 3, 32, 32), int64 (N,))``, read with an unpickler that builds plain
    data only (whether or not the checksums were verified) and checked for CIFAR-100's shapes and labels."""
    path = Path(data_dir) / CIFAR100.base_folder / ("train" if train else "test")
    try:
        with open(path, "rb") as file:
            entry = _PlainUnpickler(file, encoding="latin1").load()
        data, labels = entry["data"], np.asarray(entry["fine_labels"])
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError("data is not uint8 rows of 3,072 pixels")
        if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
            raise ValueError("fine_labels is not one whole number per image")
        if len(labels) and not 0 <= labels.min() <= labels.max() < CIFAR100DataModule.num_classes:
            raise ValueError(f"labels outside 0..99 ({labels.min()}..{labels.max()})")
    except (pickle.UnpicklingError, EOFError, OSError, KeyError, ValueError, TypeError, IndexError, MemoryError) as err:
        raise QlightError(
            f"{path} cannot be read as CIFAR-100 ({type(err).__name__}: {str(err)[:200]}): delete "
            f"{path.parent} and extract the archive again"
        ) from None
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


class _CropFlip(Dataset):
    """Per-image augmentation on the CPU, for DataLoader workers (the classic input pipeline)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels
        self.transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[index]), self.labels[index]


class CIFAR100DataModule(LightningDataModule):
    """CIFAR-100 (or an offline synthetic stand-in) held in memory as uint8 tensors.

    With ``augment_on_device`` (the default) the tensors are copied once to the device the trainer
    runs on (CIFAR-100: 184 MB of GPU memory for train and test) and each batch is gathered there by
    index, cropped, flipped and normalized on the device: no loader worker, no pinning, no
    host-to-device copy per step. The training order is a seeded permutation per epoch; under DDP each
    rank takes a disjoint shard of equal size, and a run resumed mid-epoch continues the same order.
    With it off, DataLoader workers crop and flip each image on the CPU and batches are copied per step.

    Args:
        data_dir: holds ``cifar-100-python.tar.gz`` or its extracted ``cifar-100-python/`` folder.
        batch_size: training and evaluation batch size (per device).
        val_size: images held out of the training set for validation (seeded); 0 validates on test.
        seed: seeds the validation split and the training order (``seed + epoch``).
        download: fetch CIFAR-100 when it is not in ``data_dir``.
        verify_checksums: check CIFAR-100's MD5s; switch off for subsets in the same format.
        augment_on_device: keep the data on the training device and augment whole batches there.
        num_workers: DataLoader workers for CPU augmentation (unused when augmenting on the device).
        synthetic: use generated images with class structure instead of CIFAR-100 (no files needed).
        synthetic_train_size: synthetic training images (validation is taken from these).
        synthetic_test_size: synthetic test images.
    """

    num_classes = 100

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
        super().__init__()
        if batch_size < 1:
            raise QlightError(f"data.batch_size must be at least 1, got {batch_size}")
        if val_size < 0:
            raise QlightError(f"data.val_size must be 0 or more, got {val_size}")
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self._placed: dict[tuple[int, torch.device], tuple[Tensor, ...]] = {}
        self._train_batches: EpochBatches | None = None
        self._train_position: dict[str, Any] | None = None  # restored from a checkpoint

    def prepare_data(self) -> None:
        if not self.hparams.synthetic:
            ensure_cifar100(self.hparams.data_dir, self.hparams.download, self.hparams.verify_checksums)

    def setup(self, stage: str) -> None:
        if self.test_set is not None:
            return
        if self.hparams.synthetic:
            train = synthetic_images(
                self.hparams.synthetic_train_size, self.num_classes, self.hparams.seed, split_seed=0
            )
            test = synthetic_images(self.hparams.synthetic_test_size, self.num_classes, self.hparams.seed, split_seed=1)
        else:
            train = load_cifar100(self.hparams.data_dir, True)
            test = load_cifar100(self.hparams.data_dir, False)
        if self.hparams.val_size >= len(train[1]):
            raise QlightError(f"data.val_size={self.hparams.val_size} leaves no training images out of {len(train[1])}")
        order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(self.hparams.seed))
        val_idx, train_idx = order[: self.hparams.val_size], order[self.hparams.val_size :]
        self.train_set = TensorDataset(train[0][train_idx], train[1][train_idx])
        self.test_set = TensorDataset(*test)
        self.val_set = TensorDataset(train[0][val_idx], train[1][val_idx]) if self.hparams.val_size else self.test_set

    def _device(self) -> torch.device:
        """Where the data lives: the trainer's device when augmenting there, else host memory."""
        if self.trainer is None or not self.hparams.augment_on_device:
            return torch.device("cpu")
        return self.trainer.strategy.root_device

    def _on(self, dataset: TensorDataset | None, what: str) -> tuple[Tensor, ...]:
        assert dataset is not None, "call setup() first"
        device = self._device()
        key = (id(dataset), device)
        if key not in self._placed:  # once per dataset and device (val is test when val_size is 0)
            self._placed[key] = to_device(dataset.tensors, device, f"the {what} images")
        return self._placed[key]

    def _in_order(self, dataset: TensorDataset | None, what: str) -> DeviceBatches:
        return DeviceBatches(*self._on(dataset, what), self.hparams.batch_size)

    def train_dataloader(self) -> EpochBatches | DataLoader:
        if self.hparams.augment_on_device:
            images, labels = self._on(self.train_set, "training")
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            shard = EpochShard(len(labels), self.hparams.seed, images.device, rank, world)
            self._train_batches = EpochBatches(images, labels, self.hparams.batch_size, shard)
            if self._train_position is not None:
                self._train_batches.load_state_dict(self._train_position)
                self._train_position = None
            return self._train_batches
        assert self.train_set is not None, "call setup('fit') first"
        return DataLoader(
            _CropFlip(*self.train_set.tensors),
            batch_size=self.hparams.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            pin_memory=self.trainer is not None and self.trainer.strategy.root_device.type == "cuda",
        )

    def val_dataloader(self) -> DeviceBatches:
        return self._in_order(self.val_set, "validation")

    def test_dataloader(self) -> DeviceBatches:
        return self._in_order(self.test_set, "test")

    def predict_dataloader(self) -> DeviceBatches:
        return self._in_order(self.test_set, "test")

    def state_dict(self) -> dict[str, Any]:
        return {"train_position": self._train_batches.state_dict()} if self._train_batches is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores a stateful loader only if it builds the loader after restoring the loops,
        # but a schedule that asks for ``estimated_stepping_batches`` builds it before: the DataModule's
        # state is restored first, so the position goes through here.
        self._train_position = state_dict.get("train_position")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        if self.trainer is not None and self.trainer.training and self.hparams.augment_on_device:
            if self._train_batches is not None:
                self._train_batches.mark_trained()
            images = random_crop_flip(images)
        return normalize(images), labels
