"""Files from a stranger (issue #31): a quantized model whose hyperparameters name code, symbolic shapes
that take sympy forever, zip bombs, plans that never end, and CIFAR labels that grow from a few bytes.
Each is refused in one line, before it imports, runs or allocates anything."""

import copy
import os
import pickle
import re
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from test_runtimes import onnx_with_external_data

from conftest import write_cifar100
from qlight import ImageClassifier, PostTrainingQuantization, QlightError, QuantizationAwareTraining, load_quantized
from qlight.data.cifar import load_cifar
from qlight.files import load_torch_file
from qlight.quantization import parse_recipe, quantizable_modules
from qlight.quantization.io.serialization import _is_shape_expression, quantized_bytes
from qlight.quantization.recipes.static import export_batched


def save_quantized(tmp_path: Path, backbone, name: str = "int8.pt") -> Path:
    source = ImageClassifier(backbone, num_classes=10).eval()
    targets, recipe = quantizable_modules(source), parse_recipe("int8")
    path = tmp_path / name
    path.write_bytes(quantized_bytes(recipe.quantize(copy.deepcopy(source), targets), recipe, targets, source, None))
    return path


def with_hparams(path: Path, **init_args) -> Path:
    payload = torch.load(path, weights_only=True)
    payload["model"]["init_args"].update(init_args)
    crafted = path.with_name("crafted.pt")
    torch.save(payload, crafted)
    return crafted


@pytest.fixture
def digits_file(tmp_path):
    return save_quantized(tmp_path, "digits.DigitsCNN")


def shell(marker: Path) -> dict:
    return {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}


@pytest.mark.parametrize(
    "hparams",
    [
        lambda m: {"backbone": shell(m)},
        lambda m: {"backbone": {"class_path": "subprocess.getoutput", "init_args": {"cmd": f"touch {m}"}}},
        lambda m: {"backbone": "this.Foo"},
        lambda m: {"backbone": {"class_path": "this.Foo"}},
        lambda m: {"lr": shell(m)},  # any class path, wherever it sits: a user's class may build it
        lambda m: {"backbone": {"class_path": "digits.DigitsCNN", "init_args": {"width": [[shell(m)]]}}},
    ],
    ids=["os.system", "subprocess.getoutput", "import-by-name", "import-by-dict", "another-hparam", "nested"],
)
def test_hyperparameters_cannot_choose_what_a_file_imports_or_calls(tmp_path, digits_file, hparams):
    marker = tmp_path / "pwned"
    sys.modules.pop("this", None)  # importing `this` prints the Zen of Python
    crafted = with_hparams(digits_file, **hparams(marker))
    with pytest.raises(QlightError, match=r"crafted.pt \(hyperparameters\) (names|asks to import) ") as info:
        load_quantized(crafted)
    assert "\n" not in str(info.value)
    assert not marker.exists() and "this" not in sys.modules
    assert load_quantized(digits_file, model=ImageClassifier("digits.DigitsCNN", num_classes=10)) is not None


def test_a_backbone_from_a_file_is_a_registered_builder_or_an_allowed_class(tmp_path, monkeypatch):
    # Imported already (digits), a registered builder by class path, a class by dict: all rebuild.
    for backbone in (
        "digits.DigitsCNN",
        {"class_path": "qlight.models.resnet20", "init_args": {"width_mult": 0.25}},
        {"class_path": "digits.DigitsCNN", "init_args": {"width": 4}},
    ):
        loaded = load_quantized(save_quantized(tmp_path, backbone))
        assert loaded.hparams.backbone == backbone
    # A user's package is imported only when trusted: its import leaves a marker.
    (tmp_path / "user_nets.py").write_text(
        "import pathlib\nfrom torch import nn\npathlib.Path(__file__).with_name('imported').touch()\n"
        "class Net(nn.Sequential):\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__(nn.Flatten(), nn.Linear(64, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = save_quantized(tmp_path, "user_nets.Net")
    monkeypatch.delitem(sys.modules, "user_nets")
    (tmp_path / "imported").unlink()
    with pytest.raises(QlightError, match=r"asks to import user_nets, which is not imported and not trusted"):
        load_quantized(path)
    assert not (tmp_path / "imported").exists()
    assert load_quantized(path, trusted_modules=["qlight", "user_nets"]).model[1].out_features == 10
    # An imported module's function is never called, even a harmless one.
    with pytest.raises(QlightError, match=r"names torch.nn.init.zeros_, which is not an nn.Module class"):
        load_quantized(with_hparams(path, backbone="torch.nn.init.zeros_"), trusted_modules=["qlight", "user_nets"])


def test_a_class_that_the_hyperparameters_may_name_reads_no_file_they_choose(tmp_path, digits_file, monkeypatch):
    onnx_module = "qlight.quantization.runtimes.ort.OnnxRuntimeModule"  # an nn.Module of qlight's own
    backbone = {"class_path": onnx_module, "init_args": {"onnx_bytes": onnx_with_external_data(tmp_path)}}
    monkeypatch.chdir(tmp_path)  # ONNX Runtime would read secret.bin from here
    with pytest.raises(QlightError, match="the ONNX model keeps tensors in external files"):
        load_quantized(with_hparams(digits_file, backbone=backbone))


def rezipped(source: Path, target: Path, suffix: str, write) -> Path:
    """``source`` with its member ending in ``suffix`` written, deflated, by ``write(file, old_bytes)``."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if not item.filename.endswith(suffix):
                dst.writestr(item, data)  # stored, as torch writes it
                continue
            with dst.open(item.filename, "w", force_zip64=True) as member:
                write(member, data)
    return target


def padded(before: bytes = b"", after: bytes = b"", mib: int = 0):
    """A member writer: ``mib`` MiB of ``before`` bytes, the old bytes, then as many ``after`` bytes."""

    def write(member, data):
        for _ in range(mib * bool(before)):
            member.write(before * (1 << 20))
        member.write(data)
        for _ in range(mib * bool(after)):
            member.write(after * (1 << 20))

    return write


@pytest.fixture
def graph_file(tmp_path):
    path = tmp_path / "linear.pt2"
    torch.export.save(export_batched(torch.nn.Linear(4, 2), torch.randn(2, 4)), path)  # a symbolic batch size
    return path


SYMBOL = "Symbol('s77', positive=True, integer=True)"  # how torch writes a batch dimension


@pytest.mark.parametrize("shape", ["10**10**10", "Integer(7)**Integer(7)**Integer(9)", "Float(1, 100000000)/3"])
def test_a_symbolic_shape_that_takes_sympy_forever_is_refused(tmp_path, graph_file, shape):
    def write(member, data):
        member.write(re.sub(rb'"expr_str": "Symbol\([^"]*"', f'"expr_str": "{shape}"'.encode(), data))

    crafted = rezipped(graph_file, tmp_path / "crafted.pt2", "models/model.json", write)
    start = time.perf_counter()
    with pytest.raises(QlightError, match="holds a symbolic shape that is not a shape expression"):
        load_quantized(crafted)
    assert time.perf_counter() - start < 5
    assert load_quantized(graph_file)(torch.randn(3, 4)).shape == (3, 2)
    # What torch writes for shapes that depend on the batch still passes.
    for real in (SYMBOL, f"Mul(Integer(3072), {SYMBOL})", f"Pow({SYMBOL}, Integer(-1))", "FloorDiv(s77, 2)", "s77**2"):
        assert _is_shape_expression(real, {"FloorDiv": None})
    for bomb in ("Pow(s77, Pow(10, 10))", "(s77**8)**8", "LShift(1, 99999)", "123456789012345678901*s77"):
        assert not _is_shape_expression(bomb, {"LShift": None})


@pytest.mark.parametrize(
    "member, write, declares",
    [  # deflated, a few hundred KB each: the reports' 1.5 GB bombs, smaller
        ("models/model.json", padded(before=b" ", mib=65), "bytes uncompressed for .*models/model.json"),
        ("_weights_config.json", padded(before=b" ", mib=65), "bytes uncompressed for .*_weights_config.json"),
        ("data/weights/weight_0", padded(after=b"\0", mib=24), "bytes uncompressed, more than a file of its size"),
    ],
    ids=["model.json", "weights_config.json", "tensor"],
)
def test_a_pt2_zip_bomb_is_refused_before_it_is_read(tmp_path, graph_file, member, write, declares):
    bomb = rezipped(graph_file, tmp_path / "bomb.pt2", member, write)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(QlightError, match=rf"bomb.pt2 declares [\d,]+ {declares}.*; qlight refuses it"):
        load_quantized(bomb)


def test_a_pt_or_checkpoint_zip_bomb_is_refused_before_it_is_read(tmp_path, digits_file):
    bomb = rezipped(digits_file, tmp_path / "bomb.pt", "data.pkl", padded(after=b"\0", mib=24))  # read past STOP
    with pytest.raises(QlightError, match=r"bomb.pt declares 25,\d+,\d+ bytes uncompressed, more than a file of its"):
        load_quantized(bomb)
    legacy = tmp_path / "legacy.pt"  # torch's old format is no zip: it loads as before
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert load_torch_file(legacy)["w"].sum() == 3


@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/zero"])
def test_a_plan_path_that_is_no_regular_file_is_refused_at_once(tmp_path, kind):
    plan = tmp_path / "plan.json"
    os.mkfifo(plan) if kind == "fifo" else plan.symlink_to("/dev/zero")
    for build in (lambda: PostTrainingQuantization([f"mixed@{plan}"]), lambda: QuantizationAwareTraining(str(plan))):
        with pytest.raises(QlightError, match=r"plan.json is not a regular file: a plan is a JSON file of layer"):
            build()


def test_cifar_labels_that_unfold_into_gigabytes_are_refused_before_numpy_builds_them(tmp_path):
    root = write_cifar100(tmp_path)
    train = root / "cifar-100-python" / "train"
    entry = pickle.loads(train.read_bytes())
    labels = [0, 0]
    for _ in range(21):  # 2**22 labels from a few hundred bytes; the report's 2**28 reached 3 GB
        labels = [labels, labels]
    entry["fine_labels"] = labels
    train.write_bytes(pickle.dumps(entry, protocol=2))
    tracemalloc.start()
    try:
        with pytest.raises(QlightError, match=r"train cannot be read .*fine_labels is not one whole number per image"):
            load_cifar(root, train=True)
        assert tracemalloc.get_traced_memory()[1] < 8 << 20  # numpy would hold 32 MB of labels
    finally:
        tracemalloc.stop()
