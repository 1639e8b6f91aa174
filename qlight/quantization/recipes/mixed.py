"""Mixed precision: bits per layer, chosen from each layer's sensitivity under a size budget, or read
from a plan file.

torchao quantizes every layer it is given at one bit-width and has no allocator; this recipe measures
the layers (:mod:`~qlight.quantization.recipes.sensitivity`), allocates exactly
(:mod:`~qlight.quantization.recipes.allocation`) and hands the plan to :class:`IntxWeightOnly`, so every
rounding, grouping and correction works per layer as it does uniformly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qlight.errors import QlightError, Unsupported
from qlight.quantization.grid.intx import GRANULARITIES, MAX_BITS, MIN_BITS, Granularity, groupable
from qlight.quantization.grid.sizes import weight_bytes
from qlight.quantization.methods import remembered
from qlight.quantization.recipes.allocation import Plan, allocate_bits
from qlight.quantization.recipes.base import (
    DEFAULT_GRANULARITY,
    Recipe,
    check_granularity,
    parse_method,
    register_recipe,
)
from qlight.quantization.recipes.plans import check_plan, read_plan
from qlight.quantization.recipes.sensitivity import layer_sensitivity
from qlight.quantization.recipes.weight_only import IntxWeightOnly

CANDIDATE_BITS = tuple(range(MIN_BITS, MAX_BITS + 1))
MIXED_NAME = re.compile(r"mixed@(\d+(?:\.\d+)?(?:MiB)?|.+?\.json)((?:\+\w+)*)(?:@(\w+))?")
ALIGNMENT = 64  # torch.save starts every tensor record at a multiple of 64 bytes

# The bytes of a saved model (quantized, recipe, targets, source, an input batch: the file records its
# shape), registered by the file format (``io/serialization``): recipes stand below the files that
# record them and cannot import them.
SavedBytes = Callable[[nn.Module, Recipe, Sequence[str], nn.Module, "Tensor | None"], int]
_saved_bytes: list[SavedBytes] = []


def register_saved_bytes(measure: SavedBytes) -> SavedBytes:
    """Tell MiB budgets how many bytes a saved model takes (the file format registers itself)."""
    _saved_bytes[:] = [measure]
    return measure


@dataclass(frozen=True)
class MixedPrecision:
    """Weight-only quantization with bits per layer (2..8). A budget recipe quantizes each layer alone
    at each bit-width on the calibration batches, takes the KL divergence of the logits from the float
    model as the layer's damage, and allocates the bits that minimise the summed damage within the
    budget (an exact knapsack over the bytes each layer takes in qlight's files).

    Args:
        budget: ``"3"`` (average bits per quantized weight, strictly between 2 and 8: the saved file at
            most uniform int3's), ``"1.5MiB"`` (the saved file's size) or a plan file ``"plan.json"``
            (layer -> bits, used as it is; layers it leaves out stay float).
        base: the rounding, grouping and corrections every layer gets (its ``bits`` is not used).
    """

    budget: str
    base: IntxWeightOnly = IntxWeightOnly(MAX_BITS)
    per_layer = True
    static = False
    input_dtype = torch.float32
    runtime = "eager"
    suffix = ".pt"
    bits = MAX_BITS  # the most any layer may get; a row shows the realised average

    @property
    def granularity(self) -> str:
        return self.base.granularity

    @property
    def method(self) -> str:
        return self.base.method

    @property
    def calibrated(self) -> bool:
        return self.base.calibrated or self.plan_file is None

    @property
    def plan_file(self) -> Path | None:
        return Path(self.budget) if self.budget.endswith(".json") else None

    @property
    def name(self) -> str:
        methods = "".join(f"+{m}" for m in self.method.split("+") if m != "rtn")
        suffix = "" if self.granularity == DEFAULT_GRANULARITY else f"@{self.granularity}"
        budget = self.plan_file.name if self.plan_file else self.budget
        return f"mixed@{budget}{methods}{suffix}"

    def check_budget(self) -> None:
        """Fail on a plan file that is not a plan, or an average-bits budget not strictly between 2 and 8
        (there every layer gets the same bits: a uniform recipe), before any model or data is seen."""
        if self.plan_file is not None:
            read_plan(self.plan_file)
        elif not self.budget.endswith("MiB") and float(self.budget) < MIN_BITS:
            raise QlightError(
                f"{self.name}: a budget below {MIN_BITS} bits cannot be met (every layer takes at least "
                f"{MIN_BITS}): give one between {MIN_BITS} and {MAX_BITS} bits"
            )
        elif not self.budget.endswith("MiB") and not MIN_BITS < float(self.budget) < MAX_BITS:
            edge, side = (MIN_BITS, "below") if float(self.budget) <= MIN_BITS else (MAX_BITS, "above")
            raise QlightError(
                f"{self.name}: at {edge} bits or {side} every layer gets {edge} bits, which is int{edge} in a file "
                f"with a longer name: use int{edge}, or a budget between {MIN_BITS} and {MAX_BITS} bits"
            )

    def check(self, model: nn.Module, targets: Sequence[str]) -> None:
        """Fail early on a budget or plan file that is not one, or a plan that does not fit the model."""
        if self.plan_file is None:
            self.check_budget()
        else:  # read_plan checks the file as check_budget would: read it once
            check_plan(read_plan(self.plan_file), model, targets, str(self.plan_file))

    def quantize(self, model: nn.Module, targets: Sequence[str], calibration: Sequence[Tensor] = ()) -> nn.Module:
        self.check(model, targets)
        if self.calibrated and not calibration:
            raise QlightError(f"{self.name} needs calibration batches: set calibration_batches to 1 or more")
        plan = read_plan(self.plan_file) if self.plan_file else self.allocate(model, targets, calibration)
        return self.base.quantize_plan(model, targets, plan, calibration)

    def allocate(self, model: nn.Module, targets: Sequence[str], calibration: Sequence[Tensor]) -> Plan:
        """The plan of least summed KL divergence within the budget (``model`` is left as it was)."""
        layers = self._layers(model, targets)
        cost = {
            name: {
                bits: weight_bytes(model.get_submodule(name).weight.shape, bits, self.granularity)
                for bits in CANDIDATE_BITS
            }
            for name in layers
        }
        example = calibration[0] if calibration else None
        budget = self.budget_bytes(model, targets, layers, example)
        if sum(min(c.values()) for c in cost.values()) > budget:
            fixed = self._fixed_bytes(model, targets, layers, example)
            smallest = (fixed + sum(min(c.values()) for c in cost.values())) / 2**20
            raise Unsupported(f"{self.name} cannot be met: the smallest feasible budget is mixed@{_ceil(smallest)}MiB")
        damage: dict[str, dict[int, float]] = {}
        for row in self.sensitivity(model, targets, calibration):
            damage.setdefault(row["layer"], {})[row["bits"]] = row["kl"]
        plan = allocate_bits(damage, cost, budget)
        # Summed damage is a model of the joint damage; where the best uniform plan that fits does
        # less joint damage on the calibration batches, it is the better plan.
        uniform = max((b for b in CANDIDATE_BITS if sum(cost[n][b] for n in layers) <= budget), default=None)
        if uniform is None or all(bits == uniform for bits in plan.values()):
            return plan
        return min(plan, dict.fromkeys(layers, uniform), key=lambda p: self._joint_kl(model, targets, p, calibration))

    def _layers(self, model: nn.Module, targets: Sequence[str]) -> list[str]:
        """The targets whose weights this grouping can quantize."""
        return [name for name in targets if groupable(model.get_submodule(name).weight, self.granularity)]

    def _joint_kl(self, model: nn.Module, targets: Sequence[str], plan: Plan, calibration: Sequence[Tensor]) -> float:
        quantized = copy.deepcopy(model)
        self.base.round_weights(quantized, targets, plan, calibration)
        with torch.no_grad():
            return sum(
                float(F.kl_div(quantized(x).log_softmax(1), model(x).log_softmax(1), log_target=True, reduction="sum"))
                for x in calibration
            )

    def sensitivity(self, model: nn.Module, targets: Sequence[str], calibration: Sequence[Tensor]) -> list[dict]:
        """Rows of :func:`layer_sensitivity` for the ``targets`` of the float ``model`` on the calibration
        batches (no labels, so no ``acc1``); measured once per :class:`Calibration`, rounding and grouping."""
        layers = self._layers(model, targets)
        key = ("sensitivity", tuple(layers), self.base.rounding, self.granularity)
        return remembered(
            calibration,
            key,
            lambda: layer_sensitivity(
                model,
                layers,
                CANDIDATE_BITS,
                calibration,
                lambda m, name, bits: self.base.round_weights(m, targets, {name: bits}, calibration),
                self.granularity,
            ),
        )

    def budget_bytes(
        self, model: nn.Module, targets: Sequence[str], layers: Sequence[str], example: Tensor | None = None
    ) -> int:
        """What the quantized layers' codes and scales may take in total, in bytes, so that the saved file
        is within the budget: a MiB budget bounds the whole file, ``mixed@3`` the file of uniform int3
        (``mixed@2.5``: of uniform int2, with its layers' codes at 2.5 bits). ``example``: an input batch,
        whose shape the file records."""
        if self.budget.endswith("MiB"):
            limit = int(float(self.budget[:-3]) * 2**20)
        else:
            bits = float(self.budget)
            uniform = dataclasses.replace(self.base, bits=math.floor(bits))
            limit = (
                self._measured_bytes(model, targets, layers, uniform, example)
                - self._layer_bytes(model, layers, uniform.bits)
                + self._layer_bytes(model, layers, bits)
            )
        return limit - self._fixed_bytes(model, targets, layers, example)

    def _layer_bytes(self, model: nn.Module, layers: Sequence[str], bits: float) -> int:
        return sum(weight_bytes(model.get_submodule(name).weight.shape, bits, self.granularity) for name in layers)

    def _measured_bytes(
        self, model: nn.Module, targets: Sequence[str], layers: Sequence[str], recipe: Recipe, example: Tensor | None
    ) -> int:
        """The bytes of ``model`` saved as ``recipe`` with every layer at ``recipe.bits``, as the file
        format counts them (rounding and corrections change no size: a copy is rounded to nearest)."""
        if not _saved_bytes:
            raise RuntimeError("no file format registered its sizes: import qlight.quantization first")
        plan = dict.fromkeys(layers, recipe.bits)
        copied = IntxWeightOnly(recipe.bits, self.granularity).quantize_plan(copy.deepcopy(model), targets, plan)
        return _saved_bytes[0](copied, recipe, targets, model, example)

    def _fixed_bytes(
        self, model: nn.Module, targets: Sequence[str], layers: Sequence[str], example: Tensor | None
    ) -> int:
        """The most the file takes besides the quantized layers' codes and scales, whatever the plan.

        Measured on a copy with every layer at 8 bits, saved under this recipe's name: a layer's entry
        is pickled alike at any bits but for its codes' length and offset, which are largest at 8 bits,
        so no plan pickles longer. The codes of all layers are one record, which starts at a multiple of
        :data:`ALIGNMENT`: fewer codes bytes can end in the same block, so up to one alignment of what
        a plan saves may stay in the file.
        """
        measured = self._measured_bytes(model, targets, layers, self, example)  # self.bits: 8
        return measured - self._layer_bytes(model, layers, MAX_BITS) + ALIGNMENT


def _ceil(mib: float) -> str:
    """``mib`` rounded up to 3 significant digits, as a budget would be written."""
    digits = max(0, 2 - math.floor(math.log10(mib)))
    return f"{math.ceil(mib * 10**digits) / 10**digits:.{digits}f}"


def _budget(text: str) -> str:
    """A budget written one way: ``3.0`` -> ``3``, ``1.50MiB`` -> ``1.5MiB``; plan paths as given."""
    if text.endswith(".json"):
        return text
    unit = "MiB" if text.endswith("MiB") else ""
    return f"{float(text.removesuffix(unit)):g}{unit}"


@register_recipe(
    "mixed@<average bits>, mixed@<size>MiB or mixed@<plan>.json [+<method>][@<granularity>]: bits per layer"
)
def _mixed(name: str, granularity: Granularity, method: str) -> MixedPrecision | None:
    match = MIXED_NAME.fullmatch(name)
    if not (match and match.group(3) in (None, *GRANULARITIES)):
        return None
    methods = parse_method(match.group(2)[1:]) if match.group(2) else parse_method(method)
    base = IntxWeightOnly(MAX_BITS, match.group(3) or check_granularity(granularity), **methods)
    return MixedPrecision(_budget(match.group(1)), base)
