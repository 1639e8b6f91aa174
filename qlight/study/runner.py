"""``python -m qlight study``: the whole quantization study in stages that resume where they stopped.

Stages write their results under ``study_dir`` and are skipped when those results exist:
``baseline`` (train or take a checkpoint), ``ptq`` (the PTQ sweep), ``qat`` (QAT per bit-width from
the baseline), ``precision`` (fp16 vs bf16 training) and ``report`` (always rebuilt from the files).
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from qlight.classifier import ImageClassifier
from qlight.data import CIFAR100DataModule
from qlight.errors import QlightError
from qlight.quantization import PostTrainingQuantization, QuantizationAwareTraining
from qlight.study.numerics import PrecisionStats

STAGES = ("baseline", "ptq", "qat", "precision", "report")
CPU_PRECISION_NOTE = (
    "Lightning refuses 16-mixed on the CPU and bf16 autocast trains VGG-11 at a few images/s there, so "
    "the CPU study trains once in 32-true and measures fp16/bf16 overflow and underflow by casting the "
    "sampled fp32 gradients and activations"
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m qlight study", description="Run the quantization study.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--study_dir", type=str, default="logs/study", help="where every stage writes")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace a study made with another config")
    parser.add_argument("--stages", type=list[Literal[STAGES]], default=list(STAGES), help="stages to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trainer", type=dict, default={}, help="Trainer arguments shared by every run")
    parser.add_class_arguments(ImageClassifier, "model", skip={"backbone"})
    parser.add_class_arguments(CIFAR100DataModule, "data")
    parser.add_argument("--baseline.epochs", type=int, default=200)
    parser.add_argument(
        "--baseline.ckpt", type=Optional[str], default=None, help="take this checkpoint instead of training"
    )
    parser.add_argument(
        "--ptq.recipes",
        type=list[str],
        default=["fp32", "fp16", "bf16", "int8", "int7", "int6", "int5", "int4", "int3", "int2", "int8_static"],
    )
    parser.add_argument("--ptq.calibration_batches", type=int, default=16)
    parser.add_argument("--qat.bits", type=list[int], default=[8, 4, 3, 2])
    parser.add_argument("--qat.epochs", type=int, default=20)
    parser.add_argument("--qat.lr", type=float, default=0.001)
    parser.add_argument("--precision.precisions", type=list[str], default=["16-mixed", "bf16-mixed"])
    parser.add_argument("--precision.epochs", type=int, default=30)
    parser.add_argument("--precision.sample_every_n_steps", type=int, default=50)
    return parser


class Study:
    """Runs the stages of one study configuration in ``study_dir``."""

    def __init__(self, config: Namespace) -> None:
        self.config = config
        self.dir = Path(config.study_dir)
        self.errors: dict[str, str] = {}

    # --- bookkeeping -------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        skip = {"config", "overwrite", "stages", "study_dir", "__path__"}
        return json.loads(json.dumps({k: v for k, v in self.config.as_dict().items() if k not in skip}, default=str))

    def _claim_directory(self) -> None:
        path = self.dir / "study_config.json"
        if path.is_file() and json.loads(path.read_text()) != self._fingerprint():
            if not self.config.overwrite:
                raise QlightError(
                    f"{self.dir} holds a study made with another config: choose another study_dir or pass --overwrite true"
                )
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self._fingerprint(), indent=2))

    def _stage(self, name: str, done: Path | None, work: Callable[[], None]) -> None:
        if done is not None and done.exists():
            print(f"[study] {name}: skipped ({done.relative_to(self.dir)} exists)", flush=True)
            return
        print(f"[study] {name}: running", flush=True)
        start = time.perf_counter()
        try:
            work()
        except Exception as err:  # a failed stage is reported and the others go on
            self.errors[name] = f"{type(err).__name__}: {err}".splitlines()[0]
            (self.dir / "logs").mkdir(exist_ok=True)
            (self.dir / "logs" / f"{name}.traceback.txt").write_text(traceback.format_exc())
            print(f"[study] {name}: FAILED after {time.perf_counter() - start:.0f}s: {self.errors[name]}", flush=True)
        else:
            print(f"[study] {name}: done in {time.perf_counter() - start:.0f}s", flush=True)
        (self.dir / "errors.json").write_text(json.dumps(self.errors, indent=2))

    # --- building blocks ---------------------------------------------------------------------
    @functools.cached_property
    def data(self) -> CIFAR100DataModule:
        """One DataModule for every stage: the dataset is read (or generated) once per study."""
        return CIFAR100DataModule(**self.config.data.as_dict())

    def _model(self, **overrides: Any) -> ImageClassifier:
        return ImageClassifier(**{**self.config.model.as_dict(), **overrides})

    def _trainer(self, name: str, max_epochs: int, callbacks: list, **overrides: Any) -> Trainer:
        settings = {"enable_model_summary": False, **self.config.trainer, **overrides}
        return Trainer(
            max_epochs=max_epochs,
            callbacks=callbacks,
            logger=TensorBoardLogger(self.dir / "tensorboard", name=name, version=""),
            default_root_dir=self.dir / name,
            **settings,
        )

    def on_gpu(self) -> bool:
        return torch.cuda.is_available() and self.config.trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda")

    @property
    def baseline_ckpt(self) -> Path:
        return Path(self.config.baseline.ckpt) if self.config.baseline.ckpt else self.dir / "baseline" / "baseline.ckpt"

    # --- stages ------------------------------------------------------------------------------
    def train_baseline(self) -> None:
        out = self.dir / "baseline"
        out.mkdir(parents=True, exist_ok=True)
        seed_everything(self.config.seed)
        trainer = self._trainer(
            "baseline",
            self.config.baseline.epochs,
            [ModelCheckpoint(out / "checkpoints", monitor="val/acc1", mode="max")],
        )
        model, data = self._model(), self.data
        start = time.perf_counter()
        if not self.config.baseline.ckpt:
            trainer.fit(model, data)
            shutil.move(trainer.checkpoint_callback.best_model_path, self.baseline_ckpt)
        elif not self.baseline_ckpt.is_file():
            raise QlightError(f"baseline checkpoint {self.baseline_ckpt} does not exist")
        seconds = time.perf_counter() - start
        test = trainer.test(model, data, ckpt_path=str(self.baseline_ckpt), verbose=False)[0]
        summary = {
            "checkpoint": str(self.baseline_ckpt),
            "test_acc1": test["test/acc1"],
            "test_acc5": test["test/acc5"],
            "train_seconds": seconds,
        }
        (out / "baseline.json").write_text(json.dumps(summary, indent=2))

    def run_ptq(self) -> None:
        ptq = PostTrainingQuantization(
            self.config.ptq.recipes,
            run_on=["test"],
            calibration_batches=self.config.ptq.calibration_batches,
            output_dir=str(self.dir / "ptq.tmp"),
        )
        self._trainer("ptq", 1, [ptq]).test(self._model(), self.data, ckpt_path=str(self.baseline_ckpt), verbose=False)
        (self.dir / "ptq.tmp").rename(self.dir / "ptq")

    def run_qat(self, bits: int) -> None:
        out = self.dir / f"qat_int{bits}"
        qat = QuantizationAwareTraining(
            weight_bits=bits, baseline_ckpt=str(self.baseline_ckpt), eval_split="test", output_dir=str(out)
        )
        last = out / "checkpoints" / "last.ckpt"
        seed_everything(self.config.seed)
        trainer = self._trainer(
            f"qat_int{bits}",
            self.config.qat.epochs,
            [qat, ModelCheckpoint(out / "checkpoints", save_last=True, save_top_k=0)],
        )
        trainer.fit(
            self._model(lr=self.config.qat.lr, warmup_epochs=0),
            self.data,
            ckpt_path=str(last) if last.is_file() else None,
        )

    def run_precision(self, precision: str) -> None:
        out = self.dir / "precision"
        out.mkdir(exist_ok=True)
        stats = PrecisionStats(self.config.precision.sample_every_n_steps)
        seed_everything(self.config.seed)
        trainer = self._trainer(
            f"precision_{precision}",
            self.config.precision.epochs,
            [stats],
            precision=precision,
            enable_checkpointing=False,
        )
        if self.on_gpu():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.fit(self._model(), self.data)
        seconds = time.perf_counter() - start
        summary = {
            "precision": precision,
            "device": torch.cuda.get_device_name() if self.on_gpu() else "cpu",
            "epochs": trainer.current_epoch,
            "val_acc1": float(trainer.callback_metrics["val/acc1"]),
            "seconds_per_epoch": seconds / max(trainer.current_epoch, 1),
            "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if self.on_gpu() else None,
            **stats.summary(),
        }
        (out / f"{precision}.json").write_text(json.dumps(summary, indent=2))

    def precisions(self) -> tuple[list[str], str | None]:
        if self.on_gpu():
            return list(self.config.precision.precisions), None
        return ["32-true"], CPU_PRECISION_NOTE

    def run(self) -> int:
        """Run the selected stages; returns 0 when every stage succeeded, 1 otherwise."""
        self._claim_directory()
        stages = set(self.config.stages)
        if "baseline" in stages:
            self._stage("baseline", self.dir / "baseline" / "baseline.json", self.train_baseline)
        if "ptq" in stages:
            self._stage("ptq", self.dir / "ptq" / "results.csv", self.run_ptq)
        if "qat" in stages:
            for bits in self.config.qat.bits:
                self._stage(f"qat_int{bits}", self.dir / f"qat_int{bits}" / "model.pt", lambda b=bits: self.run_qat(b))
        if "precision" in stages:
            for precision in self.precisions()[0]:
                self._stage(
                    f"precision_{precision}",
                    self.dir / "precision" / f"{precision}.json",
                    lambda p=precision: self.run_precision(p),
                )
        if "report" in stages:
            from qlight.study.report import build_report

            self._stage("report", None, lambda: build_report(self))
        return 1 if self.errors else 0


def study_main(argv: list[str]) -> int:
    config = build_parser().parse_args(argv)
    study = Study(config)
    code = study.run()
    if code:
        print(
            f"[study] incomplete: {', '.join(study.errors)} failed (see {study.dir / 'errors.json'})", file=sys.stderr
        )
    return code
