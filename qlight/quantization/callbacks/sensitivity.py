"""``LayerSensitivity``: the sensitivity of every layer at every bit-width as a Lightning callback,
with its table, heatmap and TensorBoard figure."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from qlight.errors import QlightError
from qlight.files import atomic_write_bytes
from qlight.quantization.grid.intx import MAX_BITS, MIN_BITS, Granularity, groupable
from qlight.quantization.lightning_plumbing import (
    dataloader,
    eval_copy,
    log_figure,
    output_dir,
    transferred_batches,
)
from qlight.quantization.methods import Calibration
from qlight.quantization.recipes.base import ROUNDINGS, check_granularity, quantizable_modules
from qlight.quantization.recipes.sensitivity import COLUMNS, layer_sensitivity
from qlight.quantization.recipes.weight_only import IntxWeightOnly
from qlight.tables import write_csv

HEATMAP_TITLE = "Layer sensitivity: KL divergence from fp32 (log)"


def heatmap(
    rows: Sequence[dict],
    title: str = HEATMAP_TITLE,
    chosen: Mapping[str, int] | None = None,
):
    """A layers x bits figure of the rows' KL divergence (matplotlib ``Figure``), with the bits a plan
    ``chosen`` gave each layer outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    bits = sorted({r["bits"] for r in rows})
    grid = torch.full((len(layers), len(bits)), float("nan"))
    for r in rows:
        grid[layers.index(r["layer"]), bits.index(r["bits"])] = max(r["kl"], 1e-8)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.7 * len(bits)), 1.0 + 0.35 * len(layers)))
    image = ax.imshow(grid.log10().numpy(), aspect="auto", cmap="magma_r")
    chosen = {layer: b for layer, b in (chosen or {}).items() if layer in layers and b in bits}
    picked = [(bits.index(b), layers.index(layer)) for layer, b in chosen.items()]
    if picked:
        ax.plot(*zip(*picked, strict=True), "s", ms=9, mfc="none", mec="deepskyblue", mew=2, label="bits chosen")
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.06), fontsize=7, frameon=False)
    ax.set_xticks(range(len(bits)), [str(b) for b in bits])
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("weight bits")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="log10 KL")
    fig.tight_layout()
    return fig


def write_sensitivity(
    trainer: Trainer,
    rows: Sequence[dict],
    stem: Path,
    tag: str,
    title: str = HEATMAP_TITLE,
    chosen: Mapping[str, int] | None = None,
) -> None:
    """``<stem>.csv``, the heatmap as ``<stem>.png`` (``chosen``: a plan's bits outlined), and the same
    figure to the loggers under ``tag``."""
    write_csv(rows, stem.with_name(stem.name + ".csv"), COLUMNS)
    figure = heatmap(rows, title, chosen)  # selects the Agg backend first
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(stem.with_name(stem.name + ".png"), buffer.getvalue())
    log_figure(trainer, tag, figure)
    plt.close(figure)


class LayerSensitivity(Callback):
    """Quantize one layer at a time to each bit-width, the rest in float, and measure the damage on
    held-out test batches: ``sensitivity.csv`` (``COLUMNS``), ``sensitivity.png`` (layers x bits) and
    the same figure in TensorBoard. Works on any LightningModule whose test batches are
    ``(inputs, targets)``; layers are named as in ``named_modules()``.

    Args:
        bits: the bit-widths to try (2..8).
        granularity: which weights share a scale, as in :class:`PostTrainingQuantization`.
        method: the rounding, ``rtn`` or ``gptq`` (its Hessians from ``calibration_batches`` training
            batches); the corrections act on the whole model and are not measured per layer.
        layers: the Conv2d/Linear modules to measure (``None``: all).
        eval_batches: held-out test batches to measure on.
        calibration_batches: training batches for GPTQ.
        run_on: ``fit`` measures the weights at the end of fitting, ``test`` those being tested.
        output_dir: where files go; default ``<log_dir>/sensitivity``.

    Raises:
        QlightError: for bad arguments or a layer the model lacks (listing its quantizable layers).

    Example::

        >>> from pathlib import Path
        >>> from lightning.pytorch import Trainer
        >>> from torch import nn
        >>> from qlight import CIFAR100DataModule, ImageClassifier, LayerSensitivity
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(512, 100))
        >>> data = CIFAR100DataModule(batch_size=32, synthetic=True, synthetic_test_size=64)
        >>> probe = LayerSensitivity(bits=[2, 8], eval_batches=1)
        >>> trainer = Trainer(callbacks=[probe], logger=False, enable_progress_bar=False)
        >>> _ = trainer.test(ImageClassifier(net), data, verbose=False)
        >>> [(row["layer"], row["bits"]) for row in probe.results]
        [('model.0', 2), ('model.0', 8), ('model.3', 2), ('model.3', 8)]
        >>> sorted(path.name for path in Path("sensitivity").iterdir())
        ['sensitivity.csv', 'sensitivity.png']
    """

    def __init__(
        self,
        bits: Sequence[int] = tuple(range(MIN_BITS, MAX_BITS + 1)),
        granularity: Granularity = "per_channel",
        method: Literal["rtn", "gptq"] = "rtn",
        layers: Sequence[str] | None = None,
        eval_batches: int = 16,
        calibration_batches: int = 16,
        run_on: Sequence[Literal["fit", "test"]] = ("test",),
        output_dir: str | None = None,
    ) -> None:
        self._validate(bits, granularity, method, eval_batches, calibration_batches, run_on)
        self.bits = list(bits)
        self.recipe = IntxWeightOnly(MAX_BITS, granularity, method)
        self.layers = list(layers) if layers is not None else None
        self.eval_batches = eval_batches
        self.calibration_batches = calibration_batches
        self.run_on = set(run_on)
        self.output_dir = output_dir
        self.results: list[dict] = []

    @staticmethod
    def _validate(
        bits: Sequence[int],
        granularity: str,
        method: str,
        eval_batches: int,
        calibration_batches: int,
        run_on: Sequence[str],
    ) -> None:
        if not bits or any(not MIN_BITS <= b <= MAX_BITS for b in bits):
            raise QlightError(f"bits must be one or more of {MIN_BITS}..{MAX_BITS}, got {list(bits)}")
        check_granularity(granularity)
        if method not in ROUNDINGS:
            raise QlightError(f"method must be one of {', '.join(ROUNDINGS)}, got {method!r}")
        if eval_batches < 1 or calibration_batches < 1:
            raise QlightError("eval_batches and calibration_batches must be at least 1")
        if set(run_on) - {"fit", "test"}:
            raise QlightError(f"run_on takes 'fit' and/or 'test', got {list(run_on)}")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "fit" in self.run_on:
            self.run(trainer, pl_module)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "test" in self.run_on:
            self.run(trainer, pl_module)

    def run(self, trainer: Trainer, pl_module: LightningModule) -> list[dict]:
        """Measure every layer and bit-width, write the files; returns the rows."""
        model = eval_copy(pl_module)
        targets = quantizable_modules(model)
        layers = self.layers if self.layers is not None else targets
        unknown = [name for name in layers if name not in targets]
        if unknown:
            raise QlightError(
                f"LayerSensitivity: {type(pl_module).__name__} has no Conv2d or Linear {unknown[0]!r}; "
                f"its quantizable layers: {', '.join(targets)}"
            )
        layers = [name for name in layers if groupable(model.get_submodule(name).weight, self.recipe.granularity)]
        batches = list(
            transferred_batches(trainer, pl_module, dataloader(trainer, pl_module, "test"), self.eval_batches)
        )
        calibration: list[Tensor] = []
        if self.recipe.rounding == "gptq":
            loader = dataloader(trainer, pl_module, "train")
            calibration = [x for x, _ in transferred_batches(trainer, pl_module, loader, self.calibration_batches)]
        rows = layer_sensitivity(
            model,
            layers,
            self.bits,
            [x for x, _ in batches],
            lambda m, name, b: self.recipe.round_weights(m, targets, {name: b}, Calibration(calibration)),
            self.recipe.granularity,
            labels=[y for _, y in batches],
        )
        self.results = rows
        if trainer.is_global_zero:
            out = output_dir(trainer, self.output_dir, "sensitivity")
            write_sensitivity(trainer, rows, out / "sensitivity", "sensitivity/kl")
            rank_zero_info(f"Layer sensitivity: {out / 'sensitivity.csv'}")
        return rows
