"""Quantization-aware training as a Lightning callback."""

from __future__ import annotations

import time
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from qlight.errors import QlightError
from qlight.quantization.evaluation import (
    dataloader,
    detached_copy,
    evaluate,
    load_checkpoint_weights,
    transferred_batches,
)
from qlight.quantization.fake_quant import (
    FAKE_QUANTIZED,
    activation_config,
    init_learned_scales,
    insert_fake_quant,
    remove_fake_quant,
    set_fake_quant_enabled,
    weight_config,
    weight_qparams,
)
from qlight.quantization.recipes import MAX_BITS, MIN_BITS, IntxWeightOnly, quantizable_modules
from qlight.quantization.reporting import log_to_loggers, markdown_table, output_dir, write_csv
from qlight.quantization.serialization import quantized_bytes

COLUMNS = ["epoch", "split", "fake_quant", "acc1", "acc5", "seconds"]


def _check_bits(name: str, bits: int | None) -> None:
    if bits is not None and not MIN_BITS <= bits <= MAX_BITS:
        raise QlightError(f"{name} must be between {MIN_BITS} and {MAX_BITS}, got {bits}")


class QuantizationAwareTraining(Callback):
    """Train with fake-quantized weights (and optionally activations) in every Conv2d and Linear,
    then convert to torchao's quantized weights.

    In ``setup`` the selected modules are swapped for fake-quantized ones that share their
    parameters and state-dict keys, so checkpoints, ``--ckpt_path`` resume and
    ``trainer.test(ckpt_path=...)`` work unchanged (with this callback present). Fake-quant is on
    from ``start_epoch``. After every training epoch the fake-quantized model is evaluated on the
    validation set (``qat/acc1``, ``qat/acc5``, ``<output_dir>/results.csv``). When fitting ends a
    copy is converted with ``IntxWeightOnlyConfig`` (same bits and grouping), evaluated on the test
    set and saved to ``<output_dir>/model.pt`` (load with :func:`qlight.load_quantized`).

    Args:
        weight_bits: weight bit-width, 2..8 (symmetric, per output channel).
        activation_bits: optional dynamic per-token activation fake-quant, 2..8. Training only:
            the converted model keeps float activations.
        learned_scales: train the weight scales (LSQ-style, torchao's ``range_learning``), starting
            from the weights' max, instead of recomputing them from the weights every step.
        start_epoch: first epoch with fake-quant on (earlier epochs train in float).
        freeze_bn_epoch: from this epoch on BatchNorm layers use their running statistics.
        keep_first: leave the first Conv2d/Linear in float.
        keep_last: leave the last Conv2d/Linear in float.
        baseline_ckpt: a Lightning checkpoint whose weights start the QAT fit (default: the model's
            own weights, e.g. from scratch).
        eval_every_epoch: evaluate the fake-quantized model after each training epoch.
        eval_split: the split evaluated each epoch, ``val`` (default) or ``test`` (to compare with
            PTQ, which reports test accuracy).
        output_dir: where files go; default ``<log_dir>/qat``.
    """

    def __init__(
        self,
        weight_bits: int | None = 4,
        activation_bits: int | None = None,
        learned_scales: bool = False,
        start_epoch: int = 0,
        freeze_bn_epoch: int | None = None,
        keep_first: bool = False,
        keep_last: bool = False,
        baseline_ckpt: str | None = None,
        eval_every_epoch: bool = True,
        eval_split: Literal["val", "test"] = "val",
        output_dir: str | None = None,
    ) -> None:
        if weight_bits is None:
            raise QlightError(
                "QAT needs weight_bits (2..8)"
                + (": activation_bits alone are not supported" if activation_bits else "")
            )
        _check_bits("weight_bits", weight_bits)
        _check_bits("activation_bits", activation_bits)
        if start_epoch < 0:
            raise QlightError(f"start_epoch must be 0 or more, got {start_epoch}")
        if freeze_bn_epoch is not None and freeze_bn_epoch < 0:
            raise QlightError(f"freeze_bn_epoch must be 0 or more, got {freeze_bn_epoch}")
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.learned_scales = learned_scales
        self.start_epoch = start_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.keep_first = keep_first
        self.keep_last = keep_last
        self.baseline_ckpt = baseline_ckpt
        if eval_split not in ("val", "test"):
            raise QlightError(f"eval_split must be 'val' or 'test', got {eval_split!r}")
        self.eval_every_epoch = eval_every_epoch
        self.eval_split = eval_split
        self.output_dir = output_dir
        self.results: list[dict[str, Any]] = []  # rows of results.csv, restored with checkpoints

    @property
    def recipe(self) -> IntxWeightOnly:
        return IntxWeightOnly(self.weight_bits)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.start_epoch:
            raise QlightError(f"QAT start_epoch={self.start_epoch} is at or past max_epochs={trainer.max_epochs}")
        if stage == "fit" and self.baseline_ckpt:
            load_checkpoint_weights(pl_module, self.baseline_ckpt, "baseline checkpoint")
            rank_zero_info(f"QAT: starting from the weights of {self.baseline_ckpt}")
        targets = quantizable_modules(pl_module, self.keep_first, self.keep_last)
        if not targets:
            raise QlightError(f"QAT: {type(pl_module).__name__} has no Conv2d or Linear module to fake-quantize")
        insert_fake_quant(
            pl_module,
            targets,
            weight_config(self.weight_bits, self.learned_scales),
            activation_config(self.activation_bits) if self.activation_bits else None,
        )
        init_learned_scales(pl_module)
        set_fake_quant_enabled(pl_module, stage != "fit" or self.start_epoch == 0)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        set_fake_quant_enabled(pl_module, epoch >= self.start_epoch)
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            for module in pl_module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.eval_every_epoch:
            self._record(trainer, pl_module, pl_module, self.eval_split, trainer.current_epoch)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        converted = self.convert(pl_module)
        row = self._record(trainer, pl_module, converted, "test", trainer.current_epoch, converted=True)
        out = output_dir(trainer, self.output_dir, "qat")
        example = next(iter(transferred_batches(trainer, pl_module, dataloader(trainer, pl_module, "test"), 1)))[0]
        payload = quantized_bytes(converted, self.recipe.name, self._targets(pl_module), pl_module, example)
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            (out / "model.pt").write_bytes(payload)
            rank_zero_info(
                f"QAT int{self.weight_bits}: converted test acc1 {row['acc1']:.4f}, {len(payload) / 2**20:.2f} MiB -> {out / 'model.pt'}"
            )
        log_to_loggers(trainer, {"qat/size_mib": len(payload) / 2**20})
        trainer.strategy.barrier("qlight_qat")

    def convert(self, pl_module: LightningModule) -> nn.Module:
        """A copy of ``pl_module`` with torchao quantized weights in place of the fake-quant modules,
        holding exactly the integer codes and scales that the fake-quant forward uses."""
        model = detached_copy(pl_module)
        set_fake_quant_enabled(model, True)
        qparams = {name: weight_qparams(model.get_submodule(name)) for name in self._targets(model)}
        remove_fake_quant(model)
        model = self.recipe.quantize(model, set(qparams))
        for name, (codes, scale) in qparams.items():
            weight = model.get_submodule(name).weight
            weight.qdata.copy_(codes)
            weight.scale.copy_(scale)
        return model

    @staticmethod
    def _targets(pl_module: LightningModule) -> list[str]:
        return [name for name, module in pl_module.named_modules() if isinstance(module, FAKE_QUANTIZED)]

    def _record(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        model: nn.Module,
        split: str,
        epoch: int,
        converted: bool = False,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        loader = dataloader(trainer, pl_module, split)
        accuracy = evaluate(model, transferred_batches(trainer, pl_module, loader, shard=True), trainer)
        model.train(was_training)
        on = "converted" if converted else ("on" if epoch >= self.start_epoch else "off")
        row = {
            "epoch": epoch,
            "split": split,
            "fake_quant": on,
            "acc1": accuracy.acc1,
            "acc5": accuracy.acc5,
            "seconds": round(time.perf_counter() - start, 2),
        }
        self.results.append(row)
        prefix = "qat/converted" if converted else "qat"
        log_to_loggers(
            trainer,
            {f"{prefix}/acc1": accuracy.acc1, f"{prefix}/acc5": accuracy.acc5},
            step=None if converted else epoch,
        )
        if trainer.is_global_zero:
            out = output_dir(trainer, self.output_dir, "qat")
            write_csv(self.results, out / "results.csv", COLUMNS)
            (out / "results.md").write_text(f"# QAT int{self.weight_bits}\n\n{markdown_table(self.results, COLUMNS)}")
        return row

    def _settings(self) -> dict[str, Any]:
        return {
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "learned_scales": self.learned_scales,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self._settings(), "results": self.results}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {key: state_dict.get(key, False) for key in self._settings()}
        if saved != self._settings():
            raise QlightError(f"the checkpoint was trained with QAT {saved}, this callback has {self._settings()}")
        self.results = list(state_dict["results"])
