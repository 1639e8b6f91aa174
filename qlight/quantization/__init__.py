"""Quantization recipes (torchao), the PTQ and QAT callbacks and the quantized file format."""

import logging

# torchao 0.18 registers an Enum that newer torch handles natively; torch logs a deprecation line
# on every import that users can do nothing about. Set before torchao is first imported below.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from qlight.quantization.fake_quant import FakeQuantizedConv2d  # noqa: E402
from qlight.quantization.intx import GRANULARITIES  # noqa: E402
from qlight.quantization.mixed_precision import MixedPrecision  # noqa: E402
from qlight.quantization.ptq import PostTrainingQuantization  # noqa: E402
from qlight.quantization.qat import QuantizationAwareTraining  # noqa: E402
from qlight.quantization.recipes import (  # noqa: E402
    FloatCast,
    IntxWeightOnly,
    Recipe,
    StaticPT2E,
    parse_recipe,
    quantizable_modules,
    valid_recipe_names,
)
from qlight.quantization.sensitivity import LayerSensitivity  # noqa: E402
from qlight.quantization.serialization import load_quantized, pack_bits, unpack_bits  # noqa: E402
from qlight.quantization.static_qat import StaticQuantizationAwareTraining  # noqa: E402

__all__ = [
    "GRANULARITIES",
    "FakeQuantizedConv2d",
    "FloatCast",
    "IntxWeightOnly",
    "LayerSensitivity",
    "MixedPrecision",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "Recipe",
    "StaticPT2E",
    "StaticQuantizationAwareTraining",
    "load_quantized",
    "pack_bits",
    "parse_recipe",
    "quantizable_modules",
    "unpack_bits",
    "valid_recipe_names",
]
