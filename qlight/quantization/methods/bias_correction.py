"""Bias correction: remove the shift that quantized weights cause in each output channel's mean.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction": the
weight error ``W_q - W`` moves the expected output of every channel, and the layer that follows sees a
biased input. The empirical form used here subtracts ``E[y_q - y]`` per output channel, measured on
calibration inputs against the float model's outputs, from the layer's bias, layer after layer so that
each layer is measured after the corrections above it.

Do not correct a layer that feeds a BatchNorm whose statistics are re-estimated afterwards: the
re-estimated mean would undo the correction (:func:`layers_feeding_batchnorm` finds those).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qlight.quantization.methods.calibration import hooked, run


def _channel_sums(module: nn.Module, output: Tensor) -> tuple[Tensor, int]:
    """Per-output-channel sums (float64) and the number of values summed per channel."""
    if isinstance(module, nn.Conv2d):  # (N, C, H, W)
        return output.sum((0, 2, 3)).double(), output.numel() // output.shape[1]
    return output.reshape(-1, output.shape[-1]).sum(0).double(), output.numel() // output.shape[-1]


def output_means(model: nn.Module, names: Sequence[str], batches: Sequence[Tensor]) -> dict[str, Tensor]:
    """Per-output-channel mean of each named layer's output over ``batches`` (float64): the targets of
    :func:`correct_biases`.

    Args:
        model: the float model, in eval mode.
        names: its Conv2d and Linear layers; a layer that never runs is left out of the result.
        batches: calibration inputs, on the model's device.
    """
    totals: dict[str, list] = {name: [0.0, 0] for name in names}

    def accumulate(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            sums, count = _channel_sums(module, output)
            totals[name][0] = totals[name][0] + sums
            totals[name][1] += count

        return hook

    with hooked(model, {name: accumulate(name) for name in names}):
        run(model, batches)
    return {name: sums / count for name, (sums, count) in totals.items() if count}


def correct_biases(model: nn.Module, reference: dict[str, Tensor], batches: Sequence[Tensor]) -> list[str]:
    """Subtract from each layer's bias its mean output shift against ``reference``, in place.

    The batches run through ``model`` once, concatenated into one batch: when a layer runs, its shift
    over the whole calibration set is known at once, is subtracted from its bias and from the output it
    passes on, so later layers are measured after the earlier corrections. That single pass holds the
    activations of every calibration image at once.

    Args:
        model: the quantized model, in eval mode.
        reference: per-channel output means of the float model (:func:`output_means`), by layer name.
        batches: the calibration inputs that ``reference`` was measured on.

    Returns:
        The names of the layers left as they were because they have no bias.
    """
    without_bias = [name for name in reference if model.get_submodule(name).bias is None]
    done: set[str] = set()

    def correct(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            if name in done:  # a layer called twice is corrected once, by its bias
                return None
            done.add(name)
            sums, count = _channel_sums(module, output)
            shift = (sums / count - reference[name]).to(output.dtype)
            module.bias.sub_(shift)
            return output - (shift.view(-1, 1, 1) if isinstance(module, nn.Conv2d) else shift)

        return hook

    hooks = {name: correct(name) for name in reference if name not in without_bias}
    with hooked(model, hooks):
        run(model, [torch.cat(list(batches))])
    return without_bias


def layers_feeding_batchnorm(model: nn.Module, names: Sequence[str], example: Tensor) -> set[str]:
    """The named layers whose output tensor is the input of a BatchNorm, seen in one forward pass (an
    in-place op between the two, as in conv, in-place ReLU, BatchNorm, counts too).

    Args:
        model: the model, in eval mode.
        names: the layers to check.
        example: one input batch.
    """
    outputs: dict[str, Tensor] = {}
    feeding: set[str] = set()

    def remember(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            outputs[name] = output

        return hook

    def check(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        feeding.update(name for name, output in outputs.items() if args[0] is output)

    norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with hooked(model, {name: remember(name) for name in names}), hooked(model, dict.fromkeys(norms, check), pre=True):
        run(model, [example])
    return feeding
