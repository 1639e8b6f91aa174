"""How fast a (quantized) model runs: images/s at a batch size and batch-1 latency, on its device."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Speed:
    images_per_s: float  # at the batch size measured
    latency_ms: float  # one image
    spread_pct: float  # range of the timed batch forwards, in % of their median: how far to trust the two above
    device: str


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def _seconds(model: nn.Module, batch: Tensor, repeats: int, warmup: int, budget_s: float) -> list[float]:
    """Seconds of each timed forward after ``warmup`` untimed ones; stops early once ``budget_s`` is spent."""
    sync = torch.cuda.synchronize if batch.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(batch)
    times: list[float] = []
    while len(times) < repeats and sum(times) < budget_s:
        sync()
        start = time.perf_counter()
        model(batch)
        sync()
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def measure_speed(model: nn.Module, batch: Tensor, repeats: int = 5, warmup: int = 1, budget_s: float = 10.0) -> Speed:
    """Images/s on ``batch`` and the latency of its first image, each the median of up to ``repeats``
    timed forwards (fewer when ``budget_s`` runs out: half-precision convolutions on a CPU are slow)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    per_batch = _seconds(model, batch, repeats, warmup, budget_s)
    per_image = statistics.median(_seconds(model, batch[:1], repeats, warmup, budget_s))
    median = statistics.median(per_batch)
    return Speed(
        images_per_s=len(batch) / median,
        latency_ms=1e3 * per_image,
        spread_pct=100 * (max(per_batch) - min(per_batch)) / median,
        device=device_name(batch.device),
    )
