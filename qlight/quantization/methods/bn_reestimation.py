"""BatchNorm re-estimation: the running statistics of a quantized model, measured on its own activations.

Quantized weights shift and rescale every activation, so the statistics that BatchNorm learned on the
float model no longer normalize them. Recomputing them from a few unlabelled training batches is AIMET's
"BN re-estimation" (recommended there for 4-bit weights) and part of BRECQ's recipe (Li et al. 2021).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from qlight.quantization.methods.calibration import run


def reestimate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> list[str]:
    """Recompute the running mean and variance of every BatchNorm of ``model`` from ``batches``: the
    statistics are reset, then averaged over the batches with equal weight (``momentum=None``), with
    the BatchNorm layers in training mode and everything else (dropout) in eval mode, without
    gradients. ``model`` keeps its mode and momenta.

    Args:
        model: the quantized model.
        batches: unlabelled inputs, on the model's device.

    Returns:
        The names of the re-estimated layers; empty when ``model`` has none.
    """
    norms = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    }
    momenta = {name: module.momentum for name, module in norms.items()}
    was_training = model.training
    model.eval()
    for module in norms.values():
        module.reset_running_stats()
        module.momentum = None
        module.train()
    try:
        run(model, batches)
    finally:
        for name, module in norms.items():
            module.momentum = momenta[name]
        model.train(was_training)
    return list(norms)
