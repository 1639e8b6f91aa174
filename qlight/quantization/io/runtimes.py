"""Running a static (PT2E) int8 graph fast on the CPU: compiled by Inductor, or in ONNX Runtime.

The reference graph that ``convert_pt2e`` returns quantizes and dequantizes around float ops, so it
runs slower than float. Inductor's x86 lowering (with freezing) and ONNX Runtime's QDQ fusion turn
it into real int8 convolutions and matmuls.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qlight.errors import QlightError

ONNX_HINT = 'pip install -e ".[onnx]"'
COMPILED_TOLERANCE = 0.05  # of the logits' range: the lowering requantizes, so it is close, not exact


class InductorGraph(nn.Module):
    """A PT2E graph compiled by Inductor with freezing, which lowers quantize/dequantize pairs around
    conv and linear to oneDNN int8 kernels. One compile per input shape (a dynamic batch dimension
    breaks that lowering in torch 2.14), cached by ``torch.compile``; inference only.

    Args:
        graph: the converted PT2E graph (kept as ``graph``: it is what gets saved).
    """

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph
        self.compiled = torch.compile(graph, dynamic=False)
        self._shapes: set[tuple[int, ...]] = set()  # compiled so far

    def forward(self, x: Tensor) -> Tensor:
        import torch._inductor.config as inductor_config

        with torch.no_grad():
            if tuple(x.shape) in self._shapes:
                return self.compiled(x)
            # Freezing is a global Inductor setting, needed while compiling; entering the patch on
            # every call would cost more than the int8 kernels save.
            try:
                with inductor_config.patch(freezing=True):
                    out = self.compiled(x)
            except Exception as err:  # dynamo and Inductor raise many types
                raise RuntimeError(f"the compiled graph failed: {type(err).__name__}: {err}") from err
            self._shapes.add(tuple(x.shape))
            return out


def check_agreement(fast: nn.Module, reference: nn.Module, batch: Tensor, what: str) -> None:
    """Raise when ``fast`` and ``reference`` disagree on ``batch`` beyond rounding: a lowering that
    changes the numbers must make an error row, not a plausible accuracy."""
    with torch.no_grad():
        expected, got = reference(batch), fast(batch)
    spread = float(expected.max() - expected.min()) or 1.0
    error = float((got - expected).abs().max())
    if not error <= COMPILED_TOLERANCE * spread:
        raise RuntimeError(f"{what} disagrees with the reference graph (max logit error {error:.3g})")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise QlightError(f"ONNX Runtime is not installed: {ONNX_HINT}") from None
    return onnxruntime


def export_onnx(model: nn.Module, example: Tensor) -> bytes:
    """The ONNX (QDQ for a PT2E graph) of ``model``, batch dimension dynamic, via ``torch.onnx``'s
    dynamo exporter. Needs the ``onnx`` extra."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency)
    except ImportError:
        raise QlightError(f"ONNX export needs onnx and onnxscript: {ONNX_HINT}") from None
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(model, (example[:2],), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    buffer = io.BytesIO()
    program.save(buffer)
    return buffer.getvalue()


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of an ONNX graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            yield from ([attribute.t] if attribute.HasField("t") else [])
            yield from attribute.tensors
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(subgraph)


def check_self_contained(onnx_bytes: bytes, path: Path) -> None:
    """Refuse an ONNX model whose tensors live in external files: ONNX Runtime would read them from
    paths the file names, relative to the working directory, not the model's folder."""
    try:
        import onnx
    except ImportError:
        raise QlightError(f"onnx is not installed: {ONNX_HINT}") from None
    try:
        model = onnx.load_model_from_string(onnx_bytes)
    except Exception as err:  # protobuf raises its own DecodeError
        raise QlightError(f"{path} is not an ONNX model ({type(err).__name__})") from None
    external = [t.name for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise QlightError(
            f"{path} keeps tensors in external files ({', '.join(external[:3])}); qlight loads self-contained "
            ".onnx files only, as it writes them"
        )


class OnnxRuntimeModule(nn.Module):
    """An ONNX model run by ONNX Runtime's CPU provider, called like the module it was exported from
    (tensors in, tensors out). Keeps the model's bytes, which is what gets saved."""

    def __init__(self, onnx_bytes: bytes) -> None:
        super().__init__()
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.onnx_bytes = onnx_bytes
        try:
            self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for an invalid model
            raise QlightError(f"ONNX Runtime cannot load the model ({type(err).__name__}: {err})") from None
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        output = self.session.run(None, {self.input_name: x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(output)

    def quantized_weight_sizes(self) -> list[int]:
        """Element counts of the int8 constants that the model dequantizes: its quantized weights."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load_from_string(self.onnx_bytes)
        constants = {init.name: init for init in model.graph.initializer}
        return [
            int(numpy_helper.to_array(constants[node.input[0]]).size)
            for node in model.graph.node
            if node.op_type == "DequantizeLinear"
            and node.input[0] in constants
            and constants[node.input[0]].data_type == onnx.TensorProto.INT8
        ]
