"""Lightning plumbing for callbacks that run the model outside the Trainer's loops: copies, loaders,
transferred batches, evaluation across ranks, checkpoint weights, output folders and loggers; and
for modules, whether a training step's logged values reach the loggers.

Everything here that touches Lightning internals (``_apply_batch_transfer_handler``, the running
stage, the logger connector) lives in this one module."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.compile import to_uncompiled
from torch import Tensor, nn
from torchao.quantization import IntxUnpackedToInt8Tensor

from qlight.errors import QlightError
from qlight.files import load_torch_file


def eval_copy(pl_module: LightningModule) -> LightningModule:
    """An uncompiled deep copy in eval mode; ``LightningModule.__getstate__`` drops the trainer, so it
    stays behind."""
    model = copy.deepcopy(pl_module)
    # A compiled module's wrappers survive the copy still bound to the original, so the copy would
    # run (and report) the original model: Lightning's from_compiled (``trainer.fit(torch.compile(m))``)
    # wraps forward and the step methods; ``nn.Module.compile()`` wraps ``__call__``, which nn.Module's
    # own copy drops but LightningModule's ``__getstate__`` keeps (on any LightningModule inside too).
    if model._compiler_ctx is not None:
        to_uncompiled(model)
    for module in model.modules():
        module._compiled_call_impl = None
    return model.eval()


def is_compiled(pl_module: LightningModule) -> bool:
    """Whether ``pl_module`` or a module in it runs under ``torch.compile``: Lightning's
    ``from_compiled`` (what ``trainer.fit(torch.compile(m))`` does), or ``compile()`` of the module or
    of a part (``ImageClassifier(compile=True)`` compiles its backbone)."""
    return pl_module._compiler_ctx is not None or any(m._compiled_call_impl is not None for m in pl_module.modules())


def load_checkpoint_weights(pl_module: LightningModule, path: str | Path, what: str = "checkpoint") -> None:
    """Load the ``state_dict`` of a Lightning checkpoint into ``pl_module`` (``weights_only``: the file
    cannot run code); one-line errors for a missing, corrupt or foreign file and another architecture."""
    checkpoint = load_torch_file(path, what)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise QlightError(f"{what} {path} is not a Lightning checkpoint (no state_dict)")
    try:
        pl_module.load_state_dict(state)
    except RuntimeError as err:
        lines = str(err).splitlines()
        raise QlightError(f"{what} {path} holds another architecture ({(lines[1:] or lines)[0].strip()})") from None


def non_finite_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` that hold NaN or Inf (for torchao's
    quantized weights: in their scales)."""
    bad = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        values = tensor.scale if isinstance(tensor, IntxUnpackedToInt8Tensor) else tensor
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            bad.append(name)
    return bad


def dataloader(trainer: Trainer, pl_module: LightningModule, split: Literal["train", "val", "test"]) -> Any:
    """The DataModule's (or else the module's) own loader for ``split``.

    The DataModule is set up for the split's stage unless the running stage already did it (fit
    sets up train and val, test sets up test), so per-epoch calls do not reload data.
    """
    if trainer.datamodule is None:
        return getattr(pl_module, f"{split}_dataloader")()
    stage = "test" if split == "test" else "fit"
    if trainer.state.fn != stage:
        trainer.datamodule.setup(stage)
    return getattr(trainer.datamodule, f"{split}_dataloader")()


def transferred_batches(
    trainer: Trainer,
    pl_module: LightningModule,
    loader: Iterable,
    limit: int | None = None,
    shard: bool = False,
    device: torch.device | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(inputs, targets)`` from ``loader`` after the module's and DataModule's batch-transfer
    hooks, as the test loop would see them (no training augmentation), on ``device`` (default: the
    module's).

    With ``shard``, rank r of a distributed run takes batches r, r + world, ... so that the ranks
    together see each batch exactly once.
    """
    device = pl_module.device if device is None else device
    stage = trainer.state.stage
    trainer.state.stage = RunningStage.TESTING  # the hooks key augmentation on the running stage
    try:
        for index, batch in enumerate(loader):
            if limit is not None and index >= limit:
                break
            if shard and index % trainer.world_size != trainer.global_rank:
                continue
            inputs, targets = pl_module._apply_batch_transfer_handler(batch, device)[:2]
            yield inputs, targets
    finally:
        trainer.state.stage = stage


def example_input(
    trainer: Trainer,
    pl_module: LightningModule,
    split: Literal["train", "test"] = "test",
    device: torch.device | None = None,
) -> Tensor:
    """The inputs of the first batch of ``split``, transferred, on ``device`` (default: the module's)."""
    loader = dataloader(trainer, pl_module, split)
    return next(iter(transferred_batches(trainer, pl_module, loader, 1, device=device)))[0]


def parameter_device(module: nn.Module) -> torch.device:
    """Where ``module``'s weights are. In the ``setup`` hooks ``LightningModule.device`` already names
    the accelerator while the weights are still on the CPU (Lightning moves them after setup)."""
    return next(module.parameters(), torch.empty(0)).device


@dataclass
class Accuracy:
    acc1: float
    acc5: float
    count: int
    logits: Tensor | None = None  # this rank's logits, in batch order, on the CPU (``keep_logits``)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    trainer: Trainer,
    input_dtype: torch.dtype = torch.float32,
    keep_logits: bool = False,
) -> Accuracy:
    """Top-1/top-5 accuracy, summed over ranks so every rank gets the same numbers; with
    ``keep_logits`` also this rank's logits (to compare another runtime's with, in the same pass).

    Raises ``FloatingPointError`` when the model gives a NaN or Inf logit: its accuracy would be a
    plausible-looking number computed from garbage.
    """
    device = trainer.strategy.root_device
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, non-finite logits
    seen = 0
    kept: list[Tensor] = []
    for inputs, targets in batches:
        logits = model(inputs.to(input_dtype)).float()
        if keep_logits:
            kept.append(logits.to("cpu", non_blocking=True))
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        bad = (~torch.isfinite(logits)).any(1)
        # Summed where the batch lives and read once at the end: no host sync per batch.
        counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), bad.sum()]).to(device, torch.float64)
        seen += len(targets)
    totals = torch.cat([counts, torch.tensor([seen], dtype=torch.float64, device=device)])
    totals = trainer.strategy.reduce(totals, reduce_op="sum").cpu()
    if totals[2] > 0:
        raise FloatingPointError(f"non-finite logits for {int(totals[2])} of {int(totals[3])} test images")
    count = int(totals[3])
    return Accuracy(
        acc1=float(totals[0] / max(count, 1)),
        acc5=float(totals[1] / max(count, 1)),
        count=count,
        logits=torch.cat(kept) if kept else None,
    )


def logs_this_step(pl_module: LightningModule) -> bool:
    """Whether the loggers write what the current training step logs (every ``log_every_n_steps``;
    always outside a Trainer). ``self.log`` costs about half a millisecond of host time per call, an
    eighth of a small model's step, and Lightning drops the values of the other steps unread."""
    trainer = pl_module._trainer
    return trainer is None or bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs


def output_dir(trainer: Trainer, given: str | None, name: str) -> Path:
    """``given`` or ``<log_dir>/<name>`` (the logger's version folder, else ``default_root_dir``)."""
    return Path(given) if given else Path(trainer.log_dir or trainer.default_root_dir) / name


def log_to_loggers(
    trainer: Trainer, metrics: dict[str, float], text: dict[str, str] | None = None, step: int | None = None
) -> None:
    """Scalars to every logger; Markdown text to loggers that take it (TensorBoard's ``add_text``)."""
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
        if add_text is not None and trainer.is_global_zero:
            for tag, body in (text or {}).items():
                add_text(tag, body, step)
        logger.save()


def log_figure(trainer: Trainer, tag: str, figure: Any) -> None:
    """A matplotlib figure to the loggers that take one (TensorBoard's ``add_figure``)."""
    for logger in trainer.loggers:
        add_figure = getattr(getattr(logger, "experiment", None), "add_figure", None)
        if add_figure is not None:
            add_figure(tag, figure, trainer.global_step)
