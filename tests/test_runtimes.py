"""Fast int8 on the CPU: the static graph compiled by Inductor and run by ONNX Runtime, each a row of
its own that must agree with the PyTorch quantized model on real data."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from digits import DigitsNet, trainer

from qlight import PostTrainingQuantization, QlightError, load_quantized
from qlight.quantization.runtimes.ort import export_onnx
from qlight.tables import read_csv


def ptq_rows(tmp_path, model, recipes):
    ptq = PostTrainingQuantization(recipes=recipes, output_dir=str(tmp_path / "ptq"), speed_repeats=2)
    trainer(tmp_path, [ptq]).test(model)
    return {row["recipe"]: row for row in read_csv(tmp_path / "ptq" / "results.csv")}


def test_onnx_runtime_and_inductor_rows_agree_with_the_pytorch_int8_graph(tmp_path, digits_checkpoint):
    model = DigitsNet.load_from_checkpoint(digits_checkpoint)
    rows = ptq_rows(tmp_path, model, ["int8_static", "int8_static_onnx", "int8_static_inductor"])
    reference = load_quantized(tmp_path / "ptq" / "int8_static.pt2")
    onnx = load_quantized(tmp_path / "ptq" / "int8_static_onnx.onnx")
    x, y = model.test_data.tensors
    # The runtimes pick their own int8 kernels (per CPU: VNNI, AMX): rounding may flip an image or two.
    tolerance = 2 / len(y)
    with torch.no_grad():
        top1 = {name: (m(x).argmax(1) == y).float().mean().item() for name, m in (("pt", reference), ("ort", onnx))}
    assert abs(top1["ort"] - top1["pt"]) <= tolerance, top1
    for name in ("int8_static_onnx", "int8_static_inductor"):
        row = rows[name]
        assert not row["error"], row
        assert abs(float(row["acc1"]) - float(rows["int8_static"]["acc1"])) <= tolerance, row
        assert row["quantized_modules"] == rows["int8_static"]["quantized_modules"] == "4"
        assert float(row["images_per_s"]) > 0 and float(row["quantize_seconds"]) > 0
    assert (
        rows["int8_static_onnx"]["runtime"] == "onnxruntime" and rows["int8_static_inductor"]["runtime"] == "inductor"
    )


def test_failures_of_a_fast_runtime_are_error_rows(tmp_path, digits_checkpoint, monkeypatch):
    def no_export(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    def no_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    monkeypatch.setattr(torch, "compile", lambda graph, **kwargs: no_compile)
    rows = ptq_rows(
        tmp_path,
        DigitsNet.load_from_checkpoint(digits_checkpoint),
        ["int8_static", "int8_static_onnx", "int8_static_inductor"],
    )
    assert rows["int8_static_onnx"]["error"] == "RuntimeError: unsupported operator"
    assert rows["int8_static_inductor"]["error"].startswith("RuntimeError: the compiled graph failed")
    assert float(rows["int8_static"]["acc1"]) > 0.9 and not rows["int8_static"]["error"]


def test_onnx_without_the_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(QlightError, match=r'pip install "qlight\[onnx\]"'):
        export_onnx(torch.nn.Linear(4, 2), torch.randn(2, 4))


def onnx_with_external_data(tmp_path: Path) -> bytes:
    """An ONNX model whose weight ONNX Runtime would read from ``secret.bin`` in the working directory."""
    import onnx
    from onnx import helper, numpy_helper

    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    weight = numpy_helper.from_array(np.zeros(4, dtype=np.float32), "w")
    onnx.external_data_helper.set_external_data(weight, location=secret.name)
    weight.ClearField("raw_data")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        [weight],
    )
    return helper.make_model(graph).SerializeToString()


def test_an_onnx_file_with_external_data_is_refused_before_onnx_runtime_reads_it(tmp_path, monkeypatch):
    crafted = tmp_path / "crafted.onnx"
    crafted.write_bytes(onnx_with_external_data(tmp_path))
    monkeypatch.chdir(tmp_path)  # ONNX Runtime resolves external data against the working directory
    with pytest.raises(QlightError, match="external files") as info:
        load_quantized(crafted)
    assert "\n" not in str(info.value)
