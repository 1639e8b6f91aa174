"""Whether a faster runtime computes what the reference model computes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


AGREEMENT_FLOOR = 99.5  # % of test images: below it a deployed model's results are not the PyTorch model's


@dataclass(frozen=True)
class Agreement:
    """How closely a deployed model's logits follow the PyTorch model's on the same images."""

    same: int  # images whose top-1 prediction is the same
    count: int  # images compared
    max_logit_diff: float  # largest absolute difference of any logit

    @property
    def agreement(self) -> float:
        """% of the images whose top-1 prediction is the same."""
        return 100.0 * self.same / max(self.count, 1)

    def warning(self, what: str) -> str | None:
        """One line when fewer than :data:`AGREEMENT_FLOOR` % of the predictions agree, else ``None``."""
        if self.agreement >= AGREEMENT_FLOOR:
            return None
        return (
            f"{what} agrees with the PyTorch model on {self.agreement:.2f}% of {self.count} test images "
            f"(under {AGREEMENT_FLOOR}%)"
        )


def compare_logits(reference: Tensor, got: Tensor, all_gather: Callable[[Tensor], Tensor] | None = None) -> Agreement:
    """The agreement of ``got`` with ``reference``: logits of the same images, in the same order. With
    ``all_gather`` (a Lightning strategy's), each rank compares its share and the counts are summed."""
    if reference.shape != got.shape:
        raise ValueError(f"logits of shape {tuple(got.shape)} cannot be compared with {tuple(reference.shape)}")
    reference, got = reference.float().cpu(), got.float().cpu()
    same = float((reference.argmax(1) == got.argmax(1)).sum()) if len(reference) else 0.0
    diff = float((reference - got).abs().max()) if reference.numel() else 0.0
    stats = torch.tensor([[same, len(reference), diff]], dtype=torch.float64)
    if all_gather is not None:
        stats = all_gather(stats).reshape(-1, 3).cpu()
    return Agreement(same=int(stats[:, 0].sum()), count=int(stats[:, 1].sum()), max_logit_diff=float(stats[:, 2].max()))
