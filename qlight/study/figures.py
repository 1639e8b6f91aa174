"""The study's figures, one function each, drawn from :func:`qlight.study.results.collect`'s numbers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter, PercentFormatter  # noqa: E402

from qlight.study.curves import BitCurve  # noqa: E402
from qlight.study.results import WHOLE_MODEL, is_mixed, pareto_front, weight_only_series  # noqa: E402

# What to look for in each figure: the report's caption under it.
CAPTIONS = {
    "accuracy_vs_bits": "Where a series leaves the fp32 line is the fewest bits that method keeps accuracy at; "
    "the distance between the series at low bits is what the method buys over round-to-nearest.",
    "accuracy_vs_size": "Up and to the left wins: the front joins the recipes that no other beats in both "
    "accuracy and bytes, mixed-precision points among them.",
    "accuracy_vs_throughput": "Up and to the right wins, on the device each recipe ran on: which recipes buy "
    "speed as well as size (weight-only ones dequantize and run float kernels).",
    "qat_epochs": "How many epochs of QAT each bit-width needs to reach its PTQ result and fp32: the cost of "
    "winning the accuracy back.",
    "precision_loss": "Training loss in each precision: where the curves part, a format loses training signal.",
    "precision_numerics": "Values a format cannot hold: fp16's underflow and subnormal gradients are what "
    "16-mixed's GradScaler exists for; bf16 keeps fp32's range and loses precision instead.",
}
FIGURES = tuple(CAPTIONS)


def _plot_accuracy_vs_bits(results: dict[str, Any], ax: plt.Axes) -> bool:
    series = weight_only_series(results["ptq"])
    if not series:
        return False
    grid = [2 + i * 0.05 for i in range(121)]
    for i, (label, points) in enumerate(series.items()):
        ax.plot(*zip(*points, strict=True), "o", color=f"C{i}", label=f"PTQ {label}")
        curve = results["bit_curves"].get(label)
        if curve and curve.get("fits"):  # a curve through points it does not follow would mislead
            fitted = BitCurve(curve["plateau"], curve["drop"])
            ax.plot(grid, [fitted(b) for b in grid], "-", color=f"C{i}", alpha=0.5)
    weight_only = {b: q for b, q in results["qat"].items() if b.isdigit()}  # W8A8 has activations quantized too
    qat = [(int(b), q["converted_acc1"]) for b, q in weight_only.items() if q["converted_acc1"] is not None]
    if qat:
        ax.plot(*zip(*sorted(qat), strict=True), "s", color="black", label="QAT weight-only (converted)")
    _fp32_line(results, ax)
    title = "Accuracy vs bit-width (lines: plateau - drop·4^-b, where it fits)"
    ax.set(xlabel="weight bits", ylabel="test top-1", title=title)
    _percent(ax)
    ax.legend(fontsize=7)
    return True


def _plot_accuracy_vs_size(results: dict[str, Any], ax: plt.Axes) -> bool:
    weight_only = [r for r in results["ptq"] if r.get("size_mib") and r.get("acc1") and r["method"] not in WHOLE_MODEL]
    if not weight_only:
        return False
    for i, method in enumerate(dict.fromkeys(r["method"] for r in weight_only)):
        for kind, marker, mixed in (("uniform", "o", False), ("mixed precision", "D", True)):
            rows = [r for r in weight_only if r["method"] == method and is_mixed(r) == mixed]
            if rows:
                x, y = [r["size_mib"] for r in rows], [r["acc1"] for r in rows]
                ax.plot(x, y, marker, ls="", color=f"C{i}", label=f"{method}, {kind}")
    front = pareto_front([(r["size_mib"], r["acc1"]) for r in weight_only])
    ax.plot(*zip(*front, strict=True), "-", color="black", alpha=0.4, label="Pareto front (labelled)")
    on_front = {point: r for r in weight_only for point in front if point == (r["size_mib"], r["acc1"])}
    for k, (point, r) in enumerate(sorted(on_front.items())):  # only the front: elsewhere labels pile up
        ax.annotate(r["recipe"].split("+")[0], point, xytext=(4, -10 if k % 2 else 4), textcoords="offset points")
    onnx = [r for r in _deployed(results, "onnxruntime") if r.get("size_mib") and r["method"] not in WHOLE_MODEL]
    if onnx:
        x, y = [r["size_mib"] for r in onnx], [r["acc1"] for r in onnx]
        ax.plot(x, y, "x", ls="", color="grey", label="the same in ONNX Runtime (.onnx files)")
    _fp32_line(results, ax)
    ax.set(xlabel="file size (MiB)", ylabel="test top-1", title="Accuracy vs model size (weight-only PTQ)")
    _percent(ax)
    ax.legend(fontsize=7)
    return True


def _deployed(results: dict[str, Any], runtime: str | None = None) -> list[dict[str, Any]]:
    """PTQ's rows in other runtimes than eager (``runtime``: in that one) that have a top-1."""
    rows = results.get("deployed", [])
    return [r for r in rows if r.get("acc1") is not None and runtime in (None, r["runtime"])]


def _runtime_kind(row: dict[str, Any]) -> str:
    if row["method"] in WHOLE_MODEL and row["method"] != "cast":
        return f"{row['runtime']} int8 graph"
    kind = row["recipe"] if row["method"] == "cast" else "weight-only (float kernels)"
    return kind if row.get("runtime") in (None, "eager") else f"{kind}, {row['runtime']}"


def _plot_accuracy_vs_throughput(results: dict[str, Any], ax: plt.Axes) -> bool:
    rows = results["ptq"] + _deployed(results)
    timed = [r for r in rows if r.get("images_per_s") and r.get("acc1") is not None]
    if not timed:
        return False
    devices = list(dict.fromkeys(r["device"] for r in timed))
    markers = dict(zip(devices, "os^vD", strict=False))
    for i, kind in enumerate(dict.fromkeys(_runtime_kind(r) for r in timed)):
        for device in devices:
            rows = [r for r in timed if _runtime_kind(r) == kind and r["device"] == device]
            if rows:
                label = kind if len(devices) == 1 else f"{kind} ({device})"
                x, y = [r["images_per_s"] for r in rows], [r["acc1"] for r in rows]
                ax.plot(x, y, markers[device], ls="", color=f"C{i}", label=label)
    ax.set(xscale="log", xlabel="images/s at the test batch size (log)", ylabel="test top-1")
    ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks of a short log axis overprint
    device = f"on {devices[0]}" if len(devices) == 1 else "each on its device"
    ax.set_title(f"Accuracy vs throughput (PTQ, {device})")
    _percent(ax)
    ax.legend(fontsize=7)
    return True


def _plot_qat_epochs(results: dict[str, Any], ax: plt.Axes) -> bool:
    if not results["qat"]:
        return False
    for i, q in enumerate(results["qat"].values()):
        color = f"C{i}"
        epochs = range(1, len(q["acc1_per_epoch"]) + 1)
        ax.plot(epochs, q["acc1_per_epoch"], "o-", color=color, label=f"QAT {q['label']}")
        for kind, style in (("rtn", ":"), ("best", "-.")):
            if q[f"ptq_{kind}"] is not None:
                ax.axhline(q[f"ptq_{kind}"]["acc1"], color=color, ls=style)
            matched = q[f"epochs_to_match_ptq_{kind}"]
            if matched:
                ax.plot([matched], [q["acc1_per_epoch"][matched - 1]], "*", color=color, markersize=14)
    if results["float_control"]:
        ax.axhline(
            results["float_control"]["test_acc1"], color="black", ls=":", label="fp32 fine-tuned on the same schedule"
        )
    # The line styles once, not once per series: the PTQ recipes are in the report's QAT table.
    ax.plot([], [], ":", color="grey", label="its PTQ, round to nearest")
    ax.plot([], [], "-.", color="grey", label="its best PTQ method")
    _fp32_line(results, ax)
    ax.set(xlabel="QAT epoch", ylabel="test top-1 (fake-quant)", title="QAT per epoch (★ = matches a PTQ line)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _percent(ax)
    ax.legend(fontsize=7)
    return True


def _plot_precision_loss(results: dict[str, Any], ax: plt.Axes) -> bool:
    runs = {p: r for p, r in results["precision"].items() if r["losses"]}
    if len(runs) < 2:  # one curve compares nothing (the CPU study trains in fp32 only)
        return False
    for precision, run in runs.items():
        ax.plot(*zip(*run["losses"], strict=True), label=precision)
    ax.set(xlabel="step", ylabel="training loss", title="Training loss by precision")
    ax.legend()
    return True


def _plot_precision_numerics(results: dict[str, Any], ax: plt.Axes) -> bool:
    """Small multiples: a panel per tensor kind, a group of bars per format and outcome, a colour per run."""
    runs = results["precision"]
    kinds = sorted({key.split("/")[0] for run in runs.values() for key in run["values"]})
    if not kinds:
        return False
    fig = ax.figure
    ax.remove()  # this figure is a row of panels, not the one axis the other plots draw on
    panels = fig.subplots(1, len(kinds), sharey=True, squeeze=False)[0]
    groups = [(dtype, outcome) for dtype in ("fp16", "bf16") for outcome in ("overflow", "underflow", "subnormal")]
    width = 0.8 / len(runs)
    for panel, kind in zip(panels, kinds, strict=True):
        for r, (precision, run) in enumerate(runs.items()):
            shares = [
                100 * run["values"].get(f"{kind}/{dtype}", {}).get(f"{outcome}_share", 0) for dtype, outcome in groups
            ]
            offsets = [i + (r - (len(runs) - 1) / 2) * width for i in range(len(groups))]
            panel.bar(offsets, shares, width, color=f"C{r}", label=f"trained in {precision}")
        labels = [f"{dtype} {outcome}" for dtype, outcome in groups]
        panel.set_xticks(range(len(groups)), labels, fontsize=8, rotation=30, ha="right")
        panel.set_yscale("symlog", linthresh=1e-3)
        panel.set_title(f"{kind}s cast to fp16 / bf16", fontsize=9)
    panels[0].set_ylabel("% of sampled values (symlog)")
    panels[-1].legend(fontsize=7)
    fig.suptitle("Values lost when cast: fp16 vs bf16 (underflow: to zero)")
    return True


def _percent(ax: plt.Axes) -> None:
    """Accuracies in percent, as in the report's tables."""
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))


def _fp32_line(results: dict[str, Any], ax: plt.Axes) -> None:
    if results["fp32_acc1"] is not None:
        ax.axhline(results["fp32_acc1"], color="black", ls="--", label="fp32")


PLOTS: dict[str, Callable[[dict[str, Any], plt.Axes], bool]] = {
    "accuracy_vs_bits": _plot_accuracy_vs_bits,
    "accuracy_vs_size": _plot_accuracy_vs_size,
    "accuracy_vs_throughput": _plot_accuracy_vs_throughput,
    "qat_epochs": _plot_qat_epochs,
    "precision_loss": _plot_precision_loss,
    "precision_numerics": _plot_precision_numerics,
}


def figures(results: dict[str, Any]) -> dict[str, plt.Figure]:
    figures = {}
    for name, plot in PLOTS.items():
        fig, ax = plt.subplots(figsize=(9, 4.5) if name == "precision_numerics" else (6, 4))
        if plot(results, ax):
            figures[name] = fig
        else:
            plt.close(fig)
    return figures
