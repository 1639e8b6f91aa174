"""``python -m qlight study``: the whole quantization study in stages that resume where they stopped.

Each stage writes into its own folder of ``study_dir`` (``baseline``, ``ptq``, ``qat_int<N>``,
``qat_w8a8``, ``precision_<P>``) and ends by writing ``stage.json``, which records the settings that determine the
stage's results (its fingerprint, including those of the stages it builds on). A stage is skipped
when its ``stage.json`` says done with the same fingerprint; a stage that was stopped resumes from
its ``checkpoints/last.ckpt``, saved every epoch. ``report`` is rebuilt from the files every time.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from qlight.classifier import ImageClassifier
from qlight.data.class_path import DEFAULT_DATA, datamodule_class, init_args, model_classes_from_data
from qlight.errors import QlightError
from qlight.files import atomic_write_text, exclusive_dir
from qlight.models import BACKBONE_FORMS, backbone_name
from qlight.quantization import (
    PostTrainingQuantization,
    QuantizationAwareTraining,
    StaticQuantizationAwareTraining,
)
from qlight.quantization.lightning_plumbing import load_checkpoint_weights
from qlight.quantization.recipes.base import BEST_METHOD, DEFAULT_GRANULARITY, quantizable_modules
from qlight.quantization.recipes.mixed import MixedPrecision
from qlight.study.figures import FIGURES
from qlight.study.numerics import PrecisionStats
from qlight.study.report import build_report
from qlight.study.results import PRECISIONS

RANKS_STAGES = "QLIGHT_STUDY_STAGES"  # the stages rank zero runs, for the ranks Lightning starts
STAGES = ("baseline", "ptq", "qat", "precision", "report")
# Trainer settings that change what is printed, not what is computed: they do not redo stages.
COSMETIC_TRAINER_KEYS = {"enable_progress_bar", "enable_model_summary", "log_every_n_steps"}
STUDY_SETS_TRAINER_KEYS = {"max_epochs", "callbacks", "logger", "default_root_dir"}
# Top-level files and folders a study may write (besides its stage folders); its manifest lists those it wrote.
MANIFEST = "study_files.json"
STUDY_FILES = {MANIFEST, "study_config.json", "errors.json", "report.md", "results.json", "tensorboard", "logs"} | {
    f"{name}.png" for name in FIGURES
}
CPU_PRECISION_NOTE = (
    "Lightning refuses 16-mixed on the CPU and bf16 autocast trains VGG-11 at a few images/s there, so "
    "the CPU study trains once in 32-true and measures fp16/bf16 overflow and underflow by casting the "
    "sampled fp32 gradients and activations"
)


def build_parser(data_class_path: str = DEFAULT_DATA) -> ArgumentParser:
    parser = ArgumentParser(prog="python -m qlight study", description="Run the quantization study.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--study_dir", type=str, default="logs/study", help="where every stage writes")
    parser.add_argument(
        "--overwrite", type=bool, default=False, help="redo the stages whose settings changed (their folders only)"
    )
    parser.add_argument("--stages", type=list[Literal[STAGES]], default=list(STAGES), help="stages to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trainer", type=dict, default={}, help="Trainer arguments shared by every run")
    # A ready nn.Module cannot come from a config; without it jsonargparse lists every Module subclass.
    parser.add_class_arguments(ImageClassifier, "model", skip={"backbone"})
    parser.add_argument(
        "--model.backbone",
        type=str | dict[str, Any],
        default="vgg11_bn",
        help=BACKBONE_FORMS,
    )
    parser.add_subclass_arguments(LightningDataModule, "data", help="any LightningDataModule (default CIFAR-100)")
    parser.set_defaults({"data": {"class_path": data_class_path}})
    parser.add_argument(
        "--keep_float",
        type=list[Literal["first", "last"]],
        default=[],
        help="Conv2d/Linear layers that PTQ and QAT leave in float: the first, the last (the head), or both",
    )
    parser.add_argument("--baseline.epochs", type=int, default=200)
    parser.add_argument(
        "--baseline.ckpt", type=str | None, default=None, help="take this checkpoint instead of training"
    )
    parser.add_argument(
        "--ptq.recipes",
        type=list[str],
        default=["fp32", "fp16", "bf16", "int8", "int7", "int6", "int5", "int4", "int3", "int2", "int8_static"],
    )
    parser.add_argument(
        "--ptq.methods",
        type=list[str],
        default=["rtn", BEST_METHOD],
        help="weight-only methods run at every bit-width, side by side (see PostTrainingQuantization)",
    )
    parser.add_argument("--ptq.granularity", type=list[str], default=[DEFAULT_GRANULARITY])
    parser.add_argument("--ptq.calibration_batches", type=int, default=16)
    parser.add_argument(
        "--ptq.runtimes",
        type=list[str],
        default=["eager"],
        help="where each PTQ recipe also runs, a row each, for the report's Deployed table: eager, onnxruntime "
        "(needs the onnx extra), inductor (see PostTrainingQuantization)",
    )
    parser.add_argument("--qat.bits", type=list[int], default=[8, 4, 3, 2])
    parser.add_argument(
        "--qat.plans",
        type=list[str],
        default=[],
        help="mixed-precision PTQ recipes whose saved plans QAT also trains (each must be in --ptq.recipes)",
    )
    parser.add_argument("--qat.epochs", type=int, default=20)
    parser.add_argument("--qat.lr", type=float, default=0.001)
    parser.add_argument(
        "--qat.float_control",
        type=bool,
        default=True,
        help="also fine-tune the float baseline on QAT's schedule (qat_fp32): how much of QAT's gain is more training",
    )
    parser.add_argument(
        "--qat.static",
        type=bool,
        default=True,
        help="also train the deployable int8 graph (qat_w8a8: static int8 activations, BatchNorm folded)",
    )
    parser.add_argument(
        "--precision.precisions", type=list[str], default=["16-mixed", "bf16-mixed"], help=", ".join(PRECISIONS)
    )
    parser.add_argument("--precision.epochs", type=int, default=30)
    parser.add_argument("--precision.sample_every_n_steps", type=int, default=50)
    return parser


@dataclass
class Stage:
    """One resumable piece of the study."""

    name: str  # also its folder
    fingerprint: dict[str, Any]  # the settings its results depend on
    run: Callable[[], None] = field(repr=False)
    result: str = "results.csv"  # the file in its folder that the report reads
    epochs: int = 0  # training epochs it runs, for the estimate of the time left

    @property
    def group(self) -> str:
        """Its name in ``--stages``."""
        return self.name.split("_")[0]


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def _sha256(path: str | Path | None) -> str | None:
    """The SHA-256 of the file at ``path`` (``None`` for no path or a file that cannot be read)."""
    if not path:
        return None
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, modification time) of each file under ``folder``, by its path relative to it."""
    if not folder.is_dir():
        return {}
    stats = {str(p.relative_to(folder)): p.lstat() for p in folder.rglob("*") if not p.is_dir()}
    return {name: (st.st_ino, st.st_size, st.st_mtime_ns) for name, st in stats.items()}


def _inside(folder: Path, names: list[Any]) -> set[Path]:
    """The recorded ``names`` as paths inside ``folder`` (a marker naming a path outside it is ignored there)."""
    paths = {folder / str(name) for name in names}
    return {path for path in paths if path.resolve().is_relative_to(folder.resolve())}


def _remove_files(folder: Path, files: set[Path]) -> None:
    """Delete ``files``, then the folders up to ``folder`` (included) that they leave empty."""
    parents = {folder}
    for path in files:
        path.unlink(missing_ok=True)
        parents.update(p for p in path.parents if p.is_relative_to(folder))
    for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def _unsafe_to_clear(directory: Path) -> str | None:
    cwd = Path.cwd().resolve()
    if directory == cwd or directory in cwd.parents or directory == Path.home().resolve():
        return "the current directory or one above it"
    if (directory / ".git").exists() or (directory / "pyproject.toml").exists():
        return "a project folder"
    return None


class Study:
    """Runs the stages of one study configuration in ``study_dir``."""

    def __init__(self, config: Namespace) -> None:
        self.config = config
        self.dir = Path(config.study_dir)
        self.errors: dict[str, str] = {}
        self.claimed: set[str] = set()  # the top-level names this study has written (its manifest)
        model_classes_from_data(config)

    # --- settings ----------------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        trainer = {k: v for k, v in self.config.trainer.items() if k not in COSMETIC_TRAINER_KEYS}
        cfg = self.config
        data = {**cfg.data.as_dict(), **self._data_contents}
        return _plain({"seed": cfg.seed, "model": cfg.model.as_dict(), "data": data, "trainer": trainer})

    @functools.cached_property
    def _data_contents(self) -> dict[str, Any]:
        """What a DataModule says its data holds (its optional ``fingerprint()``, such as the file list of
        an image folder): other contents under the same settings redo every stage."""
        fingerprint = getattr(self.data, "fingerprint", None)
        return {"contents": fingerprint()} if callable(fingerprint) else {}

    def stages(self) -> list[Stage]:
        """Every stage of this configuration, in order (the report is not one: it is always rebuilt)."""
        cfg = self.config
        # Input files enter by content: the same path with other bytes redoes the stages built on it.
        baseline = {**self._common(), "baseline": _plain({**cfg.baseline, "ckpt_sha256": self._inputs["ckpt"]})}
        ptq = _plain({**cfg.ptq, "keep_float": cfg.keep_float, "plans_sha256": self._inputs["plans"]})
        trained = 0 if cfg.baseline.ckpt else cfg.baseline.epochs
        stages = [
            Stage("baseline", baseline, self.train_baseline, "baseline.json", trained),
            Stage("ptq", {"baseline": baseline, "ptq": ptq}, self.run_ptq),
        ]
        qat = {"epochs": cfg.qat.epochs, "lr": cfg.qat.lr, "keep_float": cfg.keep_float}
        for bits in cfg.qat.bits:
            fingerprint = {"baseline": baseline, "qat": {**qat, "bits": bits}}
            run = functools.partial(self.run_qat, bits)
            stages.append(Stage(f"qat_int{bits}", fingerprint, run, epochs=cfg.qat.epochs))
        for recipe in cfg.qat.plans:  # the plan comes from the PTQ stage
            fingerprint = {"baseline": baseline, "ptq": ptq, "qat": {**qat, "plan": recipe}}
            run = functools.partial(self.run_qat, recipe)
            stages.append(Stage(f"qat_{recipe}", fingerprint, run, epochs=cfg.qat.epochs))
        if cfg.qat.float_control:
            fingerprint = {"baseline": baseline, "qat": {"epochs": cfg.qat.epochs, "lr": cfg.qat.lr}}
            stages.append(Stage("qat_fp32", fingerprint, self.run_float_control, "summary.json", cfg.qat.epochs))
        if cfg.qat.static:
            fingerprint = {"baseline": baseline, "qat": {**qat, "static": True}}
            stages.append(Stage("qat_w8a8", fingerprint, self.run_qat_w8a8, epochs=cfg.qat.epochs))
        precision = {"epochs": cfg.precision.epochs, "sample_every_n_steps": cfg.precision.sample_every_n_steps}
        for name in self.precisions():
            fingerprint = {**self._common(), "precision": {**precision, "precision": name}}
            run = functools.partial(self.run_precision, name)
            stages.append(Stage(f"precision_{name}", fingerprint, run, "summary.json", cfg.precision.epochs))
        return stages

    @functools.cached_property
    def _inputs(self) -> dict[str, Any]:
        """SHA-256 of the input files: the baseline checkpoint and the PTQ plan files."""
        plans = self._plan_inputs()
        return {"ckpt": _sha256(self.config.baseline.ckpt), "plans": {r.name: _sha256(r.plan_file) for r in plans}}

    def _plan_inputs(self) -> list[MixedPrecision]:
        return [r for r in self._ptq().recipes if isinstance(r, MixedPrecision) and r.plan_file is not None]

    def _input_files(self) -> dict[Path, str]:
        """The files the study reads (resolved), each with the setting that names it."""
        files = {Path(r.plan_file).resolve(): f"--ptq.recipes ({r.name})" for r in self._plan_inputs()}
        if self.config.baseline.ckpt:
            files[Path(self.config.baseline.ckpt).resolve()] = "--baseline.ckpt"
        return files

    def selected(self, stage: Stage) -> bool:
        return stage.group in self.config.stages

    def on_gpu(self) -> bool:
        return torch.cuda.is_available() and self.config.trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda")

    def precisions(self) -> list[str]:
        return list(self.config.precision.precisions) if self.on_gpu() else ["32-true"]

    def validate(self) -> None:
        """Check the whole configuration before any stage runs, so that a typo in a late stage's
        settings is found before hours of training, not after."""
        cfg = self.config
        unknown = set(cfg.trainer) - set(inspect.signature(Trainer.__init__).parameters)
        if unknown:
            raise QlightError(f"unknown trainer settings {sorted(unknown)}; see lightning.pytorch.Trainer")
        reserved = set(cfg.trainer) & STUDY_SETS_TRAINER_KEYS
        if reserved:
            raise QlightError(f"the study sets trainer {sorted(reserved)} itself: set the stages' epochs instead")
        unknown = [p for p in cfg.precision.precisions if p not in PRECISIONS]
        if unknown:
            raise QlightError(f"--precision.precisions: {unknown[0]!r} is not one of {', '.join(PRECISIONS)}")
        self._check_trainer()
        for key in ("baseline.epochs", "qat.epochs", "precision.epochs", "precision.sample_every_n_steps"):
            if cfg[key] < 1:
                raise QlightError(f"{key} must be at least 1, got {cfg[key]}")
        if cfg.baseline.ckpt and not Path(cfg.baseline.ckpt).is_file():
            raise QlightError(f"baseline checkpoint {cfg.baseline.ckpt} does not exist")
        for bits in cfg.qat.bits:
            QuantizationAwareTraining(weight_bits=bits, **self._keep())
        self._validate_plans(self._ptq(), self._model(lr=cfg.qat.lr))
        self.data  # noqa: B018 (built here, so that bad data settings fail before any stage)

    def _check_trainer(self) -> None:
        """Lightning's own checks of the Trainer settings (precision, accelerator, devices), in every
        precision a stage trains in: one line before anything is written, not a traceback per stage."""
        quiet = logging.getLogger("lightning.pytorch")
        level = quiet.level
        for precision in {self.config.trainer.get("precision"), "32-true", *self.precisions()}:
            settings = {**self.config.trainer, "precision": precision}
            try:
                quiet.setLevel(logging.ERROR)  # not Lightning's device lines for a Trainer that never runs
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    Trainer(**settings, logger=False, enable_checkpointing=False)
            except (MisconfigurationException, ValueError, TypeError) as err:
                raise QlightError(f"--trainer (precision {precision}): {str(err).splitlines()[0]}") from None
            finally:
                quiet.setLevel(level)

    def _validate_plans(self, ptq: PostTrainingQuantization, model: ImageClassifier) -> None:
        """PTQ's plan files fit the model, and QAT's plans come from mixed PTQ recipes."""
        mixed = [r for r in ptq.recipes if isinstance(r, MixedPrecision)]
        targets = quantizable_modules(model, ptq.keep_first, ptq.keep_last)
        for recipe in mixed:
            recipe.check(model, targets)  # a plan for another model fails before the baseline trains
        names = [r.name for r in mixed]
        for recipe in self.config.qat.plans:
            if recipe not in names:
                raise QlightError(
                    f"--qat.plans names {recipe!r}, which PTQ does not run; its mixed-precision recipes: "
                    f"{', '.join(names) or 'none (add one such as mixed@2.5 to --ptq.recipes)'}"
                )

    # --- the directory -----------------------------------------------------------------------
    def _claim_directory(self, stages: list[Stage]) -> None:
        """Refuse top-level files the study did not write and links; find stages made with other
        settings and, with ``overwrite``, remove the files they recorded (nothing else)."""
        self.claimed = self._claimed()
        for name in sorted(STUDY_FILES):
            path = self.dir / name
            if path.is_symlink():
                raise QlightError(
                    f"{path} is a symlink: the study writes and deletes only inside {self.dir}; remove the link"
                )
            if path.exists() and name not in self.claimed:
                raise QlightError(
                    f"{path} was not written by this study and would be replaced: move it away "
                    "(--overwrite never touches files the study did not write) or choose another study_dir"
                )
        changed = []
        for stage in stages:
            folder = self.dir / stage.name
            if folder.exists() or folder.is_symlink():
                marker = _read_marker(folder / "stage.json")
                if marker is None or marker.get("fingerprint") != stage.fingerprint:
                    changed.append(stage)
        if changed and not self.config.overwrite:
            raise QlightError(
                f"{self.dir} holds stages made with other settings ({', '.join(s.name for s in changed)}): pass "
                "--overwrite true to redo just those, or choose another study_dir"
            )
        if changed:
            self._remove_stages(changed)
        self._write("study_config.json", json.dumps(_plain(self.config.as_dict()), indent=2))
        self._write("errors.json", "{}")  # this run's failures only

    def _claimed(self) -> set[str]:
        """The top-level names this study has written and that are there: its manifest, or, for a study
        made before manifests, every study file beside a ``study_config.json`` that a study wrote."""
        try:
            names = json.loads((self.dir / MANIFEST).read_text())
            names = set(names) & STUDY_FILES if isinstance(names, list) else set()
        except (OSError, ValueError):
            config = _read_marker(self.dir / "study_config.json")
            names = set(STUDY_FILES) if config is not None and "study_dir" in config else set()
        return {name for name in names if (self.dir / name).exists() or (self.dir / name).is_symlink()}

    def _claim(self, name: str) -> None:
        """Record the top-level ``name`` in the manifest before the study first writes it."""
        if name not in self.claimed:
            self.claimed |= {name, MANIFEST}
            atomic_write_text(self.dir / MANIFEST, json.dumps(sorted(self.claimed), indent=2))

    def _write(self, name: str, text: str) -> None:
        """Write the top-level file ``name`` (or ``logs/<file>``), the study's own from then on."""
        self._claim(Path(name).parts[0])
        atomic_write_text(self.dir / name, text)

    def _remove_stages(self, stages: list[Stage]) -> None:
        root = self.dir.resolve()
        unsafe = _unsafe_to_clear(root)
        if unsafe:
            raise QlightError(f"refusing to overwrite in {self.dir}: it is {unsafe}; choose a study_dir of its own")
        recorded = {stage.name: self._recorded(stage.name) for stage in stages}
        inputs = self._input_files()
        for name, files in recorded.items():
            held = [path for path in inputs if path in {f.resolve() for f in files}]
            if held:
                raise QlightError(
                    f"refusing to overwrite {self.dir / name}: it holds {held[0]}, which {inputs[held[0]]} reads; "
                    "copy it out of the folder and name the copy"
                )
        idle = [stage for stage in stages if not self.selected(stage)]
        if idle:
            groups = sorted({stage.group for stage in idle})
            raise QlightError(
                f"refusing to remove {', '.join(str(self.dir / s.name) for s in idle)}: made with other settings, "
                f"but --stages does not run {', '.join(groups)}, so nothing would replace it; add "
                f"{', '.join(groups)} to --stages"
            )
        for name, files in recorded.items():
            print(f"[study] {name}: made with other settings, removing its files from {self.dir / name}", flush=True)
            try:
                _remove_files(root / name, files)
            except OSError as err:
                raise QlightError(f"cannot remove {self.dir / name}: {err.strerror or err}") from None

    def _recorded(self, name: str) -> set[Path]:
        """The files the stage ``name`` recorded as its own, or one line on why it cannot be removed."""
        folder = self.dir / name
        marker = None if folder.is_symlink() else _read_marker(folder / "stage.json")
        if marker is None or not isinstance(marker.get("files"), list):
            why = (
                "it is a symlink, not a folder of this study"
                if folder.is_symlink()
                else "its stage.json lists no files (a stopped stage)"
                if marker
                else "it has no stage.json"
            )
            raise QlightError(
                f"refusing to remove {folder}: {why}, so the study has no record of what it wrote there; move "
                "it away or choose another study_dir"
            )
        return _inside(self.dir.resolve() / name, marker["files"])

    # --- running -----------------------------------------------------------------------------
    def _to_run(self, stage: Stage) -> bool:
        """Whether ``stage`` runs: not done with these settings, or done but its result is gone."""
        folder = self.dir / stage.name
        marker = _read_marker(folder / "stage.json")
        if marker and marker.get("done") and marker.get("fingerprint") == stage.fingerprint:
            if (folder / stage.result).is_file():
                print(f"[study] {stage.name}: skipped (done)", flush=True)
                return False
            print(f"[study] {stage.name}: {stage.result} is missing, running it again", flush=True)
        return True

    def _run_stage(self, stage: Stage) -> float | None:
        """Run ``stage``; returns its seconds, ``None`` if it failed."""
        folder = self.dir / stage.name
        marker_path = folder / "stage.json"
        marker = _read_marker(marker_path)
        resuming = (folder / "checkpoints" / "last.ckpt").is_file()
        print(f"[study] {stage.name}: {'resuming' if resuming else 'running'}", flush=True)
        # The stage's files: those it created or rewrote in this start, those an earlier start of the
        # same settings recorded as its own, and the checkpoint it resumes from; never a file that was
        # there when this start began and that it left alone (the user's).
        same = marker is not None and marker.get("fingerprint") == stage.fingerprint
        earlier = (marker.get("files") or marker.get("owned") or []) if same else []
        owned = {str(name) for name in earlier} | ({"checkpoints/last.ckpt"} if resuming else set())
        before = _snapshot(folder)
        state = {"fingerprint": stage.fingerprint, "owned": sorted(owned)}
        atomic_write_text(marker_path, json.dumps({**state, "done": False}, indent=2))
        start = time.perf_counter()
        seconds = None
        try:
            stage.run()
        except Exception as err:  # a failed stage is reported and the others go on
            self._record_failure(stage.name, err, start)
        else:
            seconds = time.perf_counter() - start
            print(f"[study] {stage.name}: done in {seconds:.0f}s", flush=True)
        after = _snapshot(folder)
        files = sorted(name for name, stat in after.items() if name in owned or before.get(name) != stat)
        record = {"fingerprint": stage.fingerprint, "files": files, "done": seconds is not None}
        atomic_write_text(marker_path, json.dumps(record, indent=2))
        self._write("errors.json", json.dumps(self.errors, indent=2))
        return seconds

    def _record_failure(self, name: str, err: Exception, start: float) -> None:
        self.errors[name] = f"{type(err).__name__}: {err}".splitlines()[0]
        self._write(f"logs/{name}.traceback.txt", traceback.format_exc())
        print(f"[study] {name}: FAILED after {time.perf_counter() - start:.0f}s: {self.errors[name]}", flush=True)

    def run(self) -> int:
        """Run the selected stages; returns 0 when every stage succeeded, 1 otherwise.

        Under DDP Lightning starts the other ranks by running this command again when the first
        Trainer fits: they run the stages that rank zero chose (passed on in their environment, so
        that every rank enters the same Trainers) and write nothing; rank zero writes every file."""
        self.validate()
        stages = self.stages()
        if rank_zero_only.rank:
            return self._follow_rank_zero(stages)
        with exclusive_dir(self.dir, "qlight study"):  # a second study on this folder is refused up front
            return self._run_stages(stages)

    def _run_stages(self, stages: list[Stage]) -> int:
        self._claim_directory(stages)
        running = [stage for stage in stages if self.selected(stage) and self._to_run(stage)]
        os.environ[RANKS_STAGES] = json.dumps([stage.name for stage in running])
        trained = [0.0, 0]  # seconds and epochs of the training stages so far
        for index, stage in enumerate(running):
            seconds = self._run_stage(stage)
            if seconds is not None and stage.epochs:
                trained = [trained[0] + seconds, trained[1] + stage.epochs]
            if trained[1] and running[index + 1 :]:
                print(f"[study] {_time_left(running[index + 1 :], trained[0] / trained[1])}", flush=True)
        if "report" in self.config.stages:
            self._build_report(stages)
        return 1 if self.errors else 0

    def _follow_rank_zero(self, stages: list[Stage]) -> int:
        if RANKS_STAGES not in os.environ:
            raise QlightError(
                "this process is not rank zero and was not started by the study's rank zero: run the study as one "
                "command with --trainer.strategy ddp (Lightning starts the other processes), not under torchrun"
            )
        names = json.loads(os.environ[RANKS_STAGES])
        for stage in stages:
            if stage.name in names:
                try:
                    stage.run()
                except Exception:  # rank zero reports it; this rank goes on with the others
                    continue
        return 0

    def _build_report(self, stages: list[Stage]) -> None:
        for stage in stages:  # a report without the results of a stage that ran says so, and the exit code too
            result = self.dir / stage.name / stage.result
            ran = self.selected(stage) or (self.dir / stage.name / "stage.json").is_file()
            if ran and stage.name not in self.errors and not result.is_file():
                self.errors[stage.name] = f"no results: {result} is missing; run it (--stages [{stage.group}, report])"
        self._write("errors.json", json.dumps(self.errors, indent=2))
        print("[study] report: running", flush=True)
        start = time.perf_counter()
        try:
            build_report(self.dir, self._reported(stages), self._claim)
        except Exception as err:
            self._record_failure("report", err, start)
            self._write("errors.json", json.dumps(self.errors, indent=2))
        else:
            print(f"[study] report: done in {time.perf_counter() - start:.0f}s", flush=True)

    def _reported(self, stages: list[Stage]) -> set[str]:
        """The stage folders the report reads: this configuration's, and those that another one left,
        done, on the same baseline (and PTQ, data, model and seed); not those built on an older baseline."""
        names = {stage.name for stage in stages}
        shared = {"baseline": stages[0].fingerprint, "ptq": stages[1].fingerprint["ptq"], **self._common()}
        for folder in self.dir.iterdir():
            marker = None if folder.is_symlink() or folder.name in names else _read_marker(folder / "stage.json")
            fingerprint = (marker or {}).get("fingerprint")
            if marker and marker.get("done") and isinstance(fingerprint, dict) and shared.keys() & fingerprint.keys():
                if all(fingerprint[key] == shared[key] for key in shared.keys() & fingerprint.keys()):
                    names.add(folder.name)
        return names

    # --- building blocks ---------------------------------------------------------------------
    @functools.cached_property
    def data(self) -> LightningDataModule:
        """One DataModule for every stage: the dataset is read (or generated) once per study."""
        try:
            return datamodule_class(self.config.data.class_path)(**init_args(self.config.data))
        except TypeError as err:  # the arguments do not fit its __init__
            raise QlightError(f"{self.config.data.class_path}: {err}: fix the data's init_args") from None

    def _keep(self) -> dict[str, bool]:
        return {"keep_first": "first" in self.config.keep_float, "keep_last": "last" in self.config.keep_float}

    def _model(self, **overrides: Any) -> ImageClassifier:
        return ImageClassifier(**{**self.config.model.as_dict(), **overrides})

    def _trainer(self, name: str, max_epochs: int, callbacks: list, **overrides: Any) -> Trainer:
        settings = {"enable_model_summary": False, **self.config.trainer, **overrides}
        return Trainer(
            max_epochs=max_epochs,
            callbacks=callbacks,
            logger=TensorBoardLogger(self.dir / name, name="tensorboard", version=""),
            default_root_dir=self.dir / name,
            **settings,
        )

    def _last(self, name: str) -> tuple[ModelCheckpoint, str | None]:
        """A checkpoint written after every epoch, and the path to resume from when one exists."""
        folder = self.dir / name / "checkpoints"
        last = ModelCheckpoint(folder, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
        return last, str(folder / "last.ckpt") if (folder / "last.ckpt").is_file() else None

    @property
    def baseline_ckpt(self) -> Path:
        return Path(self.config.baseline.ckpt) if self.config.baseline.ckpt else self.dir / "baseline" / "baseline.ckpt"

    # --- stages ------------------------------------------------------------------------------
    def train_baseline(self) -> None:
        out = self.dir / "baseline"
        seed_everything(self.config.seed)
        best = ModelCheckpoint(out, filename="baseline", monitor="val/acc1", mode="max", enable_version_counter=False)
        last, resume = self._last("baseline")
        trainer = self._trainer("baseline", self.config.baseline.epochs, [best, last])
        model, data = self._model(), self.data
        start = time.perf_counter()
        if not self.config.baseline.ckpt:
            trainer.fit(model, data, ckpt_path=resume)
        test = trainer.test(model, data, ckpt_path=str(self.baseline_ckpt), verbose=False)[0]
        summary = {
            "checkpoint": str(self.baseline_ckpt),
            "model": backbone_name(self.config.model.backbone),
            "parameters": sum(p.numel() for p in model.parameters()),
            "num_classes": model.hparams.num_classes,
            "data": type(data).__name__,
            "test_acc1": test["test/acc1"],
            "test_acc5": test["test/acc5"],
            "test_images": _test_images(data),
            "train_seconds": time.perf_counter() - start,
        }
        if trainer.is_global_zero:
            atomic_write_text(out / "baseline.json", json.dumps(summary, indent=2))

    def _ptq(self) -> PostTrainingQuantization:
        ptq = self.config.ptq
        return PostTrainingQuantization(
            ptq.recipes,
            granularity=ptq.granularity,
            methods=ptq.methods,
            run_on=["test"],
            calibration_batches=ptq.calibration_batches,
            output_dir=str(self.dir / "ptq"),
            runtimes=ptq.runtimes,
            **self._keep(),
        )

    def run_ptq(self) -> None:
        trainer = self._trainer("ptq", 1, [self._ptq()])
        trainer.test(self._model(), self.data, ckpt_path=str(self.baseline_ckpt), verbose=False)

    def run_qat(self, bits: int | str) -> None:
        """QAT at ``bits`` for every layer, or from the plan the PTQ recipe ``bits`` saved."""
        name = f"qat_int{bits}" if isinstance(bits, int) else f"qat_{bits}"
        plan = bits if isinstance(bits, int) else str(self.dir / "ptq" / f"{bits}.plan.json")
        keep = self._keep() if isinstance(bits, int) else {}  # a plan names its layers itself
        qat = QuantizationAwareTraining(
            weight_bits=plan,
            baseline_ckpt=str(self.baseline_ckpt),
            eval_split="test",
            output_dir=str(self.dir / name),
            **keep,
        )
        last, resume = self._last(name)
        seed_everything(self.config.seed)
        trainer = self._trainer(name, self.config.qat.epochs, [qat, last])
        trainer.fit(self._model(lr=self.config.qat.lr, warmup_epochs=0), self.data, ckpt_path=resume)

    def run_float_control(self) -> None:
        """The baseline fine-tuned in float on QAT's schedule (epochs, lr, no warm-up): QAT trains the
        baseline further, so its gain over fp32 is partly this, not quantization."""
        name = "qat_fp32"
        last, resume = self._last(name)
        seed_everything(self.config.seed)
        trainer = self._trainer(name, self.config.qat.epochs, [last])
        model = self._model(lr=self.config.qat.lr, warmup_epochs=0)
        load_checkpoint_weights(model, self.baseline_ckpt, "baseline checkpoint")
        trainer.fit(model, self.data, ckpt_path=resume)
        test = trainer.test(model, self.data, verbose=False)[0]
        summary = {"epochs": trainer.current_epoch, "lr": self.config.qat.lr, "test_acc1": test["test/acc1"]}
        if trainer.is_global_zero:
            atomic_write_text(self.dir / name / "summary.json", json.dumps(summary, indent=2))

    def run_qat_w8a8(self) -> None:
        """QAT of the int8 graph that PTQ's int8_static calibrates, in float32 (the fused fake-quant's
        only dtype), the observers and BatchNorm statistics frozen for the last fifth of the epochs."""
        name, epochs = "qat_w8a8", self.config.qat.epochs
        freeze = max(1, epochs - max(1, epochs // 5))
        qat = StaticQuantizationAwareTraining(
            network="model",
            freeze_observer_epoch=freeze,
            freeze_bn_epoch=freeze,
            baseline_ckpt=str(self.baseline_ckpt),
            eval_split="test",
            output_dir=str(self.dir / name),
            **self._keep(),
        )
        last, resume = self._last(name)
        seed_everything(self.config.seed)
        trainer = self._trainer(name, epochs, [qat, last], precision="32-true")
        trainer.fit(self._model(lr=self.config.qat.lr, warmup_epochs=0), self.data, ckpt_path=resume)

    def run_precision(self, precision: str) -> None:
        name = f"precision_{precision}"
        stats = PrecisionStats(self.config.precision.sample_every_n_steps)
        last, resume = self._last(name)
        seed_everything(self.config.seed)
        trainer = self._trainer(name, self.config.precision.epochs, [stats, last], precision=precision)
        if self.on_gpu():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.fit(self._model(), self.data, ckpt_path=resume)
        seconds = time.perf_counter() - start
        summary = {
            "precision": precision,
            "device": torch.cuda.get_device_name() if self.on_gpu() else "cpu",
            "note": None if self.on_gpu() else CPU_PRECISION_NOTE,
            "epochs": trainer.current_epoch,
            "val_acc1": float(trainer.callback_metrics["val/acc1"]),
            "seconds_per_epoch": seconds / max(trainer.current_epoch, 1),
            "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if self.on_gpu() else None,
            **stats.summary(),
        }
        if trainer.is_global_zero:
            atomic_write_text(self.dir / name / "summary.json", json.dumps(summary, indent=2))


def _time_left(stages: list[Stage], seconds_per_epoch: float) -> str:
    """The estimate printed after each stage: the epochs left at the seconds per epoch measured so far
    (QAT and W8A8 epochs cost more than the baseline's, a resumed stage less)."""
    epochs = sum(stage.epochs for stage in stages)
    untimed = [stage.name for stage in stages if not stage.epochs]
    timed = len(stages) - len(untimed)
    extra = f", plus {', '.join(untimed)} (no estimate)" if untimed else ""
    if not epochs:
        return f"left: {', '.join(untimed)} (no estimate)"
    return (
        f"about {epochs * seconds_per_epoch / 60:.1f} min left: {epochs} training epoch{'s' * (epochs != 1)} in "
        f"{timed} stage{'s' * (timed != 1)} at "
        f"{seconds_per_epoch:.1f} s/epoch measured so far{extra}"
    )


def _test_images(data: LightningDataModule) -> int | None:
    """The test set's size, where its loader tells it without a pass over the data."""
    loader = data.test_dataloader()
    for source in (getattr(loader, "dataset", None), getattr(loader, "labels", None)):
        try:
            return len(source)
        except TypeError:
            continue
    return None


def study_main(argv: list[str], data_class_path: str = DEFAULT_DATA) -> int:
    """Run the study; ``data_class_path`` is the data class the arguments name (see ``qlight.cli``)."""
    config = build_parser(data_class_path).parse_args(argv)
    study = Study(config)
    code = study.run()
    if code:
        failed = ", ".join(study.errors)
        print(f"[study] incomplete: {failed} failed (see {study.dir / 'errors.json'})", file=sys.stderr)
    return code
