"""Quantization-aware training of a deployable int8 graph (static int8 activations, int8 or int4
weights, BatchNorm folded) through torchao's PT2E flow, as a Lightning callback."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from qlight.errors import QlightError
from qlight.files import atomic_write_bytes
from qlight.quantization.callbacks.deployment import QAT_RUNTIMES, check_runtimes, deploy_converted
from qlight.quantization.callbacks.qat import QuantizationAwareTraining
from qlight.quantization.io.serialization import quantized_bytes
from qlight.quantization.lightning_plumbing import (
    eval_copy,
    example_input,
    is_compiled,
    load_checkpoint_weights,
    log_to_loggers,
    non_finite_tensors,
    parameter_device,
)
from qlight.quantization.qat import pt2e
from qlight.quantization.qat.results import QATResults, check_eval_split
from qlight.quantization.recipes.base import float_modules, quantizable_modules
from qlight.quantization.recipes.static import StaticPT2E, x86_quantizer

WEIGHT_BITS = (8, 4)  # what X86InductorQuantizer's per-channel weight spec expresses through qlight
_OBSERVER_KEY = "activation_post_process_"  # the state-dict names prepare_qat_pt2e gives its fake-quantizers
_CPU = torch.device("cpu")


def _check_observers(prefix: str, module: nn.Module, state_dict: dict[str, Any], *args: Any) -> None:
    # A load_state_dict pre-hook: a checkpoint of the float network would otherwise surface as a
    # missing-keys traceback listing every observer.
    if not any(key.startswith(prefix + _OBSERVER_KEY) for key in state_dict):
        raise QlightError(
            "the checkpoint holds no StaticQuantizationAwareTraining observers: it was not trained with this "
            "callback; start from its weights with StaticQuantizationAwareTraining(baseline_ckpt=PATH)"
        )


class StaticQuantizationAwareTraining(QATResults):
    """Train the network that will be deployed: static int8 activations (per tensor), int8 or int4
    weights (per output channel) and BatchNorm folded into the conv, through torchao's PT2E flow with
    ``X86InductorQuantizer``'s QAT config; convert it to the int8 graph at the end.

    In ``setup`` the LightningModule's ``network`` attribute is exported (strict ``torch.export``, in
    training mode) and replaced by torchao's prepared graph, which fake-quantizes weights and
    activations and trains conv+BatchNorm as the folded conv. Checkpoints hold its observers, so
    ``--ckpt_path`` resume and ``trainer.test(ckpt_path=...)`` work with this callback present. From
    ``freeze_observer_epoch`` the quantization ranges stop moving; from ``freeze_bn_epoch`` BatchNorm
    uses its running statistics. After every training epoch the fake-quantized model is evaluated
    (``qat/acc1``, ``qat/acc5``, ``<output_dir>/results.csv``). When fitting ends a copy is converted
    (the integer codes and scales the fake-quant forward used), evaluated on the test set on the CPU
    and saved as an exported graph to ``<output_dir>/model.pt2`` (load with :func:`qlight.load_quantized`).

    Choose :class:`QuantizationAwareTraining` instead for weights below 4 bits or other granularities,
    or for a model that ``torch.export`` cannot trace: it fake-quantizes weights only and converts to a
    weight-only model whose activations stay float.

    Args:
        weight_bits: weight bit-width, 8 or 4 (symmetric, one scale per output channel).
        network: the attribute of the LightningModule that holds the network to export and train
            (``model`` in :class:`~qlight.ImageClassifier`); it must be traceable by ``torch.export``
            and take one batch of inputs.
        freeze_observer_epoch: from this epoch on (1 or more) the activation ranges and weight scales
            stay fixed.
        freeze_bn_epoch: from this epoch on BatchNorm layers use their running statistics.
        keep_first: leave the first Conv2d/Linear of the network in float.
        keep_last: leave the last Conv2d/Linear of the network in float.
        baseline_ckpt: a Lightning checkpoint whose weights start the QAT fit (default: the model's
            own weights). Read with ``weights_only``.
        eval_every_epoch: evaluate the fake-quantized model after each training epoch.
        eval_split: the split evaluated each epoch, ``val`` (default) or ``test``.
        output_dir: where files go; default ``<log_dir>/qat``.
        runtimes: where the converted model runs, a ``converted`` row each: ``eager`` (PyTorch, always)
            and ``onnxruntime`` (also written to ``<output_dir>/model.onnx``; needs the ``onnx`` extra),
            whose row adds its ``agreement`` with the eager model's predictions (a warning below 99.5%).

    Raises:
        QlightError: for arguments out of range, a ``network`` that is missing or cannot be exported
            (naming the first call ``torch.export`` cannot trace), mixed or half precision (torchao's
            fused fake-quant takes float32), and a checkpoint trained with other settings.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from torch import nn
        >>> from qlight import CIFAR100DataModule, ImageClassifier, StaticQuantizationAwareTraining, load_quantized
        >>> net = nn.Sequential(
        ...     nn.Conv2d(3, 8, 3, stride=4), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 100)
        ... )
        >>> data = CIFAR100DataModule(
        ...     batch_size=32, synthetic=True, synthetic_train_size=192, synthetic_test_size=64, val_size=64
        ... )
        >>> qat = StaticQuantizationAwareTraining(network="model")
        >>> trainer = Trainer(max_epochs=2, callbacks=[qat], logger=False, enable_progress_bar=False)
        >>> trainer.fit(ImageClassifier(net, lr=0.01), data)
        >>> [row["fake_quant"] for row in qat.results]
        ['on', 'on', 'converted']
        >>> int8 = load_quantized("qat/model.pt2")
        >>> ops = {str(node.target) for node in int8.graph.nodes}
        >>> "aten.batch_norm.default" in ops, "quantized_decomposed.quantize_per_tensor.default" in ops
        (False, True)
    """

    def __init__(
        self,
        weight_bits: int = 8,
        network: str = "model",
        freeze_observer_epoch: int | None = None,
        freeze_bn_epoch: int | None = None,
        keep_first: bool = False,
        keep_last: bool = False,
        baseline_ckpt: str | None = None,
        eval_every_epoch: bool = True,
        eval_split: Literal["val", "test"] = "val",
        output_dir: str | None = None,
        runtimes: Sequence[str] = ("eager",),
    ) -> None:
        self._validate(weight_bits, network, freeze_observer_epoch, freeze_bn_epoch, eval_split)
        self.weight_bits = weight_bits
        self.network = network
        self.freeze_observer_epoch = freeze_observer_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.keep_first = keep_first
        self.keep_last = keep_last
        self.baseline_ckpt = baseline_ckpt
        self._kept: list[str] = []  # the layers left in float, named when the network is prepared
        runtimes = check_runtimes(runtimes, "StaticQuantizationAwareTraining", QAT_RUNTIMES)
        super().__init__(eval_every_epoch, eval_split, output_dir, runtimes)

    @staticmethod
    def _validate(
        weight_bits: int,
        network: str,
        freeze_observer_epoch: int | None,
        freeze_bn_epoch: int | None,
        eval_split: str,
    ) -> None:
        if weight_bits not in WEIGHT_BITS or isinstance(weight_bits, bool):
            supported = " or ".join(map(str, WEIGHT_BITS))
            raise QlightError(
                f"weight_bits must be {supported} with X86InductorQuantizer, got {weight_bits}; "
                "QuantizationAwareTraining (weight-only) takes 2..8"
            )
        if not isinstance(network, str) or not network.isidentifier():
            raise QlightError(f"network must name an attribute of the LightningModule, got {network!r}")
        if freeze_observer_epoch is not None and freeze_observer_epoch < 1:
            raise QlightError(
                f"freeze_observer_epoch must be 1 or more (the observers need an epoch to find the ranges), got "
                f"{freeze_observer_epoch}"
            )
        if freeze_bn_epoch is not None and freeze_bn_epoch < 0:
            raise QlightError(f"freeze_bn_epoch must be 0 or more, got {freeze_bn_epoch}")
        check_eval_split(eval_split)

    @property
    def recipe(self) -> StaticPT2E:
        """The static recipe the converted model is saved as (the PTQ recipe of the same graph)."""
        return StaticPT2E(self.weight_bits)

    @property
    @override
    def title(self) -> str:
        return f"Static QAT {self.recipe.name}"

    def _network(self, pl_module: LightningModule) -> nn.Module:
        network = getattr(pl_module, self.network, None)
        if not isinstance(network, nn.Module):
            children = ", ".join(name for name, _ in pl_module.named_children()) or "none"
            raise QlightError(
                f"{type(pl_module).__name__} has no nn.Module attribute {self.network!r} to export: set "
                f"StaticQuantizationAwareTraining(network=...) to one of its modules ({children})"
            )
        return network

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._check_trainer(trainer)
        if is_compiled(pl_module):
            raise QlightError(
                "StaticQuantizationAwareTraining runs PT2E's prepared graph, which torch.compile cannot trace "
                "(its observers resize their buffers): pass the LightningModule uncompiled (--model.compile false)"
            )
        network = self._network(pl_module)
        if not pt2e.is_prepared(network):
            if stage == "fit" and self.baseline_ckpt:
                load_checkpoint_weights(pl_module, self.baseline_ckpt, "baseline checkpoint")
                rank_zero_info(f"Static QAT: starting from the weights of {self.baseline_ckpt}")
            bad = non_finite_tensors(pl_module)
            if bad:
                raise QlightError(f"Static QAT: {type(pl_module).__name__} holds NaN or Inf in {', '.join(bad[:3])}")
            # Exported and prepared where the weights are now; Lightning moves the graph with the module.
            example = example_input(
                trainer, pl_module, "train" if stage == "fit" else "test", device=parameter_device(network)
            )
            setattr(pl_module, self.network, self._prepare(network, example))
        hook = pl_module.register_load_state_dict_pre_hook(functools.partial(_check_observers, f"{self.network}."))
        self._writing.callback(hook.remove)
        if stage == "fit":
            self._prepare_fit(trainer, pl_module)

    def _check_trainer(self, trainer: Trainer) -> None:
        if str(trainer.precision) not in ("32-true", "32"):
            raise QlightError(
                f"StaticQuantizationAwareTraining trains in float32 (torchao's fused fake-quant takes no "
                f"{trainer.precision}): set trainer.precision to 32-true"
            )
        if any(isinstance(callback, QuantizationAwareTraining) for callback in trainer.callbacks):
            raise QlightError("use either QuantizationAwareTraining or StaticQuantizationAwareTraining, not both")

    def _prepare(self, network: nn.Module, example: torch.Tensor) -> nn.Module:
        quantized = quantizable_modules(network, self.keep_first, self.keep_last)
        kept = float_modules(network, quantized)
        self._kept = [f"{self.network}.{name}" for name in kept]  # named in the LightningModule, as PTQ does
        quantizer = x86_quantizer(self.weight_bits, is_qat=True, float_modules=kept)
        try:
            prepared = pt2e.prepare(network, example, quantizer)
        except QlightError as err:
            raise QlightError(f"StaticQuantizationAwareTraining: {self.network}: {err}") from None
        if not pt2e.fake_quantizers(prepared):
            raise QlightError(
                f"StaticQuantizationAwareTraining: X86InductorQuantizer found no Conv2d or Linear to quantize in "
                f"{self.network}"
            )
        return prepared

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        observers = self.freeze_observer_epoch is not None and epoch >= self.freeze_observer_epoch
        batch_norm = self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch
        pt2e.freeze(self._network(pl_module), observers, batch_norm)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Lightning's loops restore modes by writing ``module.training``, which does not reach the
        # graph's literals: follow the module's flag every batch (no-op when nothing changed).
        network = self._network(pl_module)
        pt2e.set_phase(network, network.training)

    def _evaluation_phase(self, trainer: Trainer, pl_module: LightningModule) -> None:
        network = self._network(pl_module)
        pt2e.sync_observers(network)
        pt2e.set_phase(network, False)  # also when an overridden on_*_model_eval kept training mode

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluation_phase(trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluation_phase(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluation_phase(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pt2e.sync_observers(self._network(pl_module))
        if self.eval_every_epoch:
            self._record(trainer, pl_module, pl_module, self.eval_split, trainer.current_epoch, "on")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        deployed = self.convert(pl_module)
        example = example_input(trainer, pl_module).to(_CPU)
        payload = quantized_bytes(deployed, self.recipe, [], pl_module, example)
        eager = self._record_converted(trainer, pl_module, deployed, example, payload, self._kept, _CPU)
        row = eager[0]
        if trainer.is_global_zero:
            path = self._out(trainer) / "model.pt2"
            atomic_write_bytes(path, payload)
            summary = f"converted test top-1 {100 * row['acc1']:.2f}%, {len(payload) / 2**20:.2f} MiB -> {path}"
            rank_zero_info(f"Static QAT {self.recipe.name}: {summary}")
        log_to_loggers(trainer, {"qat/size_mib": len(payload) / 2**20})
        deploy_converted(self, trainer, pl_module, deployed, example, eager, _CPU)
        trainer.strategy.barrier("qlight_static_qat")

    def convert(self, pl_module: LightningModule) -> LightningModule:
        """A copy of ``pl_module`` on the CPU, in eval mode, whose network is the int8 graph converted
        from the prepared one (BatchNorm folded, the scales training used). Call on every rank."""
        network = self._network(pl_module)
        pt2e.sync_observers(network)
        with _swapped(pl_module, self.network, pt2e.convert(network)):
            return eval_copy(pl_module).to(_CPU)

    def _settings(self) -> dict[str, Any]:
        return {
            "weight_bits": self.weight_bits,
            "network": self.network,
            "keep_first": self.keep_first,
            "keep_last": self.keep_last,
        }

    @classmethod
    def missing_callback_error(cls, settings: dict[str, Any]) -> str:
        """What to say when a checkpoint trained with this callback (``settings``: its saved state) is
        loaded into a Trainer without it."""
        args = f"weight_bits={settings.get('weight_bits')}, network={settings.get('network')!r}"
        return (
            f"this checkpoint was trained with {cls.__name__} (int{settings.get('weight_bits')} PT2E graph); its "
            f"observers and weights fit only that callback's prepared graph: add {cls.__name__}({args}) to the "
            "trainer"
        )


@contextlib.contextmanager
def _swapped(owner: nn.Module, name: str, module: nn.Module) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, module)
    try:
        yield
    finally:
        setattr(owner, name, original)
