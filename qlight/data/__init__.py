"""Datasets and DataModules."""

from qlight.data.augment import CIFAR100_MEAN, CIFAR100_STD, normalize, random_crop_flip
from qlight.data.cifar import CIFAR10DataModule, CIFAR100DataModule, ensure_cifar, load_cifar
from qlight.data.device_batches import DeviceBatches, EpochBatches, EpochShard
from qlight.data.image_folder import ImageFolderDataModule
from qlight.data.in_memory import InMemoryImageDataModule
from qlight.data.synthetic import synthetic_images

__all__ = [
    "CIFAR100DataModule",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10DataModule",
    "DeviceBatches",
    "EpochBatches",
    "EpochShard",
    "ImageFolderDataModule",
    "InMemoryImageDataModule",
    "ensure_cifar",
    "load_cifar",
    "normalize",
    "random_crop_flip",
    "synthetic_images",
]
