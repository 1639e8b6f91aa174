"""StaticQuantizationAwareTraining: W8A8 QAT through torchao's PT2E flow, on real digits, on the CPU."""

import copy
import inspect
from operator import attrgetter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from digits import DigitsData, DigitsNet, trainer
from lightning.fabric.utilities.device_dtype_mixin import _DeviceDtypeModuleMixin
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from qlight import (
    CIFAR100DataModule,
    ImageClassifier,
    PostTrainingQuantization,
    QlightError,
    QuantizationAwareTraining,
    StaticQuantizationAwareTraining,
    load_quantized,
)
from qlight.cli import main
from qlight.quantization.qat import pt2e
from qlight.quantization.qat.results import COLUMNS
from qlight.quantization.recipes.static import x86_quantizer
from qlight.tables import read_csv

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten


def classifier(net: nn.Module | None = None) -> ImageClassifier:
    net = DigitsNet().net if net is None else net
    return ImageClassifier(net, num_classes=10, lr=0.01, weight_decay=0.0, schedule="constant")


def digits_test_set():
    return DigitsData().test_data.tensors


def batch_norm_literals(graph: nn.Module) -> set[bool]:
    return {node.args[5] for node in graph.graph.nodes if node.target == aten.batch_norm.default}


class PhaseProbe(Callback):
    """Records, per training and validation batch, what the prepared graph does: (epoch, module flag,
    batch_norm training literals, observers on)."""

    def __init__(self) -> None:
        self.seen: dict[str, set] = {"train": set(), "val": set()}

    def _look(self, stage, trainer, graph):
        observing = {int(m.observer_enabled) for m in graph.modules() if hasattr(m, "observer_enabled")}
        self.seen[stage].add((trainer.current_epoch, graph.training, *batch_norm_literals(graph), *observing))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._look("train", trainer, pl_module.model)

    def on_validation_batch_end(self, trainer, pl_module, *args):
        if not trainer.sanity_checking:
            self._look("val", trainer, pl_module.model)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, digits_checkpoint):
    """Two epochs of W8A8 QAT of an ImageClassifier from the digits baseline, a checkpoint after each
    epoch, the observers frozen in the second."""
    root = tmp_path_factory.mktemp("static_qat")
    baseline = root / "baseline.ckpt"
    float_net = DigitsNet.load_from_checkpoint(digits_checkpoint).net
    torch.save({"state_dict": classifier(float_net).state_dict()}, baseline)
    torch.manual_seed(0)
    qat = StaticQuantizationAwareTraining(
        freeze_observer_epoch=1,
        baseline_ckpt=str(baseline),
        eval_split="test",
        output_dir=str(root / "qat"),
        runtimes=["onnxruntime"],
    )
    checkpoints = ModelCheckpoint(root / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    probe = PhaseProbe()
    model = classifier()
    trainer(root, [qat, probe, checkpoints], max_epochs=2).fit(model, DigitsData(shuffle=False))
    return SimpleNamespace(root=root, qat=qat, model=model, probe=probe, last=root / "ckpt" / "epoch=1.ckpt")


def eager_rows(qat: StaticQuantizationAwareTraining) -> list[dict]:
    return [row for row in qat.results if row.get("runtime") != "onnxruntime"]


def test_the_graph_trains_and_evaluates_as_lightning_switches_it(fitted):
    # Training: batch statistics, observers on until they freeze at epoch 1. Validation (after which
    # Lightning writes module.training back): running statistics, observers off.
    assert fitted.probe.seen == {
        "train": {(0, True, True, 1), (1, True, True, 0)},
        "val": {(0, False, False, 0), (1, False, False, 0)},
    }


def test_the_w8a8_graph_runs_in_onnx_runtime_as_in_pytorch(fitted):
    eager, onnx = [r for r in read_csv(fitted.root / "qat" / "results.csv") if r["fake_quant"] == "converted"]
    assert (eager["runtime"], onnx["runtime"], onnx["error"]) == ("eager", "onnxruntime", "")
    assert int(onnx["size_bytes"]) == (fitted.root / "qat" / "model.onnx").stat().st_size
    # ONNX Runtime runs its own int8 kernels (they differ between CPUs): within two test images.
    images = len(DigitsData().test_data)
    assert abs(float(onnx["acc1"]) - float(eager["acc1"])) * images <= 2 + 1e-6
    assert float(onnx["agreement"]) >= 100 * (1 - 2 / images)


def test_w8a8_qat_matches_ptq_and_its_folded_int8_graph_agrees_with_training(fitted, digits_checkpoint, tmp_path):
    ptq = PostTrainingQuantization(recipes=["int8_static"], output_dir=str(tmp_path), speed_repeats=0)
    trainer(tmp_path, [ptq]).test(DigitsNet.load_from_checkpoint(digits_checkpoint), verbose=False)
    ptq_acc = ptq.results[-1]["acc1"]
    rows = eager_rows(fitted.qat)  # the ONNX Runtime row: the test above
    assert [(r["epoch"], r["split"], r["fake_quant"]) for r in rows] == [
        (0, "test", "on"),
        (1, "test", "on"),
        (2, "test", "converted"),
    ]
    converted = rows[-1]
    # Two int8 paths: oneDNN picks other int8 kernels on other CPUs (AMX, VNNI), which moves an image
    # or two of 397 across the decision boundary; W8A8 QAT must not lose more than that against PTQ.
    assert converted["acc1"] >= ptq_acc - 2 / len(digits_test_set()[1]), (converted, ptq_acc)
    assert converted["images_per_s"] > 0 and converted["latency_ms"] > 0 and converted["device"].startswith("cpu")
    table = read_csv(fitted.root / "qat" / "results.csv")
    assert list(table[0]) == COLUMNS and len(table) == 4

    graph = load_quantized(fitted.root / "qat" / "model.pt2")
    x, y = digits_test_set()
    with torch.no_grad():
        fake_quant = fitted.model.eval()(x).argmax(1)
        int8 = graph(x).argmax(1)
    assert (int8 == fake_quant).float().mean() >= 0.995
    assert abs((int8 == y).float().mean().item() - converted["acc1"]) < 1e-6

    # Folded: no batch_norm left, and every conv and linear runs on dequantized int8 constants.
    nodes = [node for node in graph.graph.nodes if node.op == "call_function"]
    assert not [node for node in nodes if "batch_norm" in str(node.target)]
    layers = [node for node in nodes if node.target in (aten.conv2d.default, aten.linear.default)]
    assert len(layers) == 4
    constants = {node.target: attrgetter(node.target)(graph) for node in graph.graph.nodes if node.op == "get_attr"}
    for layer in layers:
        weight = layer.args[1]
        assert weight.target == torch.ops.quantized_decomposed.dequantize_per_channel.default, layer
        assert constants[weight.args[0].target].dtype == torch.int8
    assert not [name for name, t in constants.items() if t.is_floating_point() and t.dim() == 4]  # no float conv


def test_resume_and_test_from_a_checkpoint_and_refusals_without_the_callback(fitted, digits_checkpoint, tmp_path):
    resumed = StaticQuantizationAwareTraining(
        freeze_observer_epoch=1, eval_split="test", output_dir=str(tmp_path / "resumed")
    )
    model = classifier()
    first = fitted.root / "ckpt" / "epoch=0.ckpt"
    resumed_trainer = trainer(tmp_path, [resumed], max_epochs=2)
    resumed_trainer.fit(model, DigitsData(shuffle=False), ckpt_path=str(first))
    expected, state = fitted.model.state_dict(), model.state_dict()
    assert expected.keys() == state.keys() and any("activation_post_process" in key for key in state)
    assert [key for key in expected if not torch.equal(expected[key], state[key])] == []
    assert [r["acc1"] for r in resumed.results] == [r["acc1"] for r in eager_rows(fitted.qat)]
    graph = model.model
    tested = resumed_trainer.test(model, DigitsData(), verbose=False)  # the same graph, not prepared again
    assert model.model is graph and abs(tested[0]["test/acc1"] - fitted.qat.results[1]["acc1"]) < 1e-6

    tester = StaticQuantizationAwareTraining(output_dir=str(tmp_path / "test"))
    model = classifier()
    result = trainer(tmp_path, [tester]).test(model, DigitsData(), ckpt_path=str(fitted.last), verbose=False)
    x, y = digits_test_set()
    with torch.no_grad():
        in_memory = (fitted.model.eval()(x).argmax(1) == y).float().mean().item()
    assert abs(result[0]["test/acc1"] - in_memory) < 1e-6
    saved = torch.load(fitted.last, weights_only=True)["state_dict"]
    assert all(torch.equal(model.state_dict()[key], value) for key, value in saved.items())  # testing moved nothing

    refusals = [
        ([], r"trained with StaticQuantizationAwareTraining .*\(weight_bits=8, network='model'\)"),
        ([StaticQuantizationAwareTraining(weight_bits=4)], "'weight_bits': 8.*'weight_bits': 4"),
    ]
    for callbacks, message in refusals:
        with pytest.raises(QlightError, match=message) as err:
            trainer(tmp_path, callbacks).test(classifier(), DigitsData(), ckpt_path=str(fitted.last), verbose=False)
        assert "\n" not in str(err.value)
    with pytest.raises(QlightError, match="holds no StaticQuantizationAwareTraining observers"):
        tester = StaticQuantizationAwareTraining(network="net")
        trainer(tmp_path, [tester]).test(DigitsNet(), ckpt_path=str(digits_checkpoint), verbose=False)


def test_the_int8_graph_computes_what_training_evaluated_with_the_layers_own_settings():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8, eps=1e-3, momentum=0.01),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(8 * 36, 4),
    )
    x = torch.randn(32, 3, 8, 8)
    quantizer = x86_quantizer(4, is_qat=True, float_modules=["5"])  # the Linear stays float
    graph = pt2e.prepare(net, x[:1], quantizer)  # a one-image example
    batch_norm = next(node for node in graph.graph.nodes if node.target == aten.batch_norm.default)
    assert batch_norm.args[5:8] == (True, 0.01, 1e-3)  # prepare_qat_pt2e had written 0.1 and 1e-5
    optimizer = torch.optim.SGD(graph.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        graph(x).square().mean().backward()
        optimizer.step()

    copied = copy.deepcopy(graph).eval()
    assert batch_norm_literals(copied) == {False} and batch_norm_literals(graph) == {True}  # the copy alone
    graph.eval()
    before = {key: value.clone() for key, value in graph.state_dict().items()}
    expected = graph(x)
    assert torch.equal(graph(x), expected)  # no dropout, no observing, no running statistics in eval
    assert all(torch.equal(value, before[key]) for key, value in graph.state_dict().items())
    dropout = next(node for node in graph.graph.nodes if node.target == aten.dropout.default)
    assert dropout.args[1:] == (0.3, False)

    converted = pt2e.convert(graph)
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=1e-5)
    codes = [
        getattr(converted, n.args[0].target) for n in converted.graph.nodes if "dequantize_per_channel" in str(n.target)
    ]
    assert len(codes) == 1 and codes[0].dtype == torch.int8 and codes[0].min() >= -8 and codes[0].max() <= 7
    assert not [node for node in converted.graph.nodes if "batch_norm" in str(node.target)]


class ObserverProbe(Callback):
    """Saves each rank's observers and BatchNorm statistics when fitting ends."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        buffers = {name: b.clone() for name, b in pl_module.net.named_buffers()}
        torch.save(buffers, self.folder / f"rank{dist.get_rank()}.pt")


def test_ddp_ranks_end_with_the_same_observers_and_one_table(tmp_path, digits_checkpoint):
    qat = StaticQuantizationAwareTraining(
        network="net", baseline_ckpt=str(digits_checkpoint), output_dir=str(tmp_path / "qat")
    )
    probe = ObserverProbe(tmp_path)
    ddp = trainer(
        tmp_path,
        [qat, probe],
        max_epochs=1,
        devices=2,
        strategy="ddp_spawn",
        limit_train_batches=4,
        limit_val_batches=0,
    )
    ddp.fit(DigitsNet(lr=0.01))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert any("activation_post_process" in name for name in rank0)
    assert [name for name in rank0 if not torch.equal(rank0[name], rank1[name])] == []
    rows = read_csv(tmp_path / "qat" / "results.csv")
    assert [(r["epoch"], r["fake_quant"]) for r in rows] == [("0", "on"), ("1", "converted")]
    x, y = digits_test_set()
    with torch.no_grad():
        acc = (load_quantized(tmp_path / "qat" / "model.pt2")(x).argmax(1) == y).float().mean().item()
    assert abs(acc - float(rows[-1]["acc1"])) < 1e-6  # the converted row counts every test image once


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if y.sum() > 0:  # data-dependent control flow: dynamo cannot export it
            y = y * 2
        return self.fc(y.flatten(1))


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(QlightError, match="weight_bits must be 8 or 4 .* got 3"):
        StaticQuantizationAwareTraining(weight_bits=3)
    with pytest.raises(QlightError, match="freeze_bn_epoch must be 0 or more"):
        StaticQuantizationAwareTraining(freeze_bn_epoch=-1)
    with pytest.raises(QlightError, match="freeze_observer_epoch must be 1 or more"):
        StaticQuantizationAwareTraining(freeze_observer_epoch=0)

    lines, start = inspect.getsourcelines(Branchy.forward)
    branch = next(start + i for i, line in enumerate(lines) if "if y.sum()" in line)
    qat = StaticQuantizationAwareTraining(output_dir=str(tmp_path))
    with pytest.raises(QlightError) as err:
        trainer(tmp_path, [qat], max_epochs=1).fit(classifier(Branchy()), DigitsData())
    message = str(err.value)
    assert "\n" not in message and "QuantizationAwareTraining (weight-only" in message
    assert f"{__file__}:{branch}: if y.sum() > 0:" in message, message

    refusals = [
        (dict(callbacks=[StaticQuantizationAwareTraining(network="backbone")]), "no nn.Module attribute 'backbone'"),
        (dict(callbacks=[StaticQuantizationAwareTraining()], precision="bf16-mixed"), "set trainer.precision"),
        (dict(callbacks=[StaticQuantizationAwareTraining(), QuantizationAwareTraining()]), "not both"),
    ]
    for settings, message in refusals:
        with pytest.raises(QlightError, match=message):
            trainer(tmp_path, max_epochs=1, **settings).fit(classifier(), DigitsData())
    compilations = (
        lambda m: torch.compile(m, backend="aot_eager"),
        lambda m: m.compile(backend="aot_eager") or m,
        lambda m: m.model.compile(backend="aot_eager") or m,  # what ImageClassifier(compile=True) does
    )
    for compiled in compilations:
        with pytest.raises(QlightError, match="pass the LightningModule uncompiled"):
            fit = trainer(tmp_path, [StaticQuantizationAwareTraining()], max_epochs=1)
            fit.fit(compiled(classifier()), DigitsData())


def test_w8a8_smoke_through_the_cli_writes_the_int8_graph_and_the_table(tmp_path):
    tiny = ["--data.synthetic_train_size=192", "--data.synthetic_test_size=64", "--data.val_size=64"]
    tiny += ["--data.batch_size=32", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"]
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/qat_w8a8.yaml"),
            "--config",
            str(ROOT / "configs/smoke.yaml"),
            *tiny,
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    qat_dir = tmp_path / "qat_w8a8" / "version_0" / "qat"
    rows = read_csv(qat_dir / "results.csv")
    assert [(r["epoch"], r["fake_quant"]) for r in rows] == [("0", "on"), ("1", "converted")]
    graph = load_quantized(qat_dir / "model.pt2")
    assert graph(torch.randn(3, 3, 32, 32)).shape == (3, 100)
    assert not [node for node in graph.graph.nodes if "batch_norm" in str(node.target)]


class AcceleratorDuringSetup(Callback):
    """What Lightning does on a GPU: in the setup hooks ``LightningModule.device`` already names the
    accelerator while the weights are still on the CPU. Here the accelerator is the meta device."""

    def setup(self, trainer, pl_module, stage):
        for module in pl_module.modules():
            if isinstance(module, _DeviceDtypeModuleMixin):
                module._device = torch.device("meta")


def test_the_network_is_prepared_with_an_example_on_its_own_device(tmp_path, monkeypatch):
    seen = []
    prepare = pt2e.prepare

    def recording(net, example, quantizer):
        seen.append({p.device for p in net.parameters()} | {example.device})
        return prepare(net, example, quantizer)

    monkeypatch.setattr(pt2e, "prepare", recording)
    qat = StaticQuantizationAwareTraining(eval_every_epoch=False, output_dir=str(tmp_path / "qat"))
    model = classifier()
    trainer(tmp_path, [AcceleratorDuringSetup(), qat], max_steps=2, limit_val_batches=0).fit(model, DigitsData())
    assert seen == [{torch.device("cpu")}] and pt2e.is_prepared(model.model)


def test_w8a8_qat_and_ptq_int8_static_work_at_batch_size_1(tmp_path):
    data = CIFAR100DataModule(batch_size=1, val_size=2, synthetic=True, synthetic_train_size=8, synthetic_test_size=3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 100))
    qat = StaticQuantizationAwareTraining(eval_every_epoch=False, output_dir=str(tmp_path / "qat"))
    trainer(tmp_path, [qat], max_steps=3, limit_val_batches=0).fit(ImageClassifier(copy.deepcopy(net), lr=0.01), data)
    ptq = PostTrainingQuantization(["int8_static"], calibration_batches=1, output_dir=str(tmp_path / "ptq"))
    trainer(tmp_path, [ptq]).test(ImageClassifier(net), data, verbose=False)
    x = torch.randn(1, 3, 32, 32)
    assert load_quantized(tmp_path / "qat" / "model.pt2")(x).shape == (1, 100)
    assert "error" not in ptq.results[-1] and load_quantized(tmp_path / "ptq" / "int8_static.pt2")(x).shape == (1, 100)
