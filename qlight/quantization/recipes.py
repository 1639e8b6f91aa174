"""Quantization recipes: one small config per recipe, each mapped onto torchao (as torchao's
``quant_api.py`` pairs a config dataclass with a handler).

Unlike torchao's default (``nn.Linear`` only), every recipe targets the modules it is given, by
default every ``Conv2d`` and ``Linear`` (:func:`quantizable_modules`).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor, nn
from torchao.quantization import IntxUnpackedToInt8Tensor, IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerAxis

from qlight.errors import QlightError

QUANTIZABLE = (nn.Conv2d, nn.Linear)
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIN_BITS, MAX_BITS = 2, 8


def int_dtype(bits: int) -> torch.dtype:
    """``torch.int2`` .. ``torch.int8`` for ``bits``."""
    return getattr(torch, f"int{bits}")


def dtype_bits(dtype: torch.dtype) -> int:
    """Inverse of :func:`int_dtype`."""
    return int(str(dtype).removeprefix("torch.int"))


@dataclass(frozen=True)
class FloatCast:
    """Cast weights (and inputs) to a float dtype; ``fp32`` is the unquantized reference."""

    name: str
    dtype: torch.dtype
    bits: int
    static = False
    input_dtype = property(lambda self: self.dtype)

    def quantize(self, model: nn.Module, targets: set[str], calibration: Iterable[Tensor] = ()) -> nn.Module:
        return model.to(self.dtype)


@dataclass(frozen=True)
class IntxWeightOnly:
    """Symmetric N-bit weights, one scale per output channel (per (out, kh, kw) on conv), via
    torchao's ``IntxWeightOnlyConfig``; activations stay in float."""

    bits: int
    static = False
    input_dtype = torch.float32

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def torchao_config(self) -> IntxWeightOnlyConfig:
        return IntxWeightOnlyConfig(weight_dtype=int_dtype(self.bits), granularity=PerAxis(0))

    def quantize(self, model: nn.Module, targets: set[str], calibration: Iterable[Tensor] = ()) -> nn.Module:
        quantize_(model, self.torchao_config(), filter_fn=module_filter(targets))
        return model


@dataclass(frozen=True)
class StaticPT2E:
    """Calibrated static quantization through torchao's PT2E flow (export, ``X86InductorQuantizer``,
    calibrate, convert): int8 activations per tensor, ``weight_bits`` per channel, BatchNorm folded.
    The result is an exported graph module."""

    weight_bits: int = 8
    static = True
    input_dtype = torch.float32

    @property
    def name(self) -> str:
        return "int8_static" if self.weight_bits == 8 else f"w{self.weight_bits}a8_static"

    @property
    def bits(self) -> int:
        return self.weight_bits

    def quantize(self, model: nn.Module, targets: set[str], calibration: Iterable[Tensor] = ()) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        batches = list(calibration)
        if not batches:
            raise QlightError(f"{self.name} needs calibration batches: set calibration_batches to 1 or more")
        quantizer = _x86_quantizer(self.weight_bits)
        for fqn, module in model.named_modules():
            if isinstance(module, QUANTIZABLE) and fqn not in targets:
                quantizer.set_module_name_qconfig(fqn, None)
        # Strict (dynamo) export records the source modules that the quantizer matches its patterns
        # on; torch 2.11's default non-strict export does not, and the quantizer then finds nothing.
        graph = export_batched(model.eval(), batches[0], strict=True).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for batch in batches:
                prepared(batch)
        converted = convert_pt2e(prepared)
        if targets and not quantized_weight_sizes(converted):
            raise RuntimeError(f"{self.name}: torchao's quantizer matched no layer with torch {torch.__version__}")
        _drop_unused_attributes(converted)
        return converted


Recipe = Union[FloatCast, IntxWeightOnly, StaticPT2E]


def export_batched(model: nn.Module, example: Tensor, strict: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension, so any batch size runs the graph."""
    return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=strict)


def _x86_quantizer(weight_bits: int):
    from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    config = get_default_x86_inductor_quantization_config()
    if weight_bits != 8:
        limit = 2 ** (weight_bits - 1)
        weight = QuantizationSpec(
            dtype=torch.int8,
            quant_min=-limit,
            quant_max=limit - 1,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
            is_dynamic=False,
            observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=2**-12),
        )
        config = type(config)(config.input_activation, config.output_activation, weight, config.bias, config.is_qat)
    return X86InductorQuantizer().set_global(config)


def _drop_unused_attributes(graph_module: torch.fx.GraphModule) -> None:
    # convert_pt2e keeps the float originals beside the folded int8 weights; they would double the file.
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph_module.named_parameters(), *graph_module.named_buffers()]:
        if name not in used:
            owner_path, _, leaf = name.rpartition(".")
            delattr(graph_module.get_submodule(owner_path), leaf)


_INT = re.compile(r"int(\d+)")
_STATIC = {"int8_static": 8, "w4a8_static": 4}


def valid_recipe_names() -> list[str]:
    return [*FLOAT_DTYPES, *(f"int{b}" for b in range(MIN_BITS, MAX_BITS + 1)), *_STATIC]


def parse_recipe(name: str) -> Recipe:
    """``fp32``, ``fp16``, ``bf16``, ``int2``..``int8`` (weight-only), ``int8_static`` or ``w4a8_static``."""
    if name in FLOAT_DTYPES:
        dtype = FLOAT_DTYPES[name]
        return FloatCast(name, dtype, torch.finfo(dtype).bits)
    if name in _STATIC:
        return StaticPT2E(_STATIC[name])
    match = _INT.fullmatch(name)
    if match and MIN_BITS <= int(match.group(1)) <= MAX_BITS:
        return IntxWeightOnly(int(match.group(1)))
    raise QlightError(f"unknown quantization recipe {name!r}; valid: {', '.join(valid_recipe_names())}")


def quantizable_modules(
    model: nn.Module, keep_first: bool = False, keep_last: bool = False, types: tuple[type, ...] = QUANTIZABLE
) -> list[str]:
    """Names of the modules to quantize, in definition order; the first and/or last can stay float.

    A conv with one input channel per group is left out: torchao groups conv weights over input
    channels (one scale per out-channel, kh, kw), so its groups would hold a single value, which
    torchao 0.18 cannot quantize and which would save nothing.
    """
    names = [
        fqn
        for fqn, module in model.named_modules()
        if isinstance(module, types) and not (isinstance(module, nn.Conv2d) and module.weight.shape[1] == 1)
    ]
    return names[int(keep_first) : len(names) - int(keep_last) if keep_last else None]


def quantized_weight_sizes(model: nn.Module) -> list[int]:
    """Element counts of the weights that ``model`` really holds quantized: torchao's
    ``IntxUnpackedToInt8Tensor`` weights, or the int8 constants of a PT2E graph."""
    if isinstance(model, torch.fx.GraphModule):
        dequantized = [node.args[0] for node in model.graph.nodes if "dequantize_per_channel" in str(node.target)]
        return [operator.attrgetter(node.target)(model).numel() for node in dequantized if node.op == "get_attr"]
    return [
        m.weight.numel() for m in model.modules() if isinstance(getattr(m, "weight", None), IntxUnpackedToInt8Tensor)
    ]


def module_filter(targets: set[str]) -> Callable[[nn.Module, str], bool]:
    """A torchao ``filter_fn`` that selects modules by name."""
    return lambda _, fqn: fqn in targets
