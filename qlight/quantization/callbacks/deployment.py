"""Running a quantized model in a deployment runtime (ONNX Runtime, Inductor) beside eager PyTorch, and
measuring how closely its predictions follow the eager model's: what the callbacks' ``runtimes`` do."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from lightning.pytorch import Trainer
from torch import Tensor, nn

from qlight.errors import QlightError
from qlight.quantization.io.onnx_export import onnx_bytes
from qlight.quantization.runtimes.agreement import Agreement, compare_logits
from qlight.quantization.runtimes.inductor import InductorGraph
from qlight.quantization.runtimes.ort import OnnxRuntimeModule

RUNTIMES = ("eager", "onnxruntime", "inductor")
ONNX_EXTRA = 'pip install "qlight[onnx]"'
ONNX_FILE = {"onnxruntime": ".onnx"}  # the file a runtime's row writes; Inductor compiles the saved graph
# What ONNX Runtime does with weight-only models (measured: README "Deploy"): its constant folding
# leaves DequantizeLinear alone (kept for the QDQ fusions) and no int4/int8 x float32 conv kernel exists.
WEIGHT_ONLY_ORT_NOTE = "ONNX Runtime dequantizes the weights on every run: smaller, not faster than fp32"
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
        missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
        if missing:
            raise QlightError(f"{who} runtimes=onnxruntime needs {', '.join(missing)}: {ONNX_EXTRA}")
    return tuple(dict.fromkeys(("eager", *given)))


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


def agreement_across_ranks(trainer: Trainer, reference: Tensor, got: Tensor) -> Agreement:
    """:func:`compare_logits` of each rank's share of the test images, summed over the ranks."""
    local = compare_logits(reference, got)
    stats = torch.tensor(
        [local.same, local.count, local.max_logit_diff], dtype=torch.float64, device=trainer.strategy.root_device
    )
    gathered = trainer.strategy.all_gather(stats).reshape(-1, 3).cpu()
    return Agreement(
        same=int(gathered[:, 0].sum()), count=int(gathered[:, 1].sum()), max_logit_diff=float(gathered[:, 2].max())
    )


@dataclass(frozen=True)
class EagerResult:
    """What a runtime's row is compared with: the eager model and its test logits (this rank's)."""

    model: nn.Module
    logits: Tensor
    example: Tensor  # on the model's device
