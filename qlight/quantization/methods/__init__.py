"""Post-training methods that choose or correct quantized weights from calibration batches.

Each is a plain function of an ``nn.Module`` and input batches (no Lightning), runs on the model's own
device, and takes its bit-widths per layer:

- :mod:`~qlight.quantization.methods.gptq`: error-compensating rounding (Frantar et al. 2022);
- :mod:`~qlight.quantization.methods.bn_reestimation`: BatchNorm statistics of the quantized model;
- :mod:`~qlight.quantization.methods.bias_correction`: per-channel output shift (Nagel et al. 2019).

:class:`~qlight.quantization.recipes.weight_only.IntxWeightOnly` composes them into recipes such as
``int3+gptq+bn_reestimation+bias_correction``.
"""

from qlight.quantization.methods.bias_correction import correct_biases, layers_feeding_batchnorm, output_means
from qlight.quantization.methods.bn_reestimation import reestimate_batchnorm
from qlight.quantization.methods.calibration import Calibration, remembered
from qlight.quantization.methods.gptq import InverseHessian, gptq_weight, input_hessians, inverse_hessian

__all__ = [
    "Calibration",
    "InverseHessian",
    "correct_biases",
    "gptq_weight",
    "input_hessians",
    "inverse_hessian",
    "layers_feeding_batchnorm",
    "output_means",
    "reestimate_batchnorm",
    "remembered",
]
