"""Quantized model files: packed sub-byte weights, loadable with ``weights_only`` (no pickled code).

A file holds the recipe's name, the model's class path and hyperparameters (to rebuild it, as
Lightning's ``load_from_checkpoint`` does), the quantized module names and a state dict in which
each torchao ``IntxUnpackedToInt8Tensor`` is replaced by its packed integer codes, scales and zero
points. Static (PT2E) recipes are exported graphs and use ``torch.export``'s own format instead.
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchao.quantization import IntxUnpackedToInt8Tensor

from qlight.errors import QlightError
from qlight.quantization.recipes import StaticPT2E, dtype_bits, export_batched, parse_recipe

FORMAT = "qlight.quantized/1"


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack signed ``bits``-bit integers (held one per int8) into a dense uint8 bit stream."""
    unsigned = (codes.flatten().to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
    planes = (unsigned[:, None] >> torch.arange(bits, dtype=torch.uint8, device=codes.device)) & 1
    stream = torch.nn.functional.pad(planes.flatten(), (0, (-planes.numel()) % 8))
    weights = 2 ** torch.arange(8, dtype=torch.int16, device=codes.device)
    return (stream.view(-1, 8).to(torch.int16) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits`: int8 codes of the given shape."""
    count = int(torch.tensor(shape).prod()) if shape else 1
    stream = (packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    planes = stream.flatten()[: count * bits].view(count, bits).to(torch.int16)
    unsigned = (planes * 2 ** torch.arange(bits, dtype=torch.int16, device=packed.device)).sum(1)
    return (unsigned - 2 ** (bits - 1)).to(torch.int8).view(shape)


def _pack_state(state: dict[str, Any]) -> dict[str, Any]:
    packed: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, IntxUnpackedToInt8Tensor):
            bits = dtype_bits(value.target_dtype)
            packed[key] = {
                "codes": pack_bits(value.qdata, bits) if bits < 8 else value.qdata,
                "shape": list(value.qdata.shape),
                "bits": bits,
                "scale": value.scale,
                "zero_point": value.zero_point,
            }
        else:
            packed[key] = value
    return packed


def _model_spec(model: nn.Module) -> dict[str, Any]:
    hparams = getattr(model, "hparams", None)
    return {
        "class_path": f"{type(model).__module__}.{type(model).__qualname__}",
        "init_args": dict(hparams) if hparams is not None else None,
    }


def quantized_bytes(
    model: nn.Module, recipe_name: str, targets: list[str], source: nn.Module, example_input: Tensor
) -> bytes:
    """Serialize ``model``, the result of applying ``recipe_name`` to ``targets`` of ``source``.

    ``example_input`` is only used to export the graph of static recipes.
    """
    buffer = io.BytesIO()
    if isinstance(parse_recipe(recipe_name), StaticPT2E):
        torch.export.save(export_batched(model, example_input), buffer)
        return buffer.getvalue()
    payload = {
        "format": FORMAT,
        "recipe": recipe_name,
        "model": _model_spec(source),
        "targets": list(targets),
        "state_dict": _pack_state(model.state_dict()),
    }
    torch.save(payload, buffer)
    return buffer.getvalue()


def _instantiate(spec: dict[str, Any]) -> nn.Module:
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or spec["init_args"] is None:
        raise QlightError(
            f"cannot rebuild {spec['class_path']} from its hyperparameters: pass the model, "
            "load_quantized(path, model=MyModel(...)), or call self.save_hyperparameters() in its __init__"
        )
    # LightningCLI adds private entries (``_instantiator``, ``_class_path``) to the hyperparameters.
    return cls(**{key: value for key, value in spec["init_args"].items() if not key.startswith("_")})


def load_quantized(
    path: str | Path, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a model saved by the quantization callbacks.

    Args:
        path: a ``.pt`` file (weights-only recipes, float casts) or ``.pt2`` (static recipes).
        model: an unquantized model of the same architecture; by default it is rebuilt from the
            class path and hyperparameters stored in the file.
        map_location: device for the loaded tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise QlightError(f"no quantized model at {path}")
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module()
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise QlightError(f"{path} is not a qlight quantized model file")
    recipe = parse_recipe(payload["recipe"])
    model = (model if model is not None else _instantiate(payload["model"])).to(map_location)
    model = recipe.quantize(model, set(payload["targets"]))
    state = payload["state_dict"]
    current = model.state_dict()
    for key, value in state.items():
        if isinstance(value, dict):
            target = current[key]
            codes = (
                value["codes"]
                if value["bits"] == 8
                else unpack_bits(value["codes"], value["bits"], tuple(value["shape"]))
            )
            target.qdata.copy_(codes)
            target.scale.copy_(value["scale"])
            target.zero_point.copy_(value["zero_point"])
    model.load_state_dict({k: v for k, v in state.items() if not isinstance(v, dict)}, strict=False)
    missing = set(current) - set(state)
    if missing:
        raise QlightError(f"{path} does not match the model: missing {sorted(missing)[:3]}")
    return model.eval()
