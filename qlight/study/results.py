"""The study's numbers, read back from the files its stages wrote (nothing else)."""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from qlight.errors import QlightError
from qlight.quantization.recipes.mixed import MIXED_NAME
from qlight.study.curves import (
    epochs_to_match,
    fewest_bits_within,
    first_bits_with_gap,
    fit_bit_curve,
)
from qlight.tables import read_csv

GAP = 0.01  # "the bit-width where the gap to fp32 first exceeds 1 point"
WHOLE_MODEL = (None, "cast", "pt2e")  # methods of rows that are not weight-only integer recipes
CURVE_MODEL = "acc(b) = plateau - drop * 4^(-b)  (quantization noise variance ~ 2^(-2b)), least squares"
PRECISIONS = ("16-mixed", "bf16-mixed", "32-true", "16-true", "bf16-true")  # of the precision_<P> stages
QAT_INT = re.compile(r"qat_int(\d+)")


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
        if row.get("acc1") is not None and row.get("method") not in WHOLE_MODEL and not is_mixed(row):
            series.setdefault(f"{row['granularity']} {row['method']}", []).append((row["bits"], row["acc1"]))
    return {label: sorted(points) for label, points in series.items()}


def is_mixed(row: dict[str, Any]) -> bool:
    return str(row["recipe"]).startswith("mixed@")


def split_deployed(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """PTQ's rows as (each recipe's own row, its rows in other runtimes): a runtime's row repeats the
    name of a recipe that has an eager row (``int8_static_onnx``, named for its runtime, is its own)."""
    eager = {r["recipe"] for r in rows if r.get("runtime") in (None, "eager")}
    deployed = [r for r in rows if r.get("runtime") not in (None, "eager") and r["recipe"] in eager]
    return [r for r in rows if not any(r is d for d in deployed)], deployed


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (size, accuracy) points that no smaller-or-equal point beats in accuracy, by size."""
    front: list[tuple[float, float]] = []
    for size, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((size, acc))
    return front


def _plans(root: Path, ptq: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """The bits per layer of each mixed-precision recipe in PTQ's table, from its ``.plan.json`` (other
    ``.plan.json`` files in ``ptq/`` are not the study's)."""
    plans = {row["recipe"]: root / "ptq" / f"{row['recipe']}.plan.json" for row in ptq if is_mixed(row)}
    return {name: _json(path) for name, path in plans.items() if path.is_file()}


def _bit_curve(points: list[tuple[int, float]], fp32: float) -> dict[str, Any] | None:
    bits, acc = [b for b, _ in points], [a for _, a in points]
    if len(set(bits)) < 2:
        return None
    fit = fit_bit_curve(bits, acc)
    fits = fit.fits(bits, acc, fp32, GAP)
    return {
        "plateau": fit.plateau,
        "drop": fit.drop,
        "max_error": fit.max_error(bits, acc),
        "fits": fits,
        "first_bits_gap_over_1pt_measured": first_bits_with_gap(bits, acc, fp32, GAP),
        "bits_gap_1pt_fitted": fit.bits_for_gap(fp32, GAP) if fits else None,
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
    curve = _bit_curve(points, fp32)
    return curve and curve["bits_gap_1pt_fitted"]


def _best_ptq_at(ptq: list[dict[str, Any]], bits: int) -> dict[str, dict[str, Any] | None]:
    """The most accurate weight-only PTQ row at ``bits`` with round-to-nearest, and with any other method."""
    rows = [r for r in ptq if r["bits"] == bits and r.get("acc1") is not None and r.get("method") not in WHOLE_MODEL]
    rtn = [r for r in rows if r["method"] == "rtn"]
    other = [r for r in rows if r["method"] != "rtn"]
    return {
        "rtn": max(rtn, key=lambda r: r["acc1"], default=None),
        "best": max(other, key=lambda r: r["acc1"], default=None),
    }


def _stage_folders(root: Path, stages: Collection[str] | None) -> set[str]:
    """The names of the stage folders to read: ``stages`` where given, else every folder in ``root``."""
    if stages is not None:
        return set(stages)
    return {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()


def _qat_folders(root: Path, names: set[str]) -> list[tuple[str, Path]]:
    """(key, folder): weight-only QAT by bits, high to low, then from mixed-precision plans (keyed by
    the PTQ recipe that made the plan), then W8A8. Only names a stage has (``qat_int4.bak`` is not one)."""
    bits = sorted((int(m[1]) for m in map(QAT_INT.fullmatch, names) if m), reverse=True)
    mixed = sorted(n.removeprefix("qat_") for n in names if n.startswith("qat_") and MIXED_NAME.fullmatch(n[4:]))
    return [
        *((str(b), root / f"qat_int{b}") for b in bits),
        *((recipe, root / f"qat_{recipe}") for recipe in mixed),
        *([("w8a8", root / "qat_w8a8")] if "qat_w8a8" in names else []),
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


def _qat_results(root: Path, names: set[str], ptq: list[dict[str, Any]], fp32: float | None) -> dict[str, Any]:
    """Per QAT stage (keyed by weight bits, or ``w8a8``): its per-epoch and converted accuracy against
    the PTQ rows of the same quantized model and fp32."""
    qat: dict[str, Any] = {}
    for key, folder in _qat_folders(root, names):
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


def collect(root: Path, stages: Collection[str] | None = None) -> dict[str, Any]:
    """Every number of the study in ``root``, read back from the files its stages wrote: in the stage
    folders named ``stages`` (the study passes those of its configuration), or in every folder."""
    names = _stage_folders(root, stages)
    ptq, deployed = split_deployed(_numeric_csv(root / "ptq" / "results.csv") if "ptq" in names else [])
    by_name = {r["recipe"]: r for r in ptq if r.get("acc1") is not None}
    fp32 = by_name.get("fp32", {}).get("acc1")
    series = weight_only_series(ptq)
    precision = {}
    for name in sorted(f"precision_{p}" for p in PRECISIONS if f"precision_{p}" in names):
        summary = _json(root / name / "summary.json")
        if summary is not None:
            precision[name.removeprefix("precision_")] = summary
    return {
        "config": _json(root / "study_config.json") or {},
        "errors": _json(root / "errors.json") or {},
        "baseline": _json(root / "baseline" / "baseline.json") if "baseline" in names else None,
        "float_control": _json(root / "qat_fp32" / "summary.json") if "qat_fp32" in names else None,
        "ptq": ptq,
        "deployed": deployed,
        "fp32_acc1": fp32,
        "bit_curve_model": CURVE_MODEL,
        "bit_curves": {label: _bit_curve(points, fp32) for label, points in series.items()} if fp32 else {},
        "method_savings": method_savings(ptq, fp32) if fp32 else [],
        "plans": _plans(root, ptq),
        "qat": _qat_results(root, names, ptq, fp32),
        "precision": precision,
    }
