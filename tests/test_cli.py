import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlight import load_quantized
from qlight.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--data.synthetic_train_size=384",
    "--data.synthetic_test_size=128",
    "--data.val_size=128",
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.log_every_n_steps=1",
]


def test_fit_smoke_config_writes_events_checkpoint_and_val_accuracy(tmp_path):
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/vgg11_cifar100.yaml"),
            "--config",
            str(ROOT / "configs/smoke.yaml"),
            *TINY,
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    run_dir = tmp_path / "vgg11_cifar100" / "version_0"
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events, list(tmp_path.rglob("*"))
    scalars = EventAccumulator(str(events[0])).Reload().Tags()["scalars"]
    assert {"val/acc1", "val/acc5", "train/loss"} <= set(scalars)
    checkpoints = list((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert len(checkpoints) == 1
    ckpt = torch.load(checkpoints[0], weights_only=False)
    assert ckpt["hyper_parameters"]["backbone"] == "vgg11_bn"
    assert any("val/acc1" in str(key) for key in ckpt["callbacks"])


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "qlight", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands(tmp_path):
    out = _run("--help", cwd=tmp_path)
    assert out.returncode == 0
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out.stdout


@pytest.mark.parametrize("command", ["fit", "study"])
def test_help_names_the_backbone_forms_without_every_module_subclass(tmp_path, command):
    out = _run(command, "--help", cwd=tmp_path)
    assert out.returncode == 0 and "torchvision:<name>" in out.stdout
    assert "torch.nn.Identity" not in out.stdout  # jsonargparse lists every nn.Module subclass for a Module type


def test_missing_dataset_is_one_clear_line(tmp_path):
    out = _run(
        "fit",
        "--config",
        str(ROOT / "configs/vgg11_cifar100.yaml"),
        "--data.data_dir",
        str(tmp_path / "empty"),
        "--data.download=false",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: CIFAR-100 not found") and "cifar-100-python.tar.gz" in last


def test_unknown_config_key_is_rejected_by_name(tmp_path):
    out = _run("fit", "--config", str(ROOT / "configs/smoke.yaml"), "--model.learning_rate=1", cwd=tmp_path)
    assert out.returncode != 0 and "learning_rate" in out.stderr and "Traceback" not in out.stderr


def test_qat_int4_smoke_through_the_cli_writes_a_loadable_int4_model(tmp_path):
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/qat_int4.yaml"),
            "--config",
            str(ROOT / "configs/smoke.yaml"),
            *TINY,
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    qat_dir = tmp_path / "qat_int4" / "version_0" / "qat"
    rows = (qat_dir / "results.csv").read_text().splitlines()
    assert [r.split(",")[2] for r in rows[1:]] == ["on", "converted"]  # one epoch, then the converted model
    model = load_quantized(qat_dir / "model.pt")  # rebuilt from the hyperparameters LightningCLI saved
    weight = model.model.features[4].weight  # the second conv
    groups = weight.qdata.permute(0, 2, 3, 1).reshape(-1, weight.qdata.shape[1])
    assert max(len(torch.unique(g)) for g in groups) <= 16


def test_ptq_smoke_composes_into_one_short_ptq_callback(capsys):
    configs = ["configs/ptq.yaml", "configs/smoke.yaml", "configs/ptq_smoke.yaml"]
    with pytest.raises(SystemExit):
        main(["fit", *(f"--config={ROOT / config}" for config in configs), "--print_config"])
    (callback,) = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    args = callback["init_args"]
    assert callback["class_path"] == "qlight.PostTrainingQuantization" and len(args["recipes"]) == 8
    assert (args["granularity"], args["methods"], args["calibration_batches"]) == ("per_channel", ["rtn"], 2)
