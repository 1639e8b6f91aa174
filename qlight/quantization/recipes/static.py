"""Static int8 recipes through torchao's PT2E flow, run as the reference graph, by Inductor or by
ONNX Runtime."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from qlight.errors import QlightError
from qlight.quantization.grid.intx import Granularity
from qlight.quantization.recipes.base import QUANTIZABLE, Recipe, quantized_weight_sizes, register_recipe
from qlight.quantization.runtimes.agreement import check_agreement
from qlight.quantization.runtimes.inductor import InductorGraph
from qlight.quantization.runtimes.ort import OnnxRuntimeModule, export_onnx


@dataclass(frozen=True)
class StaticPT2E:
    """Calibrated static quantization through torchao's PT2E flow (export, ``X86InductorQuantizer``,
    calibrate, convert): int8 activations per tensor, ``weight_bits`` per output channel, BatchNorm
    folded. The result is an exported graph, run as it is (``eager``: quantize/dequantize around
    float ops, a reference rather than a fast model), compiled by Inductor's x86 int8 lowering, or
    exported to ONNX and run by ONNX Runtime (see :mod:`qlight.quantization.runtimes`)."""

    weight_bits: int = 8
    runtime: Literal["eager", "inductor", "onnxruntime"] = "eager"
    static = True
    calibrated = True
    per_layer = False
    input_dtype = torch.float32
    granularity = "per_channel"
    method = "pt2e"

    @property
    def name(self) -> str:
        base = "int8_static" if self.weight_bits == 8 else f"w{self.weight_bits}a8_static"
        return base if self.runtime == "eager" else f"{base}_{_RUNTIME_SUFFIX[self.runtime]}"

    @property
    def bits(self) -> int:
        return self.weight_bits

    @property
    def suffix(self) -> str:
        return ".onnx" if self.runtime == "onnxruntime" else ".pt2"

    def quantize(self, model: nn.Module, targets: Sequence[str], calibration: Sequence[Tensor] = ()) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        if not calibration:
            raise QlightError(f"{self.name} needs calibration batches: set calibration_batches to 1 or more")
        kept = [fqn for fqn, module in model.named_modules() if isinstance(module, QUANTIZABLE) and fqn not in targets]
        quantizer = x86_quantizer(self.weight_bits, float_modules=kept)
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
        tidy_converted(converted)
        if self.runtime == "eager":
            return converted
        fast = (
            InductorGraph(converted)
            if self.runtime == "inductor"
            else OnnxRuntimeModule(export_onnx(converted, calibration[0]))
        )
        check_agreement(fast, converted, calibration[0], self.name)
        return fast


def export_batched(model: nn.Module, example: Tensor, strict: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension, so any batch size runs the graph. What export
    writes to stderr is passed on when it succeeds and dropped when it fails: dynamo prints the graph
    it gave up on (25-150 lines), and the caller's one-line error names the code instead."""
    if len(example) < 2:  # export specializes a size-1 dimension to a constant
        example = example[:1].expand(2, *example.shape[1:]).contiguous()
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        program = torch.export.export(
            model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=strict
        )
    sys.stderr.write(held.getvalue())
    return program


def x86_quantizer(weight_bits: int, is_qat: bool = False, float_modules: Iterable[str] = ()):
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


def tidy_converted(graph_module: torch.fx.GraphModule) -> None:
    """Mend what ``convert_pt2e`` leaves in an int8 graph, in place (PTQ's and W8A8 QAT's alike)."""
    # It keeps the float originals beside the folded int8 weights; they would double the file.
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph_module.named_parameters(), *graph_module.named_buffers()]:
        if name not in used:
            owner_path, _, leaf = name.rpartition(".")
            delattr(graph_module.get_submodule(owner_path), leaf)
    # It dequantizes every weight at the top of the graph, so that all float copies (the whole model
    # in fp32) live through the forward pass; next to its layer each lives for one op. On VGG-11-BN at
    # batch 32 on the CPU that made the eager int8 graph about 12% slower.
    order = {node: index for index, node in enumerate(graph_module.graph.nodes)}
    for node in list(graph_module.graph.nodes):
        if node.target is torch.ops.quantized_decomposed.dequantize_per_channel.default and node.users:
            min(node.users, key=order.__getitem__).prepend(node)
    graph_module.recompile()


_RUNTIME_SUFFIX = {"inductor": "inductor", "onnxruntime": "onnx"}
_STATIC = {
    f"{base}{suffix}": StaticPT2E(bits, runtime)
    for base, bits in (("int8_static", 8), ("w4a8_static", 4))
    for suffix, runtime in (("", "eager"), ("_inductor", "inductor"), ("_onnx", "onnxruntime"))
}


@register_recipe(
    f"{', '.join(_STATIC)}: static int8 activations through PT2E, run eagerly, by Inductor or ONNX Runtime", _STATIC
)
def _static(name: str, granularity: Granularity, method: str) -> Recipe | None:
    return _STATIC.get(name)
