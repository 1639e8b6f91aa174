"""Bytes, in one place: what a quantized layer takes in qlight's files at a bit-width and grouping,
and what a saved layer holds. The mixed-precision budget, the sensitivity table and the file format
all ask here."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from qlight.quantization.grid.intx import Granularity, block_size

SCALE_BYTES, ZERO_POINT_BYTES = 4, 1  # per block: an fp32 scale and an int8 zero point


def code_bytes(count: int, bits: float) -> int:
    """Bytes of ``count`` packed ``bits``-bit codes (int8 codes are stored as they are); ``bits`` may
    be an average (budgets)."""
    return count if bits == 8 else math.ceil(count * bits / 8)


def weight_bytes(shape: Sequence[int], bits: float, granularity: Granularity) -> int:
    """Bytes of one quantized weight in qlight's files: packed codes, then a scale and a zero point
    per block (torch.save's per-tensor framing aside)."""
    count = math.prod(shape)
    blocks = count // math.prod(block_size(tuple(shape), granularity))
    return code_bytes(count, bits) + blocks * (SCALE_BYTES + ZERO_POINT_BYTES)


def stored_weight_bytes(entry: Mapping[str, Any]) -> int:
    """Bytes the tensors of one packed weight of a saved file hold (codes, scales, zero points)."""
    tensors: list[Tensor] = [entry["codes"], entry["scale"], entry["zero_point"]]
    return sum(t.numel() * t.element_size() for t in tensors)
