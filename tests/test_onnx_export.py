"""Every model qlight makes as an ONNX model that ONNX Runtime runs as PyTorch does, about as small as
qlight's packed file, and the ``export`` command that writes it from a saved file."""

import copy
import io
import sys

import numpy as np
import onnx
import pytest
import torch
from digits import DigitsNet, PooledDigitsNet, trainer
from onnx import TensorProto, numpy_helper

from qlight import QuantizationAwareTraining, load_quantized
from qlight.cli import main
from qlight.errors import Unsupported
from qlight.quantization.grid.intx import dtype_bits
from qlight.quantization.io import onnx_export
from qlight.quantization.io.onnx_export import onnx_bytes
from qlight.quantization.io.serialization import quantized_bytes
from qlight.quantization.recipes.base import parse_recipe, quantizable_modules
from qlight.quantization.runtimes.inductor import InductorGraph
from qlight.quantization.runtimes.ort import OnnxRuntimeModule

CODE_TYPES = {TensorProto.INT2: 2, TensorProto.INT4: 4, TensorProto.INT8: 8}
# ONNX Runtime and PyTorch sum a layer's products in different orders (float32): on logits of about 10
# that moves the last few bits, 1e-5 at most measured; 1e-4 leaves room and still catches one wrong code.
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def digits(digits_checkpoint):
    return DigitsNet.load_from_checkpoint(digits_checkpoint).eval()


def quantized(model, name, granularity="per_channel"):
    recipe = parse_recipe(name, granularity)
    calibration = [model.train_data.tensors[0][:256]]
    return recipe, recipe.quantize(copy.deepcopy(model), quantizable_modules(model), calibration)


def assert_runs_as_in_pytorch(model, onnx_model, data, logit_tolerance=LOGIT_TOLERANCE):
    """ONNX Runtime's top-1 on the digits test set within one image of PyTorch's, logits close."""
    x, y = data
    with torch.no_grad():
        expected, got = model(x), OnnxRuntimeModule(onnx_model)(x)
    assert abs(int((got.argmax(1) == y).sum()) - int((expected.argmax(1) == y).sum())) <= 1
    assert (got - expected).abs().max() <= logit_tolerance


def codes_by_weight(onnx_model):
    """``{weight name: (ONNX code type, codes)}`` of each DequantizeLinear that yields a weight."""
    graph = onnx.load_from_string(onnx_model).graph
    initializers = {init.name: init for init in graph.initializer}
    return {
        node.output[0]: (initializers[node.input[0]].data_type, numpy_helper.to_array(initializers[node.input[0]]))
        for node in graph.node
        if node.op_type == "DequantizeLinear"
    }


@pytest.mark.parametrize("granularity", ["per_channel", "per_kernel_position"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_only_models_run_in_onnx_runtime_with_torchaos_codes_in_the_narrowest_type(digits, bits, granularity):
    _, model = quantized(digits, f"int{bits}", granularity)
    exported = onnx_bytes(model, digits.test_data.tensors[0][:4])
    assert_runs_as_in_pytorch(model, exported, digits.test_data.tensors)
    codes = codes_by_weight(exported)
    layers = [name for name in quantizable_modules(model) if hasattr(model.get_submodule(name).weight, "qdata")]
    assert sorted(codes) == sorted(f"{name}.weight" for name in layers)
    for name in layers:
        kind, stored = codes[f"{name}.weight"]
        assert CODE_TYPES[kind] == (2 if bits == 2 else 4 if bits <= 4 else 8)
        assert np.array_equal(stored.astype(np.int8), model.get_submodule(name).weight.qdata.numpy())


def test_a_mixed_plan_stores_each_layer_in_its_own_type(pooled_digits_checkpoint):
    pooled = PooledDigitsNet.load_from_checkpoint(pooled_digits_checkpoint).eval()
    _, model = quantized(pooled, "mixed@3")
    exported = onnx_bytes(model, pooled.test_data.tensors[0][:4])
    assert_runs_as_in_pytorch(model, exported, pooled.test_data.tensors)
    codes = codes_by_weight(exported)
    layers = [name for name in quantizable_modules(model) if hasattr(model.get_submodule(name).weight, "qdata")]
    assert sorted(codes) == sorted(f"{name}.weight" for name in layers)
    plan = {f"{name}.weight": dtype_bits(model.get_submodule(name).weight.target_dtype) for name in layers}
    assert len(set(plan.values())) > 1, plan  # the allocation gave the layers different bits
    stored = {name: CODE_TYPES[kind] for name, (kind, _) in codes.items()}
    assert stored == {name: onnx_export.storage_bits(bits) for name, bits in plan.items()}


def test_a_qat_converted_int4_model_runs_in_onnx_runtime(tmp_path, digits_checkpoint):
    model = DigitsNet()
    qat = QuantizationAwareTraining(weight_bits=4, baseline_ckpt=str(digits_checkpoint))
    qat.setup(trainer(tmp_path), model, "fit")
    converted = qat.convert(model)
    exported = onnx_bytes(converted, model.test_data.tensors[0][:4])
    assert_runs_as_in_pytorch(converted, exported, model.test_data.tensors)
    assert {kind for kind, _ in codes_by_weight(exported).values()} == {TensorProto.INT4}


@pytest.fixture(scope="module")
def static_graph(digits):
    return quantized(digits, "int8_static")


def test_static_graphs_and_their_runtimes_export_through_the_same_entry(digits, static_graph):
    _, graph = static_graph
    exported = onnx_bytes(graph, digits.test_data.tensors[0][:4])
    # ONNX Runtime picks its own int8 kernels, the reference graph rounds in float: an image may flip.
    x, y = digits.test_data.tensors
    with torch.no_grad():
        agree = (OnnxRuntimeModule(exported)(x).argmax(1) == graph(x).argmax(1)).sum()
    assert int(agree) >= len(y) - 2
    assert onnx_bytes(InductorGraph(graph), x[:4]) == exported
    assert onnx_bytes(OnnxRuntimeModule(exported), x[:4]) == exported


def test_fp16_exports_and_bf16_says_why_not(digits):
    _, half = quantized(digits, "fp16")
    x, y = digits.test_data.tensors
    exported = onnx_bytes(half, x[:4])
    with torch.no_grad():
        expected, got = half(x.half()).float(), OnnxRuntimeModule(exported)(x.half()).float()
    assert abs(int((got.argmax(1) == y).sum()) - int((expected.argmax(1) == y).sum())) <= 1
    _, brain = quantized(digits, "bf16")
    with pytest.raises(Unsupported, match="no bfloat16 Conv: export the fp16 or fp32 model"):
        onnx_bytes(brain, x[:4])


def size_ratio(bits, granularity="per_channel"):
    """``.onnx`` bytes over qlight's packed ``.pt`` bytes of the digits CNN at width 48 (141k
    parameters: the weights are a few tens of KB, where a file's overhead shows)."""
    model = DigitsNet(width=48).eval()
    recipe, quantized_model = quantized(model, f"int{bits}", granularity)
    x = model.test_data.tensors[0][:4]
    packed = quantized_bytes(quantized_model, recipe, quantizable_modules(model), model, x)
    return len(onnx_bytes(quantized_model, x)) / len(packed)


@pytest.mark.parametrize(("bits", "bound"), [(4, 1.3), (3, 1.5), (2, 1.5)])
@pytest.mark.parametrize("granularity", ["per_channel", "per_kernel_position"])
def test_the_onnx_file_is_about_as_small_as_the_packed_file(bits, bound, granularity):
    assert size_ratio(bits, granularity) <= bound


def test_the_size_bound_catches_int4_codes_stored_as_int8(monkeypatch):
    monkeypatch.setattr(onnx_export, "storage_bits", lambda bits: 8)
    assert size_ratio(4) > 1.3


def test_export_command_converts_saved_files_end_to_end(tmp_path, digits, static_graph, capsys):
    x, y = digits.test_data.tensors
    targets = quantizable_modules(digits)
    for (recipe, model), name in ((quantized(digits, "int4"), "int4.pt"), (static_graph, "int8_static.pt2")):
        (tmp_path / name).write_bytes(quantized_bytes(model, recipe, targets, digits, x[:4]))  # as the callbacks save
        with pytest.raises(SystemExit) as done:
            main(["export", str(tmp_path / name), "--to", "onnx"])
        written = (tmp_path / name).with_suffix(".onnx")
        assert done.value.code == 0 and f"wrote {written} ({written.stat().st_size:,} bytes" in capsys.readouterr().out
        with torch.no_grad():
            reference, runtime = load_quantized(tmp_path / name)(x), load_quantized(written)(x)
        assert int((reference.argmax(1) != runtime.argmax(1)).sum()) <= (0 if name.endswith(".pt") else 2)


def test_export_command_bad_input_is_one_line(tmp_path, digits, capsys, monkeypatch):
    recipe, model = quantized(digits, "int4")
    payload = torch.load(io.BytesIO(quantized_bytes(model, recipe, quantizable_modules(model), digits, torch.empty(0))))
    payload.pop("input_shape")  # as qlight saved it before files recorded their input shape
    torch.save(payload, tmp_path / "old.pt")

    def run(*args):
        with pytest.raises(SystemExit) as done:
            main(["export", *map(str, args), "--to", "onnx"])
        return done.value.code, capsys.readouterr()

    code, out = run(tmp_path / "old.pt")
    assert (
        code == 2
        and out.err
        == f"error: {tmp_path / 'old.pt'} does not record its input shape: pass --input_shape, e.g. 3,32,32\n"
    )
    assert run(tmp_path / "old.pt", "--input_shape", "1,8,8")[0] == 0
    code, out = run(tmp_path / "old.pt", "--input_shape", "3,32,32")
    assert code == 2 and out.err.startswith(f"error: {tmp_path / 'old.pt'} does not run on inputs of shape 3,32,32 (")
    assert out.err.count("\n") == 1
    (tmp_path / "notes.pt").write_bytes(b"not a model")
    code, out = run(tmp_path / "notes.pt")
    assert code == 2 and out.err.count("\n") == 1 and "is not a PyTorch file" in out.err
    monkeypatch.setitem(sys.modules, "onnx", None)
    code, out = run(tmp_path / "old.pt", "--input_shape", "1,8,8")
    assert code == 2 and out.err == 'error: onnx is not installed: pip install "qlight[onnx]"\n'
