"""Quantization recipes: one small frozen config per recipe behind the :class:`Recipe` protocol, each
applied with torchao (as torchao's ``quant_api.py`` pairs a config dataclass with a handler).

Unlike torchao's default (``nn.Linear`` only), every recipe targets the modules it is given, by
default every ``Conv2d`` and ``Linear`` (:func:`quantizable_modules`).
"""

from __future__ import annotations

import dataclasses
import operator
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torchao.quantization import IntxUnpackedToInt8Tensor

from qlight.errors import QlightError, QlightWarning
from qlight.quantization.intx import GRANULARITIES, MAX_BITS, MIN_BITS, Granularity, groupable, intx_weight, set_weight
from qlight.quantization.methods import (
    InverseHessian,
    correct_biases,
    gptq_weight,
    input_hessians,
    inverse_hessian,
    layers_feeding_batchnorm,
    output_means,
    reestimate_batchnorm,
    remembered,
)
from qlight.quantization.runtimes import InductorGraph, OnnxRuntimeModule, check_agreement, export_onnx

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
    def per_layer(self) -> bool:
        """Bits differ per layer: the saved file carries the plan."""

    @property
    def runtime(self) -> str:
        """What runs the quantized model: ``eager`` PyTorch, ``inductor`` (compiled), ``onnxruntime``."""

    @property
    def suffix(self) -> str:
        """The saved file's suffix: ``.pt`` (state dict), ``.pt2`` (exported graph) or ``.onnx``."""

    @property
    def granularity(self) -> str:
        """Which weights share a scale (``""`` for float casts)."""

    @property
    def method(self) -> str:
        """How the values are chosen: ``cast``, ``pt2e`` (calibrated), ``rtn`` (round to nearest) or
        ``gptq``, followed by the corrections applied after it (``rtn+bn_reestimation``)."""

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


Rounding = Literal["rtn", "gptq"]
ROUNDINGS: tuple[str, ...] = ("rtn", "gptq")
CORRECTIONS: tuple[str, ...] = ("bn_reestimation", "bias_correction")
BEST_METHOD = "gptq+bn_reestimation+bias_correction"  # the most accurate combination measured (README)
METHOD_HELP = "rtn, gptq, bn_reestimation, bias_correction joined with + (at most one of rtn and gptq)"


@dataclass(frozen=True)
class IntxWeightOnly:
    """Symmetric N-bit weights as torchao ``IntxUnpackedToInt8Tensor``, one scale per group (see
    :mod:`qlight.quantization.intx`); activations stay in float. A conv whose groups would hold one
    value (one input channel, ``per_kernel_position``) stays float.

    Args:
        bits: bits per weight.
        granularity: which weights share a scale.
        rounding: ``rtn`` (round to nearest, torchao's ``from_hp``) or ``gptq``
            (:mod:`~qlight.quantization.methods.gptq`); both use torchao's scales.
        bn_reestimation: then recompute the BatchNorm statistics on the calibration batches.
        bias_correction: then correct each layer's mean output shift against the float model, except,
            with ``bn_reestimation``, in the layers that feed a BatchNorm (its new mean would undo it).
    """

    bits: int
    granularity: Granularity = DEFAULT_GRANULARITY
    rounding: Rounding = "rtn"
    bn_reestimation: bool = False
    bias_correction: bool = False
    static = False
    per_layer = False
    input_dtype = torch.float32
    runtime = "eager"
    suffix = ".pt"

    @property
    def method(self) -> str:
        """``rtn``, ``gptq``, then the corrections in the order they run, joined with ``+``."""
        corrections = [name for name in CORRECTIONS if getattr(self, name)]
        return "+".join([self.rounding, *corrections])

    @property
    def calibrated(self) -> bool:
        return self.method != "rtn"

    @property
    def name(self) -> str:
        methods = "".join(f"+{m}" for m in self.method.split("+") if m != "rtn")
        suffix = "" if self.granularity == DEFAULT_GRANULARITY else f"@{self.granularity}"
        return f"int{self.bits}{methods}{suffix}"

    def quantize(self, model: nn.Module, targets: Sequence[str], calibration: Sequence[Tensor] = ()) -> nn.Module:
        plan = {name: self.bits for name in targets if groupable(model.get_submodule(name).weight, self.granularity)}
        return self.quantize_plan(model, targets, plan, calibration)

    def quantize_plan(
        self, model: nn.Module, targets: Sequence[str], plan: Mapping[str, int], calibration: Sequence[Tensor] = ()
    ) -> nn.Module:
        """Quantize each layer of ``plan`` to its bits (``self.bits`` aside) with this recipe's rounding,
        grouping and corrections; ``targets`` names the layers whose float statistics methods share."""
        if self.calibrated and not calibration:
            raise QlightError(f"{self.name} needs calibration batches: set calibration_batches to 1 or more")
        reference = self._float_output_means(model, targets, calibration) if self.bias_correction else {}
        self.round_weights(model, targets, plan, calibration)
        if self.bn_reestimation and not reestimate_batchnorm(model, calibration):
            warnings.warn("no BatchNorm: nothing re-estimated", QlightWarning, stacklevel=2)
        if reference:
            without_bias = correct_biases(model, reference, calibration)
            if without_bias:
                warnings.warn(
                    f"bias_correction skipped {', '.join(without_bias)} (no bias)", QlightWarning, stacklevel=2
                )
        return model

    def round_weights(
        self, model: nn.Module, targets: Sequence[str], plan: Mapping[str, int], calibration: Sequence[Tensor] = ()
    ) -> None:
        """Only the rounding (``rtn`` or ``gptq``) of the ``plan`` layers, in place, without corrections."""
        if self.rounding == "gptq":
            self._gptq(model, targets, plan, calibration)
            return
        for name, layer_bits in plan.items():
            module = model.get_submodule(name)
            set_weight(module, intx_weight(module.weight, layer_bits, self.granularity))

    def _float_output_means(
        self, model: nn.Module, targets: Sequence[str], calibration: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """What bias correction aims at, measured before any weight changes; with BN re-estimation,
        without the layers that feed a BatchNorm."""
        key = tuple(targets)
        means = remembered(calibration, ("output_means", key), lambda: output_means(model, targets, calibration))
        if not self.bn_reestimation:
            return means
        feeding = remembered(
            calibration, ("feeding_batchnorm", key), lambda: layers_feeding_batchnorm(model, targets, calibration[0])
        )
        return {name: mean for name, mean in means.items() if name not in feeding}

    def _gptq(
        self, model: nn.Module, targets: Sequence[str], bits: Mapping[str, int], calibration: Sequence[Tensor]
    ) -> None:
        # Hessians of the float model, factored once per calibration set for every bit-width and grouping.
        inverses = remembered(
            calibration,
            ("inverse_hessians", tuple(targets)),
            lambda: {name: inverse_hessian(h) for name, h in input_hessians(model, targets, calibration).items()},
        )
        fallbacks = []
        for name, layer_bits in bits.items():
            module = model.get_submodule(name)
            inverse = inverses.get(name, InverseHessian(fallback="GPTQ solves Linear and ungrouped Conv2d only"))
            weight, fallback = gptq_weight(module.weight, layer_bits, self.granularity, inverse)
            set_weight(module, weight)
            if fallback:
                fallbacks.append(f"{name} ({fallback})")
        if fallbacks:
            warnings.warn(f"gptq: round-to-nearest for {'; '.join(fallbacks)}", QlightWarning, stacklevel=3)


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
    """``torch.export`` with a dynamic batch dimension, so any batch size runs the graph."""
    if len(example) < 2:  # export specializes a size-1 dimension to a constant
        example = example[:1].expand(2, *example.shape[1:]).contiguous()
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
_INT = re.compile(r"int(\d+)((?:\+\w+)*)(?:@(\w+))?")

# A recipe parser takes (name, default granularity, default method) and returns its recipe, or None
# when the name is not of its kind; each kind registers one, with the grammar it reads, as torchao
# pairs a config with a registered handler.
RecipeParser = Callable[[str, Granularity, str], "Recipe | None"]
_PARSERS: dict[str, RecipeParser] = {}


def register_recipe(grammar: str) -> Callable[[RecipeParser], RecipeParser]:
    """Register a recipe parser; ``grammar`` says what names it reads (listed in errors and
    ``python -m qlight recipes``)."""

    def register(parser: RecipeParser) -> RecipeParser:
        _PARSERS[grammar] = parser
        return parser

    return register


def recipe_grammar() -> list[str]:
    """What each registered kind of recipe reads, one line each."""
    return list(_PARSERS)


@register_recipe(f"{', '.join(FLOAT_DTYPES)}: cast weights and inputs")
def _float_cast(name: str, granularity: Granularity, method: str) -> Recipe | None:
    return FloatCast(name, FLOAT_DTYPES[name]) if name in FLOAT_DTYPES else None


@register_recipe(
    f"int<{MIN_BITS}..{MAX_BITS}>[+<method>][@<granularity>]: weight-only, method {METHOD_HELP}, granularity "
    f"{' or '.join(GRANULARITIES)}"
)
def _weight_only(name: str, granularity: Granularity, method: str) -> Recipe | None:
    match = _INT.fullmatch(name)
    if not (match and MIN_BITS <= int(match.group(1)) <= MAX_BITS and match.group(3) in (None, *GRANULARITIES)):
        return None
    methods = parse_method(match.group(2)[1:]) if match.group(2) else parse_method(method)
    return IntxWeightOnly(int(match.group(1)), match.group(3) or check_granularity(granularity), **methods)


@register_recipe(
    f"{', '.join(_STATIC)}: static int8 activations through PT2E, run eagerly, by Inductor or ONNX Runtime"
)
def _static(name: str, granularity: Granularity, method: str) -> Recipe | None:
    return _STATIC.get(name)


def valid_recipe_names() -> list[str]:
    return [*FLOAT_DTYPES, *(f"int{b}" for b in range(MIN_BITS, MAX_BITS + 1)), *_STATIC]


def parse_recipe(name: str, granularity: Granularity = DEFAULT_GRANULARITY, method: str = "rtn") -> Recipe:
    """A recipe from its name, by the registered parsers: ``fp32``, ``fp16``, ``bf16``, ``int2``..``int8``
    (weight-only), the static recipes, ``mixed@<budget>`` (:mod:`~qlight.quantization.mixed_precision`).

    A weight-only name may name its methods (``int3+gptq+bn_reestimation``, in any order) and its
    grouping (``int3@per_kernel_position``); ``method`` and ``granularity`` apply to names that do not.

    Raises:
        QlightError: for an unknown recipe, method or granularity, listing the valid ones.
    """
    for parser in _PARSERS.values():
        recipe = parser(name, granularity, method)
        if recipe is not None:
            return recipe
    raise QlightError(
        f"unknown quantization recipe {name!r}; valid: {', '.join(valid_recipe_names())}, or by kind: "
        f"{'; '.join(_PARSERS)}"
    )


def parse_method(method: str) -> dict[str, Any]:
    """``gptq+bias_correction`` -> the matching :class:`IntxWeightOnly` fields (the parts in any order).

    Raises:
        QlightError: for an unknown part, a repeated one or two roundings, listing the valid ones.
    """
    parts = method.split("+")
    unknown = [part for part in parts if part not in (*ROUNDINGS, *CORRECTIONS)]
    if unknown:
        raise QlightError(f"unknown method {unknown[0]!r}; valid: {METHOD_HELP}")
    roundings = [part for part in parts if part in ROUNDINGS]
    if len(roundings) > 1 or len(set(parts)) < len(parts):
        raise QlightError(f"method {method!r} repeats a part or names two roundings; valid: {METHOD_HELP}")
    return {"rounding": roundings[0] if roundings else "rtn", **{name: name in parts for name in CORRECTIONS}}


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
    ``IntxUnpackedToInt8Tensor`` weights, or the int8 constants of a PT2E graph (compiled or not) or
    of an ONNX model."""
    if isinstance(model, OnnxRuntimeModule):
        return model.quantized_weight_sizes()
    if isinstance(model, InductorGraph):
        model = model.graph
    if isinstance(model, torch.fx.GraphModule):
        dequantized = [node.args[0] for node in model.graph.nodes if "dequantize_per_channel" in str(node.target)]
        return [operator.attrgetter(node.target)(model).numel() for node in dequantized if node.op == "get_attr"]
    return [
        m.weight.numel() for m in model.modules() if isinstance(getattr(m, "weight", None), IntxUnpackedToInt8Tensor)
    ]
