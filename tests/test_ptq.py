import copy
import io
import zipfile

import pytest
import torch
from digits import DigitsData, DigitsNet, trainer
from torch import nn
from torchao.quantization import IntxUnpackedToInt8Tensor

from qlight import ImageClassifier, PostTrainingQuantization, QlightError, load_quantized
from qlight.models import VGG, vgg11_bn
from qlight.models.vgg import CFGS, make_layers
from qlight.quantization import parse_recipe, quantizable_modules
from qlight.quantization.io.serialization import quantized_bytes
from qlight.quantization.recipes.weight_only import IntxWeightOnly
from qlight.tables import read_csv


def quantize(model, name):
    targets = quantizable_modules(model)
    return parse_recipe(name).quantize(model, set(targets)), targets


def test_int4_quantizes_every_conv_and_linear_to_16_levels():
    model, targets = quantize(vgg11_bn().eval(), "int4")
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(targets) == len(layers) == 11
    for layer in layers:
        w = layer.weight
        assert isinstance(w, IntxUnpackedToInt8Tensor)
        codes = w.qdata
        assert codes.min() >= -8 and codes.max() <= 7
        groups = codes.transpose(0, 1).flatten(1).T if codes.dim() == 4 else codes  # one group per (out, kh, kw)
        assert max(len(torch.unique(g)) for g in groups) <= 16


def test_fp16_and_bf16_cast_every_parameter():
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model, _ = quantize(vgg11_bn(), name)
        assert {p.dtype for p in model.parameters()} == {dtype}


def test_file_sizes_of_vgg11_bn():
    source = vgg11_bn().eval()
    x = torch.randn(2, 3, 32, 32)
    size = {}
    for name in ("fp32", "fp16", "int8", "int4", "int2"):
        model, targets = quantize(copy.deepcopy(source), name)
        size[name] = len(quantized_bytes(model, parse_recipe(name), targets, source, x))
    assert size["int8"] <= 0.30 * size["fp32"]
    assert size["int4"] <= 0.55 * size["int8"]
    assert size["int2"] < 0.65 * size["int4"]
    assert abs(size["fp16"] / size["fp32"] - 0.5) < 0.02 * 0.5


def static_bytes(source, batch):
    targets = quantizable_modules(source)
    recipe = parse_recipe("int8_static")
    model = recipe.quantize(copy.deepcopy(source), targets, [batch])
    return quantized_bytes(model, recipe, targets, source, batch)


def half_width_vgg11():
    """A small CNN (2.5M parameters) whose 64-image example batch (786 KB) would show in its file."""
    return VGG(make_layers([v if v == "M" else v // 2 for v in CFGS["vgg11"]]), num_classes=100, hidden=256).eval()


@pytest.mark.parametrize("build", [vgg11_bn, half_width_vgg11])
def test_static_files_are_the_model_not_the_example_batch(build):
    source = build().eval()
    batch = torch.randn(64, 3, 32, 32)
    targets = quantizable_modules(source)
    int8 = parse_recipe("int8").quantize(copy.deepcopy(source), targets)
    weight_only = len(quantized_bytes(int8, parse_recipe("int8"), targets, source, batch))
    assert len(static_bytes(source, batch)) <= 1.1 * weight_only


def test_a_static_file_does_not_grow_with_the_batch_and_runs_any_batch(tmp_path):
    source = DigitsNet().eval()
    small, large = static_bytes(source, torch.randn(2, 1, 8, 8)), static_bytes(source, torch.randn(512, 1, 8, 8))
    # The batch size survives only as a size hint on each node (a few bytes, which can cross the archive's
    # 64-byte alignment); a stored batch of 512 images would add 128 KiB.
    assert abs(len(large) - len(small)) <= 256
    with zipfile.ZipFile(io.BytesIO(large)) as archive:
        assert all(i.file_size == 0 for i in archive.infolist() if "sample_inputs" in i.filename)
    (tmp_path / "int8_static.pt2").write_bytes(large)
    graph = load_quantized(tmp_path / "int8_static.pt2")
    assert [graph(torch.randn(n, 1, 8, 8)).shape for n in (1, 7)] == [(1, 10), (7, 10)]


def test_a_static_graph_dequantizes_each_weight_next_to_its_layer(tmp_path):
    # All weights dequantized up front would keep a float copy of the whole model alive through the
    # forward pass.
    source = DigitsNet().eval()
    (tmp_path / "int8_static.pt2").write_bytes(static_bytes(source, torch.randn(4, 1, 8, 8)))
    graph = load_quantized(tmp_path / "int8_static.pt2")
    calls = [node for node in graph.graph.nodes if node.op == "call_function"]
    dequantized = [i for i, node in enumerate(calls) if "dequantize_per_channel" in str(node.target)]
    assert len(dequantized) == 4
    assert all(calls[i + 1] in calls[i].users and "dequantize" not in str(calls[i + 1].target) for i in dequantized)


@pytest.mark.parametrize("name", ["int3", "int4", "int8", "bf16"])
def test_load_quantized_reproduces_outputs(tmp_path, name):
    source = ImageClassifier(num_classes=10).eval()
    model, targets = quantize(copy.deepcopy(source), name)
    path = tmp_path / f"{name}.pt"
    path.write_bytes(quantized_bytes(model, parse_recipe(name), targets, source, torch.randn(1, 3, 32, 32)))
    loaded = load_quantized(path)
    x = torch.randn(4, 3, 32, 32).to(parse_recipe(name).input_dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert type(loaded.model.features[0].weight) is type(model.model.features[0].weight)


def test_bad_arguments_fail_when_built():
    with pytest.raises(QlightError, match="int2, int3"):
        PostTrainingQuantization(recipes=["int9"])
    with pytest.raises(QlightError, match="valid"):
        PostTrainingQuantization(recipes=["fp8"])
    with pytest.raises(QlightError, match="calibration"):
        PostTrainingQuantization(recipes=["int8_static"], calibration_batches=0)


def _rows(path):
    return {row["recipe"]: row for row in read_csv(path)}


def test_ptq_on_real_digits_in_a_foreign_module(tmp_path, digits_checkpoint):
    ptq = PostTrainingQuantization(
        recipes=["fp32", "bf16", "int8", "int2", "int8_static", "w4a8_static"], output_dir=str(tmp_path / "ptq")
    )
    model = DigitsNet.load_from_checkpoint(digits_checkpoint)
    trainer(tmp_path, [ptq]).test(model)
    rows = _rows(tmp_path / "ptq" / "results.csv")
    acc = {name: float(row["acc1"]) for name, row in rows.items()}
    assert acc["fp32"] > 0.9, acc
    assert abs(acc["int8"] - acc["fp32"]) <= 0.01, acc
    assert abs(acc["int8_static"] - acc["fp32"]) <= 0.02, acc
    assert acc["w4a8_static"] >= acc["fp32"] - 0.05, acc
    assert acc["int2"] < acc["int8"] - 0.02, acc  # fails if quantization does nothing
    # Counted in the quantized models: per output channel the 1-channel input conv is quantized too.
    assert [int(rows[r]["quantized_modules"]) for r in ("int2", "int8_static", "w4a8_static")] == [4, 4, 4]
    loaded = load_quantized(tmp_path / "ptq" / "int2.pt")
    static = load_quantized(tmp_path / "ptq" / "int8_static.pt2")
    x = model.test_data.tensors[0][:8]
    with torch.no_grad():
        assert loaded(x).shape == static(x).shape == (8, 10)
    assert (tmp_path / "ptq" / "results.md").read_text().count("|") > 20
    # Speed is information, not a target: each row names its device and has positive figures.
    for row in rows.values():
        assert float(row["images_per_s"]) > 0 and float(row["latency_ms"]) > 0 and float(row["spread_pct"]) >= 0, row
        assert row["device"] == f"cpu ({torch.get_num_threads()} threads)"


def _compiled(model, how):
    if how == "lightning":  # Lightning rewraps forward and the step methods
        return torch.compile(model, backend="aot_eager")
    if how == "in_place":  # __call__ runs compiled
        model.compile(backend="aot_eager")
        return model
    return ImageClassifier(model.net, num_classes=10, compile=True)  # the backbone, by Inductor


@pytest.mark.parametrize("how", ["lightning", "in_place", "classifier"])
def test_ptq_of_a_compiled_module_evaluates_the_quantized_copies(tmp_path, digits_checkpoint, how, fresh_dynamo):
    accuracies = []
    for compiled in (False, True):
        ptq = PostTrainingQuantization(recipes=["fp32", "int2"], output_dir=str(tmp_path / str(compiled)))
        model = DigitsNet.load_from_checkpoint(digits_checkpoint)
        if compiled:
            model = _compiled(model, how)
        elif how == "classifier":
            model = ImageClassifier(model.net, num_classes=10)
        trainer(tmp_path, [ptq]).test(model, datamodule=DigitsData() if how == "classifier" else None)
        accuracies.append({row["recipe"]: row["acc1"] for row in ptq.results})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the module did run compiled
    # A copy that kept the original's compiled wrappers ran the float model: int2 reported fp32's accuracy.
    assert accuracies[1] == accuracies[0] and accuracies[0]["int2"] < accuracies[0]["fp32"] - 0.02, accuracies


def test_one_failing_recipe_keeps_the_others(tmp_path, digits_checkpoint, monkeypatch):
    def broken(self, model, targets, calibration=()):
        raise RuntimeError("kernel missing")

    monkeypatch.setattr(IntxWeightOnly, "quantize", broken)
    ptq = PostTrainingQuantization(recipes=["fp32", "int4", "bf16"], output_dir=str(tmp_path))
    trainer(tmp_path, [ptq]).test(DigitsNet.load_from_checkpoint(digits_checkpoint))
    rows = _rows(tmp_path / "results.csv")
    assert rows["int4"]["error"] == "RuntimeError: kernel missing" and rows["int4"]["acc1"] == ""
    assert float(rows["bf16"]["acc1"]) > 0.9


def test_a_static_recipe_that_quantizes_nothing_is_an_error_not_a_float_model(tmp_path, digits_checkpoint, monkeypatch):
    # torch 2.11's non-strict export made torchao's quantizer match nothing: a float model then
    # passed as int8_static. A quantizer without a config reproduces that outcome on any torch.
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    every_layer = lambda bits, **kwargs: X86InductorQuantizer()  # noqa: E731
    monkeypatch.setattr("qlight.quantization.recipes.static.x86_quantizer", every_layer)
    ptq = PostTrainingQuantization(recipes=["fp32", "int8_static", "int8"], output_dir=str(tmp_path))
    trainer(tmp_path, [ptq]).test(DigitsNet.load_from_checkpoint(digits_checkpoint))
    rows = _rows(tmp_path / "results.csv")
    assert rows["int8_static"]["error"].startswith("RuntimeError: int8_static: torchao's quantizer matched no layer")
    assert rows["int8_static"]["acc1"] == "" and float(rows["int8"]["acc1"]) > 0.9


class NoLayers(DigitsNet):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LayerNorm(64))


def test_model_without_conv_or_linear_warns(tmp_path):
    ptq = PostTrainingQuantization(recipes=["int4"], output_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="nothing is quantized"):
        trainer(tmp_path, [ptq]).test(NoLayers())
    assert _rows(tmp_path / "results.csv")["int4"]["quantized_modules"] == "0"


def test_ddp_gives_the_same_table_as_one_process(tmp_path, digits_checkpoint):
    tables = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        out = tmp_path / str(devices)
        ptq = PostTrainingQuantization(recipes=["fp32", "int4"], output_dir=str(out))
        trainer(tmp_path, [ptq], devices=devices, strategy=strategy).test(DigitsNet(), ckpt_path=str(digits_checkpoint))
        # Times differ between processes (threads, load), and the device column names the threads.
        timings = {"seconds", "quantize_seconds", "images_per_s", "speedup", "latency_ms", "spread_pct", "device"}
        rows = _rows(out / "results.csv")
        tables[devices] = {k: {c: v for c, v in r.items() if c not in timings} for k, r in rows.items()}
    assert tables[1] == tables[2]


def test_each_row_keeps_the_name_it_was_asked_for_by(tmp_path):
    ptq = PostTrainingQuantization(
        ["int3@per_channel", "int4"], methods=["rtn", "gptq"], output_dir=str(tmp_path), speed_repeats=0
    )
    trainer(tmp_path, [ptq]).test(DigitsNet())
    rows = {row["recipe"]: row["requested"] for row in read_csv(tmp_path / "results.csv")}
    assert rows == {
        "fp32": "fp32",
        "int3": "int3@per_channel",
        "int3+gptq": "int3@per_channel",
        "int4": "int4",
        "int4+gptq": "int4",
    }


def test_speed_is_measured_for_the_chosen_recipes_only(tmp_path):
    ptq = PostTrainingQuantization(
        ["int8", "int4@per_channel"], output_dir=str(tmp_path), speed_recipes=["int4@per_channel"]
    )
    trainer(tmp_path, [ptq]).test(DigitsNet())
    timed = {row["recipe"]: row["images_per_s"] != "" for row in read_csv(tmp_path / "results.csv")}
    assert timed == {"fp32": False, "int8": False, "int4": True}
    with pytest.raises(QlightError, match="speed_recipes names int2, which recipes does not"):
        PostTrainingQuantization(["int8"], speed_recipes=["int2"])
