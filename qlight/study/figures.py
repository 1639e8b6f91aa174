"""The study's figures, one function each, drawn from :func:`qlight.study.results.collect`'s numbers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qlight.study.curves import BitCurve  # noqa: E402
from qlight.study.results import WHOLE_MODEL, is_mixed, pareto_front, weight_only_series  # noqa: E402

FIGURES = (
    "accuracy_vs_bits",
    "accuracy_vs_size",
    "accuracy_vs_throughput",
    "qat_epochs",
    "precision_loss",
    "precision_numerics",
)


def _plot_accuracy_vs_bits(results: dict[str, Any], ax: plt.Axes) -> bool:
    series = weight_only_series(results["ptq"])
    if not series:
        return False
    grid = [2 + i * 0.05 for i in range(121)]
    for i, (label, points) in enumerate(series.items()):
        ax.plot(*zip(*points, strict=True), "o", color=f"C{i}", label=f"PTQ {label}")
        curve = results["bit_curves"].get(label)
        if curve:
            fitted = BitCurve(curve["plateau"], curve["drop"])
            ax.plot(grid, [fitted(b) for b in grid], "-", color=f"C{i}", alpha=0.5)
    weight_only = {b: q for b, q in results["qat"].items() if b.isdigit()}  # W8A8 has activations quantized too
    qat = [(int(b), q["converted_acc1"]) for b, q in weight_only.items() if q["converted_acc1"] is not None]
    if qat:
        ax.plot(*zip(*sorted(qat), strict=True), "s", color="black", label="QAT weight-only (converted)")
    _fp32_line(results, ax)
    ax.set(xlabel="weight bits", ylabel="test top-1", title="Accuracy vs bit-width (lines: plateau - drop·4^-b)")
    ax.legend(fontsize=7)
    return True


def _plot_accuracy_vs_size(results: dict[str, Any], ax: plt.Axes) -> bool:
    weight_only = [r for r in results["ptq"] if r.get("size_mib") and r.get("acc1") and r["method"] not in WHOLE_MODEL]
    if not weight_only:
        return False
    for label, rows, marker in (
        ("uniform", [r for r in weight_only if not is_mixed(r)], "o"),
        ("mixed precision", [r for r in weight_only if is_mixed(r)], "D"),
    ):
        if rows:
            ax.plot([r["size_mib"] for r in rows], [r["acc1"] for r in rows], marker, ls="", label=label)
    for r in weight_only:
        ax.annotate(r["recipe"].split("+")[0], (r["size_mib"], r["acc1"]), xytext=(3, 3), textcoords="offset points")
    front = pareto_front([(r["size_mib"], r["acc1"]) for r in weight_only])
    ax.plot(*zip(*front, strict=True), "-", color="black", alpha=0.4, label="Pareto front")
    _fp32_line(results, ax)
    ax.set(xlabel="file size (MiB)", ylabel="test top-1", title="Accuracy vs model size (weight-only PTQ)")
    ax.legend(fontsize=7)
    return True


def _plot_accuracy_vs_throughput(results: dict[str, Any], ax: plt.Axes) -> bool:
    timed = [r for r in results["ptq"] if r.get("images_per_s") and r.get("acc1") is not None]
    if not timed:
        return False
    for i, device in enumerate(dict.fromkeys(r["device"] for r in timed)):
        rows = [r for r in timed if r["device"] == device]
        ax.plot([r["images_per_s"] for r in rows], [r["acc1"] for r in rows], "o", color=f"C{i}", label=device)
        for r in rows:
            ax.annotate(
                r["recipe"].split("+")[0], (r["images_per_s"], r["acc1"]), xytext=(3, 3), textcoords="offset points"
            )
    ax.set(xscale="log", xlabel="images/s at the test batch size (log)", ylabel="test top-1")
    ax.set_title("Accuracy vs throughput (PTQ, each on its device)")
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
            ptq = q[f"ptq_{kind}"]
            if ptq is not None:
                ax.axhline(ptq["acc1"], color=color, ls=style, label=f"PTQ {ptq['recipe']}")
            matched = q[f"epochs_to_match_ptq_{kind}"]
            if matched:
                ax.plot([matched], [q["acc1_per_epoch"][matched - 1]], "*", color=color, markersize=14)
    _fp32_line(results, ax)
    ax.set(xlabel="QAT epoch", ylabel="test top-1 (fake-quant)", title="QAT per epoch (★ = matches a PTQ line)")
    ax.legend(fontsize=7)
    return True


def _plot_precision_loss(results: dict[str, Any], ax: plt.Axes) -> bool:
    runs = {p: r for p, r in results["precision"].items() if r["losses"]}
    if not runs:
        return False
    for precision, run in runs.items():
        ax.plot(*zip(*run["losses"], strict=True), label=precision)
    ax.set(xlabel="step", ylabel="training loss", title="Training loss by precision")
    ax.legend()
    return True


def _plot_precision_numerics(results: dict[str, Any], ax: plt.Axes) -> bool:
    labels, shares = [], {"overflow": [], "underflow": [], "subnormal": []}
    for precision, run in results["precision"].items():
        for key, values in run["values"].items():
            labels.append(f"{key}\n({precision})" if len(results["precision"]) > 1 else key)
            for outcome, column in shares.items():
                column.append(100 * values[f"{outcome}_share"])
    if not labels:
        return False
    width = 0.27
    for j, (outcome, values) in enumerate(shares.items()):
        ax.bar([i + (j - 1) * width for i in range(len(labels))], values, width, label=outcome)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set(ylabel="% of sampled values (symlog)", title="Values lost when cast: fp16 vs bf16")
    ax.legend()
    return True


def _fp32_line(results: dict[str, Any], ax: plt.Axes) -> None:
    fp32 = next((r["acc1"] for r in results["ptq"] if r["recipe"] == "fp32" and r.get("acc1") is not None), None)
    if fp32 is not None:
        ax.axhline(fp32, color="black", ls="--", label="fp32")


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
        fig, ax = plt.subplots(figsize=(7, 4) if name == "precision_numerics" else (6, 4))
        if plot(results, ax):
            figures[name] = fig
        else:
            plt.close(fig)
    return figures
