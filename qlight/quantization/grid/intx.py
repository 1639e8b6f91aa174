"""N-bit weights as torchao ``IntxUnpackedToInt8Tensor``, in either grouping of a conv's scales.

torchao's ``IntxWeightOnlyConfig`` accepts only ``PerAxis``/``PerGroup``; on a conv weight
``PerAxis(0)`` gives one scale per (out-channel, kh, kw). The tensor itself takes any block size, so
qlight builds it with ``IntxUnpackedToInt8Tensor.from_hp`` (round to nearest) or from given codes and
scales (QAT conversion, methods that choose their own, files), one code path for every grouping.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torchao.quantization import IntxUnpackedToInt8Tensor
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS

Granularity = Literal["per_channel", "per_kernel_position"]
GRANULARITIES: tuple[str, ...] = ("per_channel", "per_kernel_position")
MIN_BITS, MAX_BITS = 2, 8


def int_dtype(bits: int) -> torch.dtype:
    """``torch.int2`` .. ``torch.int8`` for ``bits``."""
    return getattr(torch, f"int{bits}")


def dtype_bits(dtype: torch.dtype) -> int:
    """Inverse of :func:`int_dtype`."""
    return int(str(dtype).removeprefix("torch.int"))


def code_range(bits: int) -> tuple[int, int]:
    """``(qmin, qmax)`` of signed ``bits``-bit codes."""
    return _DTYPE_TO_QVALUE_BOUNDS[int_dtype(bits)]


def block_size(shape: torch.Size | tuple[int, ...], granularity: Granularity) -> tuple[int, ...]:
    """Elements that share a scale: ``per_channel`` spans everything but the output channel (in x kh x kw
    on a conv, the input features on a linear); ``per_kernel_position`` spans the input channels only."""
    if granularity == "per_channel":
        return (1, *shape[1:])
    return (1, shape[1], *[1] * (len(shape) - 2))


def groupable(weight: Tensor, granularity: Granularity) -> bool:
    """A grouping of one element cannot be quantized by torchao (and would save nothing)."""
    block = block_size(weight.shape, granularity)
    return int(torch.tensor(block).prod()) > 1


def intx_weight(weight: Tensor, bits: int, granularity: Granularity) -> IntxUnpackedToInt8Tensor:
    """Symmetric round-to-nearest, scale = amax / ((qmax - qmin) / 2) per group (torchao's rule)."""
    return IntxUnpackedToInt8Tensor.from_hp(weight.detach(), block_size(weight.shape, granularity), int_dtype(bits))


def intx_from_codes(codes: Tensor, scale: Tensor, bits: int, dtype: torch.dtype) -> IntxUnpackedToInt8Tensor:
    """The tensor holding exactly ``codes`` (int8 storage, weight layout) and ``scale`` (one per block,
    same rank as the weight); the block size follows from the two shapes."""
    if scale.dim() != codes.dim() or any(c % s for c, s in zip(codes.shape, scale.shape, strict=True)):
        raise ValueError(f"scales of shape {tuple(scale.shape)} do not tile a weight of shape {tuple(codes.shape)}")
    block = tuple(c // s for c, s in zip(codes.shape, scale.shape, strict=True))
    return IntxUnpackedToInt8Tensor(
        qdata=codes.to(torch.int8),
        scale=scale.to(dtype),
        zero_point=torch.zeros_like(scale, dtype=torch.int8),
        target_dtype=int_dtype(bits),
        block_size=block,
        dtype=dtype,
        activation_quantization=None,
    )


def set_weight(module: nn.Module, weight: Tensor) -> None:
    """Replace ``module.weight`` (a frozen parameter, as torchao's ``quantize_`` leaves it)."""
    module.weight = nn.Parameter(weight, requires_grad=False)
