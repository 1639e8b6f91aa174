"""The study's small models: accuracy vs bit-width and QAT epochs to reach PTQ."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class BitCurve:
    """``acc(b) = plateau - drop * 4**(-b)``: uniform quantization noise has variance proportional to
    ``2**(-2b)``, and for small noise the accuracy loss grows linearly with it."""

    plateau: float
    drop: float

    def __call__(self, bits: float) -> float:
        return self.plateau - self.drop * 4.0 ** (-bits)

    def bits_for_gap(self, reference: float, gap: float) -> float | None:
        """The (fractional) bit-width where the curve falls ``gap`` below ``reference``; ``None`` when it
        never does, or only below 1 bit (outside what was measured and what means anything)."""
        room = self.plateau - reference + gap
        if self.drop <= 0 or room <= 0:
            return None
        bits = -math.log(room / self.drop, 4)
        return bits if bits >= 1 else None

    def max_error(self, bits: Sequence[int], acc: Sequence[float]) -> float:
        """The largest distance between the curve and a measured point."""
        return max(abs(self(b) - a) for b, a in zip(bits, acc, strict=True))

    def fits(self, bits: Sequence[int], acc: Sequence[float], reference: float, tolerance: float) -> bool:
        """Whether the curve describes the points: within ``tolerance`` of each, falling with fewer bits,
        and not promising more than ``tolerance`` above ``reference`` (the float model) at many bits."""
        return self.drop > 0 and self.max_error(bits, acc) <= tolerance and self.plateau <= reference + tolerance


def fit_bit_curve(bits: Sequence[int], acc: Sequence[float]) -> BitCurve:
    """Least-squares fit of :class:`BitCurve` (linear in ``4**-b``); needs two distinct bit-widths."""
    if len(set(bits)) < 2:
        raise ValueError("fitting needs at least two distinct bit-widths")
    xs = [4.0 ** (-b) for b in bits]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(acc) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, acc, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    return BitCurve(plateau=mean_y - slope * mean_x, drop=-slope)


def first_bits_with_gap(bits: Sequence[int], acc: Sequence[float], reference: float, gap: float = 0.01) -> int | None:
    """Going down from the most bits, the first measured bit-width whose accuracy is more than
    ``gap`` below ``reference``; ``None`` if none is."""
    for b, a in sorted(zip(bits, acc, strict=True), reverse=True):
        if reference - a > gap:
            return b
    return None


def fewest_bits_within(bits: Sequence[int], acc: Sequence[float], reference: float, gap: float = 0.01) -> int | None:
    """The fewest measured bits that stay within ``gap`` of ``reference`` with every wider measured
    bit-width within it too; ``None`` if even the widest is not."""
    fewest = None
    for b, a in sorted(zip(bits, acc, strict=True), reverse=True):
        if reference - a > gap:
            break
        fewest = b
    return fewest


def epochs_to_match(acc_per_epoch: Sequence[float], target: float) -> int | None:
    """Number of QAT epochs after which accuracy first reaches ``target`` (1 = after the first)."""
    for epoch, acc in enumerate(acc_per_epoch, start=1):
        if acc >= target:
            return epoch
    return None
