"""Running a quantized model in a deployment runtime (ONNX Runtime, Inductor) beside eager PyTorch, and
measuring how closely its predictions follow the eager model's: what the callbacks' ``runtimes`` do."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from qlight.errors import QlightError
from qlight.files import atomic_write_bytes
from qlight.quantization.io.onnx_export import onnx_bytes
from qlight.quantization.qat.results import QATResults
from qlight.quantization.runtimes.inductor import InductorGraph
from qlight.quantization.runtimes.ort import ONNX_HINT, OnnxRuntimeModule, require
from qlight.quantization.runtimes.speed import measure_speed

RUNTIMES = ("eager", "onnxruntime", "inductor")
QAT_RUNTIMES = ("eager", "onnxruntime")  # what the QAT callbacks' converted models run in

ONNX_FILE = {"onnxruntime": ".onnx"}  # the file a runtime's row writes; Inductor compiles the saved graph
# Measured (README "Deploy"): OnnxRuntimeModule has ONNX Runtime fold the DequantizeLinear of the
# weights at session load, so the float kernels run with float weights in memory.
WEIGHT_ONLY_ORT_NOTE = "ONNX Runtime dequantizes the weights once, at load: a smaller file, float speed and memory"
_ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16}


def check_runtimes(runtimes: Sequence[str], who: str, valid: Sequence[str] = RUNTIMES) -> tuple[str, ...]:
    """The runtimes to run, ``eager`` (the reference the others are compared with) first.

    Raises:
        QlightError: for an unknown or repeated runtime, listing the valid ones, and for ``onnxruntime``
            without the ``onnx`` extra.
    """
    given = [runtimes] if isinstance(runtimes, str) else list(runtimes)
    if not given or set(given) - set(valid) or len(set(given)) < len(given):
        raise QlightError(f"{who} runtimes takes one or more of {', '.join(valid)} (each once), got {given}")
    if "onnxruntime" in given:
        missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not _importable(name)]
        if missing:
            raise QlightError(f"{who} runtimes=onnxruntime needs {', '.join(missing)}: {ONNX_HINT}")
    return tuple(dict.fromkeys(("eager", *given)))


def _importable(name: str) -> bool:
    try:
        require(name)
    except QlightError:
        return False
    return True


def deploy(model: nn.Module, runtime: str, example: Tensor) -> tuple[nn.Module, bytes | None]:
    """``model`` in ``runtime`` and the bytes of the file that runtime runs (``None``: the eager file)."""
    if runtime == "onnxruntime":
        payload = onnx_bytes(model, example)
        return OnnxRuntimeModule(payload), payload
    if runtime == "inductor":
        return InductorGraph(model), None
    raise ValueError(f"no deployment runtime {runtime!r}")


def input_dtype(deployed: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype ``deployed`` takes its inputs in: an ONNX model's declared input type, else ``default``."""
    if isinstance(deployed, OnnxRuntimeModule):
        return _ORT_DTYPES.get(deployed.session.get_inputs()[0].type, default)
    return default


@dataclass(frozen=True)
class EagerResult:
    """What a runtime's row is compared with: the eager model and its test logits (this rank's)."""

    model: nn.Module
    logits: Tensor
    example: Tensor  # on the model's device


def deploy_converted(
    callback: QATResults,
    trainer: Trainer,
    pl_module: LightningModule,
    converted: nn.Module,
    example: Tensor,
    eager: tuple[dict[str, Any], Tensor | None],
    device: torch.device | None = None,
) -> None:
    """A QAT callback's converted model in each of its runtimes besides eager PyTorch: its file
    (``model.onnx``) and a ``converted`` row with the agreement with ``eager`` (row and logits)."""
    eager_row, logits = eager
    for runtime in callback.runtimes[1:]:
        start = time.perf_counter()
        described = {key: eager_row.get(key) for key in ("epoch", "split", "fake_quant", "kept_float")}
        try:
            deployed, payload = deploy(converted, runtime, example)
            if payload is not None and trainer.is_global_zero:
                atomic_write_bytes(callback._out(trainer) / f"model{ONNX_FILE[runtime]}", payload)
            speed = measure_speed(deployed, example.to(input_dtype(deployed, example.dtype)))
            size = eager_row.get("size_bytes") if payload is None else len(payload)
            extra = {"kept_float": eager_row.get("kept_float"), "runtime": runtime, "size_bytes": size, **vars(speed)}
            epoch, split = eager_row["epoch"], eager_row["split"]
            callback._record(trainer, pl_module, deployed, split, epoch, "converted", extra, device, reference=logits)
        except Exception as err:  # the eager model and its file stand; this runtime's row says why not
            message = f"{type(err).__name__}: {err}".splitlines()[0]
            rank_zero_warn(f"{callback.title} in {runtime} failed: {message}")
            seconds = round(time.perf_counter() - start, 2)
            callback.add_row(trainer, {**described, "runtime": runtime, "error": message, "seconds": seconds})
