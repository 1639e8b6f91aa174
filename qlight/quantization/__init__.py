"""Quantization by role, each folder importing only the ones listed before it: ``grid/`` (torchao's
integer weights and the bytes they take), ``runtimes/`` (Inductor, ONNX Runtime, speed),
``methods/`` (how low-bit weights are chosen), ``recipes/`` (what a quantized model is), ``qat/``
(fake quantization), ``io/`` (files), ``callbacks/`` (the Lightning callbacks). ``lightning_plumbing``
is the one module that touches Lightning internals."""

import logging

# torchao 0.18 registers an Enum that newer torch handles natively; torch logs a deprecation line
# on every import that users can do nothing about. Set before torchao is first imported below.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from qlight.quantization.callbacks.ptq import PostTrainingQuantization  # noqa: E402
from qlight.quantization.callbacks.qat import QuantizationAwareTraining  # noqa: E402
from qlight.quantization.callbacks.sensitivity import LayerSensitivity  # noqa: E402
from qlight.quantization.callbacks.static_qat import StaticQuantizationAwareTraining  # noqa: E402
from qlight.quantization.grid.intx import GRANULARITIES  # noqa: E402
from qlight.quantization.io.serialization import load_quantized, pack_bits, unpack_bits  # noqa: E402
from qlight.quantization.qat.fake_quant import FakeQuantizedConv2d  # noqa: E402
from qlight.quantization.recipes.base import (  # noqa: E402
    BEST_METHOD,
    Recipe,
    parse_recipe,
    quantizable_modules,
    valid_recipe_names,
)
from qlight.quantization.recipes.float_cast import FloatCast  # noqa: E402
from qlight.quantization.recipes.mixed import MixedPrecision  # noqa: E402
from qlight.quantization.recipes.static import StaticPT2E  # noqa: E402
from qlight.quantization.recipes.weight_only import IntxWeightOnly  # noqa: E402

__all__ = [
    "BEST_METHOD",
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
