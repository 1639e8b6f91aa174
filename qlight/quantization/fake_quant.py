"""Fake-quantized Conv2d and Linear on torchao's QAT primitives.

torchao's QAT swaps only ``nn.Linear`` (``FakeQuantizedLinear``); it has no fake-quantized conv.
:class:`FakeQuantizedConv2d` fills that gap with torchao's ``IntxFakeQuantizer`` semantics, grouping
conv weights as qlight's weight-only recipes do (``per_channel`` or ``per_kernel_position``, see
:mod:`qlight.quantization.intx`), so converting after training reproduces the trained numerics.
Per-step scales go through :class:`FusedFakeQuantizer` (torchao's forward in one autograd node);
learned scales use torchao's quantizer itself (:class:`TorchaoFakeQuantizer`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchao.quantization.granularity import PerToken
from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig, IntxFakeQuantizer
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, quantize_affine

from qlight.quantization.intx import Granularity, block_size, int_dtype


def weight_fake_quant_config(bits: int, learned_scales: bool = False) -> IntxFakeQuantizeConfig:
    """Symmetric weights, the QAT twin of :class:`~qlight.quantization.IntxWeightOnly`.

    Scales follow the weights' max every step, or with ``learned_scales`` start there and are
    trained (LSQ-style; torchao's ``range_learning``).
    """
    return IntxFakeQuantizeConfig(
        int_dtype(bits), "per_channel", is_symmetric=True, is_dynamic=not learned_scales, range_learning=learned_scales
    )


def activation_fake_quant_config(bits: int) -> IntxFakeQuantizeConfig:
    """Dynamic asymmetric per-token activations (per pixel across channels on conv inputs)."""
    return IntxFakeQuantizeConfig(int_dtype(bits), "per_token", is_symmetric=False, is_dynamic=True)


def _to_rows(x: Tensor, whole_rows: bool) -> Tensor:
    # torchao groups along the last dim of a 2-D tensor: one row per group.
    if x.dim() != 4:
        return x
    return x.flatten(1) if whole_rows else x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _from_rows(rows: Tensor, shape: torch.Size, whole_rows: bool) -> Tensor:
    if len(shape) != 4:
        return rows
    if whole_rows:
        return rows.reshape(shape)
    n, c, h, w = shape
    return rows.reshape(n, h, w, c).permute(0, 3, 1, 2)


class TorchaoFakeQuantizer(IntxFakeQuantizer):
    """torchao's ``IntxFakeQuantizer`` on 2-D or 4-D tensors, grouped over dim 1 (one scale per
    (out-channel, kh, kw) of a conv weight, per pixel of a conv input) or, with ``whole_rows``, over
    every dim but the first (one scale per output channel). qlight uses it for learned scales,
    which :class:`FusedFakeQuantizer` does not cover, and keeps them positive."""

    def __init__(self, config: IntxFakeQuantizeConfig, whole_rows: bool = False) -> None:
        super().__init__(config)
        self.whole_rows = whole_rows

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.config.range_learning and isinstance(self.scale, nn.Parameter):
            with torch.no_grad():  # an optimizer step can push a learned scale through zero
                self.scale.clamp_(min=torch.finfo(self.scale.dtype).eps)
        return _from_rows(super().forward(_to_rows(x, self.whole_rows)), x.shape, self.whole_rows)


class _FakeQuantize(torch.autograd.Function):
    # torchao's dynamic fake-quant numerics (choose_qparams_affine + _fake_quantize_affine, op for
    # op and dtype for dtype, so the forward is bit-identical) in one autograd node, grouped over a
    # dim in place: torchao's version records about 170 autograd/ATen events per call plus, on conv
    # inputs, two permuted copies, which on a GPU leaves the QAT step bound by the host.
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        dim: int | tuple[int, ...],
        qmin: int,
        qmax: int,
        symmetric: bool,
        eps: float,
        scale_dtype: torch.dtype,
    ):
        if symmetric:
            scale = x.abs().amax(dim, keepdim=True).div_(float(qmax - qmin) / 2).clamp_(min=eps).to(scale_dtype)
            zero_point = 0
            ctx.mark_non_differentiable(scale)
            codes = torch.round(x * scale.reciprocal())
        else:
            low, high = torch.aminmax(x, dim=dim, keepdim=True)
            scale = (high.clamp_(min=0) - low.clamp_(max=0)).div_(float(qmax - qmin)).clamp_(min=eps)
            zero_point = (qmin - torch.round(low / scale)).clamp_(qmin, qmax)
            scale = scale.to(scale_dtype)
            ctx.mark_non_differentiable(scale, zero_point)
            codes = torch.round(x * scale.reciprocal()).add_(zero_point)
        clamped = codes.clamp(qmin, qmax)
        ctx.save_for_backward(clamped == codes)
        if not symmetric:
            clamped.sub_(zero_point)
        return clamped.mul_(scale).to(x.dtype), scale, zero_point

    @staticmethod
    def backward(ctx, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None, None, None


class FusedFakeQuantizer(IntxFakeQuantizer):
    """:class:`TorchaoFakeQuantizer`'s forward, bit for bit, at a fraction of its host cost, for
    dynamic scales: symmetric weights and asymmetric per-token activations.

    Groups in place, as :class:`TorchaoFakeQuantizer` does on rows. Gradients pass straight through
    where the rounded code lies within [qmin, qmax], as in PyTorch's fused fake-quant ops.
    """

    def __init__(self, config: IntxFakeQuantizeConfig, whole_rows: bool = False) -> None:
        per_token = isinstance(config.granularity, PerToken)
        if config.range_learning or not config.is_dynamic or per_token == config.is_symmetric:
            raise ValueError("FusedFakeQuantizer takes dynamic symmetric per-channel or asymmetric per-token configs")
        super().__init__(config)
        self.whole_rows = whole_rows
        self.qmin, self.qmax = _DTYPE_TO_QVALUE_BOUNDS[config.dtype]

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        config = self.config
        eps = config.eps if config.eps is not None else torch.finfo(x.dtype).smallest_normal
        if x.dim() == 4:
            dim: int | tuple[int, ...] = (1, 2, 3) if self.whole_rows else 1
        else:
            dim = -1
        out, self.scale, self.zero_point = _FakeQuantize.apply(
            x, dim, self.qmin, self.qmax, config.is_symmetric, eps, config.scale_precision
        )
        return out


def fake_quantizer(config: IntxFakeQuantizeConfig, whole_rows: bool = False) -> IntxFakeQuantizer:
    """The fused quantizer for per-step scales, torchao's own for learned ones."""
    if config.range_learning:
        return TorchaoFakeQuantizer(config, whole_rows)
    return FusedFakeQuantizer(config, whole_rows)


class FakeQuantizedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight (and optionally input) is fake-quantized in forward, with
    straight-through gradients to the float weight. Its state dict equals the conv's (plus the
    scales, when they are learned)."""

    def __init__(
        self,
        *args,
        weight_config: IntxFakeQuantizeConfig,
        activation_config: IntxFakeQuantizeConfig | None = None,
        granularity: Granularity = "per_channel",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.weight_fake_quantizer = fake_quantizer(weight_config, whole_rows=granularity == "per_channel")
        self.activation_fake_quantizer = fake_quantizer(activation_config) if activation_config else None

    def forward(self, x: Tensor) -> Tensor:
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        return self._conv_forward(x, self.weight_fake_quantizer(self.weight), self.bias)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        weight_config: IntxFakeQuantizeConfig,
        activation_config: IntxFakeQuantizeConfig | None = None,
        granularity: Granularity = "per_channel",
    ) -> FakeQuantizedConv2d:
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
            weight_config=weight_config,
            activation_config=activation_config,
            granularity=granularity,
        )
        new.weight, new.bias = conv.weight, conv.bias  # share the parameters: optimizers keep working
        return new

    def to_conv(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device="meta",
        )
        conv.weight, conv.bias = self.weight, self.bias
        return conv


FAKE_QUANTIZED = (FakeQuantizedConv2d, FakeQuantizedLinear)


def insert_fake_quant(
    model: nn.Module,
    targets: list[str],
    weight: IntxFakeQuantizeConfig,
    activation: IntxFakeQuantizeConfig | None = None,
    granularity: Granularity = "per_channel",
) -> None:
    """Swap the named Conv2d/Linear modules of ``model`` for fake-quantized ones, in place."""
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, FAKE_QUANTIZED):
            continue
        if isinstance(module, nn.Conv2d):
            swapped: nn.Module = FakeQuantizedConv2d.from_conv(module, weight, activation, granularity)
        else:
            swapped = FakeQuantizedLinear.from_linear(module, activation_config=activation, weight_config=weight)
            swapped.weight_fake_quantizer = fake_quantizer(weight, whole_rows=True)
            if activation is not None:
                swapped.activation_fake_quantizer = fake_quantizer(activation)
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
    layout: one per block, same rank as the weight) that a fake-quantized module's forward uses."""
    quantizer = module.weight_fake_quantizer
    weight = module.weight.detach()
    with torch.no_grad():
        quantizer(weight)  # refreshes per-step scales; learned ones stay as trained
    block = block_size(weight.shape, "per_channel" if quantizer.whole_rows else "per_kernel_position")
    # Scales come in block layout from the fused quantizer, as one row per block from torchao's.
    scale = quantizer.scale.detach().reshape([size // b for size, b in zip(weight.shape, block, strict=True)])
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[quantizer.config.dtype]
    codes = quantize_affine(weight, block, scale, torch.zeros_like(scale, dtype=torch.int32), torch.int8, qmin, qmax)
    return codes, scale


def init_learned_scales(model: nn.Module) -> None:
    """Give every learned-scale weight quantizer its starting scales (from the weights) now, so
    they are parameters before the optimizer is built and before a checkpoint is restored."""
    for module in model.modules():
        if isinstance(module, FAKE_QUANTIZED) and module.weight_fake_quantizer.config.range_learning:
            # What torchao's initialize_fake_quantizers does, on the weights alone: no example input.
            module.weight_fake_quantizer._initialized = True
            with torch.no_grad():
                module.weight_fake_quantizer(module.weight)


def set_fake_quant_enabled(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, IntxFakeQuantizer):
            module.enabled = enabled
