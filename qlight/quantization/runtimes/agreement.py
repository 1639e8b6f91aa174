"""Whether a faster runtime computes what the reference model computes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

COMPILED_TOLERANCE = 0.05  # of the logits' range: a lowering requantizes, so it is close, not exact


def check_agreement(fast: nn.Module, reference: nn.Module, batch: Tensor, what: str) -> None:
    """Raise when ``fast`` and ``reference`` disagree on ``batch`` beyond rounding: a lowering that
    changes the numbers must make an error row, not a plausible accuracy."""
    with torch.no_grad():
        expected, got = reference(batch), fast(batch)
    spread = float(expected.max() - expected.min()) or 1.0
    error = float((got - expected).abs().max())
    if not error <= COMPILED_TOLERANCE * spread:
        raise RuntimeError(f"{what} disagrees with the reference graph (max logit error {error:.3g})")
