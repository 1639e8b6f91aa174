"""Training steps must not read device values back to the host: on a GPU each read waits for all
queued work, so the Python side can no longer run ahead and the step time becomes host + device.
Checked on the CPU by refusing the Tensor methods that would synchronize on a GPU; copies from host
memory and kernels that wait on their own (nonzero, masked indexing) show only on a GPU, in
``benchmarks/bench.py``'s sync count."""

import csv

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from qlight import CIFAR100DataModule, ImageClassifier, QuantizationAwareTraining, StaticQuantizationAwareTraining
from qlight.cli import _default_callbacks

READS = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]


class RefuseReads(Callback):
    """Makes every read of a tensor value raise between the start of step ``first`` and the end of
    step ``last``, so the failure's traceback names the line that read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, first: int, last: int) -> None:
        self.first, self.last, self.active = first, last, False
        for name in READS:
            original = getattr(torch.Tensor, name)

            def refused(tensor, *args, _name=name, _original=original, **kwargs):
                if self.active:
                    raise AssertionError(f"Tensor.{_name} in a steady-state training step: a host sync on a GPU")
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, refused)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = self.active or trainer.global_step == self.first

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.active = self.active and trainer.global_step < self.last


def tiny_backbone() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 100),
    )


QAT = {
    "fit": None,
    "qat int4 weights": dict(weight_bits=4),
    "qat int4 weights + int8 activations": dict(weight_bits=4, activation_bits=8),
    "qat learned scales": dict(weight_bits=4, learned_scales=True),
    "qat mixed plan": dict(weight_bits={"model.0": 3, "model.5": 8}),
    "w8a8 qat": "static",
}


@pytest.mark.parametrize("qat", QAT.values(), ids=QAT.keys())
def test_training_steps_read_nothing_back_between_log_intervals(tmp_path, monkeypatch, qat):
    refuse = RefuseReads(monkeypatch, first=3, last=12)
    out = str(tmp_path / "qat")
    if qat == "static":
        extra = [StaticQuantizationAwareTraining(eval_every_epoch=False, output_dir=out)]
    else:
        extra = [QuantizationAwareTraining(**qat, eval_every_epoch=False, output_dir=out)] if qat else []
    trainer = Trainer(
        accelerator="cpu",
        max_steps=14,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
        logger=TensorBoardLogger(tmp_path),
        callbacks=[*_default_callbacks(), *extra, refuse],
        default_root_dir=tmp_path,
    )
    data = CIFAR100DataModule(
        batch_size=4, val_size=16, synthetic=True, synthetic_train_size=128, synthetic_test_size=16
    )
    trainer.fit(ImageClassifier(tiny_backbone()), data)
    assert trainer.global_step == 14 and not refuse.active


def test_train_loss_is_logged_only_on_the_steps_the_loggers_write(tmp_path, monkeypatch):
    logged_at = []
    original = ImageClassifier.log

    def log(self, name, *args, **kwargs):
        if name == "train/loss":
            logged_at.append(self.trainer.global_step)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(ImageClassifier, "log", log)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=10,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=3,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    data = CIFAR100DataModule(batch_size=4, val_size=0, synthetic=True, synthetic_train_size=64, synthetic_test_size=8)
    trainer.fit(ImageClassifier(tiny_backbone()), data)
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as rows:
        written = [int(row["step"]) for row in csv.DictReader(rows) if row.get("train/loss")]
    # self.log costs host time on every call: it runs exactly where a value reaches the logger.
    assert written == [2, 5, 8] and logged_at == written
