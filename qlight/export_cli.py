"""``python -m qlight export <file> --to onnx``: any saved qlight model (what ``load_quantized`` reads)
as a self-contained ``.onnx`` for ONNX Runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from qlight.errors import QlightError
from qlight.files import atomic_write_bytes
from qlight.quantization.io.onnx_export import float_dtype, onnx_bytes
from qlight.quantization.io.serialization import from_payload, load_quantized, read_payload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qlight export",
        description="Convert a saved qlight model (.pt, .pt2, .onnx) to a self-contained .onnx for ONNX Runtime.",
    )
    parser.add_argument("file", type=Path, help="a model saved by qlight's callbacks")
    parser.add_argument("--to", choices=["onnx"], required=True, help="the format to write")
    parser.add_argument("--output", type=Path, help="where to write it (default: the file with .onnx)")
    parser.add_argument(
        "--input_shape",
        help="one image's shape, e.g. 3,32,32: needed only for a .pt saved before qlight recorded it",
    )
    parser.add_argument(
        "--trusted_modules",
        nargs="+",
        default=["qlight"],
        help="packages the file's model class may be imported from (default: qlight)",
    )
    return parser


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(size) for size in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise QlightError(f"--input_shape {text!r} is not one image's shape: give sizes like 3,32,32")
    return shape


def _load(path: Path, trusted_modules: list[str]) -> tuple[nn.Module, tuple[int, ...] | None]:
    """The saved model and the per-image shape the file records: a ``.pt``'s ``input_shape`` (read in the
    same load), a ``.pt2``'s input placeholder; an ``.onnx`` records none that is needed."""
    if path.suffix in (".pt2", ".onnx"):  # as load_quantized tells them apart: any other name is a .pt
        model = load_quantized(path, trusted_modules=trusted_modules)
        inputs = (
            [n.meta.get("val") for n in model.graph.nodes if n.op == "placeholder"] if path.suffix == ".pt2" else []
        )
        return model, tuple(int(size) for size in inputs[0].shape[1:]) if inputs and inputs[0] is not None else None
    payload = read_payload(path)
    shape = payload.get("input_shape") if isinstance(payload, dict) else None
    return from_payload(payload, path, trusted_modules=trusted_modules), tuple(shape) if shape else None


def _first_line(err: BaseException) -> str:
    """The first line of the innermost cause: ``torch.onnx`` wraps the error that says what failed."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def _check_runs(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Run the model once in PyTorch, whose error names a wrong input shape plainly."""
    try:
        with torch.no_grad():
            model(example.to(float_dtype(model)))
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        shape = ",".join(map(str, example.shape[1:]))
        raise QlightError(f"{path} does not run on inputs of shape {shape} ({_first_line(err)})") from None


def export_main(argv: list[str]) -> int:
    """Write the ``.onnx``; print where and how big. Bad input raises :class:`QlightError`."""
    args = build_parser().parse_args(argv)
    output = args.output or args.file.with_suffix(".onnx")
    if output.resolve() == args.file.resolve():
        raise QlightError(f"--output {output} is the file being converted: name another path")
    model, saved_shape = _load(args.file, args.trusted_modules)
    model = model.eval()
    shape = _parse_shape(args.input_shape) if args.input_shape else saved_shape
    if shape is None and args.file.suffix != ".onnx":
        raise QlightError(f"{args.file} does not record its input shape: pass --input_shape, e.g. 3,32,32")
    example = torch.zeros(2, *(shape or ()))
    if shape is not None:
        _check_runs(model, example, args.file)
    try:
        data = onnx_bytes(model, example)
    except (ValueError, RuntimeError, TypeError) as err:  # the exporter raises many types
        raise QlightError(f"cannot export {args.file} to ONNX: {_first_line(err)}") from None
    atomic_write_bytes(output, data)
    print(f"wrote {output} ({len(data):,} bytes; {args.file.name} is {args.file.stat().st_size:,} bytes)")
    return 0
