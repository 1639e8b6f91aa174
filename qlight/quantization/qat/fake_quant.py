"""Fake-quantized Conv2d and Linear on torchao's QAT primitives.

torchao's QAT swaps only ``nn.Linear`` (``FakeQuantizedLinear``); it has no fake-quantized conv.
:class:`FakeQuantizedConv2d` fills that gap with torchao's ``IntxFakeQuantizer`` semantics, grouping
conv weights as qlight's weight-only recipes do (``per_channel`` or ``per_kernel_position``, see
:mod:`qlight.quantization.grid.intx`), so converting after training reproduces the trained numerics.
Per-step scales go through :class:`FusedFakeQuantizer` (torchao's forward, bit for bit, in a dozen
ops; the weights of all layers of a model in one autograd node per step); learned scales use
torchao's quantizer itself (:class:`TorchaoFakeQuantizer`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchao.quantization.granularity import PerToken
from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig, IntxFakeQuantizer
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, quantize_affine

from qlight.quantization.grid.intx import Granularity, block_size, int_dtype


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


def _qparams(
    x: Tensor, dim: int | tuple[int, ...], qmin: int, qmax: int, symmetric: bool, eps: float, scale_dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    # torchao's choose_qparams_affine, op for op and dtype for dtype. Asymmetric: instead of the zero
    # point z it returns qmin - z, the lowest code before the shift, so that the forward clamps
    # round(x / s) to [qmin - z, qmax - z] and skips adding and subtracting z (exact on integers). z
    # needs no clamp: with 0 in [low, high], |low| / s <= qmax - qmin.
    if symmetric:
        scale = x.abs().amax(dim, keepdim=True).div_((qmax - qmin) / 2).clamp_(min=eps)
        return scale.to(scale_dtype), None
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)  # on conv inputs faster than aminmax
    scale = high.clamp_(min=0).sub_(low.clamp_(max=0)).div_(qmax - qmin).clamp_(min=eps)
    return scale.to(scale_dtype), low.div_(scale).round_()


def _fake_quantize(x: Tensor, dim: int | tuple[int, ...], qmin: int, qmax: int, *qparams_args) -> Tensor:
    # torchao's dynamic fake-quant numerics (choose_qparams_affine + _fake_quantize_affine, bit for
    # bit) in a dozen ops outside autograd, plus three that pass the gradient straight through where
    # the code was not clamped. torchao's version records about 170 autograd/ATen events per call
    # and, on conv inputs, two permuted copies; on a GPU that leaves the QAT step bound by the host.
    needs_grad = x.requires_grad and torch.is_grad_enabled()
    with torch.no_grad():
        scale, lowest = _qparams(x, dim, qmin, qmax, *qparams_args)
        codes = torch.mul(x, scale.reciprocal()).round_()
        clamped = codes.clamp(qmin, qmax) if lowest is None else torch.clamp(codes, lowest, lowest + (qmax - qmin))
        inside = clamped == codes if needs_grad else None
        out = clamped.mul_(scale).to(x.dtype)
    return out + (x - x.detach()) * inside if needs_grad else out  # x - x.detach() is 0: the forward stays exact


class _FakeQuantizeWeights(torch.autograd.Function):
    # _qparams and _fake_quantize's symmetric forward (same ops, same order: bit-identical) for the
    # weights of many layers in one autograd node, in ten foreach calls whatever the number of layers.
    @staticmethod
    def forward(ctx, group: _WeightGroup, *weights: Tensor):
        absolute = torch._foreach_abs(weights)
        scale = [a.amax(dim, keepdim=True) for a, dim in zip(absolute, group.dims, strict=True)]
        torch._foreach_div_(scale, group.halves)
        torch._foreach_clamp_min_(scale, group.eps)
        codes = torch._foreach_mul(weights, torch._foreach_reciprocal(scale))
        torch._foreach_round_(codes)
        # With s = max|w| / ((qmax - qmin) / 2), round(w / s) lies in [qmin, qmax + 1]: only the top
        # needs the clamp, and codes - clamped is 1 where the clamp cut, 0 elsewhere.
        clamped = torch._foreach_clamp_max(codes, group.qmaxs)
        ctx.save_for_backward(*torch._foreach_sub(codes, clamped))
        ctx.group = group
        torch._foreach_mul_(clamped, scale)
        return tuple(clamped)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        ctx.group.consumed = True
        return None, *torch._foreach_addcmul(grads, grads, ctx.saved_tensors, value=-1)  # grad * (1 - cut)


class _WeightGroup:
    """The per-step weight quantizers of one model, fake-quantized together in one autograd node
    when the first of them runs. A layer's result is reused until its weight changes (an optimizer
    step bumps the version), the grad mode changes or a backward pass has consumed the node; a
    training step therefore computes it once, and evaluation once for all its batches."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        quantizers = [m.weight_fake_quantizer for m in modules]
        self.dims = [quantizer.dims(m.weight.dim()) for quantizer, m in zip(quantizers, modules, strict=True)]
        self.qmaxs = [quantizer.qmax for quantizer in quantizers]
        self.halves = [(quantizer.qmax - quantizer.qmin) / 2 for quantizer in quantizers]
        self.eps = [
            torch.finfo(torch.float32).smallest_normal if q.config.eps is None else q.config.eps for q in quantizers
        ]
        for index, quantizer in enumerate(quantizers):
            quantizer.group, quantizer.index = self, index
        self._clear()

    def _clear(self) -> None:
        self.weights: list[Tensor] = []
        self.versions: list[int] = []
        self.outputs: tuple[Tensor, ...] = ()
        self.grad_enabled = self.consumed = False

    def __getstate__(self) -> dict:
        # A copy of the model (deepcopy) must not carry this step's autograd graph.
        return {**self.__dict__, "weights": [], "versions": [], "outputs": ()}

    def fake_quantized(self, index: int, weight: Tensor) -> Tensor | None:
        """Layer ``index``'s fake-quantized ``weight``; ``None`` where the group does not apply."""
        if weight.dtype != torch.float32:
            return None
        if (
            not self.outputs
            or self.consumed
            or self.grad_enabled != torch.is_grad_enabled()
            or self.versions[index] != weight._version
        ):
            self.weights = [m.weight for m in self.modules]
            if any(w.dtype != torch.float32 for w in self.weights):
                self._clear()
                return None
            self.outputs = _FakeQuantizeWeights.apply(self, *self.weights)
            self.versions = [w._version for w in self.weights]
            self.grad_enabled, self.consumed = torch.is_grad_enabled(), False
        return self.outputs[index] if self.weights[index] is weight else None  # not the layer's weight (now)


class FusedFakeQuantizer(IntxFakeQuantizer):
    """:class:`TorchaoFakeQuantizer`'s forward, bit for bit, at a fraction of its host cost, for
    dynamic scales: symmetric weights and asymmetric per-token activations.

    Groups in place, as :class:`TorchaoFakeQuantizer` does on rows. Gradients pass straight through
    where the rounded code lies within [qmin, qmax], as in PyTorch's fused fake-quant ops. The weight
    quantizers that :func:`insert_fake_quant` puts in a model run together, once per training step,
    except under ``torch.compile``, where each runs alone and Inductor fuses its ops.
    """

    def __init__(self, config: IntxFakeQuantizeConfig, whole_rows: bool = False) -> None:
        per_token = isinstance(config.granularity, PerToken)
        if config.range_learning or not config.is_dynamic or per_token == config.is_symmetric:
            raise ValueError("FusedFakeQuantizer takes dynamic symmetric per-channel or asymmetric per-token configs")
        super().__init__(config)
        self.whole_rows = whole_rows
        self.qmin, self.qmax = _DTYPE_TO_QVALUE_BOUNDS[config.dtype]
        self.group: _WeightGroup | None = None
        self.index = 0

    def dims(self, rank: int) -> int | tuple[int, ...]:
        """The dims that share a scale, for a tensor of ``rank`` dims."""
        if rank == 4:
            return (1, 2, 3) if self.whole_rows else 1
        return -1

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        # The group's cache is Python state that Dynamo cannot trace: a compiled model would break
        # its graph at every layer and recompile per layer shape.
        if self.group is not None and not torch.compiler.is_compiling():
            out = self.group.fake_quantized(self.index, x)
            if out is not None:
                return out
        return self.fake_quantize(x)

    def fake_quantize(self, x: Tensor) -> Tensor:
        """``x`` fake-quantized by this quantizer alone."""
        return _fake_quantize(x, self.dims(x.dim()), self.qmin, self.qmax, *self._qparams_args(x))

    def qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The scales and zero points that fake-quantizing ``x`` uses, grouped as ``x`` (keepdim)."""
        scale, lowest = _qparams(x.detach(), self.dims(x.dim()), self.qmin, self.qmax, *self._qparams_args(x))
        return scale, torch.zeros_like(scale, dtype=torch.int32) if lowest is None else self.qmin - lowest

    def _qparams_args(self, x: Tensor) -> tuple[bool, float, torch.dtype]:
        config = self.config
        eps = config.eps if config.eps is not None else torch.finfo(x.dtype).smallest_normal
        return config.is_symmetric, eps, config.scale_precision


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
    grouped = [
        m
        for m in model.modules()
        if isinstance(m, FAKE_QUANTIZED)
        and isinstance(m.weight_fake_quantizer, FusedFakeQuantizer)
        and m.weight_fake_quantizer.config.scale_precision == torch.float32
    ]
    if grouped:
        _WeightGroup(grouped)


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
    if isinstance(quantizer, FusedFakeQuantizer):
        scale = quantizer.qparams(weight)[0]
    else:
        with torch.no_grad():
            quantizer(weight)  # a learned quantizer's scales stay as trained; this initializes them if new
        scale = quantizer.scale.detach()
    block = block_size(weight.shape, "per_channel" if quantizer.whole_rows else "per_kernel_position")
    # Scales come in block layout from the fused quantizer, as one row per block from torchao's.
    scale = scale.reshape([size // b for size, b in zip(weight.shape, block, strict=True)])
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
