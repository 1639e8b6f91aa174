"""Running a model in ONNX Runtime's CPU provider: the export of a graph, the self-containment check
of an ``.onnx`` file, and a module that runs one like the PyTorch module it came from."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qlight.errors import QlightError

ONNX_HINT = 'pip install "qlight[onnx]"'


def require(name: str) -> Any:
    """The module ``name`` of the ``onnx`` extra (onnx, onnxscript, onnxruntime); one line naming the
    extra when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise QlightError(f"{name} is not installed: {ONNX_HINT}") from None


def export_onnx(model: nn.Module, example: Tensor, optimize: bool = True) -> bytes:
    """The ONNX (QDQ for a PT2E graph) of ``model``, batch dimension dynamic, via ``torch.onnx``'s
    dynamo exporter. Needs the ``onnx`` extra. ``optimize=False`` keeps each parameter as the
    initializer of its name (the optimizer folds BatchNorm into the conv weights before it)."""
    require("onnxscript")  # the dynamo exporter's dependency
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        if isinstance(model, torch.fx.GraphModule):  # an exported graph's mode is in its ops, not its flag
            warnings.filterwarnings("ignore", "Exporting a model while it is in training mode")
        program = torch.onnx.export(
            model, (example[:2],), dynamo=True, dynamic_shapes=({0: batch},), verbose=False, optimize=optimize
        )
    proto = program.model_proto
    _strip_debug_info(proto)
    return proto.SerializeToString()


def _strip_debug_info(proto: Any) -> None:
    """Drop what the exporter records for debugging (stack traces, source names, shapes ONNX Runtime
    infers again): on a small network it is as large as the weights."""
    graph = proto.graph
    del proto.metadata_props[:]
    del graph.value_info[:]
    for entry in (*graph.node, *graph.initializer, *graph.input, *graph.output):
        del entry.metadata_props[:]
        entry.doc_string = ""
    proto.doc_string = graph.doc_string = ""


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of an ONNX graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            yield from ([attribute.t] if attribute.HasField("t") else [])
            yield from attribute.tensors
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(subgraph)


def check_self_contained(onnx_bytes: bytes, path: Path | str) -> Any:
    """The parsed ONNX model, refused when its tensors live in external files: ONNX Runtime would read
    them from paths the file names, relative to the working directory, not the model's folder."""
    onnx = require("onnx")
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
    return model


def _weight_only(model: Any) -> bool:
    """Whether the ONNX ``model`` dequantizes constants (weights) and quantizes no activation."""
    ops = {node.op_type for node in model.graph.node}
    return "DequantizeLinear" in ops and "QuantizeLinear" not in ops


class OnnxRuntimeModule(nn.Module):
    """An ONNX model run by ONNX Runtime's CPU provider, called like the module it was exported from
    (tensors in, tensors out). Keeps the model's bytes, which is what gets saved. ``source`` names the
    bytes in errors; a model that keeps tensors in external files is refused."""

    def __init__(self, onnx_bytes: bytes, source: str = "the ONNX model") -> None:
        super().__init__()
        model = check_self_contained(onnx_bytes, source)  # also when a file's hyperparameters name this class
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        if _weight_only(model):
            # ONNX Runtime keeps DequantizeLinear out of constant folding for its QDQ fusions, so a
            # weight-only model would dequantize every weight on every run and lose the Conv+BatchNorm
            # fusion (0.4x fp32 on the digits CNN). With QDQ handling off it folds them once, at load.
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        self.onnx_bytes = onnx_bytes
        try:
            self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for an invalid model
            raise QlightError(f"ONNX Runtime cannot load the model ({type(err).__name__}: {err})") from None
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        output = self.session.run(None, {self.input_name: x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(output).to(x.device)  # where the caller's targets are (a GPU run's)

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
