"""The product around the callbacks on any model and data: DataModules by class path, the user's own
backbone, CIFAR-10 and image folders, and the study under Lightning's DDP."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torchvision.io import write_png

from qlight import CIFAR10DataModule, ImageClassifier, ImageFolderDataModule
from qlight.cli import main
from qlight.data import load_cifar
from qlight.errors import QlightError
from qlight.study.report import build_report
from qlight.tables import read_csv

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# The smoke study on a user's DataModule (tests/digits.py: real 8x8 digits, a plain LightningDataModule)
# and a user's backbone, both given by class path; the last layer stays in float.
USER_STUDY = """
trainer: {accelerator: cpu, devices: 1, precision: 32-true, enable_progress_bar: false, log_every_n_steps: 5}
model: {backbone: digits.DigitsCNN, lr: 0.05, warmup_epochs: 0}
data: {class_path: digits.DigitsData}
baseline: {epochs: 3}
ptq:
  recipes: [fp32, int8, int3, int2, int8_static]
  methods: [rtn, gptq+bn_reestimation+bias_correction]
  calibration_batches: 4
qat: {bits: [3], epochs: 1, lr: 0.005, static: true, plans: []}
precision: {epochs: 1, sample_every_n_steps: 5}
keep_float: [last]
"""


def _exit_code(args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


@pytest.fixture(scope="module")
def user_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_study")
    (root / "study.yaml").write_text(USER_STUDY)
    torch.manual_seed(0)
    code = _exit_code(["study", "--config", str(root / "study.yaml"), f"--study_dir={root / 'study'}"])
    return root, code


def test_the_study_runs_on_a_user_model_and_datamodule_given_by_class_path(user_study):
    root, code = user_study
    study = root / "study"
    assert code == 0, (study / "errors.json").read_text()
    report = (study / "report.md").read_text()
    parameters = sum(p.numel() for p in ImageClassifier("digits.DigitsCNN", num_classes=10).parameters())
    assert f"Model: digits.DigitsCNN ({parameters:,} parameters, 10 classes); data: DigitsData" in report
    assert "layers kept in float: last" in report
    assert "on 397 test images: one image is 0.25 points." in report  # what a difference of one image weighs
    assert "≈: within one test image of fp32 (0.25 points)" in report and "| +0.00 | " in report  # fp32's own row
    marked = [line for line in report.splitlines() if " ≈ |" in line]
    assert marked and all(abs(float(line.split(" ≈ |")[0].rsplit("| ", 1)[1])) <= 0.26 for line in marked)
    assert "Every Conv2d and Linear but the last (kept in float); sizes" in report  # PTQ
    assert "fake-quant on every Conv2d and Linear but the last (kept in float)" in report  # QAT
    rows = {r["recipe"]: r for r in read_csv(study / "ptq" / "results.csv")}
    assert rows["fp32"]["kept_float"] == "" and float(rows["fp32"]["acc1"]) > 0.9  # real digits, trained
    for name in ("int8", "int3", "int2", "int8_static"):
        assert rows[name]["kept_float"] == "model.head.3" and not rows[name]["error"]
    for stage in ("qat_int3", "qat_w8a8"):
        (converted,) = [r for r in read_csv(study / stage / "results.csv") if r["fake_quant"] == "converted"]
        assert converted["kept_float"] == "model.head.3"


def test_a_second_report_replaces_the_first_in_tensorboard(user_study):
    study = user_study[0] / "study"
    events = sorted(p.name for p in (study / "tensorboard").glob("events.out.tfevents.*"))
    build_report(study)
    again = sorted(p.name for p in (study / "tensorboard").glob("events.out.tfevents.*"))
    assert len(again) == len(events) > 0 and again != events
    scalars = EventAccumulator(str(study / "tensorboard")).Reload()
    series = scalars.Scalars("study/acc1_vs_bits/per_channel_rtn")
    assert [event.step for event in series] == [2, 3, 8]  # int2, int3, int8 of one method: one chart


def test_the_study_under_ddp_gives_the_ptq_table_of_one_process(user_study, tmp_path):
    root, _ = user_study
    ckpt = root / "study" / "baseline" / "baseline.ckpt"
    args = [
        "study",
        "--config",
        str(root / "study.yaml"),
        f"--baseline.ckpt={ckpt}",
        "--stages=[baseline, ptq, report]",
        "--data.init_args.shuffle=false",  # the same calibration batches in both runs
    ]
    assert _exit_code([*args, f"--study_dir={tmp_path / 'one'}"]) == 0
    # Lightning's DDP starts the second process by running the command again: a real command line.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    env.pop("QLIGHT_STUDY_STAGES", None)
    ddp = [*args, f"--study_dir={tmp_path / 'two'}", "--trainer.devices=2", "--trainer.strategy=ddp"]
    out = subprocess.run(
        [sys.executable, "-m", "qlight", *ddp], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("[study] ptq: done") == 1  # one rank speaks and writes

    def table(folder):
        keep = ("recipe", "bits", "acc1", "acc5", "size_bytes", "quantized_params", "kept_float", "note", "error")
        rows = [{k: row[k] for k in keep} for row in read_csv(tmp_path / folder / "ptq" / "results.csv")]
        # A .pt2's deflated graph JSON holds Python ids (nn_module_stack) and a random serialization id:
        # its size differs by a few bytes between processes. Its graph is compared by accuracy.
        return [{**row, "size_bytes": None} if row["recipe"] == "int8_static" else row for row in rows]

    assert table("two") == table("one") and len(table("one")) == 8
    assert json.loads((tmp_path / "two" / "errors.json").read_text()) == {}
    assert (tmp_path / "two" / "report.md").is_file()


def test_the_cli_takes_any_datamodule_and_the_classes_come_from_the_data(tmp_path):
    backbone = '{"class_path": "digits.DigitsCNN"}'
    fit = ["fit", "--data=digits.DigitsData", f"--model.backbone={backbone}", "--trainer.max_steps=2"]
    fit += [
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    main([*fit, f"--trainer.logger.init_args.save_dir={tmp_path}", "--model.num_classes=100"])
    (ckpt,) = tmp_path.rglob("last.ckpt")
    hparams = torch.load(ckpt, weights_only=False)["hyper_parameters"]
    assert hparams["num_classes"] == 10 and hparams["backbone"] == {"class_path": "digits.DigitsCNN"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("torch.nn.Linear", "torch.nn.Linear is not a LightningDataModule"),
        ("nosuch.Data", "cannot import DataModule nosuch.Data"),
        ("Cifar", "unknown DataModule 'Cifar': give its class path"),
    ],
)
def test_a_data_class_path_that_is_not_a_datamodule_is_one_line(tmp_path, capsys, data, message):
    for command in ("fit", "study"):
        assert _exit_code([command, f"--data={data}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err


class TenOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def test_logits_that_do_not_match_the_classes_are_one_line():
    model = ImageClassifier(TenOutputs(), num_classes=12)
    with pytest.raises(QlightError, match=r"returns \(4, 10\) .* model.num_classes is 12") as info:
        model.training_step((torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), 0)
    assert "\n" not in str(info.value)


def test_a_model_built_for_other_classes_than_the_data_is_one_line(tmp_path):
    data = CIFAR10DataModule(synthetic=True, synthetic_train_size=64, synthetic_test_size=32, val_size=32)
    model = ImageClassifier(TenOutputs(), num_classes=12)
    trainer = Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    with pytest.raises(
        QlightError, match="^model.num_classes is 12 but the data has 10 classes: set model.num_classes 10$"
    ):
        trainer.fit(model, data)


def _image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=4, size=(12, 10)) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = torch.randint(0, 60, (3, *size), generator=generator, dtype=torch.uint8) + 60 * index
                write_png(image, str(folder / f"{i}.png"))
    return root


def test_an_image_folder_is_read_resized_and_trained_on(tmp_path):
    root = _image_folder(tmp_path / "images")
    (root / "train" / "cat" / "notes.txt").write_text("not an image: ignored")
    data = ImageFolderDataModule(str(root), image_size=8, batch_size=4)
    assert (data.num_classes, data.classes) == (3, ["cat", "dog", "fox"])
    data.setup("fit")
    images, labels = data.train_set.tensors
    assert images.shape == (12, 3, 8, 8) and images.dtype == torch.uint8
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    # Each class is brighter than the one before: the pixels are the files', resized.
    means = [float(images[labels == c].float().mean()) for c in range(3)]
    assert means[0] + 40 < means[1] < means[2] - 40
    assert data.mean[0] == pytest.approx(float(images[:, 0].float().mean()) / 255, rel=1e-4)
    model = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 3)), num_classes=3, lr=0.01)
    trainer = Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, data)
    assert torch.isfinite(trainer.callback_metrics["val/acc1"])


def test_image_folder_mistakes_are_one_line(tmp_path):
    root = _image_folder(tmp_path / "images")
    (root / "val" / "cow").mkdir()
    with pytest.raises(QlightError, match="val has classes that train/ lacks: cow"):
        ImageFolderDataModule(str(root))
    (root / "val" / "cow").rmdir()
    (root / "train" / "dog" / "1.png").write_bytes(b"\x89PNG broken")
    data = ImageFolderDataModule(str(root))
    with pytest.raises(QlightError, match=r"dog/1.png cannot be read as an image") as info:
        data.setup("fit")
    assert "\n" not in str(info.value)
    with pytest.raises(QlightError, match="must hold train/<class>/<image> and val/<class>/<image>"):
        ImageFolderDataModule(str(tmp_path / "elsewhere"))


class TinyRGB(nn.Module):
    """A user's backbone for RGB images of any size."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    def forward(self, x):
        return self.net(x)


def test_the_cli_takes_the_classes_of_an_image_folder(tmp_path):
    root = _image_folder(tmp_path / "images")
    args = ["fit", "--data=ImageFolderDataModule", f"--data.root={root}", "--data.image_size=8", "--data.batch_size=4"]
    args += ["--model.backbone=test_any_data.TinyRGB", "--trainer.max_steps=1", "--trainer.accelerator=cpu"]
    main([*args, f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    (ckpt,) = tmp_path.rglob("last.ckpt")
    assert torch.load(ckpt, weights_only=False)["hyper_parameters"]["num_classes"] == 3


def _write_cifar10(root: Path, n: int = 8) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}, protocol=2))
    return root


def test_cifar10_is_read_from_its_own_format(tmp_path):
    root = _write_cifar10(tmp_path / "data")
    data = CIFAR10DataModule(str(root), val_size=8, verify_checksums=False, download=False, batch_size=8)
    data.prepare_data()
    data.setup("fit")
    assert data.num_classes == 10 and len(data.train_set) == 32 and len(data.test_set) == 8
    images, labels = load_cifar(root, train=False, dataset="cifar10")
    raw = pickle.loads((root / "cifar-10-batches-py" / "test_batch").read_bytes())
    assert torch.equal(images[2], torch.from_numpy(raw["data"][2].reshape(3, 32, 32)))
    assert labels.tolist() == raw["labels"]
    raw["labels"][0] = 10
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(raw, protocol=2))
    with pytest.raises(QlightError, match=r"labels outside 0..9"):
        load_cifar(root, train=False, dataset="cifar10")


def test_synthetic_sizes_are_bounded():
    with pytest.raises(QlightError, match="synthetic_train_size must be between 1 and 1,000,000, got 1000000000000"):
        CIFAR10DataModule(synthetic=True, synthetic_train_size=10**12)
