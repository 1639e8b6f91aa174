"""A LightningModule for image classification around any backbone."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from qlight.errors import QlightError
from qlight.models import backbone_name, build_backbone
from qlight.quantization.lightning_plumbing import logs_this_step


class ImageClassifier(LightningModule):
    """Cross-entropy classifier trained with SGD (Nesterov) and a per-step cosine or one-cycle schedule.

    Logs ``train/loss`` (on the steps the loggers write: every ``log_every_n_steps``), ``val/loss``,
    ``val/acc1``, ``val/acc5`` and the same under ``test/``.

    Args:
        backbone: a registered name (``resnet20``, ``vgg11_bn``, ...: ``qlight.models.BACKBONES``),
            ``torchvision:<name>`` for any torchvision classifier, the class path of your own
            ``nn.Module`` (``"pkg.module.Net"`` or ``{"class_path": ..., "init_args": {...}}``), or a
            ready ``nn.Module``. All but the last are saved in checkpoints and rebuilt from them.
        num_classes: outputs of the backbone (passed to it when it is built from a name or class path
            that takes ``num_classes``); the CLI and the study take it from the data when the data knows it.
        lr: peak learning rate.
        momentum: SGD momentum (Nesterov).
        weight_decay: L2 penalty on every parameter.
        label_smoothing: cross-entropy label smoothing.
        schedule: ``cosine`` (linear warm-up, then cosine to zero), ``onecycle`` or ``constant``.
        warmup_epochs: linear warm-up length for ``cosine``.
        channels_last: run convolutions in the channels-last memory format.
        compile: run the backbone under ``torch.compile`` (Inductor; it compiles on the first batches).
            The callbacks quantize and evaluate uncompiled copies.
    """

    def __init__(
        self,
        backbone: str | dict[str, Any] | nn.Module = "vgg11_bn",
        num_classes: int = 100,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.0,
        schedule: Literal["cosine", "onecycle", "constant"] = "cosine",
        warmup_epochs: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise QlightError(f"model.lr must be positive, got {lr}")
        if not 0 <= label_smoothing < 1:
            raise QlightError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        self.model = backbone if isinstance(backbone, nn.Module) else build_backbone(backbone, num_classes)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.compile()  # in place: the state-dict keys stay those of the backbone
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.test_acc1 = self.val_acc1.clone()
        self.test_acc5 = self.val_acc5.clone()

    @override
    def setup(self, stage: str) -> None:
        classes = getattr(self.trainer.datamodule, "num_classes", None)
        if classes is not None and classes != self.hparams.num_classes:
            raise QlightError(
                f"model.num_classes is {self.hparams.num_classes} but the data has {classes} classes: "
                f"set model.num_classes {classes}"
            )

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from qlight.quantization import QuantizationAwareTraining, StaticQuantizationAwareTraining

        callbacks = self._trainer.callbacks if self._trainer is not None else None
        if callbacks is None:
            return
        for cls in (QuantizationAwareTraining, StaticQuantizationAwareTraining):
            # Lightning keys a callback's state by its class name (``state_key``).
            trained = [key for key in checkpoint.get("callbacks", {}) if key.startswith(cls.__name__)]
            if trained and not any(isinstance(c, cls) for c in callbacks):
                raise QlightError(cls.missing_callback_error(checkpoint["callbacks"][trained[0]]))

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _logits(self, images: Tensor) -> Tensor:
        logits = self(images)
        if logits.ndim != 2 or logits.shape[1] != self.hparams.num_classes:  # shapes are known on the host
            raise QlightError(
                f"the backbone returns {tuple(logits.shape)} for a batch of {len(images)} images where "
                f"model.num_classes is {self.hparams.num_classes}: give the backbone num_classes="
                f"{self.hparams.num_classes} outputs, or set model.num_classes to what it returns"
            )
        return logits

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = self.criterion(self._logits(images), labels)
        if logs_this_step(self):  # not on the progress bar: showing it reads it back every step
            self.log("train/loss", loss)
        return loss

    def _evaluate(
        self, batch: tuple[Tensor, Tensor], stage: str, acc1: MulticlassAccuracy, acc5: MulticlassAccuracy
    ) -> None:
        images, labels = batch
        logits = self._logits(images)
        acc1(logits, labels)
        acc5(logits, labels)
        self.log(f"{stage}/loss", self.criterion(logits, labels), sync_dist=True)
        self.log(f"{stage}/acc1", acc1, prog_bar=True)
        self.log(f"{stage}/acc5", acc5)

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc1, self.val_acc5)

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc1, self.test_acc5)

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).argmax(dim=1)

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if next(self.parameters(), None) is None:
            name = backbone_name(hp.backbone) if "backbone" in hp else type(self.model).__name__
            raise QlightError(
                f"backbone {name} has no parameters to train: give a network with learnable layers that returns "
                f"(batch, num_classes) logits"
            )
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.momentum > 0
        )
        if hp.schedule == "constant":
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise QlightError(
                f"the {hp.schedule} schedule runs per step and needs a finite length, but trainer.max_epochs is "
                f"{self.trainer.max_epochs} and trainer.max_steps {self.trainer.max_steps}: set trainer.max_epochs or "
                "trainer.max_steps, or model.schedule constant"
            )
        total = max(int(total), 1)
        if hp.schedule == "onecycle":
            scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=hp.lr, total_steps=total
            )
        else:
            warmup = min(int(hp.warmup_epochs * total / max(self.trainer.max_epochs or 1, 1)), total - 1)
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))
            scheduler = cosine
            if warmup > 0:
                ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup)
                scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
