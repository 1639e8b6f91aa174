"""What both QAT callbacks share: the table of per-epoch evaluations and of the converted model."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from qlight.errors import QlightError
from qlight.files import exclusive_dir
from qlight.quantization.lightning_plumbing import (
    dataloader,
    evaluate,
    log_to_loggers,
    output_dir,
    transferred_batches,
)
from qlight.quantization.runtimes.agreement import compare_logits
from qlight.quantization.runtimes.speed import measure_speed
from qlight.tables import write_results

COLUMNS = [
    "epoch",
    "split",
    "fake_quant",
    "acc1",
    "acc5",
    "runtime",
    "agreement",
    "max_logit_diff",
    "size_bytes",
    "kept_float",
    "images_per_s",
    "latency_ms",
    "spread_pct",
    "device",
    "seconds",
    "note",
    "error",
]
EVAL_SPLITS = ("val", "test")


def check_eval_split(eval_split: str) -> None:
    if eval_split not in EVAL_SPLITS:
        raise QlightError(f"eval_split must be 'val' or 'test', got {eval_split!r}")


class QATResults(Callback):
    """Evaluates the model in training after each epoch (``eval_every_epoch``, on ``eval_split``) and
    the converted model on the test set, as rows of ``<output_dir>/results.csv`` and ``results.md``
    and as ``qat/acc1``, ``qat/acc5`` (``qat/converted/...``) in the loggers; the converted model in
    each of ``runtimes`` besides eager PyTorch is a further ``converted`` row with its ``agreement``
    (``qat/converted/<runtime>/...``). Rank zero holds ``output_dir`` while fitting, so that a second
    run cannot interleave its files."""

    def __init__(
        self, eval_every_epoch: bool, eval_split: str, output_dir: str | None, runtimes: tuple[str, ...] = ("eager",)
    ) -> None:
        self.eval_every_epoch = eval_every_epoch
        self.eval_split = eval_split
        self.output_dir = output_dir
        self.runtimes = runtimes  # checked by the callback; eager first
        self.results: list[dict[str, Any]] = []  # rows of results.csv, restored with checkpoints
        self._writing = contextlib.ExitStack()  # the output folder's lock and load hooks, until teardown

    @property
    def title(self) -> str:
        """The heading of ``results.md``."""
        raise NotImplementedError

    _older_settings: dict[str, Any] = {}  # settings that older checkpoints lack, with the value they had

    def _settings(self) -> dict[str, Any]:
        """What the trained weights depend on: a checkpoint made with other settings is refused."""
        raise NotImplementedError

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self._settings(), "results": self.results}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {key: state_dict.get(key, self._older_settings.get(key)) for key in self._settings()}
        if saved != self._settings():
            raise QlightError(
                f"the checkpoint was trained with {type(self).__name__} {saved}, this callback has {self._settings()}"
            )
        self.results = list(state_dict["results"])

    def _out(self, trainer: Trainer) -> Path:
        return output_dir(trainer, self.output_dir, "qat")

    def _prepare_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Before any training: the loader the per-epoch evaluation reads exists; the output folder is held."""
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        if self.eval_every_epoch and not is_overridden(f"{self.eval_split}_dataloader", source):
            raise QlightError(
                f"{type(self).__name__} evaluates every epoch on the {self.eval_split} split, but "
                f"{type(source).__name__} has no {self.eval_split}_dataloader: set eval_split to a split it has "
                "or eval_every_epoch=False"
            )
        if trainer.is_global_zero:
            self._writing.enter_context(exclusive_dir(self._out(trainer), type(self).__name__))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._writing.close()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._writing.close()

    def _record(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        model: nn.Module,
        split: str,
        epoch: int,
        fake_quant: str,
        extra: dict[str, Any] | None = None,
        device: torch.device | None = None,
        keep_logits: bool = False,
        reference: Tensor | None = None,
    ) -> tuple[dict[str, Any], Tensor | None]:
        """Evaluate ``model`` (on ``device``: default the module's) on ``split``; add its row, with the
        ``extra`` columns, to the table. Returns the row and, with ``keep_logits``, this rank's logits;
        with ``reference`` (logits of the same images) the row holds the agreement with them."""
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        batches = transferred_batches(trainer, pl_module, dataloader(trainer, pl_module, split), shard=True)
        if device is not None:
            batches = ((x.to(device), y.to(device)) for x, y in batches)
        accuracy = evaluate(model, batches, trainer, keep_logits=keep_logits or reference is not None)
        model.train(was_training)
        row = {"epoch": epoch, "split": split, "fake_quant": fake_quant, "acc1": accuracy.acc1, "acc5": accuracy.acc5}
        row.update(extra or {})
        if reference is not None:
            agreement = compare_logits(reference, accuracy.logits, trainer.strategy.all_gather)
            row.update(agreement=agreement.agreement, max_logit_diff=agreement.max_logit_diff)
            row["note"] = agreement.warning(f"{self.title} in {row.get('runtime')}") or ""
            if row["note"]:
                rank_zero_warn(row["note"])
        row["seconds"] = round(time.perf_counter() - start, 2)
        converted = fake_quant == "converted"
        prefix = "qat/converted" if converted else "qat"
        if row.get("runtime", "eager") != "eager":
            prefix += f"/{row['runtime']}"
        metrics = {f"{prefix}/acc1": accuracy.acc1, f"{prefix}/acc5": accuracy.acc5}
        log_to_loggers(trainer, metrics, step=None if converted else epoch)
        self.add_row(trainer, row)
        return row, accuracy.logits

    def _record_converted(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        converted: nn.Module,
        example: Tensor,
        payload: bytes,
        kept: list[str],
        device: torch.device | None = None,
    ) -> tuple[dict[str, Any], Tensor | None]:
        """The eager ``converted`` row (file size, layers left float, speed) and, when other runtimes
        follow, the logits their rows are compared with."""
        extra = {"runtime": "eager", "size_bytes": len(payload), "kept_float": ", ".join(kept)}
        extra.update(vars(measure_speed(converted, example)))
        epoch, keep = trainer.current_epoch, len(self.runtimes) > 1
        return self._record(trainer, pl_module, converted, "test", epoch, "converted", extra, device, keep_logits=keep)

    def add_row(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """Append ``row`` to the table and rewrite its files."""
        self.results.append(row)
        if trainer.is_global_zero:
            write_results(self._out(trainer), self.title, self.results, COLUMNS)
