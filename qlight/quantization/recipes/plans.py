"""Plans of bits per layer: read from a file, checked against a model, read off a quantized model."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torchao.quantization import IntxUnpackedToInt8Tensor

from qlight.errors import QlightError
from qlight.quantization.grid.intx import MAX_BITS, MIN_BITS, dtype_bits
from qlight.quantization.recipes.allocation import Plan

MAX_PLAN_BYTES = 2**20


def _plan_text(path: Path) -> str:
    # Opened without blocking and checked as opened: a FIFO would block in open() and /dev/zero never end.
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise QlightError(f"{path} is not a regular file: a plan is a JSON file of layer -> bits")
        data = file.read(MAX_PLAN_BYTES + 1)
    if len(data) > MAX_PLAN_BYTES:
        raise QlightError(
            f"{path} holds {max(info.st_size, len(data)):,} bytes: a plan is a JSON object of layer -> bits, "
            "at most 1 MiB"
        )
    return data.decode()


def read_plan(path: Path) -> Plan:
    """A plan file: a non-empty JSON object of layer name -> bits (2..8), a regular file of at most 1 MiB."""
    try:
        plan = json.loads(_plan_text(path))
    except FileNotFoundError:
        raise QlightError(f"no plan file at {path}: write a JSON object of layer -> bits") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: also 5,000-digit numbers
        reason = f"{type(err).__name__}: {str(err)[:100]}"
        raise QlightError(f"{path} is not a JSON plan of layer -> bits ({reason})") from None
    if not isinstance(plan, dict) or not plan:
        raise QlightError(f"{path} is not a JSON plan: write a non-empty object of layer -> bits")
    check_bits(plan, str(path))
    return plan


def _short(name: str) -> str:
    return repr(name) if len(name) <= 80 else f"{name[:80]!r}... ({len(name):,} characters)"


def check_bits(plan: Mapping[str, Any], source: str) -> None:
    """Every layer of ``plan`` has a whole number of bits in 2..8."""
    for name, bits in plan.items():
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            shown = repr(bits) if isinstance(bits, (int, float, str, bool)) and len(repr(bits)) < 40 else "a value"
            raise QlightError(f"plan {source} gives {_short(name)} {shown} bits: bits are whole numbers 2..8")


def check_plan(plan: Mapping[str, int], model: nn.Module, targets: Sequence[str], source: str) -> None:
    """Every layer of ``plan`` is one of ``targets`` and has 2..8 bits; the error lists the layers."""
    check_bits(plan, source)
    unknown = [name for name in plan if name not in targets]
    if unknown:
        raise QlightError(
            f"plan {source} names {_short(unknown[0])}, not a quantizable layer of {type(model).__name__}; its "
            f"quantizable layers: {', '.join(targets)}"
        )


def realised_plan(model: nn.Module) -> Plan:
    """The bits each quantized weight of ``model`` holds, by layer name."""
    return {
        name: dtype_bits(module.weight.target_dtype)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), IntxUnpackedToInt8Tensor)
    }


def average_bits(model: nn.Module) -> float:
    """Bits per quantized weight of ``model``, weighted by the weights' sizes."""
    sizes = {
        name: module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), IntxUnpackedToInt8Tensor)
    }
    plan = realised_plan(model)
    return sum(plan[name] * count for name, count in sizes.items()) / max(1, sum(sizes.values()))
