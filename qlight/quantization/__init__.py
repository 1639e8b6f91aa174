"""Quantization recipes (torchao), the PTQ and QAT callbacks and the quantized file format."""

import logging

# torchao 0.18 registers an Enum that newer torch handles natively; torch logs a deprecation line
# on every import that users can do nothing about.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from qlight.quantization.fake_quant import FakeQuantizedConv2d
from qlight.quantization.ptq import PostTrainingQuantization
from qlight.quantization.qat import QuantizationAwareTraining
from qlight.quantization.recipes import (
    FloatCast,
    IntxWeightOnly,
    StaticPT2E,
    parse_recipe,
    quantizable_modules,
    valid_recipe_names,
)
from qlight.quantization.serialization import load_quantized, pack_bits, unpack_bits

__all__ = [
    "FakeQuantizedConv2d",
    "FloatCast",
    "IntxWeightOnly",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "StaticPT2E",
    "load_quantized",
    "pack_bits",
    "parse_recipe",
    "quantizable_modules",
    "unpack_bits",
    "valid_recipe_names",
]
