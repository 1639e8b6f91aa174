"""Offline stand-in for CIFAR: uint8 images whose classes differ in structure, not just in label."""

from __future__ import annotations

import torch
from torch import Tensor


def synthetic_images(
    num_images: int, num_classes: int, seed: int, image_size: int = 32, split_seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Return ``(images uint8 (N, 3, H, W), labels int64 (N,))``.

    Each class is a mean colour plus a smooth random pattern (a 4x4 grid upsampled), shared by every split made
    with the same ``seed``; each image adds a random shift, contrast and pixel noise
    (``split_seed`` picks the draw), so a CNN must learn the pattern and accuracy rises clearly above
    chance within a few hundred steps, while low-bit quantization visibly hurts it.
    """
    g_classes = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, 3, 4, 4, generator=g_classes)
    patterns = torch.nn.functional.interpolate(patterns, size=image_size, mode="bicubic", align_corners=False)
    colours = torch.rand(num_classes, 3, 1, 1, generator=g_classes) * 2 - 1
    templates = 0.6 * patterns + colours
    g = torch.Generator().manual_seed(seed * 1_000_003 + split_seed + 1)
    labels = torch.randint(0, num_classes, (num_images,), generator=g)
    contrast = 0.8 + 0.4 * torch.rand(num_images, 1, 1, 1, generator=g)
    noise = torch.randn(num_images, 3, image_size, image_size, generator=g)
    images = 128 + 80 * contrast * templates[labels] + 12 * noise
    shifts = torch.randint(-3, 4, (num_images, 2), generator=g)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        images[i] = images[i].roll((dy, dx), dims=(1, 2))
    return images.clamp(0, 255).to(torch.uint8), labels
