"""Datasets and DataModules."""

from qlight.data.augment import CIFAR100_MEAN, CIFAR100_STD, normalize, random_crop_flip
from qlight.data.cifar100 import CIFAR100DataModule, ensure_cifar100, load_cifar100
from qlight.data.device_batches import DeviceBatches, EpochBatches, EpochShard
from qlight.data.synthetic import synthetic_images

__all__ = [
    "CIFAR100DataModule",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DeviceBatches",
    "EpochBatches",
    "EpochShard",
    "ensure_cifar100",
    "load_cifar100",
    "normalize",
    "random_crop_flip",
    "synthetic_images",
]
