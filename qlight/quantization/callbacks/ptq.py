"""Post-training quantization as a Lightning callback."""

from __future__ import annotations

import contextlib
import copy
import json
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchao.quantization import IntxUnpackedToInt8Tensor
from typing_extensions import override

from qlight.errors import QlightError, QlightWarning, Unsupported
from qlight.files import LOCK, atomic_write_bytes, atomic_write_text, exclusive_dir
from qlight.quantization.callbacks.deployment import (
    ONNX_FILE,
    WEIGHT_ONLY_ORT_NOTE,
    EagerResult,
    check_runtimes,
    deploy,
    input_dtype,
)
from qlight.quantization.callbacks.sensitivity import write_sensitivity
from qlight.quantization.grid.intx import Granularity
from qlight.quantization.io.serialization import quantized_bytes
from qlight.quantization.lightning_plumbing import (
    dataloader,
    eval_copy,
    evaluate,
    example_input,
    load_checkpoint_weights,
    log_to_loggers,
    non_finite_tensors,
    output_dir,
    transferred_batches,
)
from qlight.quantization.methods import Calibration
from qlight.quantization.recipes.base import (
    DEFAULT_GRANULARITY,
    Recipe,
    check_granularity,
    float_modules,
    parse_method,
    parse_recipe,
    quantizable_modules,
    quantized_weight_sizes,
)
from qlight.quantization.recipes.float_cast import FloatCast
from qlight.quantization.recipes.mixed import MixedPrecision
from qlight.quantization.recipes.plans import average_bits, realised_plan
from qlight.quantization.recipes.weight_only import IntxWeightOnly
from qlight.quantization.runtimes.agreement import compare_logits
from qlight.quantization.runtimes.speed import measure_speed
from qlight.tables import markdown_table, write_results

MANIFEST = "ptq_files.json"  # the files the last run wrote into the output folder
COLUMNS = [
    "recipe",
    "requested",
    "bits",
    "granularity",
    "method",
    "runtime",
    "acc1",
    "acc5",
    "delta_acc1",
    "agreement",
    "max_logit_diff",
    "size_bytes",
    "size_mib",
    "compression",
    "quantized_modules",
    "quantized_params",
    "kept_float",
    "images_per_s",
    "speedup",
    "latency_ms",
    "spread_pct",
    "device",
    "quantize_seconds",
    "calibration_batches",
    "seconds",
    "note",
    "error",
]


class PostTrainingQuantization(Callback):
    """Quantize copies of the trained model with torchao, evaluate and save each one.

    Works with any LightningModule whose ``forward(x)`` returns class logits and whose test batches
    are ``(inputs, targets)``. For every recipe it writes ``<output_dir>/<recipe>.pt`` (``.pt2`` for
    static recipes, ``.onnx`` for those run by ONNX Runtime (``runtimes``); load any with
    :func:`qlight.load_quantized`), writes ``results.csv`` and ``results.md``, and logs the table as
    text (``ptq/results``) and top-1 as scalars: uniform weight-only recipes as one chart per
    granularity and method with the bits as its step (``ptq/acc1_vs_bits/per_channel_rtn``), the
    others as ``ptq/<recipe>/acc1``. ``fp32`` (the
    unquantized copy) is always evaluated first as the reference for ``delta_acc1``. A recipe that
    fails (or gives NaN/Inf logits) records its error in its row and the others go on.

    Args:
        recipes: names from :func:`qlight.quantization.valid_recipe_names`: ``fp32``, ``fp16``,
            ``bf16``, ``int2``..``int8`` (weight-only), ``int8_static``, ``w4a8_static`` (PT2E graphs
            that run on the CPU; with ``_inductor`` compiled to int8 kernels, with ``_onnx`` exported
            to ONNX Runtime: the older spelling of ``runtimes``, without its agreement columns). A
            weight-only name may name its methods (``int3+gptq+bn_reestimation+bias_correction``) and
            end in ``@per_channel`` or ``@per_kernel_position``.
        granularity: which weights share a scale in weight-only recipes without a suffix:
            ``per_channel`` (one scale per output channel; over in x kh x kw on a conv) or
            ``per_kernel_position`` (one per output channel and kernel position); a list runs each.
        methods: how weight-only recipes that name no method are made; a list runs each. ``rtn``
            (round to nearest) or ``gptq`` (error-compensating rounding), optionally followed by
            ``bn_reestimation`` (recompute BatchNorm statistics) and/or ``bias_correction`` (remove
            each output channel's mean shift), joined with ``+``. All but ``rtn`` use the calibration
            batches; GPTQ's input Hessians come from the float model in one pass per run, shared by
            every bit-width and granularity.
        run_on: ``fit`` quantizes the best checkpoint's weights when fitting ends (the last weights
            without a checkpoint callback); ``test`` quantizes the tested weights after ``test``.
        keep_first: leave the first Conv2d/Linear in float.
        keep_last: leave the last Conv2d/Linear (usually the classifier head) in float.
        calibration_batches: training batches (unlabelled) for the recipes that calibrate: static
            recipes' activation ranges, and the methods above.
        eval_batches: limit the test batches per recipe (``None``: all).
        output_dir: where files go; default ``<log_dir>/ptq``. One run at a time writes into it.
        save_models: write each quantized model to disk (its size is measured either way).
        speed_repeats: timed forwards per recipe for ``images_per_s`` (on one test batch) and
            ``latency_ms`` (one image), medians on the recipe's device after an untimed warm-up (so
            a compiled recipe's compile time shows in ``quantize_seconds`` and ``seconds``, not in
            its speed); 0 skips the measurement.
        speed_recipes: time only these recipes (names as given in ``recipes``, or the names of their
            rows); ``None`` times every one.
        runtimes: where each recipe runs, a row each: ``eager`` (PyTorch, always run: the reference),
            ``onnxruntime`` (every recipe, exported to ``<recipe>.onnx``; needs the ``onnx`` extra) and
            ``inductor`` (the static recipes and fp32, compiled; it shares the eager row's file). A
            runtime's row adds ``agreement`` (% of test images predicted as the eager model does; a
            warning below 99.5%) and ``max_logit_diff``; ``speedup`` is images/s over fp32's in the same
            runtime. A model that cannot run in a runtime records the reason in that row's ``error``.

    A row's ``recipe`` is the recipe's own name and ``requested`` the name it was asked for by
    (``int3@per_channel`` runs as ``int3``, the default granularity). A row's ``note`` says what the
    result depends on, e.g. ``no BatchNorm: nothing re-estimated``
    or the layers where GPTQ fell back to round-to-nearest (also given as warnings).

    Raises:
        QlightError: for unknown recipes, methods or granularities (listing the valid ones) and bad
            arguments, when a recipe needs calibration and ``calibration_batches`` is 0, when the
            weights hold NaN or Inf, and when another run is writing into ``output_dir``.

    Example::

        >>> from pathlib import Path
        >>> from lightning.pytorch import Trainer
        >>> from torch import nn
        >>> from qlight import CIFAR100DataModule, ImageClassifier, PostTrainingQuantization
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(512, 100))
        >>> data = CIFAR100DataModule(
        ...     batch_size=32, synthetic=True, synthetic_train_size=192, synthetic_test_size=64, val_size=64
        ... )
        >>> ptq = PostTrainingQuantization(recipes=["int8", "int4"])
        >>> trainer = Trainer(max_epochs=1, callbacks=[ptq], logger=False, enable_progress_bar=False)
        >>> trainer.fit(ImageClassifier(net), data)
        >>> [(row["recipe"], row["bits"], row["quantized_modules"]) for row in ptq.results]
        [('fp32', 32, 0), ('int8', 8, 2), ('int4', 4, 2)]
        >>> sorted(path.name for path in Path("ptq").iterdir())
        ['fp32.pt', 'int4.pt', 'int8.pt', 'ptq_files.json', 'results.csv', 'results.md']
    """

    def __init__(
        self,
        recipes: Sequence[str] = ("fp32", "fp16", "bf16", "int8", "int4"),
        granularity: Granularity | Sequence[Granularity] = DEFAULT_GRANULARITY,
        methods: str | Sequence[str] = ("rtn",),
        run_on: Sequence[Literal["fit", "test"]] = ("fit", "test"),
        keep_first: bool = False,
        keep_last: bool = False,
        calibration_batches: int = 16,
        eval_batches: int | None = None,
        output_dir: str | None = None,
        save_models: bool = True,
        speed_repeats: int = 5,
        speed_recipes: Sequence[str] | None = None,
        runtimes: Sequence[str] = ("eager",),
    ) -> None:
        self.runtimes = check_runtimes(runtimes, "PostTrainingQuantization")
        self.recipes: list[Recipe]
        self.requested: dict[str, str]  # each recipe's name -> the name it was asked for by
        self.recipes, self.requested = self._validate(
            recipes, granularity, methods, run_on, calibration_batches, eval_batches, speed_repeats, speed_recipes
        )
        self.run_on = set(run_on)
        self.keep_first = keep_first
        self.keep_last = keep_last
        self.calibration_batches = calibration_batches
        self.eval_batches = eval_batches
        self.output_dir = output_dir
        self.save_models = save_models
        self.speed_repeats = speed_repeats
        self.speed_recipes = None if speed_recipes is None else set(speed_recipes)
        self.results: list[dict[str, Any]] = []  # rows of the last run, as written to results.csv
        self.plans: dict[str, dict[str, int]] = {}  # bits per layer of the last run's mixed recipes

    @staticmethod
    def _validate(
        recipes: Sequence[str],
        granularity: str | Sequence[str],
        methods: str | Sequence[str],
        run_on: Sequence[str],
        calibration_batches: int,
        eval_batches: int | None,
        speed_repeats: int,
        speed_recipes: Sequence[str] | None,
    ) -> tuple[list[Recipe], dict[str, str]]:
        """Check every argument; returns the recipes to run, ``fp32`` first, and the name each was asked for
        by."""
        if isinstance(recipes, str) or not recipes:
            raise QlightError("PostTrainingQuantization needs a list of at least one recipe")
        parsed, requested = _expand(
            recipes,
            [granularity] if isinstance(granularity, str) else list(granularity),
            [methods] if isinstance(methods, str) else list(methods),
        )
        if set(run_on) - {"fit", "test"}:
            raise QlightError(f"run_on takes 'fit' and/or 'test', got {list(run_on)}")
        if calibration_batches < 0:
            raise QlightError(f"calibration_batches must be 0 or more, got {calibration_batches}")
        for recipe in parsed:
            if isinstance(recipe, MixedPrecision):
                recipe.check_budget()  # a plan file that is not a plan fails before any training
        calibrated = [r.name for r in parsed if r.calibrated]
        if calibrated and calibration_batches == 0:
            more = f" and {len(calibrated) - 3} more" if len(calibrated) > 3 else ""
            raise QlightError(
                f"{', '.join(calibrated[:3])}{more} need calibration: set calibration_batches to 1 or more"
            )
        if eval_batches is not None and eval_batches < 1:
            raise QlightError(f"eval_batches must be at least 1 (or None for all), got {eval_batches}")
        if speed_repeats < 0:
            raise QlightError(f"speed_repeats must be 0 (no measurement) or more, got {speed_repeats}")
        unknown = sorted(set(speed_recipes or ()) - set(requested) - set(requested.values()))
        if unknown:
            raise QlightError(f"speed_recipes names {', '.join(unknown)}, which recipes does not: time one of them")
        return parsed, requested

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # A plan for another model fails before training, not after it.
        targets = quantizable_modules(pl_module, self.keep_first, self.keep_last)
        for recipe in self.recipes:
            if isinstance(recipe, MixedPrecision):
                recipe.check(pl_module, targets)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "fit" in self.run_on:
            best = getattr(trainer.checkpoint_callback, "best_model_path", "")
            self.run(trainer, pl_module, checkpoint=best or None)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "test" in self.run_on:
            self.run(trainer, pl_module)

    def run(self, trainer: Trainer, pl_module: LightningModule, checkpoint: str | None = None) -> list[dict[str, Any]]:
        """Quantize, evaluate and save every recipe; returns the table's rows."""
        source = eval_copy(pl_module)
        if checkpoint:
            load_checkpoint_weights(source, checkpoint)
            rank_zero_info(f"PTQ: weights of {checkpoint}")
        bad = non_finite_tensors(source)
        if bad:
            where = checkpoint or f"the {type(pl_module).__name__}"
            raise QlightError(f"PTQ: {where} holds NaN or Inf in {', '.join(bad[:3])}: nothing to quantize")
        targets = quantizable_modules(source, self.keep_first, self.keep_last)
        if not targets:
            rank_zero_warn(f"PTQ: {type(pl_module).__name__} has no Conv2d or Linear module: nothing is quantized")
        for recipe in self.recipes:
            if isinstance(recipe, MixedPrecision):
                recipe.check(source, targets)  # a plan for another model fails before any work
        calibration = []
        if any(recipe.calibrated for recipe in self.recipes):
            loader = dataloader(trainer, pl_module, "train")
            calibration = [
                x.cpu() for x, _ in transferred_batches(trainer, pl_module, loader, self.calibration_batches)
            ]
            if not calibration:
                raise QlightError(
                    "PTQ: the training loader gave no batch to calibrate with (fewer training images than one batch "
                    "when it drops incomplete batches?): give it more images or a smaller batch size"
                )
            # Each rank drew its own (shuffled) batches: all must quantize the same model.
            calibration = trainer.strategy.broadcast(calibration)
        out = output_dir(trainer, self.output_dir, "ptq")
        kept = float_modules(source, targets)
        inputs = _RunInputs(source, targets, kept, calibration, example_input(trainer, pl_module), out)
        with exclusive_dir(out, "PostTrainingQuantization") if trainer.is_global_zero else contextlib.nullcontext():
            self.plans = {}
            rows = []
            for index, recipe in enumerate(self.recipes, 1):
                rows += self._recipe_rows(trainer, pl_module, recipe, inputs, f"{index}/{len(self.recipes)}")
            self.results = _finish_table(rows)
            table = markdown_table(self.results, COLUMNS)
            if trainer.is_global_zero:
                write_results(out, "Post-training quantization", self.results, COLUMNS)
                _replace_manifest(out, inputs.written | {"results.csv", "results.md", MANIFEST})
                rank_zero_info(f"PTQ results ({out / 'results.csv'}):\n{table}")
        self._log(trainer, table)
        trainer.strategy.barrier("qlight_ptq")
        return self.results

    def _log(self, trainer: Trainer, table: str) -> None:
        """Top-1 as scalars, uniform weight-only recipes as one chart per granularity and method with
        the bits as its step (not a one-point chart per recipe); the table and plans as text."""
        uniform = {recipe.name for recipe in self.recipes if isinstance(recipe, IntxWeightOnly)}
        recipe_runtime = {recipe.name: recipe.runtime for recipe in self.recipes}
        others = {}
        for row in self.results:
            if row.get("acc1") is None:
                continue
            if row["runtime"] != recipe_runtime.get(row["recipe"], row["runtime"]):  # a deployed copy's row
                others[f"ptq/{row['runtime']}/{row['recipe']}/acc1"] = float(row["acc1"])
            elif row["recipe"] in uniform:
                series = f"ptq/acc1_vs_bits/{row['granularity']}_{row['method']}"
                log_to_loggers(trainer, {series: float(row["acc1"])}, step=row["bits"])
            else:
                others[f"ptq/{row['recipe']}/acc1"] = float(row["acc1"])
        plans = {f"ptq/plan/{name}": f"```\n{json.dumps(plan, indent=1)}\n```" for name, plan in self.plans.items()}
        log_to_loggers(trainer, others, {"ptq/results": table, **plans})

    def _recipe_rows(
        self, trainer: Trainer, pl_module: LightningModule, recipe: Recipe, inputs: _RunInputs, progress: str
    ) -> list[dict[str, Any]]:
        """The recipe's row and its rows in the other runtimes, a line each: a long sweep shows progress."""
        row, eager = self._run_recipe(trainer, pl_module, recipe, inputs)
        rows = [row] + [
            self._deployed_row(trainer, pl_module, recipe, inputs, row, eager, runtime)
            for runtime in (self._deploy_runtimes(recipe) if eager is not None else ())
        ]
        for done in rows:
            outcome = "failed" if done.get("error") else f"top-1 {100 * done['acc1']:.2f}%"
            rank_zero_info(f"PTQ {progress} {recipe.name} ({done['runtime']}): {outcome}, {done['seconds']:.1f} s")
        return rows

    def _run_recipe(
        self, trainer: Trainer, pl_module: LightningModule, recipe: Recipe, inputs: _RunInputs
    ) -> tuple[dict[str, Any], EagerResult | None]:
        """The recipe's own row and, when other runtimes follow, what their rows are compared with."""
        eager = None
        start = time.perf_counter()
        row: dict[str, Any] = {
            "recipe": recipe.name,
            "requested": self.requested[recipe.name],
            "bits": recipe.bits,
            "granularity": recipe.granularity,
            "method": recipe.method,
            "runtime": recipe.runtime,
            "calibration_batches": len(inputs.calibration) if recipe.calibrated else 0,
            "kept_float": "" if isinstance(recipe, FloatCast) else ", ".join(inputs.kept),
        }
        try:
            device = torch.device("cpu") if recipe.static else pl_module.device
            model = copy.deepcopy(inputs.source).to(device).eval()
            start_quantize = time.perf_counter()
            model, notes = _quantize(recipe, model, inputs.targets, inputs.calibration_on(device))
            row["quantize_seconds"] = round(time.perf_counter() - start_quantize, 2)
            for note in notes:
                rank_zero_warn(f"PTQ {recipe.name}: {note}")
            row["note"] = "; ".join(notes)
            bad = non_finite_tensors(model)
            if bad:
                raise FloatingPointError(f"{recipe.method} left NaN or Inf in {', '.join(bad[:3])}")
            loader = dataloader(trainer, pl_module, "test")
            batches = transferred_batches(trainer, pl_module, loader, self.eval_batches, shard=True)
            batches = ((x.to(device), y.to(device)) for x, y in batches)
            keep = len(self._deploy_runtimes(recipe)) > 0
            accuracy = evaluate(model, batches, trainer, recipe.input_dtype, keep_logits=keep)
            example = inputs.example.to(device)
            payload = quantized_bytes(model, recipe, inputs.targets, inputs.source, example)
            self._save(trainer, inputs, f"{recipe.name}{recipe.suffix}", payload)
            if isinstance(recipe, MixedPrecision):
                row["bits"] = round(average_bits(model), 3)
                self._write_plan(trainer, recipe, model, inputs.calibration_on(device), inputs)
            row.update(acc1=accuracy.acc1, acc5=accuracy.acc5, size_bytes=len(payload))
            row.update(_quantized_counts(model, recipe))
            if not recipe.static and not isinstance(recipe, FloatCast):  # also what the recipe could not group
                row["kept_float"] = ", ".join(_float_layers(model, inputs.source))
            if self._timed(row):
                row.update(vars(measure_speed(model, example.to(recipe.input_dtype), self.speed_repeats)))
            if accuracy.logits is not None:
                eager = EagerResult(model, accuracy.logits, example)
        except QlightError:
            raise
        except Exception as err:  # one failing recipe must not lose the others
            _record_failure(row, f"PTQ {recipe.name}", err)
        row["seconds"] = round(time.perf_counter() - start, 2)
        return row, eager

    def _deploy_runtimes(self, recipe: Recipe) -> list[str]:
        """The runtimes besides eager PyTorch that ``recipe`` runs in: ONNX Runtime runs every recipe,
        Inductor the static graphs (its x86 int8 lowering) and fp32 (what they are compared with). A
        recipe named for its runtime (``int8_static_onnx``) is already deployed: none."""
        if recipe.runtime != "eager":
            return []
        return [r for r in self.runtimes[1:] if r != "inductor" or recipe.static or recipe.name == "fp32"]

    def _timed(self, row: dict[str, Any]) -> bool:
        listed = self.speed_recipes is None or {row["recipe"], row["requested"]} & self.speed_recipes
        return bool(self.speed_repeats and listed)

    def _save(self, trainer: Trainer, inputs: _RunInputs, name: str, payload: bytes) -> None:
        if self.save_models and trainer.is_global_zero:
            atomic_write_bytes(inputs.out / name, payload)
            inputs.written.add(name)

    def _deployed_row(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        recipe: Recipe,
        inputs: _RunInputs,
        eager_row: dict[str, Any],
        eager: EagerResult,
        runtime: str,
    ) -> dict[str, Any]:
        """The row of the eager model run in ``runtime``: its top-1, agreement with the eager model's
        predictions, file size and speed; what cannot run there records the reason in ``error``."""
        start = time.perf_counter()
        row = {key: eager_row.get(key) for key in _DESCRIPTION} | {"runtime": runtime}
        try:
            deployed, payload = deploy(eager.model, runtime, eager.example)
            row["quantize_seconds"] = round(time.perf_counter() - start, 2)
            dtype, device = input_dtype(deployed, recipe.input_dtype), eager.example.device
            loader = dataloader(trainer, pl_module, "test")
            batches = transferred_batches(trainer, pl_module, loader, self.eval_batches, shard=True)
            batches = ((x.to(device), y.to(device)) for x, y in batches)
            accuracy = evaluate(deployed, batches, trainer, dtype, keep_logits=True)
            agreement = compare_logits(eager.logits, accuracy.logits, trainer.strategy.all_gather)
            row.update(acc1=accuracy.acc1, acc5=accuracy.acc5, agreement=agreement.agreement)
            row.update(max_logit_diff=agreement.max_logit_diff, size_bytes=eager_row.get("size_bytes"))
            if payload is not None:
                row["size_bytes"] = len(payload)
                self._save(trainer, inputs, f"{recipe.name}{ONNX_FILE[runtime]}", payload)
            warning = agreement.warning(f"PTQ {recipe.name} in {runtime}")
            if warning:
                rank_zero_warn(warning)
            weight_only = runtime == "onnxruntime" and not recipe.static and not isinstance(recipe, FloatCast)
            row["note"] = "; ".join(n for n in (warning, WEIGHT_ONLY_ORT_NOTE if weight_only else None) if n)
            if self._timed(row):
                row.update(vars(measure_speed(deployed, eager.example.to(dtype), self.speed_repeats)))
        except Exception as err:  # what one runtime cannot run must not lose the other rows
            _record_failure(row, f"PTQ {recipe.name} in {runtime}", err)
        row["seconds"] = round(time.perf_counter() - start, 2)
        return row

    def _write_plan(
        self, trainer: Trainer, recipe: MixedPrecision, model: nn.Module, calibration: Calibration, inputs: _RunInputs
    ) -> None:
        """``<recipe>.plan.json``; for a budget, also the sensitivity it was allocated from (CSV, heatmap,
        TensorBoard), remembered by ``calibration``."""
        self.plans[recipe.name] = realised_plan(model)
        if not trainer.is_global_zero:
            return
        atomic_write_text(inputs.out / f"{recipe.name}.plan.json", json.dumps(self.plans[recipe.name], indent=1) + "\n")
        inputs.written.add(f"{recipe.name}.plan.json")
        if recipe.plan_file is None:
            inputs.written.update(f"{recipe.name}.sensitivity.{kind}" for kind in ("csv", "png"))
            rows = recipe.sensitivity(inputs.source, inputs.targets, calibration)
            title = f"{recipe.name}: KL divergence from fp32 (log)"
            stem, tag = inputs.out / f"{recipe.name}.sensitivity", f"ptq/sensitivity/{recipe.name}"
            write_sensitivity(trainer, rows, stem, tag, title, chosen=self.plans[recipe.name])


# The columns a runtime's row takes from the eager row of its recipe: what was quantized, and how.
_DESCRIPTION = (
    "recipe",
    "requested",
    "bits",
    "granularity",
    "method",
    "calibration_batches",
    "kept_float",
    "quantized_modules",
    "quantized_params",
)


def _record_failure(row: dict[str, Any], what: str, err: Exception) -> None:
    """``err`` as the row's one-line ``error`` and a warning; its traceback in the log unless it is a
    known limit (:class:`~qlight.errors.Unsupported`)."""
    row["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
    rank_zero_warn(f"{what} failed: {row['error']}")
    if not isinstance(err, Unsupported):
        rank_zero_info(traceback.format_exc())


def _replace_manifest(out: Path, written: set[str]) -> None:
    """Record the files this run wrote into ``out`` and delete those an earlier run recorded there that
    this one did not write again (a recipe dropped or failed now): no stale model beside a new table."""
    try:
        previous = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        previous = []
    for name in set(previous if isinstance(previous, list) else []) - written:
        # Only plain names of files (or links) beside it; never the lock this run holds, never a folder.
        if isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..", LOCK):
            path = out / name
            if path.is_symlink() or path.is_file():
                path.unlink()
    atomic_write_text(out / MANIFEST, json.dumps(sorted(written), indent=1))


def _expand(
    recipes: Sequence[str], granularities: list[str], methods: list[str]
) -> tuple[list[Recipe], dict[str, str]]:
    """``fp32``, then each recipe in each granularity and method unless its name sets them, each with the
    name it was asked for by (``int3@per_channel`` is the recipe ``int3``)."""
    if not granularities or not methods:
        raise QlightError("granularity and methods need at least one value each")
    for method in methods:
        parse_method(method)
    parsed, requested = {"fp32": parse_recipe("fp32")}, {"fp32": "fp32"}
    for name in recipes:
        for granularity in granularities:
            for method in methods:
                recipe = parse_recipe(name, check_granularity(granularity), method)
                same_name = parsed.setdefault(recipe.name, recipe)
                requested.setdefault(recipe.name, name)
                if not _same_recipe(same_name, recipe):  # rows and files are keyed by the name
                    raise QlightError(
                        f"two different plans would both be named {recipe.name}: give the plan files different names"
                    )
    return list(parsed.values()), requested


def _same_recipe(a: Recipe, b: Recipe) -> bool:
    """Equal, or plan recipes alike but for the path of plan files with the same content."""
    if a == b:
        return True
    if not (isinstance(a, MixedPrecision) and isinstance(b, MixedPrecision) and a.plan_file and b.plan_file):
        return False
    try:
        return a.base == b.base and a.plan_file.read_bytes() == b.plan_file.read_bytes()
    except OSError:
        return False


def _quantize(
    recipe: Recipe, model: nn.Module, targets: list[str], calibration: Calibration
) -> tuple[nn.Module, list[str]]:
    """``recipe.quantize`` and the distinct messages of the ``QlightWarning``s it gave, for the row's
    note; other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QlightWarning)
        model = recipe.quantize(model, targets, calibration)
    notes = []
    for warning in caught:
        if issubclass(warning.category, QlightWarning):
            notes.append(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return model, list(dict.fromkeys(notes))


@dataclass(frozen=True)
class _RunInputs:
    """What every recipe of one run starts from."""

    source: nn.Module  # the float model, eval mode
    targets: list[str]
    kept: list[str]  # the Conv2d/Linear layers left in float (keep_first, keep_last)
    calibration: list[torch.Tensor]  # input batches, on the CPU
    example: torch.Tensor  # one test batch, to export static graphs
    out: Path
    calibrations: dict[torch.device, Calibration] = field(default_factory=dict)
    written: set[str] = field(default_factory=set)  # file names in ``out``

    def calibration_on(self, device: torch.device) -> Calibration:
        """The calibration batches on ``device``; one per device and run, so that what methods derive
        from the float model (GPTQ's Hessians) is computed once for all recipes."""
        if device not in self.calibrations:
            self.calibrations[device] = Calibration(x.to(device) for x in self.calibration)
        return self.calibrations[device]


def _quantized_counts(model: nn.Module, recipe: Recipe) -> dict[str, int]:
    # Counted on the quantized model itself, so the table shows what was done, not what was asked.
    if isinstance(recipe, FloatCast):
        cast = 0 if recipe.dtype == torch.float32 else sum(p.numel() for p in model.parameters())
        return {"quantized_modules": 0, "quantized_params": cast}
    weights = quantized_weight_sizes(model)
    return {"quantized_modules": len(weights), "quantized_params": sum(weights)}


def _float_layers(model: nn.Module, source: nn.Module) -> list[str]:
    """The Conv2d/Linear layers of ``source`` whose weights are still float in the eager ``model``."""
    return [
        name
        for name in quantizable_modules(source)
        if not isinstance(model.get_submodule(name).weight, IntxUnpackedToInt8Tensor)
    ]


def _finish_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    reference = next((r for r in rows if r["recipe"] == "fp32" and "acc1" in r), None)
    fp32_speed = {r["runtime"]: r["images_per_s"] for r in rows if r["recipe"] == "fp32" and r.get("images_per_s")}
    for row in rows:
        if row.get("size_bytes") is not None:
            row["size_mib"] = row["size_bytes"] / 2**20
        if row.get("images_per_s") and row["runtime"] in fp32_speed:  # against fp32 in the same runtime
            row["speedup"] = row["images_per_s"] / fp32_speed[row["runtime"]]
        if reference is not None and "acc1" in row:
            row["delta_acc1"] = row["acc1"] - reference["acc1"]
            row["compression"] = reference["size_bytes"] / row["size_bytes"]
    return rows
