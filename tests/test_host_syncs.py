"""Training steps must not read device values back to the host: on a GPU each read waits for all
queued work, so the Python side can no longer run ahead and the step time becomes host + device.
Checked on the CPU by counting the Tensor methods that would synchronize on a GPU."""

import csv

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from qlight import CIFAR100DataModule, ImageClassifier, QuantizationAwareTraining
from qlight.cli import _default_callbacks

READS = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]


class CountReads(Callback):
    """Counts reads of tensor values between the start of step ``first`` and the end of step ``last``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, first: int, last: int) -> None:
        self.first, self.last, self.active = first, last, False
        self.reads: list[str] = []
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                if self.active:
                    self.reads.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

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


@pytest.mark.parametrize("qat", [None, dict(weight_bits=4), dict(weight_bits=4, activation_bits=8)])
def test_training_steps_read_nothing_back_between_log_intervals(tmp_path, monkeypatch, qat):
    counter = CountReads(monkeypatch, first=3, last=12)
    extra = [QuantizationAwareTraining(**qat, eval_every_epoch=False, output_dir=str(tmp_path / "qat"))] if qat else []
    trainer = Trainer(
        accelerator="cpu",
        max_steps=14,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
        logger=TensorBoardLogger(tmp_path),
        callbacks=[*_default_callbacks(), *extra, counter],
        default_root_dir=tmp_path,
    )
    data = CIFAR100DataModule(
        batch_size=4,
        val_size=16,
        synthetic=True,
        synthetic_train_size=128,
        synthetic_test_size=16,
        augment_on_device=True,
    )
    trainer.fit(ImageClassifier(tiny_backbone()), data)
    assert trainer.global_step == 14 and not counter.active
    assert counter.reads == []


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
