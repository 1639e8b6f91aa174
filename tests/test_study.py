import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlight import load_quantized
from qlight.cli import main
from qlight.quantization.recipes.plans import realised_plan
from qlight.study import cast_outcomes, epochs_to_match, first_bits_with_gap, fit_bit_curve
from qlight.study.curves import BitCurve
from qlight.study.figures import CAPTIONS, _plot_precision_numerics
from qlight.study.report import build_report
from qlight.study.runner import Study, build_parser
from qlight.tables import read_csv

ROOT = Path(__file__).resolve().parents[1]


def test_bit_curve_recovers_known_parameters():
    bits = [2, 3, 4, 6, 8]
    acc = [0.7 - 3.2 * 4.0**-b for b in bits]
    curve = fit_bit_curve(bits, acc)
    assert curve.plateau == pytest.approx(0.7) and curve.drop == pytest.approx(3.2)
    # 0.7 - 3.2 * 4^-b = 0.69  ->  b = log4(320)
    assert curve.bits_for_gap(reference=0.7, gap=0.01) == pytest.approx(math.log(320, 4))
    # gaps: 2 bits 0.2, 3 bits 0.05, 4 bits 0.0125, 6 bits 0.00078
    assert first_bits_with_gap(bits, acc, reference=0.7, gap=0.01) == 4


def test_a_curve_that_misses_the_points_is_not_a_fit():
    bits = [2, 3, 4, 6, 8]
    follows = [0.7 - 3.2 * 4.0**-b for b in bits]
    assert fit_bit_curve(bits, follows).fits(bits, follows, reference=0.7, tolerance=0.01)
    flat = [0.99] * 5  # nothing falls: no drop to fit
    assert not fit_bit_curve(bits, flat).fits(bits, flat, reference=0.99, tolerance=0.01)
    cliff = [0.10, 0.95, 0.99, 0.99, 0.99]  # a collapse at 2 bits only: 4^-b cannot bend that sharply
    curve = fit_bit_curve(bits, cliff)
    assert curve.max_error(bits, cliff) > 0.1 and not curve.fits(bits, cliff, reference=0.99, tolerance=0.01)
    above = [0.75 - 3.2 * 4.0**-b for b in bits]  # a plateau 5 points above the float model's accuracy
    assert not fit_bit_curve(bits, above).fits(bits, above, reference=0.7, tolerance=0.01)
    assert BitCurve(plateau=0.7, drop=0.02).bits_for_gap(reference=0.7, gap=0.01) is None  # at 0.5 bits


def test_the_numerics_figure_has_a_panel_per_tensor_kind_and_a_colour_per_run():
    shares = {"overflow_share": 0.0, "underflow_share": 1e-4, "subnormal_share": 0.02}
    values = {f"{kind}/{dtype}": shares for kind in ("activation", "gradient") for dtype in ("fp16", "bf16")}
    fig, ax = plt.subplots()
    assert _plot_precision_numerics(
        {"precision": {"16-mixed": {"values": values}, "bf16-mixed": {"values": values}}}, ax
    )
    assert [panel.get_title() for panel in fig.axes] == [
        "activations cast to fp16 / bf16",
        "gradients cast to fp16 / bf16",
    ]
    assert [len(panel.patches) for panel in fig.axes] == [12, 12]  # 3 outcomes x 2 formats x 2 runs
    assert {patch.get_facecolor() for patch in fig.axes[0].patches[:6]} != {
        p.get_facecolor() for p in fig.axes[0].patches[6:]
    }
    plt.close(fig)


def test_first_gap_and_epochs_to_match_on_made_up_numbers():
    assert first_bits_with_gap([8, 6, 4, 3, 2], [0.70, 0.70, 0.695, 0.68, 0.40], reference=0.70) == 3
    assert first_bits_with_gap([8, 4], [0.70, 0.70], reference=0.70) is None
    assert epochs_to_match([0.5, 0.62, 0.66, 0.64], target=0.65) == 3
    assert epochs_to_match([0.5, 0.6], target=0.65) is None
    with pytest.raises(ValueError):
        fit_bit_curve([4, 4], [0.1, 0.2])


def test_cast_outcomes_counts_fp16_and_bf16_limits():
    values = torch.tensor([1.0, 1e5, 1e-9, 1e-6, 0.0, float("inf")])
    fp16 = cast_outcomes(values, torch.float16)
    assert fp16 == {"count": 4, "overflow": 1, "underflow": 1, "subnormal": 1}
    assert cast_outcomes(values, torch.bfloat16) == {"count": 4, "overflow": 0, "underflow": 0, "subnormal": 0}


def test_report_states_bits_saved_and_qat_epochs_against_both_ptq_methods(tmp_path, capsys):
    # Made-up curves acc(b) = 0.9 - drop * 4^-b: RTN (drop 6) crosses 1 point below fp32 at log4(600)
    # bits, the method (drop 0.6) at log4(60); measured, RTN holds down to 5 bits, the method to 3.
    from qlight.tables import write_csv

    best = "gptq+bn_reestimation+bias_correction"
    rows = [{"recipe": "fp32", "bits": 32, "method": "cast", "acc1": 0.9}]
    for bits in (8, 6, 5, 4, 3, 2):
        for method, drop in (("rtn", 6.0), (best, 0.6)):
            name = f"int{bits}" + ("" if method == "rtn" else f"+{best}")
            rows.append({"recipe": name, "bits": bits, "granularity": "per_channel", "method": method})
            rows[-1]["acc1"] = 0.9 - drop * 4.0**-bits
    (tmp_path / "ptq").mkdir()
    write_csv(rows, tmp_path / "ptq" / "results.csv", ["recipe", "bits", "granularity", "method", "acc1"])
    (tmp_path / "qat_int2").mkdir()
    qat = [{"epoch": e, "fake_quant": "on", "acc1": a} for e, a in enumerate((0.80, 0.87, 0.89))]
    write_csv(qat, tmp_path / "qat_int2" / "results.csv", ["epoch", "fake_quant", "acc1"])
    build_report(tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    (saving,) = results["method_savings"]
    assert saving["bits_saved_fitted"] == pytest.approx(math.log(10, 4))
    assert (saving["fewest_bits_rtn"], saving["fewest_bits"], saving["bits_saved_measured"]) == (5, 3, 2)
    q = results["qat"]["2"]
    assert (q["ptq_best"]["recipe"], q["epochs_to_match_ptq_rtn"], q["epochs_to_match_ptq_best"]) == (
        f"int2+{best}",
        1,
        2,
    )
    report = (tmp_path / "report.md").read_text()
    assert f"by {best} over RTN (per_channel): 1.66 by the fits" in report and "2 measured" in report
    assert "| epochs to match PTQ RTN | epochs to match best PTQ |" in report
    assert {"accuracy_vs_bits.png", "qat_epochs.png"} <= {p.name for p in tmp_path.glob("*.png")}


TINY = [
    "--data.synthetic_train_size=256",
    "--data.synthetic_test_size=64",
    "--data.val_size=64",
    "--data.batch_size=32",
    "--baseline.epochs=1",
    "--ptq.recipes=[fp32, bf16, int8, int4, int2, mixed@3]",
    "--ptq.calibration_batches=1",
    "--qat.bits=[4, 2]",
    "--qat.epochs=2",
    "--qat.static=false",
    "--qat.plans=[]",
    "--precision.epochs=1",
    "--precision.sample_every_n_steps=2",
]


def study(tmp_path, *extra, study_dir=None):
    study_dir = study_dir or tmp_path / "study"
    args = ["study", "--config", str(ROOT / "configs/study_smoke.yaml"), f"--study_dir={study_dir}", *TINY, *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def test_smoke_study_end_to_end_and_resume(tmp_path, capsys):
    best = "gptq+bn_reestimation+bias_correction"
    w8a8 = (
        "--ptq.recipes=[fp32, bf16, int8, int4, int2, mixed@3, int8_static]",
        "--qat.static=true",
        f"--qat.plans=[mixed@3+{best}]",
    )
    assert study(tmp_path, "--stages=[baseline, ptq]", *w8a8) == 0
    first = capsys.readouterr().out
    assert "[study] ptq: done" in first and "qat" not in first

    assert study(tmp_path, *w8a8) == 0
    second = capsys.readouterr().out
    assert "[study] baseline: skipped" in second and "[study] ptq: skipped" in second
    assert "[study] qat_int4: done" in second and "[study] qat_w8a8: done" in second
    assert f"[study] qat_mixed@3+{best}: done" in second
    assert "[study] report: done" in second and "[study] qat_fp32: done" in second
    # After the first QAT stage, the time left: 3 more QAT stages, the float control and the precision run.
    left = r"\[study\] qat_int4: done in \d+s\n\[study\] about \d+\.\d min left: \d+ training epochs in 5 stages at "
    assert re.search(left + r"\d+\.\d s/epoch measured so far\n", second), second

    root = tmp_path / "study"
    report = (root / "report.md").read_text()
    for section in (
        "## Post-training quantization",
        "## Mixed precision: bits per layer",
        "## Accuracy vs bit-width",
        "## Quantization-aware training",
        "## fp16 vs bf16",
        "## Plots",
    ):
        assert section in report
    pngs = sorted(root.glob("*.png"))
    assert {"accuracy_vs_size.png", "accuracy_vs_throughput.png"} <= {p.name for p in pngs}
    for png in pngs:
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0.01  # a drawn plot, not blank
        assert f"![{png.stem}]({png.name})\n\n*{CAPTIONS[png.stem]}*" in report  # with what to look for
    results = json.loads((root / "results.json").read_text())
    control = results["float_control"]  # QAT's schedule without fake-quant, and each QAT row against it
    assert control["epochs"] == 2 and f"reaches {100 * control['test_acc1']:.2f}% top-1, against fp32's" in report
    assert "| vs fp32 fine-tuned (pt) |" in report
    # RTN and the best method side by side at every bit-width: two curves, and the bits one saves.
    assert set(results["bit_curves"]) == {"per_channel rtn", f"per_channel {best}"}  # mixed rows are not uniform
    assert set(results["plans"]) == {"mixed@3", f"mixed@3+{best}"}
    assert all(len(plan) == 11 and set(plan.values()) <= set(range(2, 9)) for plan in results["plans"].values())
    assert [s["method"] for s in results["method_savings"]] == [best] and "Bits saved at a 1-point gap" in report
    csv_rows = {r["recipe"]: float(r["acc1"]) for r in read_csv(root / "ptq" / "results.csv")}
    assert {r["recipe"]: r["acc1"] for r in results["ptq"]} == csv_rows
    for recipe, acc in csv_rows.items():
        assert f"| {recipe} | " in report and f"{100 * acc:.2f}" in report
    assert set(results["qat"]) == {"4", "2", f"mixed@3+{best}", "w8a8"}
    assert len(results["qat"]["2"]["acc1_per_epoch"]) == 2
    mixed_row = results["qat"][f"mixed@3+{best}"]  # QAT from that PTQ recipe's plan, compared with it
    assert mixed_row["ptq_best"] == {"recipe": f"mixed@3+{best}", "acc1": csv_rows[f"mixed@3+{best}"]}
    qat_model = load_quantized(root / f"qat_mixed@3+{best}" / "model.pt")
    assert realised_plan(qat_model) == results["plans"][f"mixed@3+{best}"]
    w8a8_row = results["qat"]["w8a8"]  # beside PTQ's int8_static, the same kind of int8 graph
    assert w8a8_row["ptq_rtn"] == {"recipe": "int8_static", "acc1": csv_rows["int8_static"]}
    assert w8a8_row["ptq_best"] is None and w8a8_row["epochs_to_match_ptq_best"] is None
    assert len(w8a8_row["acc1_per_epoch"]) == 2 and (root / "qat_w8a8" / "model.pt2").is_file()
    assert f"| W8A8 | int8_static | {100 * csv_rows['int8_static']:.2f} |" in report
    numerics = results["precision"]["32-true"]["values"]
    assert {"gradient/fp16", "gradient/bf16", "activation/fp16", "activation/bf16"} <= set(numerics)
    assert numerics["gradient/fp16"]["count"] > 0

    # The report is a function of the directory: rebuilt alone, it says the same.
    (root / "report.md").unlink()
    build_report(root)
    assert (root / "report.md").read_text() == report

    # A half-written result is never trusted: a stage is done only by its marker, written last.
    (root / "qat_int2" / "model.pt").write_bytes(b"")
    marker = json.loads((root / "qat_int2" / "stage.json").read_text())
    (root / "qat_int2" / "stage.json").write_text(json.dumps({**marker, "done": False}))
    assert study(tmp_path, "--stages=[qat, report]", *w8a8) == 0
    third = capsys.readouterr().out
    assert "[study] qat_int4: skipped" in third and "[study] qat_int2: resuming" in third
    assert "[study] qat_w8a8: skipped" in third
    rows = read_csv(root / "qat_int2" / "results.csv")
    assert [(r["epoch"], r["fake_quant"]) for r in rows] == [("0", "on"), ("1", "on"), ("2", "converted")]
    assert load_quantized(root / "qat_int2" / "model.pt") is not None


def test_changing_a_later_stage_keeps_the_earlier_ones_and_overwrite_touches_only_study_files(tmp_path, capsys):
    rtn = "--ptq.methods=[rtn]"  # GPTQ's time is not what this test is about
    assert study(tmp_path, "--stages=[baseline, ptq, qat]", "--qat.bits=[4]", "--qat.epochs=1", rtn) == 0
    root = tmp_path / "study"
    baseline = (root / "baseline" / "baseline.ckpt").read_bytes()
    (root / "notes.txt").write_text("mine")
    capsys.readouterr()

    (root / "qat_int4" / "analysis.ipynb").write_text("mine too")  # written after the stage: not the study's

    # Another QAT epoch count: refused without --overwrite, and nothing is touched.
    assert study(tmp_path, "--stages=[baseline, ptq, qat]", "--qat.bits=[4]", "--qat.epochs=2", rtn) == 2
    assert "qat_int4" in capsys.readouterr().err
    # With --overwrite the stage's own files go and it is redone; the user's files stay where they are.
    args = ("--stages=[baseline, ptq, qat]", "--qat.bits=[4]", "--qat.epochs=2", "--overwrite=true", rtn)
    assert study(tmp_path, *args) == 0
    out = capsys.readouterr().out
    assert "[study] baseline: skipped" in out and "[study] ptq: skipped" in out and "[study] qat_int4: done" in out
    assert (root / "baseline" / "baseline.ckpt").read_bytes() == baseline
    assert len(read_csv(root / "qat_int4" / "results.csv")) == 3  # two epochs and the converted row
    assert (root / "notes.txt").read_text() == "mine"
    assert (root / "qat_int4" / "analysis.ipynb").read_text() == "mine too"
    assert "analysis.ipynb" not in json.loads((root / "qat_int4" / "stage.json").read_text())["files"]

    # A stage result deleted after the fact: the report says so and the exit code too; running the
    # stage redoes it although its marker says done.
    (root / "ptq" / "results.csv").unlink()
    capsys.readouterr()
    assert study(tmp_path, "--stages=[report]", "--qat.bits=[4]", "--qat.epochs=2", rtn) == 1
    assert "ptq/results.csv is missing" in (root / "report.md").read_text()
    assert "ptq" in capsys.readouterr().err
    assert study(tmp_path, "--stages=[ptq, report]", "--qat.bits=[4]", "--qat.epochs=2", rtn) == 0
    assert "[study] ptq: results.csv is missing, running it again" in capsys.readouterr().out
    assert (root / "ptq" / "results.csv").is_file()


def test_input_files_enter_the_fingerprints_by_content(tmp_path):
    ckpt, plan = tmp_path / "base.ckpt", tmp_path / "plan.json"
    ckpt.write_bytes(b"weights A")
    plan.write_text(json.dumps({"model.features.0": 4}))
    args = [f"--config={ROOT / 'configs/study_smoke.yaml'}", f"--baseline.ckpt={ckpt}"]
    config = build_parser().parse_args([*args, f"--ptq.recipes=[fp32, mixed@{plan}]", "--qat.plans=[]"])

    def fingerprints():
        return {stage.name: stage.fingerprint for stage in Study(config).stages()}

    before = fingerprints()
    plan.write_text(json.dumps({"model.features.0": 2}))  # same path, another plan: PTQ is redone
    after_plan = fingerprints()
    assert after_plan["baseline"] == before["baseline"] and after_plan["ptq"] != before["ptq"]
    ckpt.write_bytes(b"weights B")  # same path, other weights: everything built on them is redone
    after_ckpt = fingerprints()
    assert all(after_ckpt[name] != after_plan[name] for name in after_ckpt if not name.startswith("precision"))


def test_a_plan_for_another_model_is_refused_before_the_baseline_trains(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model.0": 3}))
    assert study(tmp_path, f"--ptq.recipes=[fp32, mixed@{plan}]") == 2
    assert "names 'model.0', not a quantizable layer of ImageClassifier" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize(
    "folder, marker",
    [("baseline", None), ("ptq", '{"fingerprint": {"x": 1}, "done": true}')],
    ids=["a user folder named like a stage", "a stage.json that lists no files"],
)
def test_overwrite_removes_nothing_the_study_has_no_record_of(tmp_path, capsys, folder, marker):
    user_file = tmp_path / "study" / folder / "mine.ckpt"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("my own model")
    if marker:
        (user_file.parent / "stage.json").write_text(marker)
    assert study(tmp_path, "--stages=[report]", "--overwrite=true") == 2
    err = capsys.readouterr().err
    assert f"refusing to remove {tmp_path / 'study' / folder}" in err and err.count("\n") == 1
    assert user_file.read_text() == "my own model"


@pytest.mark.parametrize("name", ["report.md", "results.json", "errors.json"])
def test_the_study_writes_over_no_file_it_did_not_write(tmp_path, capsys, name):
    user_file = tmp_path / "study" / name
    user_file.parent.mkdir()
    user_file.write_text("the user's")
    for overwrite in ("false", "true"):
        assert study(tmp_path, "--stages=[report]", f"--overwrite={overwrite}") == 2
        err = capsys.readouterr().err
        assert f"{user_file} was not written by this study" in err and "--overwrite" in err
    assert user_file.read_text() == "the user's" and not (tmp_path / "study" / "study_config.json").exists()


def test_overwrite_refuses_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ptq").mkdir()  # a stage folder the study did not mark: it would be removed
    assert study(tmp_path, "--stages=[ptq]", "--overwrite=true", study_dir=".") == 2
    assert "current directory" in capsys.readouterr().err
    assert (tmp_path / "ptq").is_dir()


def test_bad_settings_are_refused_before_any_stage_runs(tmp_path, capsys):
    assert study(tmp_path, "--ptq.recipes=[int9]") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown quantization recipe 'int9'") and "Traceback" not in err
    assert not (tmp_path / "study").exists()
    assert study(tmp_path, "--qat.bits=[9]") == 2
    assert "weight_bits must be between 2 and 8" in capsys.readouterr().err
    assert study(tmp_path, "--trainer={max_epoch: 3}") == 2
    assert "unknown trainer settings ['max_epoch']" in capsys.readouterr().err


def test_a_corrupt_marker_or_a_blocked_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert study(tmp_path, study_dir=tmp_path / "file" / "study") == 2
    assert capsys.readouterr().err.startswith("error: cannot create")
    (tmp_path / "study" / "ptq").mkdir(parents=True)
    (tmp_path / "study" / "ptq" / "stage.json").write_text('{"fingerp')
    assert study(tmp_path, "--stages=[ptq]") == 2
    assert "stages made with other settings (ptq)" in capsys.readouterr().err


def test_failed_stage_is_reported_and_exit_code_says_incomplete(tmp_path, capsys):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    code = study(tmp_path, f"--baseline.ckpt={text}", "--stages=[baseline, ptq, report]")
    assert code == 1
    out = capsys.readouterr()
    assert "[study] baseline: FAILED" in out.out and "incomplete" in out.err
    report = (tmp_path / "study" / "report.md").read_text()
    assert "## Stages that failed" in report and "notes.ckpt" in report
    assert text.read_text() == "not a checkpoint"


def test_precision_stats_counts_gradscaler_changes_on_the_device():
    from types import SimpleNamespace

    from qlight.study import PrecisionStats

    stats = PrecisionStats(every_n_steps=1000)
    scaler = SimpleNamespace(_scale=None)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), global_step=5)
    for value in (65536.0, 32768.0, 32768.0, 65536.0, 16384.0):  # drop, keep, grow, drop
        scaler._scale = torch.tensor(value)
        stats.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.0)}, None, 0)
    summary = stats.summary()["scaler"]
    assert summary == {"skipped_steps": 2, "scale_decreases": 2, "scale_increases": 1, "final_scale": 16384.0}


@pytest.mark.parametrize("devices", [1, 2])
def test_a_study_killed_mid_qat_resumes_at_the_epoch_it_was_in(tmp_path, devices):
    root = tmp_path / "study"
    args = [sys.executable, "-m", "qlight", "study", "--config", str(ROOT / "configs/study_smoke.yaml")]
    args += [f"--study_dir={root}", *TINY, "--stages=[baseline, qat]", "--qat.bits=[4]", "--qat.epochs=3"]
    if devices > 1:  # Lightning's DDP on the CPU (gloo): rank 0 starts rank 1 by running the command again
        args += [f"--trainer.devices={devices}", "--trainer.strategy=ddp"]
    env = {k: v for k, v in os.environ.items() if k != "QLIGHT_STUDY_STAGES"}
    first = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env, start_new_session=True
    )
    last = root / "qat_int4" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)  # every rank, during QAT's second epoch
    first.wait()
    assert last.exists(), "QAT wrote no checkpoint after its first epoch"
    events = sorted((root / "qat_int4" / "tensorboard").glob("events.out.tfevents.*"))

    rerun = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "[study] baseline: skipped" in rerun.stdout and "[study] qat_int4: resuming" in rerun.stdout
    rows = read_csv(root / "qat_int4" / "results.csv")
    assert [(r["epoch"], r["fake_quant"]) for r in rows] == [("0", "on"), ("1", "on"), ("2", "on"), ("3", "converted")]
    # The rerun's own TensorBoard file starts after the first epoch: that epoch was not trained again.
    (new,) = set((root / "qat_int4" / "tensorboard").glob("events.out.tfevents.*")) - set(events)
    steps = [event.step for event in EventAccumulator(str(new)).Reload().Scalars("train/loss")]
    steps_per_epoch = (256 - 64) // 32 // devices  # each rank trains on its shard
    assert steps and min(steps) >= steps_per_epoch, steps
