"""Quantization-aware training as a Lightning callback."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from qlight.errors import QlightError
from qlight.files import atomic_write_bytes
from qlight.quantization.callbacks.deployment import QAT_RUNTIMES, check_runtimes, deploy_converted
from qlight.quantization.grid.intx import MAX_BITS, MIN_BITS, Granularity, groupable, intx_from_codes, set_weight
from qlight.quantization.io.serialization import quantized_bytes
from qlight.quantization.lightning_plumbing import (
    eval_copy,
    example_input,
    load_checkpoint_weights,
    log_to_loggers,
    non_finite_tensors,
)
from qlight.quantization.qat.fake_quant import (
    FAKE_QUANTIZED,
    activation_fake_quant_config,
    init_learned_scales,
    insert_fake_quant,
    remove_fake_quant,
    set_fake_quant_enabled,
    weight_fake_quant_config,
    weight_qparams,
)
from qlight.quantization.qat.results import QATResults, check_eval_split
from qlight.quantization.recipes.base import Recipe, check_granularity, float_modules, quantizable_modules
from qlight.quantization.recipes.mixed import MixedPrecision
from qlight.quantization.recipes.plans import check_bits, check_plan, read_plan
from qlight.quantization.recipes.weight_only import IntxWeightOnly


def _check_scales(learned_scales: bool, module: nn.Module, state_dict: dict[str, Any], *args: Any) -> None:
    # A load_state_dict pre-hook: a checkpoint trained with the other learned_scales setting would
    # otherwise surface as a missing/unexpected-keys traceback.
    learned = any(key.endswith("weight_fake_quantizer.scale") for key in state_dict)
    if learned != learned_scales:
        raise QlightError(
            f"the checkpoint was trained with QAT learned_scales={learned}, this callback has "
            f"learned_scales={learned_scales}: use the same setting to resume or test it"
        )


class QuantizationAwareTraining(QATResults):
    """Train with fake-quantized weights (and optionally activations) in every Conv2d and Linear,
    then convert to torchao's quantized weights.

    In ``setup`` the selected modules are swapped for fake-quantized ones that share their
    parameters and state-dict keys, so checkpoints, ``--ckpt_path`` resume and
    ``trainer.test(ckpt_path=...)`` work unchanged (with this callback present). Fake-quant is on
    from ``start_epoch``. After every training epoch the fake-quantized model is evaluated on the
    validation set (``qat/acc1``, ``qat/acc5``, ``<output_dir>/results.csv``). When fitting ends a
    copy is converted to the codes and scales the fake-quant forward uses (the recipe
    ``int<weight_bits>``), evaluated on the test set and saved to ``<output_dir>/model.pt`` (load
    with :func:`qlight.load_quantized`).

    Activations and BatchNorm stay float in the converted model: it is smaller, not faster. For the
    int8 graph that x86 (oneDNN) deploys, with int8 activations and BatchNorm folded into the conv,
    train with :class:`StaticQuantizationAwareTraining` instead (8- or 4-bit weights, a network that
    ``torch.export`` traces, float32). This callback takes 2..8 bits, either granularity, learned
    scales, any model and any precision.

    Args:
        weight_bits: weight bit-width, 2..8 (symmetric), or a plan of bits per layer: a mapping of
            layer name -> bits, or the path of a JSON plan (as ``mixed@`` PTQ recipes save). With a
            plan, exactly its layers are fake-quantized and the model is saved as that plan.
        granularity: which weights share a scale, as in :class:`~qlight.PostTrainingQuantization`:
            ``per_channel`` (one per output channel) or ``per_kernel_position``.
        activation_bits: optional dynamic per-token activation fake-quant, 2..8. Training only:
            the converted model keeps float activations.
        learned_scales: train the weight scales (LSQ-style, torchao's ``range_learning``), starting
            from the weights' max, instead of recomputing them from the weights every step.
        start_epoch: first epoch with fake-quant on (earlier epochs train in float).
        freeze_bn_epoch: from this epoch on BatchNorm layers use their running statistics.
        keep_first: leave the first Conv2d/Linear in float.
        keep_last: leave the last Conv2d/Linear in float.
        baseline_ckpt: a Lightning checkpoint whose weights start the QAT fit (default: the model's
            own weights, e.g. from scratch). Read with ``weights_only``.
        eval_every_epoch: evaluate the fake-quantized model after each training epoch.
        eval_split: the split evaluated each epoch, ``val`` (default) or ``test`` (to compare with
            PTQ, which reports test accuracy).
        output_dir: where files go; default ``<log_dir>/qat``.
        runtimes: where the converted model runs, a ``converted`` row each: ``eager`` (PyTorch, always)
            and ``onnxruntime`` (also written to ``<output_dir>/model.onnx``; needs the ``onnx`` extra),
            whose row adds its ``agreement`` with the eager model's predictions (a warning below 99.5%).

    Raises:
        QlightError: for arguments out of range, when the module has nothing to quantize or holds
            non-finite weights, and when a checkpoint was trained with other QAT settings.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from torch import nn
        >>> from qlight import CIFAR100DataModule, ImageClassifier, QuantizationAwareTraining, load_quantized
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(512, 100))
        >>> data = CIFAR100DataModule(
        ...     batch_size=32, synthetic=True, synthetic_train_size=192, synthetic_test_size=64, val_size=64
        ... )
        >>> qat = QuantizationAwareTraining(weight_bits=4)
        >>> trainer = Trainer(max_epochs=2, callbacks=[qat], logger=False, enable_progress_bar=False)
        >>> trainer.fit(ImageClassifier(net, lr=0.01), data)
        >>> [row["fake_quant"] for row in qat.results]
        ['on', 'on', 'converted']
        >>> int4 = load_quantized("qat/model.pt", model=ImageClassifier(net))
        >>> int4.model[0].weight.qdata.unique().numel() <= 16
        True
    """

    _older_settings = {"granularity": "per_kernel_position"}  # checkpoints of qlight 0.1 lack the key

    def __init__(
        self,
        weight_bits: int | str | dict[str, int] = 4,
        granularity: Granularity = "per_channel",
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
        runtimes: Sequence[str] = ("eager",),
    ) -> None:
        self._validate(weight_bits, granularity, activation_bits, start_epoch, freeze_bn_epoch, eval_split)
        if (keep_first or keep_last) and not isinstance(weight_bits, int):
            raise QlightError("keep_first/keep_last do not combine with a plan: leave those layers out of the plan")
        self.plan_source = weight_bits if isinstance(weight_bits, str) else None
        self.weight_bits: int | dict[str, int] = (
            dict(read_plan(Path(weight_bits))) if isinstance(weight_bits, str) else weight_bits
        )
        self.granularity = granularity
        self.activation_bits = activation_bits
        self.learned_scales = learned_scales
        self.start_epoch = start_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.keep_first = keep_first
        self.keep_last = keep_last
        self.baseline_ckpt = baseline_ckpt
        runtimes = check_runtimes(runtimes, "QuantizationAwareTraining", QAT_RUNTIMES)
        super().__init__(eval_every_epoch, eval_split, output_dir, runtimes)

    @staticmethod
    def _validate(
        weight_bits: int | str | Mapping[str, int],
        granularity: str,
        activation_bits: int | None,
        start_epoch: int,
        freeze_bn_epoch: int | None,
        eval_split: str,
    ) -> None:
        uniform = None if isinstance(weight_bits, (str, Mapping)) else weight_bits  # a plan is checked in setup
        for name, bits in (("weight_bits", uniform), ("activation_bits", activation_bits)):
            if bits is not None and not (isinstance(bits, int) and MIN_BITS <= bits <= MAX_BITS):
                raise QlightError(f"{name} must be between {MIN_BITS} and {MAX_BITS}, got {bits}")
        if weight_bits is None:
            raise QlightError(f"QAT needs weight_bits ({MIN_BITS}..{MAX_BITS})")
        if isinstance(weight_bits, Mapping):  # a plan file is checked as it is read
            if not weight_bits:
                raise QlightError("weight_bits is an empty plan: name at least one layer and its bits")
            check_bits(weight_bits, "weight_bits")
        check_granularity(granularity)
        if start_epoch < 0:
            raise QlightError(f"start_epoch must be 0 or more, got {start_epoch}")
        if freeze_bn_epoch is not None and freeze_bn_epoch < 0:
            raise QlightError(f"freeze_bn_epoch must be 0 or more, got {freeze_bn_epoch}")
        check_eval_split(eval_split)

    @property
    def recipe(self) -> Recipe:
        """The weight-only recipe the converted model is saved as."""
        if isinstance(self.weight_bits, int):
            return IntxWeightOnly(self.weight_bits, self.granularity)
        name = Path(self.plan_source).name if self.plan_source else "plan.json"
        return MixedPrecision(name, IntxWeightOnly(MAX_BITS, self.granularity))

    def _bits(self, layer: str) -> int:
        return self.weight_bits if isinstance(self.weight_bits, int) else self.weight_bits[layer]

    @property
    @override
    def title(self) -> str:
        return f"QAT {self.recipe.name}"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.start_epoch:
            raise QlightError(f"QAT start_epoch={self.start_epoch} is at or past max_epochs={trainer.max_epochs}")
        if stage == "fit" and self.baseline_ckpt:
            load_checkpoint_weights(pl_module, self.baseline_ckpt, "baseline checkpoint")
            rank_zero_info(f"QAT: starting from the weights of {self.baseline_ckpt}")
        bad = non_finite_tensors(pl_module)
        if bad:
            raise QlightError(f"QAT: {type(pl_module).__name__} holds NaN or Inf in {', '.join(bad[:3])}")
        targets = [
            name
            for name in quantizable_modules(pl_module, self.keep_first, self.keep_last)
            if groupable(pl_module.get_submodule(name).weight, self.granularity)
        ]
        if not isinstance(self.weight_bits, int):
            source = self.plan_source or "weight_bits"
            check_plan(self.weight_bits, pl_module, quantizable_modules(pl_module), source)
            targets = [name for name in targets if name in self.weight_bits]
        if not targets:
            raise QlightError(f"QAT: {type(pl_module).__name__} has no Conv2d or Linear module to fake-quantize")
        for bits in sorted({self._bits(name) for name in targets}):
            insert_fake_quant(
                pl_module,
                [name for name in targets if self._bits(name) == bits],
                weight_fake_quant_config(bits, self.learned_scales),
                activation_fake_quant_config(self.activation_bits) if self.activation_bits else None,
                self.granularity,
            )
        init_learned_scales(pl_module)
        set_fake_quant_enabled(pl_module, stage != "fit" or self.start_epoch == 0)
        hook = pl_module.register_load_state_dict_pre_hook(functools.partial(_check_scales, self.learned_scales))
        self._writing.callback(hook.remove)
        if stage == "fit":
            self._prepare_fit(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        set_fake_quant_enabled(pl_module, epoch >= self.start_epoch)
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            for module in pl_module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.eval_every_epoch:
            epoch = trainer.current_epoch
            state = "on" if epoch >= self.start_epoch else "off"
            self._record(trainer, pl_module, pl_module, self.eval_split, epoch, state)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        converted = self.convert(pl_module)
        example = example_input(trainer, pl_module)
        targets = self._targets(pl_module)
        kept = float_modules(pl_module, targets)
        payload = quantized_bytes(converted, self.recipe, targets, pl_module, example)
        eager = self._record_converted(trainer, pl_module, converted, example, payload, kept)
        row = eager[0]
        if trainer.is_global_zero:
            path = self._out(trainer) / "model.pt"
            atomic_write_bytes(path, payload)
            mib = len(payload) / 2**20
            rank_zero_info(
                f"QAT {self.recipe.name}: converted test top-1 {100 * row['acc1']:.2f}%, {mib:.2f} MiB -> {path}"
            )
        log_to_loggers(trainer, {"qat/size_mib": len(payload) / 2**20})
        deploy_converted(self, trainer, pl_module, converted, example, eager)
        trainer.strategy.barrier("qlight_qat")

    def convert(self, pl_module: LightningModule) -> nn.Module:
        """A copy of ``pl_module`` with torchao quantized weights in place of the fake-quant modules,
        holding exactly the integer codes and scales that the fake-quant forward uses."""
        model = eval_copy(pl_module)
        set_fake_quant_enabled(model, True)
        qparams = {name: weight_qparams(model.get_submodule(name)) for name in self._targets(model)}
        remove_fake_quant(model)
        for name, (codes, scale) in qparams.items():
            module = model.get_submodule(name)
            set_weight(module, intx_from_codes(codes, scale, self._bits(name), module.weight.dtype))
        bad = non_finite_tensors(model)
        if bad:
            raise QlightError(f"QAT trained NaN or Inf into {', '.join(bad[:3])}: lower the learning rate")
        return model

    @staticmethod
    def _targets(pl_module: nn.Module) -> list[str]:
        return [name for name, module in pl_module.named_modules() if isinstance(module, FAKE_QUANTIZED)]

    def _settings(self) -> dict[str, Any]:
        return {
            "weight_bits": self.weight_bits,
            "granularity": self.granularity,
            "activation_bits": self.activation_bits,
            "learned_scales": self.learned_scales,
        }

    @classmethod
    def missing_callback_error(cls, settings: dict[str, Any]) -> str:
        """What to say when a checkpoint trained with this callback (``settings``: its saved state) is
        loaded into a Trainer without it."""
        bits = settings.get("weight_bits")
        what = f"int{bits}" if isinstance(bits, int) else "a per-layer plan"
        return (
            f"this checkpoint was trained with {cls.__name__} ({what}); without that callback it would run the "
            f"float model: add {cls.__name__}(weight_bits={bits}) to the trainer"
        )
