"""Float casts: ``fp32`` (the reference), ``fp16``, ``bf16``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qlight.quantization.grid.intx import Granularity
from qlight.quantization.recipes.base import Recipe, register_recipe

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class FloatCast:
    """Cast weights (and inputs) to a float dtype; ``fp32`` is the unquantized reference."""

    name: str
    dtype: torch.dtype
    static = False
    calibrated = False
    per_layer = False
    granularity = ""
    method = "cast"
    runtime = "eager"
    suffix = ".pt"

    @property
    def bits(self) -> int:
        return torch.finfo(self.dtype).bits

    @property
    def input_dtype(self) -> torch.dtype:
        return self.dtype

    def quantize(self, model: nn.Module, targets: Sequence[str], calibration: Sequence[Tensor] = ()) -> nn.Module:
        return model.to(self.dtype)


@register_recipe(f"{', '.join(FLOAT_DTYPES)}: cast weights and inputs", FLOAT_DTYPES)
def _float_cast(name: str, granularity: Granularity, method: str) -> Recipe | None:
    return FloatCast(name, FLOAT_DTYPES[name]) if name in FLOAT_DTYPES else None
