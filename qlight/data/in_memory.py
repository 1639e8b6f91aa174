"""Image datasets held in memory as uint8 tensors, with augmentation on the training device.

What differs between datasets is how the images are read (:meth:`InMemoryImageDataModule.load`); the
splits, the placement on the device, the loaders, DDP shards and mid-epoch resumption are shared.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms import v2

from qlight.data.augment import normalize, random_crop_flip
from qlight.data.device_batches import DeviceBatches, EpochBatches, EpochShard, to_device
from qlight.errors import QlightError

Split = tuple[Tensor, Tensor]  # uint8 (N, C, H, W) images, int64 (N,) labels


class _CropFlip(Dataset):
    """Per-image augmentation on the CPU, for DataLoader workers (the classic input pipeline)."""

    def __init__(self, images: Tensor, labels: Tensor, padding: int) -> None:
        self.images, self.labels = images, labels
        self.transform = v2.Compose([v2.RandomCrop(images.shape[-2:], padding=padding), v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[index]), self.labels[index]


class InMemoryImageDataModule(LightningDataModule):
    """Base of qlight's DataModules: train and test splits as uint8 tensors, a seeded validation split
    held out of training, and batches augmented (random crop after zero padding, horizontal flip) and
    normalized on the device the trainer runs on.

    With ``augment_on_device`` (the default) the tensors are copied once to the trainer's device and each
    batch is gathered there by index: no loader worker, no pinning, no host-to-device copy per step. The
    training order is a seeded permutation per epoch (``seed + epoch``); under DDP each rank takes a
    disjoint shard of equal size, and a run resumed mid-epoch continues the same order. With it off,
    DataLoader workers crop and flip each image on the CPU and batches are copied per step.

    Subclasses set ``num_classes`` and implement :meth:`load`; ``mean`` and ``std`` (per channel, in
    [0, 1]) normalize the images.
    """

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        batch_size: int = 256,
        val_size: int = 5000,
        seed: int = 0,
        augment_on_device: bool = True,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise QlightError(f"data.batch_size must be at least 1, got {batch_size}")
        if val_size < 0:
            raise QlightError(f"data.val_size must be 0 or more, got {val_size}")
        if num_workers < 0:
            raise QlightError(f"data.num_workers must be 0 or more, got {num_workers}")
        self.batch_size, self.val_size, self.seed = batch_size, val_size, seed
        self.augment_on_device, self.num_workers = augment_on_device, num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self._placed: dict[tuple[int, torch.device], tuple[Tensor, ...]] = {}
        self._train_batches: EpochBatches | None = None
        self._train_position: dict[str, Any] | None = None  # restored from a checkpoint

    def load(self) -> tuple[Split, Split]:
        """The ``(train, test)`` splits."""
        raise NotImplementedError

    @property
    def crop_padding(self) -> int:
        """Zero padding of the random crop: 4 pixels at 32x32, as in the CIFAR papers."""
        assert self.train_set is not None, "call setup() first"
        return max(1, self.train_set.tensors[0].shape[-1] // 8)

    def setup(self, stage: str) -> None:
        if self.test_set is not None:
            return
        train, test = self.load()
        if self.val_size >= len(train[1]):
            raise QlightError(f"data.val_size={self.val_size} leaves no training images out of {len(train[1])}")
        order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        self.train_set = TensorDataset(train[0][train_idx], train[1][train_idx])
        self.test_set = TensorDataset(*test)
        self.val_set = TensorDataset(train[0][val_idx], train[1][val_idx]) if self.val_size else self.test_set

    def _device(self) -> torch.device:
        """Where the data lives: the trainer's device when augmenting there, else host memory."""
        if self.trainer is None or not self.augment_on_device:
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
        return DeviceBatches(*self._on(dataset, what), self.batch_size)

    def _check_batch_size(self, world_size: int) -> None:
        assert self.train_set is not None, "call setup('fit') first"
        per_device = len(self.train_set) // world_size
        if self.batch_size > per_device:
            raise QlightError(
                f"data.batch_size={self.batch_size} is more than the {per_device} training images per device: "
                f"training batches are whole (the last incomplete one is dropped), so none would train: set "
                f"data.batch_size {per_device} or less"
            )

    def train_dataloader(self) -> EpochBatches | DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if self.trainer is None or self.trainer.state.fn == TrainerFn.FITTING:  # PTQ's calibration says its own
            self._check_batch_size(world)
        if self.augment_on_device:
            images, labels = self._on(self.train_set, "training")
            shard = EpochShard(len(labels), self.seed, images.device, rank, world)
            self._train_batches = EpochBatches(images, labels, self.batch_size, shard)
            if self._train_position is not None:
                self._train_batches.load_state_dict(self._train_position)
                self._train_position = None
            return self._train_batches
        return DataLoader(
            _CropFlip(*self.train_set.tensors, self.crop_padding),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
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
        if self.trainer is not None and self.trainer.training and self.augment_on_device:
            if self._train_batches is not None:
                self._train_batches.mark_trained()
            images = random_crop_flip(images, self.crop_padding)
        return normalize(images, self.mean, self.std), labels
