"""Any model qlight makes as a self-contained ONNX model that ONNX Runtime's CPU provider runs.

A weight-only model (torchao ``IntxUnpackedToInt8Tensor`` weights: any bits, either granularity, a
mixed plan, QAT-converted) is exported with its weights dequantized, then each such weight's float
initializer becomes its integer codes (exactly torchao's ``qdata``, in the narrowest integer type
ONNX Runtime runs: INT2 for 2 bits, INT4 for 3-4, INT8 for 5-8) and scales, joined by a
``DequantizeLinear`` node that yields the tensor the layer read. Static (PT2E) graphs are exported
as they are (QDQ), an ``InductorGraph`` as its graph, an ``OnnxRuntimeModule`` as its bytes.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchao.quantization import IntxUnpackedToInt8Tensor

from qlight.errors import Unsupported
from qlight.quantization.grid.intx import dtype_bits
from qlight.quantization.runtimes.inductor import InductorGraph
from qlight.quantization.runtimes.ort import OnnxRuntimeModule, export_onnx, require

# The opset where ONNX Runtime's DequantizeLinear reads a code type (or a blocked scale).
_OPSET_INT8, _OPSET_INT4, _OPSET_INT2 = 13, 21, 25


def storage_bits(bits: int) -> int:
    """The width of the ONNX integer type that holds ``bits``-bit codes: 2, 4 or 8."""
    return 2 if bits == 2 else 4 if bits <= 4 else 8


def float_dtype(model: nn.Module) -> torch.dtype:
    """The float type of ``model``'s weights, which its inputs take (float32 for a model without)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def onnx_bytes(model: nn.Module, example: Tensor) -> bytes:
    """``model`` as a self-contained ONNX model (batch dimension dynamic) that
    ``runtimes.ort.OnnxRuntimeModule`` runs; ``example`` is a batch of its inputs.

    Raises:
        QlightError: the ``onnx`` extra is missing.
        Unsupported: the model holds what ONNX Runtime's CPU provider cannot run (bfloat16).
    """
    if isinstance(model, OnnxRuntimeModule):
        return model.onnx_bytes
    if isinstance(model, InductorGraph):  # compiled for running; its graph is what exports
        model = model.graph
    onnx = require("onnx")
    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
        model = copy.deepcopy(model).cpu()  # exported and run on the CPU, as ONNX Runtime's CPU provider runs it
    dtype = float_dtype(model)
    if dtype == torch.bfloat16:
        raise Unsupported("ONNX Runtime's CPU provider has no bfloat16 Conv: export the fp16 or fp32 model")
    example = example.to(device="cpu", dtype=dtype)
    if len(example) < 2:  # the exporter specializes a size-1 batch to a constant
        example = example[:1].expand(2, *example.shape[1:]).contiguous()
    weights = {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), IntxUnpackedToInt8Tensor)
    }
    if not weights:
        proto = onnx.load_from_string(export_onnx(model, example))
    else:
        proto = onnx.load_from_string(export_onnx(_dequantized(model, weights), example, optimize=False))
        for name, weight in weights.items():
            _store_codes(proto, f"{name}.weight", weight)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _dequantized(model: nn.Module, weights: dict[str, IntxUnpackedToInt8Tensor]) -> nn.Module:
    """A copy of ``model`` whose quantized weights are the float tensors they stand for."""
    plain = copy.deepcopy(model).eval()
    for name, weight in weights.items():
        plain.get_submodule(name).weight = nn.Parameter(weight.dequantize(), requires_grad=False)
    return plain


def _float_initializer(graph: Any, name: str, value: np.ndarray) -> Any:
    """The initializer that holds ``value``: the one the exporter named after the parameter, else
    the one with the same values (an exporter may rename what it keeps)."""
    from onnx import numpy_helper

    named = [init for init in graph.initializer if init.name == name]
    candidates = named + [init for init in graph.initializer if tuple(init.dims) == value.shape]
    for init in candidates:
        if np.array_equal(numpy_helper.to_array(init), value):
            return init
    raise ValueError(f"{name} is not a constant of the exported graph: cannot store its integer codes")


def _scale_layout(weight: IntxUnpackedToInt8Tensor) -> tuple[np.ndarray, dict[str, int]]:
    """The scale tensor and DequantizeLinear attributes for torchao's block layout: per output
    channel (axis 0, 1-D scale), blocked along one axis (``per_kernel_position``: axis 1, a block of
    all input channels) or one scale for the tensor."""
    shape, block = tuple(weight.qdata.shape), tuple(weight.block_size)
    scale = weight.scale.detach().cpu().numpy()  # DequantizeLinear yields the scale's float type
    if block == shape:
        return scale.reshape(()), {}
    if block == (1, *shape[1:]):
        return scale.reshape(shape[0]), {"axis": 0}
    spans = [axis for axis, size in enumerate(block) if size > 1]
    if len(spans) == 1:
        return scale, {"axis": spans[0], "block_size": block[spans[0]]}
    raise ValueError(f"scales in blocks of {block} on a weight of shape {shape} have no DequantizeLinear layout")


def _codes_tensor(name: str, weight: IntxUnpackedToInt8Tensor) -> Any:
    """torchao's codes in the narrowest ONNX integer type, packed little end first as ONNX stores them."""
    from onnx import TensorProto, helper

    codes = weight.qdata.detach().cpu().flatten().numpy().astype(np.int8)
    width = storage_bits(dtype_bits(weight.target_dtype))
    kind = {2: TensorProto.INT2, 4: TensorProto.INT4, 8: TensorProto.INT8}[width]
    if width < 8:
        per_byte = 8 // width
        fields = np.pad(codes.astype(np.uint8) & (2**width - 1), (0, (-len(codes)) % per_byte)).reshape(-1, per_byte)
        codes = (fields << (np.arange(per_byte, dtype=np.uint8) * width)).sum(1, dtype=np.uint8)
    return helper.make_tensor(name, kind, list(weight.qdata.shape), codes.tobytes(), raw=True)


def _store_codes(proto: Any, name: str, weight: IntxUnpackedToInt8Tensor) -> None:
    """Replace the float initializer of ``weight`` by its codes, scales and a DequantizeLinear node
    that produces the tensor under the name the graph reads; raise the opset to what the codes need."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializer = _float_initializer(graph, name, weight.dequantize().detach().cpu().numpy())
    target = initializer.name
    scale, attributes = _scale_layout(weight)
    codes = _codes_tensor(f"{target}.codes", weight)
    graph.initializer.remove(initializer)
    graph.initializer.extend([codes, numpy_helper.from_array(scale, f"{target}.scale")])
    node = helper.make_node(
        "DequantizeLinear", [codes.name, f"{target}.scale"], [target], f"{target}.dequantize", **attributes
    )
    graph.node.insert(0, node)
    width = storage_bits(dtype_bits(weight.target_dtype))
    needed = {2: _OPSET_INT2, 4: _OPSET_INT4, 8: _OPSET_INT4 if "block_size" in attributes else _OPSET_INT8}[width]
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, needed)
