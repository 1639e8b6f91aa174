"""The study's report, a function of the study directory alone: it reads the files the stages
wrote and writes results.json, report.md, PNG plots and the same figures in TensorBoard."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from qlight.errors import QlightError  # noqa: E402
from qlight.files import atomic_write_bytes, atomic_write_text  # noqa: E402
from qlight.study.curves import (  # noqa: E402
    BitCurve,
    epochs_to_match,
    fewest_bits_within,
    first_bits_with_gap,
    fit_bit_curve,
)
from qlight.tables import markdown_table, read_csv  # noqa: E402

GAP = 0.01  # "the bit-width where the gap to fp32 first exceeds 1 point"
WHOLE_MODEL = (None, "cast", "pt2e")  # methods of rows that are not weight-only integer recipes
FIGURES = (
    "accuracy_vs_bits",
    "accuracy_vs_size",
    "accuracy_vs_throughput",
    "qat_epochs",
    "precision_loss",
    "precision_numerics",
)
CURVE_MODEL = "acc(b) = plateau - drop * 4^(-b)  (quantization noise variance ~ 2^(-2b)), least squares"


def _number(value: str) -> float | int | str | None:
    if value == "":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _numeric_csv(path: Path) -> list[dict[str, Any]]:
    return [{k: _number(v) for k, v in row.items()} for row in read_csv(path)] if path.is_file() else []


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise QlightError(f"{path} is corrupt: delete it and rerun its stage") from None


def weight_only_series(ptq: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Measured (bits, top-1) of the weight-only rows, one series per granularity and method."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in ptq:
        if row.get("acc1") is not None and row.get("method") not in WHOLE_MODEL and not _mixed(row):
            series.setdefault(f"{row['granularity']} {row['method']}", []).append((row["bits"], row["acc1"]))
    return {label: sorted(points) for label, points in series.items()}


def _mixed(row: dict[str, Any]) -> bool:
    return str(row["recipe"]).startswith("mixed@")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (size, accuracy) points that no smaller-or-equal point beats in accuracy, by size."""
    front: list[tuple[float, float]] = []
    for size, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((size, acc))
    return front


def _plans(root: Path) -> dict[str, dict[str, int]]:
    """The bits per layer of each mixed-precision PTQ recipe, from its ``.plan.json``."""
    return {path.name.removesuffix(".plan.json"): _json(path) for path in sorted((root / "ptq").glob("*.plan.json"))}


def _bit_curve(points: list[tuple[int, float]], fp32: float) -> dict[str, Any] | None:
    bits, acc = [b for b, _ in points], [a for _, a in points]
    if len(set(bits)) < 2:
        return None
    fit = fit_bit_curve(bits, acc)
    return {
        "plateau": fit.plateau,
        "drop": fit.drop,
        "first_bits_gap_over_1pt_measured": first_bits_with_gap(bits, acc, fp32, GAP),
        "bits_gap_1pt_fitted": fit.bits_for_gap(fp32, GAP),
    }


def method_savings(ptq: list[dict[str, Any]], fp32: float) -> list[dict[str, Any]]:
    """For each granularity and each method other than RTN, the bits it needs to stay within 1 point
    of fp32 against RTN's: from the fitted curves (fractional) and measured (the fewest bits within 1
    point, all wider ones within too)."""
    series = weight_only_series(ptq)
    savings = []
    for label, points in series.items():
        granularity, method = label.split(" ", 1)
        rtn = series.get(f"{granularity} rtn")
        if method == "rtn" or rtn is None:
            continue
        pair = {"rtn": rtn, "method": points}
        fitted = {key: _bits_for_gap(p, fp32) for key, p in pair.items()}
        fewest = {key: fewest_bits_within(*zip(*p, strict=True), fp32, GAP) for key, p in pair.items()}
        savings.append(
            {
                "granularity": granularity,
                "method": method,
                "bits_fitted_rtn": fitted["rtn"],
                "bits_fitted": fitted["method"],
                "bits_saved_fitted": None if None in fitted.values() else fitted["rtn"] - fitted["method"],
                "fewest_bits_rtn": fewest["rtn"],
                "fewest_bits": fewest["method"],
                "bits_saved_measured": None if None in fewest.values() else fewest["rtn"] - fewest["method"],
                "lowest_bits_measured": min(b for b, _ in points),
            }
        )
    return savings


def _bits_for_gap(points: list[tuple[int, float]], fp32: float) -> float | None:
    if len({b for b, _ in points}) < 2:
        return None
    return fit_bit_curve(*zip(*points, strict=True)).bits_for_gap(fp32, GAP)


def _best_ptq_at(ptq: list[dict[str, Any]], bits: int) -> dict[str, dict[str, Any] | None]:
    """The most accurate weight-only PTQ row at ``bits`` with round-to-nearest, and with any other method."""
    rows = [r for r in ptq if r["bits"] == bits and r.get("acc1") is not None and r.get("method") not in WHOLE_MODEL]
    rtn = [r for r in rows if r["method"] == "rtn"]
    other = [r for r in rows if r["method"] != "rtn"]
    return {
        "rtn": max(rtn, key=lambda r: r["acc1"], default=None),
        "best": max(other, key=lambda r: r["acc1"], default=None),
    }


def _qat_folders(root: Path) -> list[tuple[str, Path]]:
    """(key, folder): weight-only QAT by bits, high to low, then from mixed-precision plans (keyed by
    the PTQ recipe that made the plan), then W8A8."""
    weight_only = sorted(root.glob("qat_int*"), key=lambda p: -int(p.name.removeprefix("qat_int") or 0))
    mixed = sorted(root.glob("qat_mixed@*"))
    return [
        *((p.name.removeprefix("qat_int"), p) for p in weight_only),
        *((p.name.removeprefix("qat_"), p) for p in mixed),
        ("w8a8", root / "qat_w8a8"),
    ]


def _ptq_compared(ptq: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any] | None]:
    """The PTQ rows a QAT stage is compared with: at N weight bits the best RTN and best other-method
    rows; for W8A8 PTQ's int8_static (the same int8 graph, round-to-nearest weights), no other method."""
    if key.isdigit():
        return _best_ptq_at(ptq, int(key))
    if key.startswith("mixed@"):  # the PTQ row of the same plan
        row = next((r for r in ptq if r["recipe"] == key and r.get("acc1") is not None), None)
        return {"rtn": row, "best": None} if row is None or row["method"] == "rtn" else {"rtn": None, "best": row}
    static = next((r for r in ptq if r["recipe"] == "int8_static" and r.get("acc1") is not None), None)
    return {"rtn": static, "best": None}


def _qat_results(root: Path, ptq: list[dict[str, Any]], fp32: float | None) -> dict[str, Any]:
    """Per QAT stage (keyed by weight bits, or ``w8a8``): its per-epoch and converted accuracy against
    the PTQ rows of the same quantized model and fp32."""
    qat: dict[str, Any] = {}
    for key, folder in _qat_folders(root):
        rows = _numeric_csv(folder / "results.csv")
        if not rows:
            continue
        per_epoch = [r["acc1"] for r in rows if r["fake_quant"] != "converted"]
        qat[key] = {
            "label": f"int{key}" if key.isdigit() else key if key.startswith("mixed@") else key.upper(),
            "acc1_per_epoch": per_epoch,
            "converted_acc1": next((r["acc1"] for r in rows if r["fake_quant"] == "converted"), None),
            "epochs_to_match_fp32": epochs_to_match(per_epoch, fp32) if fp32 is not None else None,
        }
        for kind, row in _ptq_compared(ptq, key).items():
            qat[key][f"ptq_{kind}"] = None if row is None else {"recipe": row["recipe"], "acc1": row["acc1"]}
            matched = None if row is None else epochs_to_match(per_epoch, row["acc1"])
            qat[key][f"epochs_to_match_ptq_{kind}"] = matched
    return qat


def collect(root: Path) -> dict[str, Any]:
    """Every number of the study in ``root``, read back from the files its stages wrote."""
    ptq = _numeric_csv(root / "ptq" / "results.csv")
    by_name = {r["recipe"]: r for r in ptq if r.get("acc1") is not None}
    fp32 = by_name.get("fp32", {}).get("acc1")
    series = weight_only_series(ptq)
    precision = {}
    for folder in sorted(root.glob("precision_*")):
        summary = _json(folder / "summary.json")
        if summary is not None:
            precision[folder.name.removeprefix("precision_")] = summary
    return {
        "config": _json(root / "study_config.json") or {},
        "errors": _json(root / "errors.json") or {},
        "baseline": _json(root / "baseline" / "baseline.json"),
        "ptq": ptq,
        "bit_curve_model": CURVE_MODEL,
        "bit_curves": {label: _bit_curve(points, fp32) for label, points in series.items()} if fp32 else {},
        "method_savings": method_savings(ptq, fp32) if fp32 else [],
        "plans": _plans(root),
        "qat": _qat_results(root, ptq, fp32),
        "precision": precision,
    }


# --- figures, one function each -----------------------------------------------------------------


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
        ("uniform", [r for r in weight_only if not _mixed(r)], "o"),
        ("mixed precision", [r for r in weight_only if _mixed(r)], "D"),
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


def _figures(results: dict[str, Any]) -> dict[str, plt.Figure]:
    figures = {}
    for name, plot in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4) if name == "precision_numerics" else (6, 4))
        if plot(results, ax):
            figures[name] = fig
        else:
            plt.close(fig)
    return figures


# --- markdown, one function per section ----------------------------------------------------------


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _header(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    data, baseline = cfg.get("data", {}), cfg.get("baseline", {})
    if data.get("synthetic"):
        source = f"synthetic ({data['synthetic_train_size']} train / {data['synthetic_test_size']} test images)"
    else:
        source = "CIFAR-100"
    trained = baseline.get("ckpt") or f"{baseline.get('epochs')} epochs"
    lines = [
        "# qlight quantization study",
        "",
        f"Model: {cfg.get('model', {}).get('num_classes')}-class VGG-11-BN; data: {source}; baseline: {trained}; "
        f"trainer: {cfg.get('trainer')}.",
        "",
    ]
    if results["baseline"]:
        b = results["baseline"]
        top = f"top-1 {_pct(b['test_acc1'])}%, top-5 {_pct(b['test_acc5'])}%"
        lines += [f"Baseline test {top} ({b['checkpoint']}).", ""]
    return lines


def _ptq_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Post-training quantization", "", "Every Conv2d and Linear; sizes are bytes of the saved file.", ""]
    if not results["ptq"]:
        return [*lines, "(no PTQ results)", ""]
    rows = []
    for r in results["ptq"]:
        delta, size, ratio = r.get("delta_acc1"), r.get("size_mib"), r.get("compression")
        rows.append(
            {
                "recipe": r["recipe"],
                "bits": r["bits"],
                "granularity": r.get("granularity"),
                "method": r.get("method"),
                "top-1 %": _pct(r.get("acc1")),
                "Δ vs fp32 (pt)": None if delta is None else f"{100 * delta:+.2f}",
                "size MiB": None if size is None else f"{size:.2f}",
                "compression": None if ratio is None else f"{ratio:.1f}x",
                "images/s": None if r.get("images_per_s") is None else f"{r['images_per_s']:,.0f}",
                "error": r.get("error"),
            }
        )
    return [*lines, markdown_table(rows, list(rows[0]))]


def _plan_section(results: dict[str, Any]) -> list[str]:
    plans = results["plans"]
    if not plans:
        return []
    layers = list(dict.fromkeys(layer for plan in plans.values() for layer in plan))
    rows = [{"layer": layer, **{name: plan.get(layer, "float") for name, plan in plans.items()}} for layer in layers]
    intro = "Bits per layer that each mixed-precision recipe chose (``<recipe>.plan.json`` in ``ptq/``)."
    return ["## Mixed precision: bits per layer", "", intro, "", markdown_table(rows, list(rows[0])), ""]


def _bit_curve_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Accuracy vs bit-width", ""]
    curves = {label: curve for label, curve in results["bit_curves"].items() if curve}
    if not curves:
        return [*lines, "(needs fp32 and at least two integer bit-widths)", ""]
    lines += [f"Fitted model: {results['bit_curve_model']}.", ""]
    for label, curve in curves.items():
        fitted = curve["bits_gap_1pt_fitted"]
        lines.append(
            f"- {label}: plateau {_pct(curve['plateau'])}%, drop {curve['drop']:.3f}; first measured bit-width more "
            f"than 1 point below fp32: {curve['first_bits_gap_over_1pt_measured'] or 'none'}; the fit crosses "
            f"1 point at {_bits(fitted)} bits."
        )
    lines.append("")
    lines += [_saving_line(saving) for saving in results["method_savings"]]
    return [*lines, ""] if results["method_savings"] else lines


def _saving_line(saving: dict[str, Any]) -> str:
    measured = saving["bits_saved_measured"]
    if measured is not None and saving["fewest_bits"] == saving["lowest_bits_measured"]:
        measured = f"at least {measured}"  # it may hold below the lowest bit-width measured
    return (
        f"- Bits saved at a 1-point gap to fp32 by {saving['method']} over RTN ({saving['granularity']}): "
        f"{_bits(saving['bits_saved_fitted'])} by the fits ({_bits(saving['bits_fitted'])} bits against "
        f"{_bits(saving['bits_fitted_rtn'])}), {'n/a' if measured is None else measured} measured (fewest measured "
        f"bits within 1 point: {saving['fewest_bits'] or 'none'} against {saving['fewest_bits_rtn'] or 'none'})."
    )


def _bits(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _qat_section(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Quantization-aware training",
        "",
        "From the baseline, fake-quant on every Conv2d and Linear, evaluated on the test set after each epoch "
        "(the same split as PTQ). intN: weights only (activations float); W8A8: int8 weights and static int8 "
        "activations with BatchNorm folded (torchao PT2E), the graph PTQ's int8_static calibrates (its PTQ RTN "
        "column: round-to-nearest weights, calibrated activations; no other PTQ method applies).",
        "",
    ]
    if not results["qat"]:
        return [*lines, "(no QAT results)", ""]
    rows = [
        {
            "QAT": q["label"],
            "PTQ RTN": (q["ptq_rtn"] or {}).get("recipe"),
            "PTQ RTN top-1 %": _pct(_acc(q["ptq_rtn"])),
            "best PTQ top-1 %": _pct(_acc(q["ptq_best"])),
            "best PTQ recipe": (q["ptq_best"] or {}).get("recipe"),
            "QAT last epoch %": _pct(q["acc1_per_epoch"][-1] if q["acc1_per_epoch"] else None),
            "QAT converted %": _pct(q["converted_acc1"]),
            "epochs to match PTQ RTN": _epochs(q["epochs_to_match_ptq_rtn"], q["ptq_rtn"]),
            "epochs to match best PTQ": _epochs(q["epochs_to_match_ptq_best"], q["ptq_best"]),
            "epochs to match fp32": q["epochs_to_match_fp32"] or "not reached",
        }
        for q in results["qat"].values()
    ]
    return [*lines, markdown_table(rows, list(rows[0]))]


def _acc(ptq: dict[str, Any] | None) -> float | None:
    return None if ptq is None else ptq["acc1"]


def _epochs(matched: int | None, ptq: dict[str, Any] | None) -> int | str:
    return "n/a" if ptq is None else matched or "not reached"


def _precision_section(results: dict[str, Any]) -> list[str]:
    lines = ["## fp16 vs bf16", ""]
    runs = results["precision"]
    lines += [f"Note: {note}." for note in sorted({r["note"] for r in runs.values() if r.get("note")})]
    if runs:
        rows = [
            {
                "precision": p,
                "device": r["device"],
                "epochs": r["epochs"],
                "val top-1 %": _pct(r["val_acc1"]),
                "s/epoch": f"{r['seconds_per_epoch']:.1f}",
                "peak memory MiB": "n/a" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}",
                "GradScaler skipped steps": r["scaler"]["skipped_steps"],
                "scale changes": r["scaler"]["scale_increases"] + r["scaler"]["scale_decreases"],
            }
            for p, r in runs.items()
        ]
        lines += ["", markdown_table(rows, list(rows[0]))]
        lines += ["Sampled values cast to each format (% of finite non-zero values):", ""]
        rows = [
            {
                "trained in": p,
                "values": k.split("/")[0],
                "cast to": k.split("/")[1],
                "sampled": v["count"],
                "overflow %": f"{100 * v['overflow_share']:.4f}",
                "underflow to 0 %": f"{100 * v['underflow_share']:.4f}",
                "subnormal %": f"{100 * v['subnormal_share']:.4f}",
            }
            for p, r in runs.items()
            for k, v in r["values"].items()
        ]
        lines += [markdown_table(rows, list(rows[0])) if rows else ""]
    casts = [
        f"{r['recipe']}: top-1 {_pct(r.get('acc1'))}%, {r.get('size_mib') or 0:.2f} MiB"
        for r in results["ptq"]
        if r["recipe"] in ("fp16", "bf16")
    ]
    if casts:
        lines += ["PTQ casts of the baseline: " + "; ".join(casts) + ".", ""]
    return lines


def _markdown(results: dict[str, Any], images: list[str]) -> str:
    lines = _header(results) + _ptq_section(results) + _plan_section(results) + _bit_curve_section(results)
    lines += _qat_section(results) + _precision_section(results)
    lines += ["## Plots", ""] + [f"![{name}]({name}.png)" for name in images] + [""]
    if results["errors"]:
        lines += ["## Stages that failed", ""] + [f"- {k}: {v}" for k, v in results["errors"].items()] + [""]
    return "\n".join(lines)


def _tensorboard(root: Path, results: dict[str, Any], figures: dict[str, plt.Figure], report: str) -> None:
    writer = SummaryWriter(str(root / "tensorboard"))
    for name, fig in figures.items():
        writer.add_figure(f"study/{name}", fig)
    metrics = {f"ptq/{r['recipe']}/acc1": r["acc1"] for r in results["ptq"] if r.get("acc1") is not None}
    for q in results["qat"].values():
        if q["converted_acc1"] is not None:
            metrics[f"qat/{q['label'].lower()}/converted_acc1"] = q["converted_acc1"]
    cfg = results["config"]
    hparams = {
        "seed": cfg.get("seed"),
        "baseline_epochs": cfg.get("baseline", {}).get("epochs"),
        "qat_epochs": cfg.get("qat", {}).get("epochs"),
        "qat_lr": cfg.get("qat", {}).get("lr"),
        "synthetic": cfg.get("data", {}).get("synthetic"),
    }
    if metrics:
        writer.add_hparams(hparams, metrics, run_name=".")
    writer.add_text("study/report", report)
    writer.close()


def build_report(study_dir: str | Path) -> Path:
    """Write results.json, report.md and the PNGs into ``study_dir``, and the figures, scalars and
    hparams into ``<study_dir>/tensorboard``; returns report.md's path."""
    root = Path(study_dir)
    results = collect(root)
    figures = _figures(results)
    for name, fig in figures.items():
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        atomic_write_bytes(root / f"{name}.png", png.getvalue())
    report = _markdown(results, list(figures))
    atomic_write_text(root / "report.md", report)
    atomic_write_text(root / "results.json", json.dumps(results, indent=2))
    _tensorboard(root, results, figures, report)
    for fig in figures.values():
        plt.close(fig)
    _print_summary(root, results)
    return root / "report.md"


def _print_summary(root: Path, results: dict[str, Any]) -> None:
    print(f"\nReport: {root / 'report.md'}")
    width = max([28, *(len(r["recipe"]) for r in results["ptq"])])
    for r in results["ptq"]:
        size = "" if r.get("size_mib") is None else f"{r['size_mib']:7.2f} MiB"
        print(f"  PTQ {r['recipe']:<{width}} top-1 {_pct(r.get('acc1')):>6}%  {size}  {r.get('error') or ''}")
    for q in results["qat"].values():
        matched = {kind: _epochs(q[f"epochs_to_match_ptq_{kind}"], q[f"ptq_{kind}"]) for kind in ("rtn", "best")}
        rtn = (q["ptq_rtn"] or {}).get("recipe", "RTN")
        print(
            f"  QAT {q['label']:<{width}} top-1 {_pct(q['converted_acc1']):>6}%  "
            f"epochs to match PTQ {rtn}: {matched['rtn']}, best PTQ: {matched['best']}"
        )
