"""Quantization recipes: one small frozen config per recipe behind the :class:`Recipe` protocol, each
applied with torchao (as torchao's ``quant_api.py`` pairs a config dataclass with a handler). Each
kind registers a parser for its names here (:func:`register_recipe`); :func:`parse_recipe` asks them.

Unlike torchao's default (``nn.Linear`` only), every recipe targets the modules it is given, by
default every ``Conv2d`` and ``Linear`` (:func:`quantizable_modules`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torchao.quantization import IntxUnpackedToInt8Tensor

from qlight.errors import QlightError
from qlight.quantization.grid.intx import GRANULARITIES, Granularity
from qlight.quantization.runtimes.inductor import InductorGraph
from qlight.quantization.runtimes.ort import OnnxRuntimeModule

QUANTIZABLE = (nn.Conv2d, nn.Linear)
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


Rounding = Literal["rtn", "gptq"]
ROUNDINGS: tuple[str, ...] = ("rtn", "gptq")
CORRECTIONS: tuple[str, ...] = ("bn_reestimation", "bias_correction")
BEST_METHOD = "gptq+bn_reestimation+bias_correction"  # the most accurate combination measured (README)
METHOD_HELP = "rtn, gptq, bn_reestimation, bias_correction joined with + (at most one of rtn and gptq)"
METHODS = {
    "rtn": "each weight to the nearest code of its group's scale (torchao's from_hp)",
    "gptq": "rounds input columns one at a time, moving each error onto the columns left (GPTQ)",
    "bn_reestimation": "recomputes the BatchNorm statistics of the quantized model on calibration batches",
    "bias_correction": "subtracts each output channel's mean shift against the float model from its bias",
}
GRANULARITY_HELP = {
    "per_channel": "one scale per output channel (the default; what int8 conv kernels take)",
    "per_kernel_position": "one scale per output channel and kernel position (torchao's PerAxis(0))",
}


# A recipe parser takes (name, default granularity, default method) and returns its recipe, or None
# when the name is not of its kind; each kind registers one, with the grammar it reads, as torchao
# pairs a config with a registered handler.
RecipeParser = Callable[[str, Granularity, str], "Recipe | None"]
_PARSERS: dict[str, RecipeParser] = {}
_NAMES: list[str] = []


def register_recipe(grammar: str, names: Iterable[str] = ()) -> Callable[[RecipeParser], RecipeParser]:
    """Register a recipe parser; ``grammar`` says what names it reads and ``names`` lists its plain
    ones (both are listed in the error for an unknown recipe)."""

    def register(parser: RecipeParser) -> RecipeParser:
        _PARSERS[grammar] = parser
        _NAMES.extend(names)
        return parser

    return register


def describe_recipes() -> str:
    """Every kind of recipe, method and granularity, one line each (``python -m qlight recipes``)."""
    lines = ["recipes (one name each; a method or granularity in the name overrides the callback's):"]
    lines += [f"  {grammar}" for grammar in _PARSERS]
    lines += [f"methods (joined with +, at most one of rtn and gptq; best measured: {BEST_METHOD}):"]
    lines += [f"  {name}: {text}" for name, text in METHODS.items()]
    lines += ["granularities (@<granularity>):"] + [f"  {name}: {text}" for name, text in GRANULARITY_HELP.items()]
    return "\n".join(lines)


def valid_recipe_names() -> list[str]:
    """The plain names of the registered recipes (``int3`` but not ``int3+gptq``)."""
    return list(_NAMES)


def parse_recipe(name: str, granularity: Granularity = DEFAULT_GRANULARITY, method: str = "rtn") -> Recipe:
    """A recipe from its name, by the registered parsers: ``fp32``, ``fp16``, ``bf16``, ``int2``..``int8``
    (weight-only), the static recipes, ``mixed@<budget>`` (:mod:`~qlight.quantization.recipes.mixed`).

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


def float_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The quantizable modules of ``model`` that are not among ``targets``: those left in float."""
    return [name for name in quantizable_modules(model) if name not in targets]


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
