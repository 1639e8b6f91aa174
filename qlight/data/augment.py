"""Batched augmentation of uint8 image tensors, run on whatever device the batch is on."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# Per-channel mean and standard deviation of the training images, in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def random_crop_flip(images: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Random crop after zero padding plus horizontal flip, per image, on an (N, C, H, W) batch.

    Same semantics as torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()`` but
    one gather for the whole batch, so it stays cheap on a GPU.
    """
    n, _, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, n), device=device, generator=generator)
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    rows = offsets[0, :, None] + torch.arange(h, device=device)
    cols = torch.arange(w, device=device).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + offsets[1, :, None]
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


@functools.lru_cache(maxsize=16)
def _shift_scale(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    # Cached per device: building them anew is a pageable host-to-GPU copy, which waits for the GPU
    # to finish all queued work and so stalls the input pipeline every step.
    shift = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
    return shift, 1.0 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)


def normalize(images: Tensor, mean: tuple[float, ...] = CIFAR100_MEAN, std: tuple[float, ...] = CIFAR100_STD) -> Tensor:
    """uint8 (N, C, H, W) in [0, 255] to float32, standardized per channel."""
    shift, scale = _shift_scale(tuple(mean), tuple(std), images.device)
    return (images.float() - shift) * scale
