"""How much each layer suffers from fewer bits: quantize one layer at a time, the rest in float.

The damage is measured on held-out batches against the float model, as top-1 accuracy and as the
KL divergence of the quantized logits from the float ones (smoother than accuracy, and additive
enough across layers for a bit allocation, as HAWQ and NVIDIA ModelOpt's ``auto_quantize`` use it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn import functional as F

from qlight.quantization.grid.intx import Granularity
from qlight.quantization.grid.sizes import weight_bytes

COLUMNS = ["layer", "params", "bits", "acc1", "kl", "bytes"]
QuantizeLayer = Callable[[nn.Module, str, int], None]  # (model, layer name, bits): quantize that layer in place


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    layers: Sequence[str],
    bits: Sequence[int],
    inputs: Sequence[Tensor],
    quantize_layer: QuantizeLayer,
    granularity: Granularity,
    labels: Sequence[Tensor] | None = None,
) -> list[dict]:
    """One row per layer and bit-width (``COLUMNS``): ``model`` with only that layer quantized. Works in
    place on ``model`` and restores each layer's weight after its rows.

    Args:
        model: the float model, in eval mode.
        layers: names of the Conv2d/Linear modules to try.
        bits: the bit-widths to try.
        inputs: batches on the model's device.
        quantize_layer: quantizes one named layer of the model in place (e.g. round to nearest, GPTQ).
        granularity: the grouping ``quantize_layer`` uses, for the byte costs.
        labels: the batches' targets, for ``acc1`` (``None`` without them).
    """
    reference = [model(x).float().log_softmax(1) for x in inputs]
    count = sum(len(x) for x in inputs)
    rows = []
    for index, name in enumerate(layers, 1):
        start = time.perf_counter()
        module = model.get_submodule(name)
        original = module.weight
        for b in bits:
            quantize_layer(model, name, b)
            kl = hits = 0.0
            for i, (x, log_p) in enumerate(zip(inputs, reference, strict=True)):
                logits = model(x).float()
                kl += float(F.kl_div(logits.log_softmax(1), log_p, log_target=True, reduction="sum"))
                if labels is not None:
                    hits += float((logits.argmax(1) == labels[i]).sum())
            module.weight = original
            rows.append(
                {
                    "layer": name,
                    "params": original.numel(),
                    "bits": b,
                    "acc1": hits / count if labels is not None else None,
                    "kl": kl / count,
                    "bytes": weight_bytes(tuple(original.shape), b, granularity),
                }
            )
        rank_zero_info(
            f"sensitivity {index}/{len(layers)} {name}: {len(bits)} bit-widths, {time.perf_counter() - start:.1f} s"
        )
    return rows
