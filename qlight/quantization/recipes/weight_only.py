"""Weight-only integer recipes: ``int2``..``int8``, rounded to nearest or by GPTQ, with BatchNorm
re-estimation and bias correction."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qlight.errors import QlightError, QlightWarning
from qlight.quantization.grid.intx import (
    GRANULARITIES,
    MAX_BITS,
    MIN_BITS,
    Granularity,
    groupable,
    intx_weight,
    set_weight,
)
from qlight.quantization.methods import (
    correct_biases,
    gptq_weight,
    input_hessians,
    inverse_hessian,
    layers_feeding_batchnorm,
    output_means,
    reestimate_batchnorm,
    remembered,
)
from qlight.quantization.recipes.base import (
    CORRECTIONS,
    DEFAULT_GRANULARITY,
    METHOD_HELP,
    Recipe,
    Rounding,
    check_granularity,
    parse_method,
    register_recipe,
)

_INT = re.compile(r"int(\d+)((?:\+\w+)*)(?:@(\w+))?")


@dataclass(frozen=True)
class IntxWeightOnly:
    """Symmetric N-bit weights as torchao ``IntxUnpackedToInt8Tensor``, one scale per group (see
    :mod:`qlight.quantization.grid.intx`); activations stay in float. A conv whose groups would hold one
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
            inverse = inverses[name]
            weight, fallback = gptq_weight(module.weight, layer_bits, self.granularity, inverse)
            set_weight(module, weight)
            if fallback:
                fallbacks.append(f"{name} ({fallback})")
        if fallbacks:
            warnings.warn(f"gptq: round-to-nearest for {'; '.join(fallbacks)}", QlightWarning, stacklevel=3)


@register_recipe(
    f"int<{MIN_BITS}..{MAX_BITS}>[+<method>][@<granularity>]: weight-only, method {METHOD_HELP}, granularity "
    f"{' or '.join(GRANULARITIES)}",
    [f"int{bits}" for bits in range(MIN_BITS, MAX_BITS + 1)],
)
def _weight_only(name: str, granularity: Granularity, method: str) -> Recipe | None:
    match = _INT.fullmatch(name)
    if not (match and MIN_BITS <= int(match.group(1)) <= MAX_BITS and match.group(3) in (None, *GRANULARITIES)):
        return None
    methods = parse_method(match.group(2)[1:]) if match.group(2) else parse_method(method)
    return IntxWeightOnly(int(match.group(1)), match.group(3) or check_granularity(granularity), **methods)
