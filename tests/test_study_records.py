"""What the study records as its own, what it reads back and what it refuses: study folders built by hand
(stage.json records, made-up result files), so that no test here trains."""

import json
import os
from pathlib import Path

import pytest
import torch
from test_study import ROOT, TINY, study

from qlight.classifier import ImageClassifier
from qlight.errors import QlightError
from qlight.files import exclusive_dir
from qlight.quantization.callbacks.ptq import _replace_manifest
from qlight.quantization.recipes.base import quantizable_modules
from qlight.study.results import collect
from qlight.study.runner import Stage, Study, build_parser
from qlight.tables import write_csv


def _config(*extra):
    return build_parser().parse_args([f"--config={ROOT / 'configs/study_smoke.yaml'}", *TINY, *extra])


def _one_line(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _stage_json(folder: Path, fingerprint, files, done=True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stage.json").write_text(json.dumps({"fingerprint": fingerprint, "files": files, "done": done}))


# --- W04: a stage records as its own only what it wrote ------------------------------------------


def test_a_rerun_stage_does_not_record_the_users_files_as_its_own(tmp_path):
    study_ = Study(_config(f"--study_dir={tmp_path}"))
    folder = tmp_path / "ptq"
    fail = {"now": False}

    def run():
        (folder / "results.csv").write_text("recipe\nfp32\n")
        (folder / "model.pt").write_bytes(b"weights")
        if fail["now"]:
            raise RuntimeError("a stage that fails after writing")

    stage = Stage("ptq", {"x": 1}, run)
    assert study_._run_stage(stage) is not None
    first = json.loads((folder / "stage.json").read_text())["files"]
    assert set(first) == {"results.csv", "model.pt", "stage.json"}

    (folder / "my_analysis.ipynb").write_text("mine")  # after the stage finished
    (folder / "results.csv").unlink()  # its result gone: the same settings run it again
    fail["now"] = True
    assert study_._run_stage(stage) is None
    (folder / "my_notes.txt").write_text("mine too")  # after the failed start
    fail["now"] = False
    assert study_._run_stage(stage) is not None
    files = json.loads((folder / "stage.json").read_text())["files"]
    assert set(files) == {"results.csv", "model.pt", "stage.json"}

    # --overwrite with other settings removes the stage's files and nothing else.
    changed = Stage("ptq", {"x": 2}, run)
    study_._remove_stages([changed])
    assert sorted(p.name for p in folder.iterdir()) == ["my_analysis.ipynb", "my_notes.txt"]


# --- W05, W06, W12: the top-level names --------------------------------------------------------------


def test_the_manifest_lists_what_the_study_wrote_and_a_users_report_is_kept(tmp_path, capsys):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")  # the baseline stage fails at once: a run that writes no report
    assert study(tmp_path, f"--baseline.ckpt={text}", "--stages=[baseline]") == 1
    root = tmp_path / "study"
    manifest = json.loads((root / "study_files.json").read_text())
    assert manifest == ["errors.json", "logs", "study_config.json", "study_files.json"]
    (root / "report.md").write_text("# my own report")
    (root / "tensorboard").mkdir()
    (root / "tensorboard" / "events.out.tfevents.1.mine").write_text("x")
    capsys.readouterr()
    assert study(tmp_path, f"--baseline.ckpt={text}", "--stages=[report]") == 2
    _one_line(capsys, f"{root / 'report.md'} was not written by this study")
    assert (root / "report.md").read_text() == "# my own report"
    assert (root / "tensorboard" / "events.out.tfevents.1.mine").is_file()


@pytest.mark.parametrize("name", ["tensorboard", "logs"])
def test_a_claimed_folder_that_is_a_symlink_is_refused(tmp_path, capsys, name):
    root, outside = tmp_path / "study", tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "events.out.tfevents.123.user").write_text("the user's run")
    root.mkdir()
    (root / "study_files.json").write_text(json.dumps(["study_files.json", "tensorboard", "logs"]))
    (root / name).symlink_to(outside)
    assert study(tmp_path, "--stages=[report]") == 2
    _one_line(capsys, f"{root / name} is a symlink")
    assert sorted(p.name for p in outside.iterdir()) == ["events.out.tfevents.123.user"]


def test_the_report_alone_deletes_no_event_file_through_a_symlink(tmp_path):
    from qlight.study.report import build_report

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "events.out.tfevents.123.user").write_text("the user's run")
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "tensorboard").symlink_to(outside)
    with pytest.raises(QlightError, match="is a symlink"):
        build_report(tmp_path / "study")
    assert sorted(p.name for p in outside.iterdir()) == ["events.out.tfevents.123.user"]


# --- W11, W13, W16: what --overwrite refuses to remove -----------------------------------------------


def test_overwrite_never_deletes_a_plan_file_the_settings_read(tmp_path, capsys):
    model = ImageClassifier(num_classes=100)
    plan = tmp_path / "study" / "ptq" / "mixed@3.plan.json"
    _stage_json(plan.parent, {"x": 1}, ["mixed@3.plan.json", "results.csv"])
    plan.write_text(json.dumps({name: 8 for name in quantizable_modules(model)}))  # edited by the user
    (plan.parent / "results.csv").write_text("recipe\n")
    recipes = f"--ptq.recipes=[fp32, mixed@{plan}]"
    assert study(tmp_path, recipes, "--qat.plans=[]", "--stages=[ptq, report]", "--overwrite=true") == 2
    _one_line(capsys, f"refusing to overwrite {plan.parent}: it holds {plan}, which --ptq.recipes")
    assert plan.is_file() and (plan.parent / "results.csv").is_file()


def test_overwrite_refuses_a_stage_folder_that_is_a_symlink_and_says_so(tmp_path, capsys):
    other = tmp_path / "other_study" / "ptq"
    _stage_json(other, {"x": 1}, ["results.csv"])
    (other / "results.csv").write_text("recipe\n")
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "ptq").symlink_to(other)
    assert study(tmp_path, "--stages=[ptq]", "--overwrite=true") == 2
    _one_line(capsys, f"refusing to remove {tmp_path / 'study' / 'ptq'}: it is a symlink")
    assert (other / "results.csv").is_file() and (other / "stage.json").is_file()


def test_overwrite_refuses_to_remove_a_stage_that_this_run_would_not_redo(tmp_path, capsys):
    ptq = tmp_path / "study" / "ptq"
    _stage_json(ptq, {"x": 1}, ["results.csv"])
    (ptq / "results.csv").write_text("recipe\n")
    assert study(tmp_path, "--stages=[report]", "--overwrite=true") == 2
    _one_line(capsys, f"refusing to remove {ptq}: made with other settings", "add ptq to --stages")
    assert (ptq / "results.csv").is_file()


# --- W09, W10 and the report's plans: what the report reads ----------------------------------------------


def _fake_results(root: Path, stages: dict[str, Stage]) -> None:
    """A finished study of ``stages`` in made-up numbers."""
    _stage_json(root / "baseline", stages["baseline"].fingerprint, ["baseline.json"])
    baseline = {"checkpoint": "b.ckpt", "parameters": 10, "test_acc1": 0.9, "test_acc5": 1.0, "test_images": 100}
    (root / "baseline" / "baseline.json").write_text(json.dumps(baseline))
    _stage_json(root / "ptq", stages["ptq"].fingerprint, ["results.csv"])
    rows = [
        {"recipe": "fp32", "bits": 32, "granularity": "", "method": "cast", "acc1": 0.9},
        {"recipe": "int2", "bits": 2, "granularity": "per_channel", "method": "rtn", "acc1": 0.5},
        {"recipe": "mixed@3", "bits": 3, "granularity": "per_channel", "method": "rtn", "acc1": 0.8},
    ]
    write_csv(rows, root / "ptq" / "results.csv", list(rows[0]))
    (root / "ptq" / "mixed@3.plan.json").write_text(json.dumps({"model.features.0": 3}))
    (root / "ptq" / "mine.plan.json").write_text(json.dumps({"model.features.0": 8}))  # the user's


def _qat(folder: Path, fingerprint, acc1: float) -> None:
    _stage_json(folder, fingerprint, ["results.csv"])
    rows = [{"epoch": 0, "fake_quant": "on", "acc1": acc1}, {"epoch": 1, "fake_quant": "converted", "acc1": acc1}]
    write_csv(rows, folder / "results.csv", list(rows[0]))


def test_the_report_reads_only_stages_built_on_the_current_baseline(tmp_path):
    root = tmp_path / "study"
    args = ["--qat.bits=[2]", "--qat.float_control=false", "--ptq.recipes=[fp32, int2, mixed@3]"]
    stages = {stage.name: stage for stage in Study(_config(f"--study_dir={root}", *args)).stages()}
    _fake_results(root, stages)
    _qat(root / "qat_int2", stages["qat_int2"].fingerprint, 0.85)  # this configuration's
    same_baseline = {**stages["qat_int2"].fingerprint, "qat": {"bits": 3}}
    _qat(root / "qat_int3", same_baseline, 0.87)  # an earlier configuration's, on this baseline
    _qat(root / "qat_int4", {"baseline": {"epochs": 1}, "qat": {"bits": 4}}, 0.89)  # on an older baseline
    _qat(root / "qat_int4.bak", stages["qat_int2"].fingerprint, 0.1)  # the user's copy of a stage folder
    _qat(root / "qat_fp32", {"baseline": {"epochs": 1}, "qat": {}}, 0.1)  # an old float control

    assert study(tmp_path, "--stages=[report]", *args) == 0
    results = json.loads((root / "results.json").read_text())
    assert set(results["qat"]) == {"2", "3"} and results["float_control"] is None
    assert set(results["plans"]) == {"mixed@3"}  # a plan of a recipe PTQ ran; mine.plan.json is not one
    # Read alone, the folder gives every stage folder but the user's copy.
    assert set(collect(root)["qat"]) == {"2", "3", "4"}


# --- W17: the data's contents ----------------------------------------------------------------------


def test_new_images_under_the_same_root_redo_every_stage(tmp_path):
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / "imgs" / split / label).mkdir(parents=True)
            (tmp_path / "imgs" / split / label / "0.png").write_bytes(b"an image")
    data = ["--data.class_path=qlight.data.ImageFolderDataModule", f"--data.init_args.root={tmp_path / 'imgs'}"]

    def fingerprints():
        return {stage.name: stage.fingerprint for stage in Study(_config(*data)).stages()}

    before = fingerprints()
    assert fingerprints() == before  # stat only: the same files give the same fingerprint
    (tmp_path / "imgs" / "train" / "a" / "1.png").write_bytes(b"a new image")
    after = fingerprints()
    assert set(after) == set(before) and all(after[name] != before[name] for name in after)


# --- Z02, Y03, Y04, W07, W08: locks and PTQ's own record ----------------------------------------------


def test_a_second_study_on_the_same_folder_is_refused_before_any_work(tmp_path, capsys):
    root = tmp_path / "study"
    with exclusive_dir(root, "another study"):  # held by a live process: this one
        assert study(tmp_path, "--stages=[report]") == 2
        _one_line(capsys, f"{root} is being written by another run")
    assert sorted(p.name for p in root.iterdir()) == []


@pytest.mark.parametrize("kind", ["folder", "symlink"])
def test_a_lock_that_qlight_did_not_write_is_one_short_line(tmp_path, kind):
    lock = tmp_path / "out" / ".qlight.lock"
    lock.parent.mkdir()
    big = tmp_path / "big.txt"
    big.write_text("secret " * 100_000)
    lock.mkdir() if kind == "folder" else lock.symlink_to(big)
    with pytest.raises(QlightError, match=f"is a {kind}, not a lock") as err, exclusive_dir(lock.parent, "test"):
        pass
    assert len(str(err.value)) < 300 and "secret" not in str(err.value)
    assert lock.exists() and big.stat().st_size == 700_000


def test_ptqs_record_never_removes_its_lock_or_a_folder(tmp_path):
    out = tmp_path / "ptq"
    (out / "mydata").mkdir(parents=True)
    (out / "mydata" / "keep.txt").write_text("keep")
    for name in (".qlight.lock", "int4.pt", "fp32.pt"):
        (out / name).write_text(name)
    (out / "ptq_files.json").write_text(json.dumps(["mydata", ".qlight.lock", "int4.pt", "fp32.pt"]))
    _replace_manifest(out, {"fp32.pt", "ptq_files.json"})
    assert sorted(p.name for p in out.iterdir()) == [".qlight.lock", "fp32.pt", "mydata", "ptq_files.json"]
    assert (out / "mydata" / "keep.txt").read_text() == "keep"


# --- A15-A17: trainer settings checked up front ----------------------------------------------------------


@pytest.mark.parametrize(
    "setting, message",
    [
        ("--trainer={precision: fp8}", "Precision 'fp8' is invalid"),
        ("--trainer={accelerator: cpu, devices: 0}", "devices"),
        ("--precision.precisions=[64-true]", "'64-true' is not one of 16-mixed"),
        *([] if torch.cuda.is_available() else [("--trainer={accelerator: gpu}", "No supported gpu backend")]),
    ],
)
def test_bad_trainer_settings_are_one_line_before_the_study_folder_exists(tmp_path, capsys, setting, message):
    assert study(tmp_path, setting) == 2
    _one_line(capsys, message)
    assert not (tmp_path / "study").exists()
    assert os.listdir(tmp_path) == []
