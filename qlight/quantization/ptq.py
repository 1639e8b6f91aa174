"""Post-training quantization as a Lightning callback."""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from qlight.errors import QlightError
from qlight.quantization.evaluation import (
    dataloader,
    detached_copy,
    evaluate,
    load_checkpoint_weights,
    transferred_batches,
)
from qlight.quantization.recipes import FloatCast, Recipe, parse_recipe, quantizable_modules, quantized_weight_sizes
from qlight.quantization.reporting import log_to_loggers, markdown_table, output_dir, write_csv
from qlight.quantization.serialization import quantized_bytes

COLUMNS = [
    "recipe",
    "bits",
    "acc1",
    "acc5",
    "delta_acc1",
    "size_bytes",
    "size_mib",
    "compression",
    "quantized_modules",
    "quantized_params",
    "seconds",
    "error",
]


class PostTrainingQuantization(Callback):
    """Quantize copies of the trained model with torchao, evaluate and save each one.

    Works with any LightningModule whose ``forward(x)`` returns class logits and whose test batches
    are ``(inputs, targets)``. For every recipe it writes ``<output_dir>/<recipe>.pt`` (``.pt2`` for
    static recipes; load either with :func:`qlight.load_quantized`), logs ``ptq/<recipe>/acc1``,
    ``acc5`` and ``size_mib``, and writes ``results.csv`` and ``results.md``. ``fp32`` (the
    unquantized copy) is always evaluated first as the reference for ``delta_acc1``.

    Args:
        recipes: names from :func:`qlight.quantization.valid_recipe_names`: ``fp32``, ``fp16``,
            ``bf16``, ``int2``..``int8`` (weight-only), ``int8_static``, ``w4a8_static``.
        run_on: ``fit`` quantizes the best checkpoint's weights when fitting ends (the last weights
            without a checkpoint callback); ``test`` quantizes the tested weights after ``test``.
        keep_first: leave the first Conv2d/Linear in float.
        keep_last: leave the last Conv2d/Linear (usually the classifier head) in float.
        calibration_batches: training batches that calibrate static recipes' activation ranges.
        eval_batches: limit the test batches per recipe (``None``: all).
        output_dir: where files go; default ``<log_dir>/ptq``.
        save_models: write each quantized model to disk (its size is measured either way).
    """

    def __init__(
        self,
        recipes: Sequence[str] = ("fp32", "fp16", "bf16", "int8", "int4"),
        run_on: Sequence[Literal["fit", "test"]] = ("fit", "test"),
        keep_first: bool = False,
        keep_last: bool = False,
        calibration_batches: int = 16,
        eval_batches: int | None = None,
        output_dir: str | None = None,
        save_models: bool = True,
    ) -> None:
        parsed = [parse_recipe(name) for name in recipes]
        if not parsed:
            raise QlightError("PostTrainingQuantization needs at least one recipe")
        if set(run_on) - {"fit", "test"}:
            raise QlightError(f"run_on takes 'fit' and/or 'test', got {list(run_on)}")
        if calibration_batches < 0:
            raise QlightError(f"calibration_batches must be 0 or more, got {calibration_batches}")
        static = [r.name for r in parsed if r.static]
        if static and calibration_batches == 0:
            raise QlightError(f"{', '.join(static)} need calibration: set calibration_batches to 1 or more")
        if eval_batches is not None and eval_batches < 1:
            raise QlightError(f"eval_batches must be at least 1 (or None for all), got {eval_batches}")
        names = [r.name for r in parsed]
        self.recipes: list[Recipe] = [parse_recipe("fp32")] * ("fp32" not in names) + parsed
        self.run_on = set(run_on)
        self.keep_first = keep_first
        self.keep_last = keep_last
        self.calibration_batches = calibration_batches
        self.eval_batches = eval_batches
        self.output_dir = output_dir
        self.save_models = save_models
        self.results: list[dict[str, Any]] = []  # rows of the last run, as written to results.csv

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "fit" in self.run_on:
            self.run(trainer, pl_module, checkpoint=getattr(trainer.checkpoint_callback, "best_model_path", "") or None)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "test" in self.run_on:
            self.run(trainer, pl_module)

    def run(self, trainer: Trainer, pl_module: LightningModule, checkpoint: str | None = None) -> list[dict[str, Any]]:
        """Quantize, evaluate and save every recipe; returns the table's rows."""
        source = detached_copy(pl_module)
        if checkpoint:
            load_checkpoint_weights(source, checkpoint)
            rank_zero_info(f"PTQ: weights of {checkpoint}")
        targets = quantizable_modules(source, self.keep_first, self.keep_last)
        if not targets:
            rank_zero_warn(f"PTQ: {type(pl_module).__name__} has no Conv2d or Linear module: nothing is quantized")
        out = output_dir(trainer, self.output_dir, "ptq")
        test_loader = dataloader(trainer, pl_module, "test")
        calibration: list[torch.Tensor] = []
        if any(r.static for r in self.recipes):
            train_loader = dataloader(trainer, pl_module, "train")
            calibration = [
                x.cpu() for x, _ in transferred_batches(trainer, pl_module, train_loader, self.calibration_batches)
            ]
        example = next(iter(transferred_batches(trainer, pl_module, test_loader, 1)))[0]

        rows: list[dict[str, Any]] = []
        for recipe in self.recipes:
            start = time.perf_counter()
            row: dict[str, Any] = {"recipe": recipe.name, "bits": recipe.bits}
            try:
                device = torch.device("cpu") if recipe.static else pl_module.device
                model = recipe.quantize(copy.deepcopy(source).to(device).eval(), set(targets), calibration)
                batches = (
                    (x.to(device), y.to(device))
                    for x, y in transferred_batches(trainer, pl_module, test_loader, self.eval_batches, shard=True)
                )
                accuracy = evaluate(model, batches, trainer, recipe.input_dtype)
                payload = quantized_bytes(model, recipe.name, targets, source, example.to(device))
                if self.save_models and trainer.is_global_zero:
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"{recipe.name}{'.pt2' if recipe.static else '.pt'}").write_bytes(payload)
                row.update(
                    acc1=accuracy.acc1, acc5=accuracy.acc5, size_bytes=len(payload), **_quantized_counts(model, recipe)
                )
            except QlightError:
                raise
            except Exception as err:  # one failing recipe must not lose the others
                rank_zero_warn(f"PTQ {recipe.name} failed: {type(err).__name__}: {err}")
                row["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
                rank_zero_info(traceback.format_exc())
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
        self.results = _finish_table(rows)
        table = markdown_table(self.results, COLUMNS)
        if trainer.is_global_zero:
            write_csv(self.results, out / "results.csv", COLUMNS)
            (out / "results.md").write_text(f"# Post-training quantization\n\n{table}")
            rank_zero_info(f"PTQ results ({out / 'results.csv'}):\n{table}")
        metrics = {
            f"ptq/{row['recipe']}/{key}": float(row[key])
            for row in self.results
            for key in ("acc1", "acc5", "size_mib")
            if row.get(key) is not None
        }
        log_to_loggers(trainer, metrics, {"ptq/results": table})
        trainer.strategy.barrier("qlight_ptq")
        return self.results


def _quantized_counts(model: nn.Module, recipe: Recipe) -> dict[str, int]:
    # Counted on the quantized model itself, so the table shows what was done, not what was asked.
    if isinstance(recipe, FloatCast):
        cast = recipe.dtype != torch.float32
        return {"quantized_modules": 0, "quantized_params": sum(p.numel() for p in model.parameters()) * cast}
    weights = quantized_weight_sizes(model)
    return {"quantized_modules": len(weights), "quantized_params": sum(weights)}


def _finish_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    reference = next((r for r in rows if r["recipe"] == "fp32" and "acc1" in r), None)
    for row in rows:
        if "size_bytes" in row:
            row["size_mib"] = row["size_bytes"] / 2**20
        if reference is not None and "acc1" in row:
            row["delta_acc1"] = row["acc1"] - reference["acc1"]
            row["compression"] = reference["size_bytes"] / row["size_bytes"]
    return rows
