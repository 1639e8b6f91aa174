"""GPTQ: error-compensating rounding for Conv2d and Linear weights.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
Algorithm 1: the columns of a weight (its inputs) are rounded one at a time, and each rounding error is
spread over the columns not yet rounded so that the layer's output on the calibration inputs changes as
little as possible, measured with the inputs' Hessian ``H = 2 X X^T / n``. For a conv, ``X`` holds its
unfolded input patches, one column per (input channel, kernel position), the layout of
``weight.reshape(out, -1)``. Choices made here:

- the scales are torchao's round-to-nearest ones, fixed from the original weights before the sweep
  ("static groups"), so GPTQ changes only the integer codes, any grouping works (a
  ``per_kernel_position`` group is a set of non-adjacent columns) and the result is the same
  ``IntxUnpackedToInt8Tensor`` as round-to-nearest;
- act-order: columns with the largest Hessian diagonal first;
- lazy block updates of 128 columns;
- a grouped conv (depthwise included) is one GPTQ problem per group: the outputs of a group see only
  its input channels, so each group has its own Hessian, column order and sweep, all run as one
  batched sweep;
- the Hessians come from the float model in one pass (not from the partly quantized model, layer after
  layer, as in the paper): on the tested networks this is almost as accurate, and the Hessians and their
  factorizations then serve every bit-width and grouping of a PTQ run (see ``Calibration``);
- numerics: damping of 1% of the mean diagonal, raised tenfold up to three times if the Cholesky
  factorization fails; columns that never saw a non-zero input keep their weights and get plain
  rounding; a layer without a usable Hessian (no calibration input reached it, NaN/Inf, no
  factorization) or with a non-finite result gets round-to-nearest. Never NaN.

torchao's prototype GPTQ (``torchao.prototype.gptq``) is not reused: it runs on CUDA only, covers
``nn.Linear`` only and produces its Int4/Int8/NVFP4 tensors, not the ``IntxUnpackedToInt8Tensor`` that
qlight's recipes, files and QAT conversion share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchao.quantization import IntxUnpackedToInt8Tensor

from qlight.quantization.grid.intx import Granularity, code_range, intx_from_codes, intx_weight
from qlight.quantization.methods.calibration import hooked, run

PERCDAMP = 0.01
DAMPING_TRIES = 4
BLOCK = 128


def solvable(module: nn.Module) -> bool:
    """GPTQ handles Linear and Conv2d, grouped or not."""
    return isinstance(module, nn.Linear | nn.Conv2d)


def groups(module: nn.Module) -> int:
    """Independent GPTQ problems in a layer: a conv's groups, 1 for a linear layer."""
    return module.groups if isinstance(module, nn.Conv2d) else 1


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as rows of the matrix products it computes, shape ``(groups, samples, columns)``:
    for a conv, one row per output position holding a group's patch in the order of the group's
    ``weight.reshape(out, -1)`` rows."""
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    padding = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):  # as Conv2d._conv_forward pads
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x, padding = F.pad(x, module._reversed_padding_repeated_twice, mode=mode), 0
    patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
    # unfold lays out input channel after input channel, so a group's columns are contiguous
    rows = patches.transpose(1, 2).reshape(-1, module.groups, patches.shape[1] // module.groups)
    return rows.transpose(0, 1)


def input_hessians(model: nn.Module, names: Sequence[str], batches: Sequence[Tensor]) -> dict[str, Tensor | None]:
    """``H = 2 X X^T / n`` of the inputs of each named layer that GPTQ can solve, from one pass of
    ``batches`` through ``model`` (float32, one batched matrix product per batch and layer).

    Args:
        model: the float model, in eval mode.
        names: its Conv2d and Linear layers.
        batches: calibration inputs, on the model's device.

    Returns:
        The Hessians of each solvable layer, shape ``(groups, columns, columns)``; ``None`` for a layer
        that no input reached.
    """
    layers = [name for name in names if solvable(model.get_submodule(name))]
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def accumulate(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            rows = input_rows(module, args[0].detach().float())
            if name not in sums:
                sums[name] = rows.new_zeros(rows.shape[0], rows.shape[2], rows.shape[2])
            sums[name].baddbmm_(rows.transpose(1, 2), rows)
            counts[name] += rows.shape[1]

        return hook

    with hooked(model, {name: accumulate(name) for name in layers}, pre=True):
        run(model, batches)
    return {name: sums[name] * (2 / counts[name]) if counts[name] else None for name in layers}


@dataclass(frozen=True)
class InverseHessian:
    """What GPTQ needs of one layer's Hessian, independent of bits and grouping: the column order
    (act-order) and the upper Cholesky factor of ``(H + damp I)^-1`` in that order; or, with ``upper``
    ``None``, why the layer gets round-to-nearest instead."""

    order: Tensor | None = None
    upper: Tensor | None = None
    fallback: str = ""


def inverse_hessian(hessian: Tensor | None, percdamp: float = PERCDAMP) -> InverseHessian:
    """Factor a layer's Hessians for :func:`gptq_weight`.

    Args:
        hessian: from :func:`input_hessians`, ``(groups, columns, columns)`` or one ``(columns, columns)``
            matrix; ``None``, NaN/Inf or a matrix that cannot be factored gives an :class:`InverseHessian`
            that says why the layer gets round-to-nearest.
        percdamp: damping added to the diagonal, as a share of its mean; raised tenfold (up to three
            times) for each group whose Cholesky factorization fails.
    """
    if hessian is None:
        return InverseHessian(fallback="no calibration input reached it")
    if not bool(torch.isfinite(hessian).all()):
        return InverseHessian(fallback="its Hessian holds NaN or Inf")
    hessian = (hessian if hessian.dim() == 3 else hessian[None]).clone()
    diagonal = torch.diagonal(hessian, dim1=1, dim2=2)
    diagonal[diagonal <= 0] = 1.0  # input always zero: no error flows into or out of these columns
    order = torch.argsort(diagonal, dim=1, descending=True, stable=True)  # ties keep their order
    hessian = hessian.take_along_dim(order[:, :, None], 1).take_along_dim(order[:, None, :], 2)
    damp = percdamp * torch.diagonal(hessian, dim1=1, dim2=2).mean(1)
    eye = torch.eye(hessian.shape[1], device=hessian.device)
    upper, pending = torch.empty_like(hessian), torch.ones(len(hessian), dtype=torch.bool, device=hessian.device)
    for _ in range(DAMPING_TRIES):
        lower, info = torch.linalg.cholesky_ex(hessian[pending] + damp[pending, None, None] * eye)
        factor, inverse_info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        done = (info == 0) & (inverse_info == 0) & torch.isfinite(factor).flatten(1).all(1)
        solved = pending.nonzero().squeeze(1)[done]
        upper[solved] = factor[done]
        pending[solved] = False
        if not bool(pending.any()):
            return InverseHessian(order, upper)
        damp = damp * 10
    return InverseHessian(fallback="its Hessian could not be factored even with damping")


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    # The sweep is thousands of tiny ops per layer: on a 2-core CPU, intra-op threads only add
    # synchronization (measured on VGG-11-BN: 2.6-2.9 s per recipe with one thread, 2.2-5.9 s with two).
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_codes(weight: Tensor, scale: Tensor, bits: int, upper: Tensor, block: int = BLOCK) -> Tensor:
    """The GPTQ sweep over the columns of ``weight``, shape ``(groups, rows, columns)`` and already in the
    order of ``upper`` (``(groups, columns, columns)``), with ``scale`` giving each weight's fixed scale
    (same shape); returns the codes (float, integer-valued). Rounding is torchao's: ``round(w * (1 /
    scale))`` clamped to the code range."""
    with _one_cpu_thread(weight.device):
        return _sweep(weight.clone(), scale, bits, upper, block)


def _sweep(weight: Tensor, scale: Tensor, bits: int, upper: Tensor, block: int) -> Tensor:
    """Column by column within a block of ``weight`` (modified in place), every group at once; the
    columns after the block take the block's errors in one product ("lazy batch updates")."""
    qmin, qmax = code_range(bits)
    inverse_scale = 1.0 / scale
    codes = torch.empty_like(weight)
    columns = weight.shape[2]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        part, local = weight[:, :, start:end], upper[:, start:end, start:end]
        errors = torch.empty_like(part)
        for i in range(end - start):
            column = start + i
            code = torch.clamp(torch.round(part[:, :, i] * inverse_scale[:, :, column]), qmin, qmax)
            codes[:, :, column] = code
            errors[:, :, i] = (part[:, :, i] - code * scale[:, :, column]) / local[:, i, i, None]
            part[:, :, i:].baddbmm_(errors[:, :, i : i + 1], local[:, i : i + 1, i:], alpha=-1)
        weight[:, :, end:].baddbmm_(errors, upper[:, start:end, end:], alpha=-1)
    return codes


def gptq_weight(
    weight: Tensor, bits: int, granularity: Granularity, inverse: InverseHessian
) -> tuple[IntxUnpackedToInt8Tensor, str]:
    """GPTQ codes for ``weight`` with torchao's round-to-nearest scales, as torchao's tensor; and why it
    fell back to round-to-nearest (``""`` when it did not).

    Args:
        weight: a Linear or Conv2d weight (a grouped conv's output channels split evenly into the groups
            of ``inverse``).
        bits: this layer's bit-width.
        granularity: which weights share a scale.
        inverse: this layer's factored Hessians (:func:`inverse_hessian`).
    """
    rtn = intx_weight(weight, bits, granularity)
    if inverse.upper is None:
        return rtn, inverse.fallback
    groups, columns = inverse.order.shape
    shape = (groups, weight.shape[0] // groups, columns)
    flat = weight.detach().float().reshape(shape)
    scale = rtn.scale.float().expand(weight.shape).reshape(shape)
    order = inverse.order[:, None, :].expand(shape)
    ordered = gptq_codes(flat.gather(2, order), scale.gather(2, order), bits, inverse.upper)
    codes = torch.empty_like(flat).scatter_(2, order, ordered)
    if not bool(torch.isfinite(codes).all()):
        return rtn, "its GPTQ sweep was not finite"
    return intx_from_codes(codes.reshape(weight.shape), rtn.scale, bits, weight.dtype), ""
