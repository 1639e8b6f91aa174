"""Hostile and careless input: files that try to run code, edited or broken files, NaN weights, a
second writer, and bad settings given through the CLI. Each must end in one clear line (or an error
row) and run nothing from a file."""

import copy
import io
import pathlib
import socket
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from digits import DigitsNet, trainer
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import qlight
from qlight import (
    CIFAR100DataModule,
    ImageClassifier,
    PostTrainingQuantization,
    QlightError,
    QuantizationAwareTraining,
    load_quantized,
)
from qlight.cli import main
from qlight.data import ensure_cifar
from qlight.files import SAFE_GLOBALS_ENV, exclusive_dir, load_torch_file
from qlight.quantization import parse_recipe, quantizable_modules
from qlight.quantization.io.serialization import quantized_bytes
from qlight.quantization.qat import pt2e
from qlight.quantization.recipes.static import export_batched, x86_quantizer
from qlight.tables import read_csv

ROOT = Path(__file__).resolve().parents[1]


class RunsCode:
    """Unpickling this calls ``Path.write_text``: the file it writes shows that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "code from a file ran"))


def crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "ran.txt"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": DigitsNet().state_dict(), "hyper_parameters": RunsCode(marker)}, path)
    return path, marker


def test_a_crafted_checkpoint_runs_no_code_and_says_how_to_allow_it(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    qat = QuantizationAwareTraining(weight_bits=4, baseline_ckpt=str(path), output_dir=str(tmp_path / "qat"))
    with pytest.raises(QlightError, match=f"crafted.ckpt holds Python objects .*{SAFE_GLOBALS_ENV}="):
        trainer(tmp_path, [qat], max_epochs=1).fit(DigitsNet())
    ptq = PostTrainingQuantization(recipes=["int8"], output_dir=str(tmp_path / "ptq"))
    with pytest.raises(QlightError, match="crafted.ckpt"):  # PTQ reads the best checkpoint the same way
        ptq.run(trainer(tmp_path, [ptq]), DigitsNet(), checkpoint=str(path))
    assert not marker.exists()


def test_a_global_the_user_vouched_for_loads(tmp_path, monkeypatch):
    path = tmp_path / "with_path.ckpt"
    torch.save({"state_dict": {}, "where": pathlib.PosixPath("/data")}, path)
    with pytest.raises(QlightError, match=f"{SAFE_GLOBALS_ENV}=pathlib.PosixPath"):
        load_torch_file(path)
    monkeypatch.setenv(SAFE_GLOBALS_ENV, "pathlib.PosixPath")
    assert load_torch_file(path)["where"] == pathlib.PosixPath("/data")


def rewrite_zip(source: Path, target: Path, edit) -> None:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, edit(item.filename, src.read(item.filename)))


def pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("where", ["weights", "sample_inputs", "shape_expression"])
def test_a_crafted_pt2_runs_no_code(tmp_path, where):
    good = tmp_path / "good.pt2"
    torch.export.save(export_batched(nn.Linear(4, 2), torch.randn(2, 4)), good)  # a symbolic batch size
    marker = tmp_path / "ran.txt"

    def edit(name: str, data: bytes) -> bytes:
        if where == "shape_expression" and name.endswith("models/model.json"):
            # torch's deserializer hands these strings to sympy.sympify, which evaluates Python.
            code = f"__import__('pathlib').Path('{marker}').write_text('ran') or Symbol("
            return data.replace(b'"expr_str": "Symbol(', f'"expr_str": "{code}'.encode(), 1)
        if where == "weights" and name.endswith("weights_config.json"):
            return data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
        if where == "weights" and name.endswith("weights/weight_0"):
            return pickled(RunsCode(marker))
        if where == "sample_inputs" and name.endswith("sample_inputs/model.pt"):
            return pickled(RunsCode(marker))  # torch.export.load unpickles this when weights_only fails
        return data

    crafted = tmp_path / "crafted.pt2"
    rewrite_zip(good, crafted, edit)
    with pytest.raises(QlightError, match="crafted.pt2"):
        load_quantized(crafted)
    assert not marker.exists()
    assert load_quantized(good)(torch.randn(2, 4)).shape == (2, 2)


@pytest.fixture
def int4_file(tmp_path):
    source = ImageClassifier(num_classes=10).eval()
    targets = quantizable_modules(source)
    recipe = parse_recipe("int4")
    model = recipe.quantize(copy.deepcopy(source), targets)
    path = tmp_path / "int4.pt"
    path.write_bytes(quantized_bytes(model, recipe, targets, source, torch.randn(1, 3, 32, 32)))
    return path


def edited(path: Path, edit) -> Path:
    payload = torch.load(path, weights_only=True)
    edit(payload)
    target = path.with_name("edited.pt")
    torch.save(payload, target)
    return target


def first_weight(payload):
    return next(v for v in payload["state_dict"].values() if isinstance(v, dict))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: first_weight(p).update(bits=3), "holds 3-bit codes, but recipe int4 gives it 4 bits"),
        (lambda p: first_weight(p)["scale"].view(-1)[0].fill_(float("nan")), "not finite and positive"),
        (lambda p: first_weight(p)["scale"].view(-1)[0].fill_(-1.0), "not finite and positive"),
        (lambda p: first_weight(p).update(shape=[1, 2, 3, 3]), "has shape"),
        (lambda p: p.update(recipe="int42"), "unknown quantization recipe 'int42'"),
        (lambda p: p.update(format="other/9"), "is not a qlight quantized model file"),
        (lambda p: p["model"].update(class_path="this.Zen"), "asks to import this, which is not imported"),
        (lambda p: p["model"].update(class_path=""), "names no model class"),
        (lambda p: p["model"].update(class_path="qlight.nowhere.Model"), "cannot be imported"),
        (lambda p: p["state_dict"]["model.classifier.6.bias"].fill_(float("nan")), "classifier.6.bias holds NaN"),
        (lambda p: p["state_dict"]["model.features.1.running_var"].fill_(float("inf")), "running_var holds NaN or Inf"),
        (
            lambda p: p["state_dict"].update({"model.classifier.6.bias": torch.zeros(10, dtype=torch.int64)}),
            "is torch.int64",
        ),
        (
            lambda p: first_weight(p).update(codes=torch.zeros(1, dtype=torch.uint8)),
            "does not hold 4-bit codes for shape",
        ),
        (lambda p: p["model"]["init_args"].update(num_classes=10**9), "model.classifier.6.weight has shape"),
        (lambda p: p["model"]["init_args"].update(num_classes=-1), "cannot rebuild qlight.classifier.ImageClassifier"),
    ],
)
def test_an_edited_file_is_refused_in_one_line(int4_file, edit, message):
    sys.modules.pop("this", None)  # importing `this` prints the Zen of Python: it must not happen
    with pytest.raises(QlightError, match=message) as info:
        load_quantized(edited(int4_file, edit))
    assert "\n" not in str(info.value)
    assert "this" not in sys.modules
    assert load_quantized(int4_file) is not None


def test_broken_files_and_another_architecture_are_one_line(int4_file, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(int4_file.read_bytes()[:5000])
    random = tmp_path / "random.pt"
    random.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    for path in (truncated, random):
        with pytest.raises(QlightError, match="not a PyTorch file"):
            load_quantized(path)
    text = tmp_path / "notes.pt"
    text.write_text("not a model, just words\n")  # torch's weights-only unpickler raised IndexError on this
    passwd = tmp_path / "passwd.pt"
    passwd.symlink_to("/etc/passwd")
    for path in (text, passwd):
        with pytest.raises(QlightError, match="not a PyTorch file"):
            load_quantized(path)
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(QlightError, match="not a .pt2 archive or is corrupt"):
        load_quantized(corrupt)
    with pytest.raises(QlightError, match="does not match the model"):
        load_quantized(int4_file, model=DigitsNet())
    with pytest.raises(QlightError, match="baseline checkpoint .* is not a PyTorch file"):
        QuantizationAwareTraining(baseline_ckpt=str(random)).setup(trainer(tmp_path), DigitsNet(), "fit")


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.mean() > 0 else -y  # strict export cannot trace a branch on a value


def test_torch_prints_nothing_before_the_one_line_of_a_bad_pt2_or_an_untraceable_network(tmp_path, capfd):
    source = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    targets, recipe = quantizable_modules(source), parse_recipe("int8")
    weights = quantized_bytes(recipe.quantize(copy.deepcopy(source), targets), recipe, targets, source, None)
    renamed = tmp_path / "int8.pt2"  # a .pt under a .pt2 name
    renamed.write_bytes(weights)
    with pytest.raises(QlightError, match="cannot be loaded as an exported program"):
        load_quantized(renamed)
    with pytest.raises(QlightError, match=r"cannot trace DataDependent at .*: return y if y.mean\(\) > 0"):
        pt2e.prepare(DataDependent(), torch.randn(2, 3, 8, 8), x86_quantizer(8, is_qat=True))
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def nan_checkpoint(tmp_path, digits_checkpoint) -> Path:
    checkpoint = torch.load(digits_checkpoint, weights_only=True)
    checkpoint["state_dict"]["net.3.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.ckpt"
    torch.save(checkpoint, path)
    return path


def test_nan_weights_stop_ptq_and_qat_with_one_line(tmp_path, digits_checkpoint):
    path = nan_checkpoint(tmp_path, digits_checkpoint)
    ptq = PostTrainingQuantization(recipes=["int8", "int4"], output_dir=str(tmp_path / "ptq"))
    with pytest.raises(QlightError, match="NaN or Inf in net.3.weight"):
        trainer(tmp_path, [ptq]).test(DigitsNet(), ckpt_path=str(path))
    assert not (tmp_path / "ptq" / "results.csv").exists()
    qat = QuantizationAwareTraining(weight_bits=4, baseline_ckpt=str(path), output_dir=str(tmp_path / "qat"))
    with pytest.raises(QlightError, match="NaN or Inf in net.3.weight"):
        trainer(tmp_path, [qat], max_epochs=1).fit(DigitsNet())
    assert not (tmp_path / "qat" / "model.pt").exists()


def test_a_recipe_that_overflows_to_inf_is_an_error_row(tmp_path, digits_checkpoint):
    model = DigitsNet.load_from_checkpoint(digits_checkpoint)
    with torch.no_grad():
        model.net[-1].weight.mul_(1e4)  # logits beyond fp16's 65504
    ptq = PostTrainingQuantization(recipes=["fp16", "int8"], output_dir=str(tmp_path))
    trainer(tmp_path, [ptq]).test(model)
    rows = {r["recipe"]: r for r in read_csv(tmp_path / "results.csv")}
    assert rows["fp16"]["error"].startswith("FloatingPointError: non-finite logits") and rows["fp16"]["acc1"] == ""
    assert float(rows["int8"]["acc1"]) > 0.9


def test_learned_scales_stay_positive_on_an_all_zero_layer(tmp_path, digits_checkpoint):
    checkpoint = torch.load(digits_checkpoint, weights_only=True)
    checkpoint["state_dict"]["net.3.weight"].zero_()
    path = tmp_path / "zero.ckpt"
    torch.save(checkpoint, path)
    qat = QuantizationAwareTraining(
        weight_bits=2, learned_scales=True, baseline_ckpt=str(path), output_dir=str(tmp_path)
    )
    model = DigitsNet(lr=0.05)
    trainer(tmp_path, [qat], max_epochs=2).fit(model)
    scales = [m.weight_fake_quantizer.scale for m in model.modules() if hasattr(m, "weight_fake_quantizer")]
    assert min(float(s.min()) for s in scales) > 0
    converted = load_quantized(tmp_path / "model.pt")
    assert float(converted.net[3].weight.scale.min()) > 0


def tiny_classifier() -> ImageClassifier:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(512, 100))
    return ImageClassifier(net, lr=0.01)


def tiny_data() -> CIFAR100DataModule:
    return CIFAR100DataModule(
        synthetic=True, synthetic_train_size=128, synthetic_test_size=32, val_size=32, batch_size=32
    )


def test_a_qat_checkpoint_without_its_callback_is_refused(tmp_path):
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", filename="last")
    qat = QuantizationAwareTraining(weight_bits=4, output_dir=str(tmp_path / "qat"))
    Trainer(max_epochs=1, callbacks=[qat, checkpoints], default_root_dir=tmp_path, logger=False).fit(
        tiny_classifier(), tiny_data()
    )
    plain = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    with pytest.raises(QlightError, match=r"trained with QuantizationAwareTraining \(int4\)"):
        plain.test(tiny_classifier(), tiny_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


def test_resuming_with_learned_scales_flipped_is_one_line(tmp_path, digits_checkpoint):
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", filename="last")
    qat = QuantizationAwareTraining(weight_bits=4, baseline_ckpt=str(digits_checkpoint), output_dir=str(tmp_path))
    trainer(tmp_path, [qat, checkpoints], max_epochs=1).fit(DigitsNet(lr=0.01))
    flipped = QuantizationAwareTraining(weight_bits=4, learned_scales=True, output_dir=str(tmp_path / "flipped"))
    with pytest.raises(QlightError, match="learned_scales=False, this callback has learned_scales=True"):
        trainer(tmp_path, [flipped], max_epochs=2).fit(DigitsNet(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


def test_a_second_writer_of_an_output_dir_is_refused(tmp_path, digits_checkpoint):
    out = tmp_path / "ptq"
    out.mkdir()
    (out / "fp32.pt").write_bytes(b"the other run's model")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".qlight.lock").write_text(f"{socket.gethostname()} {other.pid} PostTrainingQuantization")
        ptq = PostTrainingQuantization(recipes=["int8"], output_dir=str(out))
        with pytest.raises(QlightError, match="being written by another run"):
            trainer(tmp_path, [ptq]).test(DigitsNet.load_from_checkpoint(digits_checkpoint))
        assert (out / "fp32.pt").read_bytes() == b"the other run's model"
    finally:
        other.kill()
        other.wait()
    # The other run is gone (killed): its lock is taken over.
    trainer(tmp_path, [ptq]).test(DigitsNet.load_from_checkpoint(digits_checkpoint))
    assert {r["recipe"] for r in read_csv(out / "results.csv")} == {"fp32", "int8"}
    assert not (out / ".qlight.lock").exists()


def test_the_lock_is_a_plain_file_not_an_executable_one(tmp_path):
    with exclusive_dir(tmp_path, "PostTrainingQuantization"):
        mode = stat.S_IMODE((tmp_path / ".qlight.lock").stat().st_mode)
    assert mode & 0o111 == 0 and mode & 0o600 == 0o600


def test_a_corrupt_archive_is_kept_even_without_checksums(tmp_path):
    archive = tmp_path / "cifar-100-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b not a tarball")
    with pytest.raises(QlightError, match="cannot be extracted"):
        ensure_cifar(tmp_path, download=False, verify_checksums=False)
    assert archive.read_bytes() == b"\x1f\x8b not a tarball"
    assert not (tmp_path / "cifar-100-python").exists()


SMOKE_PTQ = ["fit", "--config", str(ROOT / "configs/ptq.yaml"), "--config", str(ROOT / "configs/smoke.yaml")]
SMOKE_QAT = ["fit", "--config", str(ROOT / "configs/qat_int4.yaml"), "--config", str(ROOT / "configs/smoke.yaml")]


@pytest.mark.parametrize(
    "args, message",
    [
        (SMOKE_PTQ + ["--trainer.callbacks.init_args.recipes=[int1]"], "unknown quantization recipe 'int1'"),
        (SMOKE_PTQ + ["--trainer.callbacks.init_args.recipes=[int9]"], "unknown quantization recipe 'int9'"),
        (SMOKE_PTQ + ["--trainer.callbacks.init_args.recipes=[fp8]"], "unknown quantization recipe 'fp8'"),
        (SMOKE_PTQ + ["--trainer.callbacks.init_args.recipes=[]"], "needs a list of at least one recipe"),
        (SMOKE_PTQ + ["--trainer.callbacks.init_args.methods=[adaround]"], "unknown method 'adaround'; valid: rtn"),
        (SMOKE_PTQ + ["--trainer.callbacks.init_args.calibration_batches=0"], "set calibration_batches to 1 or more"),
        (SMOKE_QAT + ["--trainer.callbacks.init_args.weight_bits=1"], "weight_bits must be between 2 and 8"),
        (SMOKE_QAT + ["--trainer.callbacks.init_args.weight_bits=9"], "weight_bits must be between 2 and 8"),
        (SMOKE_QAT + ["--trainer.callbacks.init_args.start_epoch=-1"], "start_epoch must be 0 or more"),
        (SMOKE_PTQ + ["--model.backbone=resnet"], "unknown backbone 'resnet'"),
    ],
)
def test_bad_cli_settings_end_in_one_error_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"--trainer.logger.init_args.save_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


BILLION_LAUGHS = "\n".join(
    [
        'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)),
    ]
)


@pytest.mark.parametrize("command", [SMOKE_PTQ, ["study", "--config", str(ROOT / "configs/study_smoke.yaml")]])
def test_a_config_with_yaml_aliases_is_refused_before_it_expands(tmp_path, monkeypatch, capsys, command):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)  # 9 levels of 9 aliases: 387 million strings once expanded
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--config", str(bomb)])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("qlight configs take no YAML aliases (*name): write the values out")
    )


def test_a_text_file_as_baseline_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    notes = tmp_path / "notes.ckpt"
    notes.write_text("a baseline? no, my notes\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                *SMOKE_QAT,
                f"--trainer.callbacks.init_args.baseline_ckpt={notes}",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        exit_info.value.code == 2
        and err[-1] == f"error: baseline checkpoint {notes} is not a PyTorch file or is truncated"
    )


def test_a_second_ptq_run_into_a_folder_leaves_no_stale_file_of_the_first(tmp_path, digits_checkpoint):
    out = tmp_path / "ptq"
    model = DigitsNet.load_from_checkpoint(digits_checkpoint)
    for recipes in (["int8", "int4", "mixed@3"], ["int8"]):
        ptq = PostTrainingQuantization(recipes, output_dir=str(out), speed_repeats=0, calibration_batches=2)
        trainer(tmp_path, [ptq]).test(model, verbose=False)
        (out / "notes.txt").write_text("mine")
    assert {p.name for p in out.iterdir()} == {
        "fp32.pt",
        "int8.pt",
        "results.csv",
        "results.md",
        "ptq_files.json",
        "notes.txt",
    }


def test_calibration_without_a_training_batch_and_a_folder_as_checkpoint_say_what_is_wrong(tmp_path):
    data = CIFAR100DataModule(batch_size=32, val_size=1, synthetic=True, synthetic_train_size=2, synthetic_test_size=4)
    ptq = PostTrainingQuantization(["int8_static"], output_dir=str(tmp_path / "ptq"), speed_repeats=0)
    with pytest.raises(QlightError, match="the training loader gave no batch to calibrate with"):
        trainer(tmp_path, [ptq]).test(ImageClassifier(), data, verbose=False)
    with pytest.raises(QlightError, match=f"baseline checkpoint {tmp_path} is a folder, not a file"):
        QuantizationAwareTraining(baseline_ckpt=str(tmp_path)).setup(trainer(tmp_path), DigitsNet(), "fit")


@pytest.mark.parametrize("command", [SMOKE_PTQ, ["study", "--config", str(ROOT / "configs/study_smoke.yaml")]])
def test_an_empty_config_file_is_named_in_one_line(tmp_path, monkeypatch, capsys, command):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--config", str(empty)])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: config {empty} is empty: give it settings, or leave out --config {empty}"
    )


def test_what_a_user_of_the_callbacks_meets_is_said_before_training(tmp_path, capsys):
    # A plan naming a layer the model lacks: refused when fitting starts, not after training.
    plan = tmp_path / "plan.json"
    plan.write_text('{"net.99": 4}')
    ptq = PostTrainingQuantization([f"mixed@{plan}"], output_dir=str(tmp_path / "ptq"))
    fit = trainer(tmp_path, [ptq], max_epochs=1)
    with pytest.raises(QlightError, match="names 'net.99', not a quantizable layer"):
        fit.fit(DigitsNet())
    assert fit.global_step == 0
    # QAT that evaluates every epoch on a split the module has no loader for.
    qat = QuantizationAwareTraining(weight_bits=4, output_dir=str(tmp_path / "qat"))
    with pytest.raises(QlightError, match="has no val_dataloader: set eval_split to a split it has"):
        trainer(tmp_path, [qat], max_epochs=1).fit(type("NoVal", (DigitsNet,), {"val_dataloader": None})())
    # The recipe grammar, every method and granularity, one line each.
    with pytest.raises(SystemExit) as exit_info:
        main(["recipes"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(f"  {m}: " in out for m in ("rtn", "gptq", "bn_reestimation"))
    assert "mixed@<average bits>" in out and "per_kernel_position" in out and qlight.BEST_METHOD in out


def test_reloaded_models_behave_like_modules_and_a_script_class_says_how_to_load(tmp_path, int4_file):
    graph_file = tmp_path / "linear.pt2"
    torch.export.save(export_batched(nn.Linear(4, 2), torch.randn(2, 4)), graph_file)
    graph = load_quantized(graph_file)
    assert graph.eval() is graph and graph.train() is graph and graph.eval()(torch.randn(3, 4)).shape == (3, 2)
    in_a_script = edited(int4_file, lambda p: p["model"].update(class_path="__main__.Tiny"))
    with pytest.raises(
        QlightError, match=r"names __main__.Tiny, which __main__ does not define here: .*model=Tiny\(...\)"
    ):
        load_quantized(in_a_script)
