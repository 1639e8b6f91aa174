"""CIFAR-100 as uint8 tensors, with augmentation on the training device."""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset
from torchvision.datasets import CIFAR100
from torchvision.datasets.utils import check_integrity, download_url, extract_archive
from torchvision.transforms import v2

from qlight.data.augment import normalize, random_crop_flip
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


def load_cifar100(data_dir: str | Path, train: bool, verify_checksums: bool = True) -> tuple[Tensor, Tensor]:
    """One split through torchvision's reader, as ``(uint8 (N, 3, 32, 32), int64 (N,))``."""
    reader = _reader(verify_checksums)
    try:
        dataset = reader(str(data_dir), train=train, download=False)
    except (pickle.UnpicklingError, EOFError, OSError, KeyError, ValueError) as err:
        folder = Path(data_dir) / CIFAR100.base_folder
        raise QlightError(
            f"{folder} cannot be read as CIFAR-100 ({type(err).__name__}): delete it and extract the archive again"
        ) from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets, dtype=torch.long)


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

    Batches leave the loader as uint8 and are normalized in ``on_after_batch_transfer``; the
    training crop/flip runs there too when ``augment_on_device`` (default: on a GPU), so no PIL and
    no worker processes sit between the data and the accelerator. With it off, DataLoader workers
    augment each image on the CPU.

    Args:
        data_dir: holds ``cifar-100-python.tar.gz`` or its extracted ``cifar-100-python/`` folder.
        batch_size: training and evaluation batch size (per device).
        val_size: images held out of the training set for validation (seeded); 0 validates on test.
        seed: seeds the validation split and the shuffling.
        download: fetch CIFAR-100 when it is not in ``data_dir``.
        verify_checksums: check CIFAR-100's MD5s; switch off for subsets in the same format.
        augment_on_device: crop/flip on the training device; ``None`` picks it on GPUs.
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
        augment_on_device: bool | None = None,
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
            train = load_cifar100(self.hparams.data_dir, True, self.hparams.verify_checksums)
            test = load_cifar100(self.hparams.data_dir, False, self.hparams.verify_checksums)
        if self.hparams.val_size >= len(train[1]):
            raise QlightError(f"data.val_size={self.hparams.val_size} leaves no training images out of {len(train[1])}")
        order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(self.hparams.seed))
        val_idx, train_idx = order[: self.hparams.val_size], order[self.hparams.val_size :]
        self.train_set = TensorDataset(train[0][train_idx], train[1][train_idx])
        self.test_set = TensorDataset(*test)
        self.val_set = TensorDataset(train[0][val_idx], train[1][val_idx]) if self.hparams.val_size else self.test_set

    def _on_gpu(self) -> bool:
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def _on_device(self) -> bool:
        return self._on_gpu() if self.hparams.augment_on_device is None else self.hparams.augment_on_device

    def _batches(self, dataset: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        # Whole batches are gathered with one tensor index: no per-image collate, no workers.
        order = (
            RandomSampler(dataset, generator=torch.Generator().manual_seed(self.hparams.seed))
            if shuffle
            else SequentialSampler(dataset)
        )
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=BatchSampler(order, self.hparams.batch_size, drop_last),
            pin_memory=self._on_gpu(),
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup('fit') first"
        if self._on_device():
            return self._batches(self.train_set, shuffle=True, drop_last=True)
        return DataLoader(
            _CropFlip(*self.train_set.tensors),
            batch_size=self.hparams.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._batches(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._batches(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._batches(self.test_set, shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        if self.trainer is not None and self.trainer.training and self._on_device():
            images = random_crop_flip(images)
        return normalize(images), labels
