"""Fake-quantized Conv2d and Linear on torchao's QAT primitives.

torchao's QAT swaps only ``nn.Linear`` (``FakeQuantizedLinear``); it has no fake-quantized conv.
:class:`FakeQuantizedConv2d` fills that gap with torchao's own ``IntxFakeQuantizer``, grouping conv
weights exactly as ``IntxWeightOnlyConfig(granularity=PerAxis(0))`` does (one scale per output
channel and kernel position), so converting after training reproduces the trained numerics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig, IntxFakeQuantizer
from torchao.quantization.quant_primitives import quantize_affine

from qlight.quantization.recipes import dtype_bits, int_dtype


def weight_config(bits: int, learned_scales: bool = False) -> IntxFakeQuantizeConfig:
    """Symmetric per-output-channel weights, the QAT twin of :class:`~qlight.quantization.IntxWeightOnly`.

    Scales follow the weights' max every step, or with ``learned_scales`` start there and are
    trained (LSQ-style; torchao's ``range_learning``).
    """
    return IntxFakeQuantizeConfig(
        int_dtype(bits), "per_channel", is_symmetric=True, is_dynamic=not learned_scales, range_learning=learned_scales
    )


def activation_config(bits: int) -> IntxFakeQuantizeConfig:
    """Dynamic asymmetric per-token activations (per pixel across channels on conv inputs)."""
    return IntxFakeQuantizeConfig(int_dtype(bits), "per_token", is_symmetric=False, is_dynamic=True)


def _rows(x: Tensor) -> Tensor:
    # torchao groups along the last dim of a 2-D tensor: move channels there, one row per
    # (out-channel or image, kh or h, kw or w).
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x


def _unrows(rows: Tensor, shape: torch.Size) -> Tensor:
    if len(shape) != 4:
        return rows
    n, c, h, w = shape
    return rows.reshape(n, h, w, c).permute(0, 3, 1, 2)


def _channels_last_apply(quantizer: IntxFakeQuantizer, x: Tensor) -> Tensor:
    return _unrows(quantizer(_rows(x)), x.shape)


class FakeQuantizedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight (and optionally input) is fake-quantized in forward, with
    straight-through gradients to the float weight. Its state dict equals the conv's."""

    def __init__(
        self,
        *args,
        weight_config: IntxFakeQuantizeConfig,
        activation_config: IntxFakeQuantizeConfig | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.weight_fake_quantizer = IntxFakeQuantizer(weight_config)
        self.activation_fake_quantizer = IntxFakeQuantizer(activation_config) if activation_config else None

    def forward(self, x: Tensor) -> Tensor:
        if self.activation_fake_quantizer is not None:
            x = _channels_last_apply(self.activation_fake_quantizer, x)
        return self._conv_forward(x, _channels_last_apply(self.weight_fake_quantizer, self.weight), self.bias)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, weight_config: IntxFakeQuantizeConfig, activation_config: IntxFakeQuantizeConfig | None = None
    ) -> "FakeQuantizedConv2d":
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
            weight_config=weight_config, activation_config=activation_config,
        )
        new.weight, new.bias = conv.weight, conv.bias  # share the parameters: optimizers keep working
        return new

    def to_conv(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, self.padding_mode, device="meta",
        )
        conv.weight, conv.bias = self.weight, self.bias
        return conv


FAKE_QUANTIZED = (FakeQuantizedConv2d, FakeQuantizedLinear)


def insert_fake_quant(
    model: nn.Module, targets: list[str], weight: IntxFakeQuantizeConfig, activation: IntxFakeQuantizeConfig | None = None
) -> None:
    """Swap the named Conv2d/Linear modules of ``model`` for fake-quantized ones, in place."""
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, FAKE_QUANTIZED):
            continue
        if isinstance(module, nn.Conv2d):
            swapped: nn.Module = FakeQuantizedConv2d.from_conv(module, weight, activation)
        else:
            swapped = FakeQuantizedLinear.from_linear(module, activation_config=activation, weight_config=weight)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, swapped)


def remove_fake_quant(model: nn.Module) -> list[str]:
    """Swap fake-quantized modules back to plain ones, in place; returns their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, FAKE_QUANTIZED)]
    for name in names:
        module = model.get_submodule(name)
        plain = module.to_conv() if isinstance(module, FakeQuantizedConv2d) else module.to_linear()
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, plain)
    return names


def weight_qparams(module: nn.Module) -> tuple[Tensor, Tensor]:
    """The integer codes (in the weight's layout) and scales (in torchao's ``IntxUnpackedToInt8Tensor``
    layout) that a fake-quantized module's forward uses for its current weight."""
    quantizer = module.weight_fake_quantizer
    weight = module.weight.detach()
    rows = _rows(weight)
    with torch.no_grad():
        quantizer(rows)  # refreshes per-step scales; learned ones stay as trained
    scale = quantizer.scale.detach().reshape(rows.shape[0], 1)
    bits = dtype_bits(quantizer.config.dtype)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = quantize_affine(rows, (1, rows.shape[1]), scale, torch.zeros_like(scale, dtype=torch.int32), torch.int8, qmin, qmax)
    if weight.dim() == 4:  # torchao keeps one conv scale per (out, kh, kw) as (O, 1, kh, kw)
        scale = scale.reshape(weight.shape[0], 1, *weight.shape[2:])
    return _unrows(codes, weight.shape), scale


def init_learned_scales(model: nn.Module) -> None:
    """Give every learned-scale weight quantizer its starting scales (from the weights) now, so
    they are parameters before the optimizer is built and before a checkpoint is restored."""
    for module in model.modules():
        if isinstance(module, FAKE_QUANTIZED) and module.weight_fake_quantizer.config.range_learning:
            # What torchao's initialize_fake_quantizers does, on the weights alone: no example input.
            module.weight_fake_quantizer._initialized = True
            with torch.no_grad():
                module.weight_fake_quantizer(_rows(module.weight))


def set_fake_quant_enabled(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, IntxFakeQuantizer):
            module.enabled = enabled
