"""Quantized model files: packed sub-byte weights, loaded without running code from the file.

A ``.pt`` file holds the recipe's name, the model's class path and hyperparameters (to rebuild it, as
Lightning's ``load_from_checkpoint`` does), the quantized module names and a state dict in which each
torchao ``IntxUnpackedToInt8Tensor`` is replaced by its packed integer codes and scales. It is read
with ``weights_only`` and checked (shapes, bits, code range, finite scales) before use. Static (PT2E)
recipes are exported graphs in ``torch.export``'s ``.pt2`` format, whose archive is inspected first
(a ``.pt2`` that asks for pickled objects is refused), or ONNX models (``.onnx``) for ONNX Runtime.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import json
import logging
import math
import os
import re
import sys
import types
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import sympy
import torch
from torch import Tensor, nn
from torch.export.pt2_archive import constants as pt2_constants
from torchao.quantization import IntxUnpackedToInt8Tensor
from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

from qlight.errors import QlightError
from qlight.files import check_unpacked_sizes, load_torch_file
from qlight.models import BACKBONES, backbone_class_path
from qlight.quantization.grid.intx import code_range, dtype_bits, intx_from_codes, set_weight
from qlight.quantization.grid.sizes import code_bytes
from qlight.quantization.recipes.base import Recipe, parse_recipe, quantizable_modules
from qlight.quantization.recipes.mixed import register_saved_bytes
from qlight.quantization.recipes.plans import check_plan
from qlight.quantization.recipes.static import export_batched
from qlight.quantization.runtimes.inductor import InductorGraph
from qlight.quantization.runtimes.ort import OnnxRuntimeModule

FORMAT = "qlight.quantized/1"
_PLAIN_TENSOR_FILES = (pt2_constants.WEIGHT_FILENAME_PREFIX, pt2_constants.TENSOR_CONSTANT_FILENAME_PREFIX)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack signed ``bits``-bit integers (held one per int8) into a dense uint8 bit stream."""
    unsigned = (codes.flatten().to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
    if bits == 8:  # whole bytes already
        return unsigned
    planes = (unsigned[:, None] >> torch.arange(bits, dtype=torch.uint8, device=codes.device)) & 1
    stream = torch.nn.functional.pad(planes.flatten(), (0, (-planes.numel()) % 8))
    weights = 2 ** torch.arange(8, dtype=torch.int16, device=codes.device)
    return (stream.view(-1, 8).to(torch.int16) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits`: int8 codes of the given shape."""
    if bits == 8:
        return (packed.to(torch.int16) - 128).to(torch.int8).view(shape)
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
                "codes": pack_bits(value.qdata, bits),
                "shape": list(value.qdata.shape),
                "bits": bits,
                "scale": value.scale,
                "zero_point": value.zero_point,
            }
        else:
            packed[key] = value
    _share_codes([entry for entry in packed.values() if isinstance(entry, dict)])
    return packed


def _share_codes(entries: Sequence[dict[str, Any]]) -> None:
    """Make the entries' codes views of one storage, in place. torch.save starts each storage at a
    multiple of 64 bytes: with one, a plan's file differs from another plan's by its codes' bytes and at
    most one alignment (MixedPrecision's budget counts on it), and no layer pays its own padding."""
    if not entries:
        return
    shared = torch.cat([entry["codes"] for entry in entries])
    start = 0
    for entry in entries:
        count = entry["codes"].numel()
        entry["codes"] = shared[start : start + count]
        start += count


def _model_spec(model: nn.Module) -> dict[str, Any]:
    hparams = getattr(model, "hparams", None)
    return {
        "class_path": f"{type(model).__module__}.{type(model).__qualname__}",
        "init_args": dict(hparams) if hparams is not None else None,
    }


def quantized_bytes(
    model: nn.Module, recipe: Recipe, targets: Sequence[str], source: nn.Module, example_input: Tensor | None
) -> bytes:
    """Serialize ``model``, the result of applying ``recipe`` to ``targets`` of ``source``.

    ``example_input`` exports the graph of static recipes (which need it); a ``.pt`` keeps its per-image
    shape, which the ``export`` command needs to trace the model (without it, ``--input_shape``).
    """
    buffer = io.BytesIO()
    if isinstance(model, OnnxRuntimeModule):
        return model.onnx_bytes
    if recipe.static:
        graph = model.graph if isinstance(model, InductorGraph) else model  # compiling is for running, not saving
        program = export_batched(graph, example_input)
        program.example_inputs = None  # torch.export.save would store the whole example batch
        for node in program.graph.nodes:  # debugging provenance, the largest metadata (a third of the JSON)
            node.meta.pop("from_node", None)
        torch.export.save(program, buffer)
        return _deflate_json(buffer.getvalue())
    payload = {
        "format": FORMAT,
        "recipe": recipe.name,
        "model": _model_spec(source),
        "targets": list(targets),
        "state_dict": _pack_state(model.state_dict()),
        "input_shape": None if example_input is None else list(example_input.shape[1:]),
    }
    torch.save(payload, buffer)  # a per-layer plan is its packed weights' bits: not stored twice
    return buffer.getvalue()


def _deflate_json(archive: bytes) -> bytes:
    """The ``.pt2`` archive with its JSON members deflated, its tensors stored as they were.

    ``torch.export.save`` stores every member uncompressed; the graph's JSON (``models/model.json``: node
    metadata, tensor descriptions) is then most of a small network's file and deflates about 25-fold.
    ``torch.export.load`` reads deflated members; the date of each member is kept, so equal graphs give
    equal bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            member = zipfile.ZipInfo(info.filename, info.date_time)
            member.compress_type = zipfile.ZIP_DEFLATED if info.filename.endswith(".json") else zipfile.ZIP_STORED
            target.writestr(member, source.read(info), compresslevel=9)
    return out.getvalue()


@register_saved_bytes
def _weight_only_file_bytes(
    model: nn.Module, recipe: Recipe, targets: Sequence[str], source: nn.Module, example: Tensor | None
) -> int:
    return len(quantized_bytes(model, recipe, targets, source, example))


def _model_class(class_path: Any, trusted_modules: Sequence[str], where: str) -> Any:
    """The ``nn.Module`` class (or qlight's registered backbone builder) that a file names at ``where``.

    Importing a module runs its code and calling a function does whatever it does: a file may name only
    modules already imported or trusted, and only classes of modules (never a function or builtin)."""
    module_name, _, class_name = str(class_path).rpartition(".")
    if not module_name or not class_name:
        raise QlightError(f"{where} names no model class ({class_path!r}): pass load_quantized(path, model=...)")
    if module_name not in sys.modules:
        if module_name.split(".")[0] not in trusted_modules:
            raise QlightError(
                f"{where} asks to import {module_name}, which is not imported and not trusted: import it first, "
                f"pass load_quantized(path, model=...) or trusted_modules=[{module_name.split('.')[0]!r}]"
            )
        try:
            importlib.import_module(module_name)
        except ImportError as err:
            raise QlightError(f"{where} needs {class_path}, which cannot be imported ({err})") from None
    cls = getattr(sys.modules[module_name], class_name, None)
    if cls is None:  # e.g. a class defined in the script that saved the file, loaded from another
        raise QlightError(
            f"{where} names {class_path}, which {module_name} does not define here: pass the model, "
            f"load_quantized(path, model={class_name}(...))"
        )
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) and cls not in BACKBONES.values():
        raise QlightError(
            f"{where} names {class_path}, which is not an nn.Module class: qlight calls nothing else that a file "
            "names; pass load_quantized(path, model=...)"
        )
    return cls


def _class_paths(value: Any) -> Iterator[Any]:
    """Every ``class_path`` in hyperparameters (dicts and lists), each shared object visited once: a
    small file can nest one list in itself billions of times."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if id(item) in seen or not isinstance(item, (dict, list, tuple)):
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            if "class_path" in item:
                yield item["class_path"]
            stack.extend(item.values())
        else:
            stack.extend(item)


def _rebuilder(spec: Any, trusted_modules: Sequence[str], path: Path) -> Callable[[str], nn.Module]:
    """Check every class the file's model spec would import or build, then return its builder for a
    device: the file chooses no import and no call that the checks did not allow."""
    if not isinstance(spec, dict):
        raise QlightError(f"{path} does not say which model it holds: pass load_quantized(path, model=...)")
    cls = _model_class(spec.get("class_path"), trusted_modules, str(path))
    if not isinstance(spec.get("init_args"), dict):
        raise QlightError(
            f"cannot rebuild {spec['class_path']} from its hyperparameters: pass the model, "
            "load_quantized(path, model=MyModel(...)), or call self.save_hyperparameters() in its __init__"
        )
    # LightningCLI adds private entries (``_instantiator``, ``_class_path``) to the hyperparameters.
    init_args = {k: v for k, v in spec["init_args"].items() if not (isinstance(k, str) and k.startswith("_"))}
    class_paths = list(_class_paths(init_args))
    backbone = backbone_class_path(init_args.get("backbone"))  # ImageClassifier imports a dotted name too
    for class_path in class_paths if backbone is None else [backbone, *class_paths]:
        _model_class(class_path, trusted_modules, f"{path} (hyperparameters)")

    def build(device: str) -> nn.Module:
        try:
            with torch.device(device):
                return cls(**init_args)
        except (TypeError, ValueError, RuntimeError, OverflowError, QlightError) as err:
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise QlightError(f"{path}: cannot rebuild {spec['class_path']} ({reason})") from None

    return build


def _unpacked_codes(packed: Tensor, bits: int, shape: tuple[int, ...]) -> Tensor:
    """The codes of a packed weight, which must be exactly the bytes ``bits`` take for ``shape``: bits
    edited to fewer would otherwise read the codes as other codes."""
    if packed.numel() != code_bytes(math.prod(shape), bits):
        raise ValueError("codes of another length")
    if packed.dtype == torch.int8:  # 8-bit codes as they are, in files before their codes were packed too
        return packed.reshape(shape)
    return unpack_bits(packed, bits, shape)


def _quantized_weight(
    entry: Any, key: str, model_weight: Tensor, expected_bits: int, source: str, path: Path
) -> Tensor:
    """Check one packed weight against the model and the bits that ``source`` (the file's recipe or
    plan) gives it, then build its torchao tensor."""

    def bad(why: str) -> QlightError:
        return QlightError(f"{path}: {key} {why}")

    if not isinstance(entry, dict) or not {"codes", "shape", "bits", "scale"} <= set(entry):
        raise bad("is not a packed weight")
    bits, shape, scale = entry["bits"], tuple(entry["shape"]), entry["scale"]
    if bits != expected_bits:
        raise bad(f"holds {bits}-bit codes, but {source} gives it {expected_bits} bits")
    if shape != tuple(model_weight.shape):
        raise bad(f"has shape {shape}, the model's weight {tuple(model_weight.shape)}: another architecture?")
    try:
        codes = _unpacked_codes(entry["codes"], bits, shape)
    except (RuntimeError, TypeError, ValueError, AttributeError):
        raise bad(f"does not hold {bits}-bit codes for shape {shape}") from None
    qmin, qmax = code_range(bits)
    if codes.shape != shape or codes.dtype != torch.int8 or codes.min() < qmin or codes.max() > qmax:
        raise bad(f"holds codes outside {bits}-bit range [{qmin}, {qmax}]")
    if (
        not torch.is_tensor(scale)
        or not scale.is_floating_point()
        or not bool((torch.isfinite(scale) & (scale > 0)).all())
    ):
        raise bad("has scales that are not finite and positive")
    if "zero_point" in entry and bool(entry["zero_point"].any()):
        raise bad("has non-zero zero points, but qlight's weights are symmetric")
    try:
        return intx_from_codes(codes, scale, bits, scale.dtype)
    except ValueError as err:
        raise bad(str(err)) from None


def _stored_plan(state: Mapping[str, Any]) -> dict[str, Any]:
    """The bits of each packed weight of a saved state, by layer: a per-layer file's plan."""
    return {key.rpartition(".")[0]: value.get("bits") for key, value in state.items() if isinstance(value, dict)}


def _check_shapes(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    """Every entry of ``state`` has the name and shape of ``model``'s (packed weights: their ``shape``)."""
    current = model.state_dict()
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise QlightError(
            f"{path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
            "another architecture?"
        )
    for key, value in state.items():
        shape = value.get("shape") if isinstance(value, dict) else getattr(value, "shape", None)
        if not isinstance(shape, (tuple, list, torch.Size)) or tuple(shape) != tuple(current[key].shape):
            raise QlightError(
                f"{path}: {key} has shape {shape}, the model's {tuple(current[key].shape)}: another architecture?"
            )


def _restore(model: nn.Module, state: dict[str, Any], bits: Mapping[str, int], source: str, path: Path) -> None:
    """Load ``state`` into ``model``, each packed weight checked against the ``bits`` that ``source``
    gives its layer and every other tensor against the model's dtype, and for NaN or Inf."""
    _check_shapes(model, state, path)
    current = model.state_dict()
    plain = {}
    for key, value in state.items():
        if isinstance(value, dict):
            layer = key.rpartition(".")[0]
            if layer not in bits:
                raise QlightError(f"{path}: {key} is quantized, but the file's plan leaves {layer} float")
            set_weight(
                model.get_submodule(layer), _quantized_weight(value, key, current[key], bits[layer], source, path)
            )
            continue
        expected = current[key].dtype
        same_kind = torch.is_tensor(value) and (
            value.dtype == expected or value.is_floating_point() == expected.is_floating_point
        )
        if not same_kind:  # a float cast keeps its own float dtype; anything else is the model's
            raise QlightError(
                f"{path}: {key} is {getattr(value, 'dtype', type(value).__name__)}, the model's {expected}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise QlightError(f"{path}: {key} holds NaN or Inf")
        plain[key] = value
    model.load_state_dict(plain, strict=False, assign=True)


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    # torch.export.load falls back to unpickling (weights_only=False) for some entries; this makes
    # every torch.load it does weights-only.
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


# What a symbolic shape of a qlight graph is written with (``Symbol('s77', positive=True, integer=True)``,
# sums, products, integer division): sympy's and torch's function names, symbol names, numbers.
_SHAPE_FUNCTIONS = frozenset(
    "Symbol Integer Rational Float Add Mul Pow Mod Max Min Abs floor ceiling Eq Ne Lt Le Gt Ge And Or Not "
    "oo zoo nan true false True False".split()
)
_SHAPE_NODES = (
    *(ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp, ast.Compare),
    *(ast.BoolOp, ast.And, ast.Or, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow),
    *(ast.USub, ast.UAdd, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq),
)
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")  # s77, u0: the names torch gives shape symbols
_MAX_EXPRESSION = 10_000
# sympy evaluates numbers as it parses: 10**10**10 never ends. Literals stay within int64's digits, and
# what grows exponentially with an argument (powers, shifts, a Float's precision) takes a small literal there.
_MAX_LITERAL = 10**20
_MAX_EXPONENT = 8
_EXPONENTIAL = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift", "Float", "RoundDecimal"})


def _exponential_operands(node: ast.AST) -> tuple[ast.AST | None, list[ast.AST]] | None:
    """``(base, exponents)`` of a power, shift or precision; ``None`` for any other node."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return node.left, [node.right]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _EXPONENTIAL:
        return (node.args[0] if node.args else None), [*node.args[1:], *(k.value for k in node.keywords)]
    return None


def _small_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer":
        node = node.args[0] if len(node.args) == 1 and not node.keywords else node
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) <= _MAX_EXPONENT


def _bounded_growth(node: ast.AST) -> bool:
    """A power's exponent is a small literal and its base holds no other power: nested, they multiply."""
    operands = _exponential_operands(node)
    if operands is None:
        return True
    base, exponents = operands
    return (
        base is not None and all(map(_small_literal, exponents)) and not any(map(_exponential_operands, ast.walk(base)))
    )


def _is_shape_expression(text: str, functions: Iterable[str]) -> bool:
    """Whether ``text`` is a call tree of known function names over symbols, numbers and symbol-name
    strings: nothing that names an attribute, a module or a builtin, and no number that takes sympy
    long to build (literals up to 20 digits, powers to small literal exponents, never nested)."""
    allowed = _SHAPE_FUNCTIONS | set(functions)

    def plain(node: ast.AST) -> bool:
        if not isinstance(node, _SHAPE_NODES):
            return False
        if not _bounded_growth(node):
            return False
        if isinstance(node, ast.Call):
            return isinstance(node.func, ast.Name)
        if isinstance(node, ast.Name):
            return node.id in allowed or _SYMBOL_NAME.fullmatch(node.id) is not None
        if isinstance(node, ast.Constant):
            value = node.value
            name = isinstance(value, str) and value.isidentifier() and not value.startswith("_")
            return isinstance(value, float) or (isinstance(value, int) and abs(value) < _MAX_LITERAL) or name
        return not isinstance(node, ast.keyword) or node.arg is not None

    if len(text) > _MAX_EXPRESSION:
        return False
    try:
        return all(plain(node) for node in ast.walk(ast.parse(text, mode="eval")))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


@contextlib.contextmanager
def _shape_expressions_only(path: Path) -> Iterator[None]:
    # torch's deserializer hands the symbolic-shape strings of a .pt2 (``expr_str`` in
    # models/model.json) to sympy.sympify, which evaluates them as Python: a crafted string runs code.
    original = sympy.sympify

    def checked(a: Any, *args: Any, locals: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        if isinstance(a, str) and not _is_shape_expression(a, locals or {}):
            raise QlightError(
                f"{path} holds a symbolic shape that is not a shape expression; qlight refuses to load it"
            )
        return original(a, *args, locals=locals, **kwargs)

    sympy.sympify = checked
    try:
        yield
    finally:
        sympy.sympify = original


def _check_pt2(path: Path) -> None:
    """Refuse a zip bomb, and an archive that asks for pickled weights, constants or objects."""
    try:
        with zipfile.ZipFile(path) as archive:
            check_unpacked_sizes(archive, path)
            for name in archive.namelist():
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    entries = json.loads(archive.read(name))["config"].values()
                    if any(e["use_pickle"] or not e["path_name"].startswith(_PLAIN_TENSOR_FILES) for e in entries):
                        raise QlightError(f"{path} asks to unpickle objects ({name}); qlight loads only plain tensors")
                elif name.endswith(".pt") and "/data/sample_inputs/" not in name:
                    raise QlightError(f"{path} holds a pickled file ({name}); qlight loads only plain tensors")
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, AttributeError):
        raise QlightError(f"{path} is not a .pt2 archive or is corrupt") from None


@contextlib.contextmanager
def _quiet_export_log() -> Iterator[None]:
    # torch.export.load logs a traceback (warning) for a damaged archive before it raises; the raised
    # error becomes qlight's one line.
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_pt2(path: Path) -> nn.Module:
    _check_pt2(path)
    try:
        with _weights_only_loads(), _shape_expressions_only(path), _quiet_export_log():
            graph = torch.export.load(str(path)).module()
    except QlightError:
        raise
    except Exception as err:  # torch.export raises many types for a damaged archive
        raise QlightError(f"{path} cannot be loaded as an exported program ({type(err).__name__})") from None
    # An exported module refuses train()/eval(): these switch its graph's modes the way torchao does
    # and return the module, so that it behaves like any module in a user's evaluation loop.
    graph.train = types.MethodType(_train_exported, graph)
    graph.eval = types.MethodType(lambda self: self.train(False), graph)
    return graph


def _train_exported(graph: nn.Module, mode: bool = True) -> nn.Module:
    (move_exported_model_to_train if mode else move_exported_model_to_eval)(graph)
    return graph


def load_quantized(
    path: str | Path,
    model: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
    trusted_modules: Sequence[str] = ("qlight",),
) -> nn.Module:
    """Rebuild a model saved by the quantization callbacks, without running code from the file.

    Args:
        path: a ``.pt`` file (weight-only recipes, float casts), ``.pt2`` (static recipes) or ``.onnx``
            (static recipes for ONNX Runtime, which must be installed).
        model: an unquantized model of the same architecture; by default it is rebuilt from the
            class path and hyperparameters stored in the file.
        map_location: device for the loaded tensors.
        trusted_modules: top-level packages that the file's class path may import when the class is
            not imported yet (a module that is already imported runs no new code).

    Raises:
        QlightError: a missing, truncated or edited file, a file for another model, or a class
            that is neither imported nor trusted.
    """
    path = Path(path)
    if path.suffix == ".pt2":
        return _load_pt2(existing(path))
    if path.suffix == ".onnx":
        return OnnxRuntimeModule(existing(path).read_bytes(), str(path))
    return from_payload(read_payload(path, map_location), path, model, map_location, trusted_modules)


def existing(path: Path) -> Path:
    """``path``, or one line when no file is there."""
    if not path.is_file():
        raise QlightError(f"no quantized model at {path}")
    return path


def read_payload(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """What a ``.pt`` file holds, loaded weights-only; :func:`from_payload` rebuilds its model."""
    return load_torch_file(existing(path), "quantized model", map_location)


def from_payload(
    payload: Any,
    path: Path,
    model: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
    trusted_modules: Sequence[str] = ("qlight",),
) -> nn.Module:
    """The model of a ``.pt`` file's loaded ``payload`` (``path`` names it in errors), as
    :func:`load_quantized` rebuilds it, for a caller that reads the payload's other entries too."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise QlightError(f"{path} is not a qlight quantized model file")
    try:
        recipe = parse_recipe(str(payload.get("recipe")))
    except QlightError as err:
        raise QlightError(f"{path}: {err}") from None
    if recipe.static or not isinstance(payload.get("state_dict"), dict):
        raise QlightError(f"{path} is not a qlight quantized model file")
    if model is None:  # built on the meta device first: hyperparameters that ask for huge tensors allocate nothing
        build = _rebuilder(payload.get("model"), trusted_modules, path)
        _check_shapes(build("meta"), payload["state_dict"], path)
        model = build("cpu")
    model = model.to(map_location)
    targets = quantizable_modules(model)
    if recipe.per_layer:  # older files hold the plan too, checked against the weights alike
        plan = payload.get("plan", _stored_plan(payload["state_dict"]))
        if not isinstance(plan, dict):
            raise QlightError(f"{path} holds no per-layer plan: it is not a qlight quantized model file")
        check_plan(plan, model, targets, str(path))
        source = "the file's plan"
    else:
        plan, source = dict.fromkeys(targets, recipe.bits), f"recipe {recipe.name}"
    _restore(model, payload["state_dict"], plan, source, path)
    return model.eval()
