"""Quantization recipes: one small frozen config per recipe behind the :class:`Recipe` protocol, each
applied with torchao (as torchao's ``quant_api.py`` pairs a config dataclass with a handler).

Unlike torchao's default (``nn.Linear`` only), every recipe targets the modules it is given, by
default every ``Conv2d`` and ``Linear`` (:func:`quantizable_modules`).
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torchao.quantization import IntxUnpackedToInt8Tensor

from qlight.errors import QlightError
from qlight.quantization.intx import GRANULARITIES, MAX_BITS, MIN_BITS, Granularity, groupable, intx_weight, set_weight

QUANTIZABLE = (nn.Conv2d, nn.Linear)
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_GRANULARITY: Granularity = "per_channel"


@runtime_checkable
class Recipe(Protocol):
    """What the callbacks, the result tables and the file format need of a recipe."""

    @property
    def name(self) -> str:
        """Unique among recipes: the table row and the file name."""

    @property
    def bits(self) -> int:
        """Bits per quantized weight."""

    @property
    def static(self) -> bool:
        """The result is an exported graph (saved as ``.pt2``), not the module with new weights."""

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the quantized model takes its inputs in."""

    @property
    def calibrated(self) -> bool:
        """The recipe uses the calibration batches."""

    @property
    def granularity(self) -> str:
        """Which weights share a scale (``""`` for float casts)."""

    @property
    def method(self) -> str:
        """How the values are chosen: ``cast``, ``rtn`` (round to nearest), ``pt2e`` (calibrated)."""

    def quantize(self, model: nn.Module, targets: Sequence[str], calibration: Sequence[Tensor] = ()) -> nn.Module:
        """Quantize the ``targets`` of ``model`` (modified in place or replaced); ``calibration`` holds
        input batches for recipes that calibrate."""


@dataclass(frozen=True)
class FloatCast:
    """Cast weights (and inputs) to a float dtype; ``fp32`` is the unquantized reference."""

    name: str
    dtype: torch.dtype
    static = False
    calibrated = False
    granularity = ""
    method = "cast"

    @property
    def bits(self) -> int:
        return torch.finfo(self.dtype).bits

    @property
    def input_dtype(self) -> torch.dtype:
        return self.dtype

    def quantize(self, model: nn.Module, targets: Sequence[str], calibration: Sequence[Tensor] = ()) -> nn.Module:
        return model.to(self.dtype)


@dataclass(frozen=True)
class IntxWeightOnly:
    """Symmetric N-bit weights as torchao ``IntxUnpackedToInt8Tensor``, rounded to nearest with one
    scale per group (see :mod:`qlight.quantization.intx`); activations stay in float. A conv whose
    groups would hold one value (one input channel, ``per_kernel_position``) stays float."""

    bits: int
    granularity: Granularity = DEFAULT_GRANULARITY
    static = False
    calibrated = False
    input_dtype = torch.float32
    method = "rtn"

    @property
    def name(self) -> str:
        suffix = "" if self.granularity == DEFAULT_GRANULARITY else f"@{self.granularity}"
        return f"int{self.bits}{suffix}"

    def quantize(self, model: nn.Module, targets: Sequence[str], calibration: Sequence[Tensor] = ()) -> nn.Module:
        for name in targets:
            module = model.get_submodule(name)
            if groupable(module.weight, self.granularity):
                set_weight(module, intx_weight(module.weight, self.bits, self.granularity))
        return model


@dataclass(frozen=True)
class StaticPT2E:
    """Calibrated static quantization through torchao's PT2E flow (export, ``X86InductorQuantizer``,
    calibrate, convert): int8 activations per tensor, ``weight_bits`` per output channel, BatchNorm
    folded. The result is an exported graph module."""

    weight_bits: int = 8
    static = True
    calibrated = True
    input_dtype = torch.float32
    granularity = "per_channel"
    method = "pt2e"

    @property
    def name(self) -> str:
        return "int8_static" if self.weight_bits == 8 else f"w{self.weight_bits}a8_static"

    @property
    def bits(self) -> int:
        return self.weight_bits

    def quantize(self, model: nn.Module, targets: Sequence[str], calibration: Sequence[Tensor] = ()) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        if not calibration:
            raise QlightError(f"{self.name} needs calibration batches: set calibration_batches to 1 or more")
        kept = [fqn for fqn, module in model.named_modules() if isinstance(module, QUANTIZABLE) and fqn not in targets]
        quantizer = _x86_quantizer(self.weight_bits, float_modules=kept)
        # Strict (dynamo) export records the source modules that the quantizer matches its patterns
        # on; torch 2.11's default non-strict export does not, and the quantizer then finds nothing.
        graph = export_batched(model.eval(), calibration[0], strict=True).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        converted = convert_pt2e(prepared)
        if targets and not quantized_weight_sizes(converted):
            raise RuntimeError(f"{self.name}: torchao's quantizer matched no layer with torch {torch.__version__}")
        _drop_unused_attributes(converted)
        return converted


def export_batched(model: nn.Module, example: Tensor, strict: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension, so any batch size runs the graph."""
    return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=strict)


def _x86_quantizer(weight_bits: int, is_qat: bool = False, float_modules: Iterable[str] = ()):
    """torchao's ``X86InductorQuantizer`` with its default config (``is_qat``: fused fake-quant in place
    of observers) at ``weight_bits`` per output channel; ``float_modules`` (by name) stay float."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    config = get_default_x86_inductor_quantization_config(is_qat=is_qat)
    if weight_bits != 8:
        limit = 2 ** (weight_bits - 1)
        weight = dataclasses.replace(config.weight, quant_min=-limit, quant_max=limit - 1)
        config = dataclasses.replace(config, weight=weight)
    quantizer = X86InductorQuantizer().set_global(config)
    for name in float_modules:
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def _drop_unused_attributes(graph_module: torch.fx.GraphModule) -> None:
    # convert_pt2e keeps the float originals beside the folded int8 weights; they would double the file.
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph_module.named_parameters(), *graph_module.named_buffers()]:
        if name not in used:
            owner_path, _, leaf = name.rpartition(".")
            delattr(graph_module.get_submodule(owner_path), leaf)


_INT = re.compile(r"int(\d+)(?:@(\w+))?")
_STATIC = {"int8_static": 8, "w4a8_static": 4}


def valid_recipe_names() -> list[str]:
    return [*FLOAT_DTYPES, *(f"int{b}" for b in range(MIN_BITS, MAX_BITS + 1)), *_STATIC]


def parse_recipe(name: str, granularity: Granularity = DEFAULT_GRANULARITY) -> Recipe:
    """``fp32``, ``fp16``, ``bf16``, ``int2``..``int8`` (weight-only; ``granularity`` unless the name
    ends in ``@per_channel`` or ``@per_kernel_position``), ``int8_static`` or ``w4a8_static``."""
    if name in FLOAT_DTYPES:
        return FloatCast(name, FLOAT_DTYPES[name])
    if name in _STATIC:
        return StaticPT2E(_STATIC[name])
    match = _INT.fullmatch(name)
    if match and MIN_BITS <= int(match.group(1)) <= MAX_BITS and match.group(2) in (None, *GRANULARITIES):
        return IntxWeightOnly(int(match.group(1)), match.group(2) or check_granularity(granularity))
    raise QlightError(
        f"unknown quantization recipe {name!r}; valid: {', '.join(valid_recipe_names())}, "
        f"int<N>@<granularity> with granularity {' or '.join(GRANULARITIES)}"
    )


def check_granularity(granularity: str) -> Granularity:
    if granularity not in GRANULARITIES:
        raise QlightError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")
    return granularity  # type: ignore[return-value]


def quantizable_modules(
    model: nn.Module, keep_first: bool = False, keep_last: bool = False, types: tuple[type, ...] = QUANTIZABLE
) -> list[str]:
    """Names of the ``types`` modules of ``model`` in definition order, without the first and/or last."""
    names = [fqn for fqn, module in model.named_modules() if isinstance(module, types)]
    if keep_first:
        names = names[1:]
    if keep_last:
        names = names[:-1]
    return names


def quantized_weight_sizes(model: nn.Module) -> list[int]:
    """Element counts of the weights that ``model`` really holds quantized: torchao's
    ``IntxUnpackedToInt8Tensor`` weights, or the int8 constants of a PT2E graph."""
    if isinstance(model, torch.fx.GraphModule):
        dequantized = [node.args[0] for node in model.graph.nodes if "dequantize_per_channel" in str(node.target)]
        return [operator.attrgetter(node.target)(model).numel() for node in dequantized if node.op == "get_attr"]
    return [
        m.weight.numel() for m in model.modules() if isinstance(getattr(m, "weight", None), IntxUnpackedToInt8Tensor)
    ]
