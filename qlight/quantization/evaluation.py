"""Working with a LightningModule outside the Trainer's loops: copies, loaders, batches, accuracy."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor, nn

from qlight.errors import QlightError


def detached_copy(pl_module: LightningModule) -> LightningModule:
    """A deep copy in eval mode; ``LightningModule.__getstate__`` drops the trainer, so it stays behind."""
    return copy.deepcopy(pl_module).eval()


def load_checkpoint_weights(pl_module: LightningModule, path: str, what: str = "checkpoint") -> None:
    """Load the ``state_dict`` of a Lightning checkpoint into ``pl_module``; one-line errors for a
    missing file, a file that is not a Lightning checkpoint and another architecture."""
    if not Path(path).is_file():
        raise QlightError(f"{what} {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if state is None:
        raise QlightError(f"{path} is not a Lightning checkpoint (no state_dict)")
    try:
        pl_module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise QlightError(f"{what} {path} holds another architecture ({first})") from None


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


@dataclass
class Accuracy:
    acc1: float
    acc5: float
    count: int


def transferred_batches(
    trainer: Trainer, pl_module: LightningModule, loader: Iterable, limit: int | None = None, shard: bool = False
) -> Iterable[tuple[Tensor, Tensor]]:
    """Yield ``(inputs, targets)`` from ``loader`` after the module's and DataModule's batch-transfer
    hooks, as the test loop would see them (no training augmentation).

    With ``shard``, rank r of a distributed run takes batches r, r + world, ... so that the ranks
    together see each batch exactly once.
    """
    stage = trainer.state.stage
    trainer.state.stage = RunningStage.TESTING  # the hooks key augmentation on the running stage
    try:
        for index, batch in enumerate(loader):
            if limit is not None and index >= limit:
                break
            if shard and index % trainer.world_size != trainer.global_rank:
                continue
            inputs, targets = pl_module._apply_batch_transfer_handler(batch, pl_module.device)[:2]
            yield inputs, targets
    finally:
        trainer.state.stage = stage


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    trainer: Trainer,
    input_dtype: torch.dtype = torch.float32,
) -> Accuracy:
    """Top-1/top-5 accuracy, summed over ranks so every rank gets the same numbers."""
    device = trainer.strategy.root_device
    correct = torch.zeros(2, dtype=torch.float64, device=device)  # top-1, top-5
    seen = 0
    for inputs, targets in batches:
        logits = model(inputs.to(input_dtype)).float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        # Summed where the batch lives and read once at the end: no host sync per batch.
        correct += torch.stack([hits[:, 0].sum(), hits.any(1).sum()]).to(device, torch.float64)
        seen += len(targets)
    totals = torch.cat([correct, torch.tensor([seen], dtype=torch.float64, device=device)])
    totals = trainer.strategy.reduce(totals, reduce_op="sum").cpu()
    count = int(totals[2])
    return Accuracy(acc1=float(totals[0] / max(count, 1)), acc5=float(totals[1] / max(count, 1)), count=count)
