"""The quantization study: stages, numerics callback, curve fits and the report."""

from qlight.study.curves import BitCurve, epochs_to_match, fewest_bits_within, first_bits_with_gap, fit_bit_curve
from qlight.study.numerics import PrecisionStats, cast_outcomes

__all__ = [
    "BitCurve",
    "PrecisionStats",
    "cast_outcomes",
    "epochs_to_match",
    "fewest_bits_within",
    "first_bits_with_gap",
    "fit_bit_curve",
]
