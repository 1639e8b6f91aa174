"""Batches gathered by index from tensors that already live on the training device.

A DataLoader hands each batch to the accelerator from host memory: a gather on the CPU, pinning and
a host-to-device copy every step, all on the host's critical path. A dataset the size of CIFAR-100
(150 MB as uint8) fits in any GPU's memory, so it is copied there once and every batch is one index
on the device. Lightning accepts any iterable as a loader; these follow its protocols for the rest:
``set_epoch`` (as ``DistributedSampler``) and ``state_dict`` (resuming mid-epoch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from qlight.errors import QlightError


def to_device(tensors: tuple[Tensor, ...], device: torch.device, what: str) -> tuple[Tensor, ...]:
    """``tensors`` on ``device``; a one-line error naming the fix when they do not fit."""
    try:
        return tuple(t.to(device) for t in tensors)
    except torch.OutOfMemoryError:
        mib = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        raise QlightError(
            f"{what} ({mib:.0f} MiB) does not fit in the memory of {device}: set --data.augment_on_device false "
            "(batches are then copied from host memory every step)"
        ) from None


class EpochShard:
    """A seeded permutation of ``size`` indices per epoch, drawn on ``device``; rank ``rank`` of
    ``world_size`` takes every ``world_size``-th index of it, so the ranks' shards are disjoint and
    equal in size (the remainder is left out, as ``DistributedSampler(drop_last=True)`` does)."""

    def __init__(self, size: int, seed: int, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size} ranks")
        self.size, self.seed, self.device = size, seed, device
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each training epoch, as for ``DistributedSampler``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world_size

    def indices(self) -> Tensor:
        """This rank's indices for the current epoch, on the device."""
        generator = torch.Generator(device=self.device).manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator, device=self.device)
        return order[self.rank : len(self) * self.world_size : self.world_size]


class DeviceBatches:
    """``(images, labels)`` batches of ``batch_size``, in order, sliced from ``images`` and ``labels``
    on their device (views: nothing is copied)."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            yield self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]


class EpochBatches:
    """Training batches of ``batch_size`` gathered by index from ``images`` and ``labels`` on their
    device, in the ``sampler``'s order for the epoch (whole batches only).

    Resumable: ``state_dict`` holds the epoch and the batches of it already trained. A batch counts as
    trained when :meth:`mark_trained` is called for it, where the trainer consumes it: a loader runs
    a batch ahead of training (Lightning prefetches one).
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, sampler: EpochShard) -> None:
        self.images, self.labels, self.batch_size, self.sampler = images, labels, batch_size, sampler
        self.trained = 0  # batches of the sampler's epoch already trained
        self._resume_at = 0

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A generator: the epoch is read when the first batch is drawn, after Lightning's set_epoch.
        order = self.sampler.indices()
        start, self._resume_at = self._resume_at, 0
        self.trained = start
        for batch in range(start, len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self.images[index], self.labels[index]

    def mark_trained(self) -> None:
        """Count one more batch of this epoch as trained (what a resumed run skips)."""
        self.trained += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "trained": self.trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, trained = int(state["epoch"]), int(state["trained"])
        if trained >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, trained = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self._resume_at = trained
