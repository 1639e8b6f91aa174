"""The benchmark's code on tiny sizes, so that it cannot rot (its numbers live in BENCHMARKS.md)."""

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from qlight import CIFAR100DataModule, ImageClassifier
from qlight.tables import read_csv


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_end_to_end_on_tiny_sizes(tmp_path, capsys, monkeypatch):
    bench = load_benchmark("bench")
    printed_before_ptq = []
    ptq_seconds = bench.ptq_seconds

    def ptq_seconds_after_reading_stdout(args):
        printed_before_ptq.append(capsys.readouterr().out)
        return ptq_seconds(args)

    monkeypatch.setattr(bench, "ptq_seconds", ptq_seconds_after_reading_stdout)
    summary = bench.main(
        [
            "--quick",
            "--steps=2",
            "--warmup=1",
            "--repeats=1",
            "--host-steps=2",
            "--host-repeats=2",
            "--batch-size=4",
            "--images=64",
            "--test-images=16",
            f"--workdir={tmp_path}",
            "--recipes",
            "fp32",
            "int4",
            "--inference",
            "fp32",
            "int8",
            "--skip-cpu-int8",  # (k) compiles VGG-11; tests/test_runtimes.py covers those runtimes
        ]
    )
    assert set(summary["train_images_per_s"]) == {
        "plain loop",
        "qlight fit",
        "qlight fit + QAT int4 weights",
        "qlight fit + QAT int4 w + int8 act",
        "data path (load + augment)",
    }
    assert all(v > 0 for v in summary["train_images_per_s"].values())
    assert all(summary[key] > 0 for key in ("fit_vs_plain", "qat_vs_plain", "qat_act_vs_plain", "qat_act_vs_fit"))
    assert set(summary["ptq_seconds"]) == {"fp32", "int4"} and set(summary["inference_images_per_s"]) == {
        "fp32",
        "int8",
    }
    assert len(summary["fake_quant_host_ms"]) == 4 and len(summary["host_ms_per_step"]) == 6
    assert all(v > 0 for v in summary["host_ms_per_step"].values())
    assert all(summary[key] > 0 for key in ("fit_host_vs_plain", "qat_host_vs_fit", "qat_act_host_vs_fit"))
    assert summary["qat_act_host_vs_fit_compiled"] is None  # --host-compiled is off: nothing compiles here
    assert summary["int8_vs_fp32"] is None
    assert set(summary["w8a8_train_images_per_s"]) == {"float", "W8A8 QAT"} and summary["w8a8_device"] == "cpu"
    assert summary["syncs_per_step"] is None  # counted on a GPU only
    assert set(summary["w8a8_cpu_inference_images_per_s"]) == {"W8A8 QAT (converted)", "PTQ int8_static"}
    assert summary["w8a8_step_vs_float"] > 0 and summary["w8a8_int8_vs_ptq"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"device"')
    # Each section is out when it is measured: the training table before PTQ starts.
    assert "training (images/s)" in printed_before_ptq[0] and '{"device"' not in printed_before_ptq[0]
    assert (tmp_path / "ptq" / "results.csv").is_file() and (tmp_path / "qat" / "model.pt").is_file()
    assert (tmp_path / "qat_w8a8" / "model.pt2").is_file()


def test_ptq_sweep_benchmark_runs_on_tiny_sizes(tmp_path, capsys):
    ptq_sweep = load_benchmark("ptq_sweep")
    args = ["--recipes", "fp32", "int4", "--methods", "rtn+bias_correction", "--calibration-batches=1"]
    summary = ptq_sweep.main([*args, "--batch-size=4", "--test-images=8", f"--workdir={tmp_path}"])
    assert list(summary["seconds"]) == ["fp32", "int4+bias_correction"] and summary["wall_seconds"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"device"')
    assert (tmp_path / "ptq" / "int4+bias_correction.pt").is_file()


def test_sensitivity_benchmark_runs_on_tiny_sizes(tmp_path, capsys):
    bench = load_benchmark("sensitivity")
    summary = bench.main(["--images=8", "--batch-size=4", "--bits", "2", "8", f"--workdir={tmp_path}"])
    assert (summary["layers"], summary["images"]) == (11, 8) and summary["wall_seconds"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"device"')
    assert len(read_csv(tmp_path / "sensitivity" / "sensitivity.csv")) == 22


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_host_repeats_and_steps_must_be_positive(capsys, value):
    bench = load_benchmark("bench")
    for flag in ("--host-repeats", "--host-steps"):
        with pytest.raises(SystemExit):
            bench.parse_args([flag, value])
        assert f"{flag}: must be a whole number of at least 1" in capsys.readouterr().err


def test_gpu_check_summary_reads_each_steps_figures():
    gpu_check = load_benchmark("gpu_check")
    bench = {"fit_vs_plain": 0.97, "qat_vs_plain": 1.1, "w8a8_step_vs_float": 1.6, "syncs_per_step": {"fit": 0.0}}
    results = {
        "bench": {"rc": 0, "seconds": 90.0, "lines": ["training (images/s)", json.dumps(bench)]},
        "ptq_sweep": {"rc": 0, "seconds": 50.0, "lines": ['{"wall_seconds": 41.2}']},
        "sensitivity": {"rc": 0, "seconds": 12.0, "lines": ['{"wall_seconds": 2.5}']},
        "w8a8_cli": {"rc": 0, "seconds": 20.0, "lines": []},
        "study": {
            "rc": 1,
            "seconds": 80.0,
            "lines": ["[study] baseline: done in 9s", "[study] qat_w8a8: FAILED after 3s: QlightError: x"],
        },
    }
    summary = gpu_check.summarize(results)
    assert (summary["fit_vs_plain"], summary["w8a8_step_vs_float"], summary["qat_act_vs_plain"]) == (0.97, 1.6, None)
    assert (summary["ptq_sweep_seconds"], summary["sensitivity_seconds"], summary["w8a8_cli_ok"]) == (41.2, 2.5, True)
    assert summary["study_stage_seconds"] == {"baseline": 9.0, "qat_w8a8": None} and not summary["study_complete"]
    results["study"] = {"rc": 0, "seconds": 80.0, "lines": ["[study] baseline: done in 9s"]}
    assert gpu_check.summarize(results)["study_complete"]


def test_sync_counter_counts_the_sync_warnings_of_its_steps_by_call_site(tmp_path, monkeypatch):
    # On a GPU torch's sync debug mode warns at every synchronizing call; here a callback warns as it would.
    bench = load_benchmark("bench")
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    class Syncs(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    counter = bench.SyncCounter(2, 5)
    data = CIFAR100DataModule(batch_size=4, val_size=0, synthetic=True, synthetic_train_size=64, synthetic_test_size=8)
    trainer = Trainer(
        accelerator="cpu", max_steps=7, logger=False, enable_checkpointing=False, callbacks=[counter, Syncs()]
    )
    trainer.fit(ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3072, 100))), data)
    assert modes == ["warn", "default"]
    assert list(counter.sites.values()) == [3] and next(iter(counter.sites)).startswith("test_bench.py:")
