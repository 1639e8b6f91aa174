"""The study's report, a function of the study directory alone: results.json, report.md, the PNG
plots and the same figures in TensorBoard, from the files the stages wrote."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from torch.utils.tensorboard import SummaryWriter

from qlight.errors import QlightError
from qlight.files import atomic_write_bytes, atomic_write_text
from qlight.models import backbone_name
from qlight.quantization.runtimes.agreement import AGREEMENT_FLOOR
from qlight.study.figures import CAPTIONS, figures
from qlight.study.results import collect, weight_only_series
from qlight.tables import markdown_table

# --- markdown, one function per section ----------------------------------------------------------


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _data(data: dict[str, Any]) -> str:
    """The data as the config names it: the class, and the synthetic sizes or the folder it reads."""
    name = str(data.get("class_path", "CIFAR100DataModule")).rpartition(".")[2]
    args = data.get("init_args", data)
    if args.get("synthetic"):
        return f"{name}, synthetic ({args['synthetic_train_size']} train / {args['synthetic_test_size']} test images)"
    where = args.get("root") or args.get("data_dir")
    return f"{name} ({where})" if where else name


def _header(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    baseline, b = cfg.get("baseline", {}), results["baseline"]
    trained = baseline.get("ckpt") or f"{baseline.get('epochs')} epochs"
    model = cfg.get("model", {})
    name = backbone_name(model.get("backbone", "vgg11_bn"))
    size = f"{b['parameters']:,} parameters, " if b and b.get("parameters") else ""
    kept = cfg.get("keep_float") or []
    lines = [
        "# qlight quantization study",
        "",
        f"Model: {name} ({size}{model.get('num_classes')} classes); data: {_data(cfg.get('data', {}))}; "
        f"baseline: {trained}; layers kept in float: {', '.join(kept) or 'none'}; trainer: {cfg.get('trainer')}.",
        "",
    ]
    if b:
        top = f"top-1 {_pct(b['test_acc1'])}%, top-5 {_pct(b['test_acc5'])}%"
        images = b.get("test_images")
        resolution = f" on {images:,} test images: one image is {100 / images:.2f} points" if images else ""
        lines += [f"Baseline test {top} ({b['checkpoint']}){resolution}.", ""]
    return lines


def _quantized_layers(cfg: dict[str, Any]) -> str:
    kept = cfg.get("keep_float") or []
    return "every Conv2d and Linear" + (f" but the {' and '.join(kept)} (kept in float)" if kept else "")


def _ptq_section(results: dict[str, Any]) -> list[str]:
    which = _quantized_layers(results["config"])
    lines = [
        "## Post-training quantization",
        "",
        f"{which[0].upper()}{which[1:]}; sizes are bytes of the saved file.",
        "",
    ]
    if not results["ptq"]:
        return [*lines, "(no PTQ results)", ""]
    images = (results["baseline"] or {}).get("test_images")
    if images:
        lines[-1:] = [
            f"≈: within one test image of fp32 ({100 / images:.2f} points), below what the test set resolves.",
            "",
        ]
    rows = []
    for r in results["ptq"]:
        delta, size, ratio = r.get("delta_acc1"), r.get("size_mib"), r.get("compression")
        close = images and delta is not None and r["recipe"] != "fp32" and abs(delta) * images <= 1 + 1e-6
        noise = " ≈" if close else ""
        rows.append(
            {
                "recipe": r["recipe"],
                "bits": r["bits"],
                "granularity": r.get("granularity"),
                "method": r.get("method"),
                "top-1 %": _pct(r.get("acc1")),
                "Δ vs fp32 (pt)": None if delta is None else f"{100 * delta:+.2f}{noise}",
                "size MiB": None if size is None else f"{size:.2f}",
                "compression": None if ratio is None else f"{ratio:.1f}x",
                "images/s": None if r.get("images_per_s") is None else f"{r['images_per_s']:,.0f}",
                "spread %": None if r.get("spread_pct") is None else f"{r['spread_pct']:.0f}",
                "error": r.get("error"),
            }
        )
    return [*lines, markdown_table(rows, list(rows[0]))]


def _deployed_section(results: dict[str, Any]) -> list[str]:
    """Every row PTQ ran in a runtime other than eager PyTorch, with its agreement and speedup."""
    rows = [r for r in results["ptq"] + results.get("deployed", []) if r.get("runtime") not in (None, "eager")]
    lines = ["## Deployed", ""]
    if not rows:
        return [*lines, "(no deployed rows: run PTQ with --ptq.runtimes=[eager, onnxruntime])", ""]
    lines += [
        f"Each recipe in another runtime: agreement is the share of test images it predicts as the PyTorch "
        f"model does (under {AGREEMENT_FLOOR}%: its results are not the PyTorch model's), speedup its images/s "
        "over fp32's in the same runtime; sizes are bytes of its file.",
        "",
    ]
    table = [
        {
            "recipe": r["recipe"],
            "runtime": r["runtime"],
            "top-1 %": _pct(r.get("acc1")),
            "agreement %": None if r.get("agreement") is None else f"{r['agreement']:.2f}",
            "size MiB": None if r.get("size_mib") is None else f"{r['size_mib']:.3f}",
            "images/s": None if r.get("images_per_s") is None else f"{r['images_per_s']:,.0f}",
            "speedup": None if r.get("speedup") is None else f"{r['speedup']:.2f}x",
            "note": r.get("error") or r.get("note"),
        }
        for r in rows
    ]
    return [*lines, markdown_table(table, list(table[0]))]


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
        measured = curve["first_bits_gap_over_1pt_measured"] or "none"
        if curve["fits"]:
            fit = (
                f"plateau {_pct(curve['plateau'])}%, drop {curve['drop']:.3f}, within "
                f"{100 * curve['max_error']:.2f} points of every measured point; the fit crosses 1 point at "
                f"{_bits(curve['bits_gap_1pt_fitted'])} bits"
            )
        else:
            fit = (
                f"the model does not describe these points (off by up to {100 * curve['max_error']:.2f} points, "
                f"drop {curve['drop']:.3f}, plateau {_pct(curve['plateau'])}%): no curve drawn, no fitted crossing"
            )
        lines.append(f"- {label}: first measured bit-width more than 1 point below fp32: {measured}; {fit}.")
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
        f"From the baseline, fake-quant on {_quantized_layers(results['config'])}, evaluated on the test set after "
        "each epoch (the same split as PTQ). intN: weights only (activations float); W8A8: int8 weights and "
        "static int8 activations with BatchNorm folded (torchao PT2E), the graph PTQ's int8_static calibrates (its "
        "PTQ RTN column: round-to-nearest weights, calibrated activations; no other PTQ method applies).",
        "",
    ]
    if not results["qat"]:
        return [*lines, "(no QAT results)", ""]
    control = results["float_control"]
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
            **({"vs fp32 fine-tuned (pt)": _points(q["converted_acc1"], control["test_acc1"])} if control else {}),
        }
        for q in results["qat"].values()
    ]
    lines.append(markdown_table(rows, list(rows[0])))
    if control:
        lines += [
            f"Control: the float baseline fine-tuned on QAT's schedule ({control['epochs']} "
            f"epoch{'s' * (control['epochs'] != 1)} at lr "
            f"{control['lr']}) reaches {_pct(control['test_acc1'])}% top-1, against fp32's "
            f"{_pct(results['fp32_acc1'])}%: QAT above fp32 by up to that much is more training, not quantization.",
            "",
        ]
    return lines


def _points(value: float | None, reference: float | None) -> str:
    return "n/a" if value is None or reference is None else f"{100 * (value - reference):+.2f}"


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
    lines = _header(results) + _ptq_section(results) + _deployed_section(results) + _plan_section(results)
    lines += _bit_curve_section(results)
    lines += _qat_section(results) + _precision_section(results)
    lines += ["## Plots", ""]
    for name in images:
        lines += [f"![{name}]({name}.png)", "", f"*{CAPTIONS[name]}*", ""]
    if results["errors"]:
        lines += ["## Stages that failed", ""] + [f"- {k}: {v}" for k, v in results["errors"].items()] + [""]
    return "\n".join(lines)


def _tensorboard(root: Path, results: dict[str, Any], drawn: dict[str, plt.Figure], report: str) -> None:
    # The folder is the report's own: an earlier report's event files would stack up in TensorBoard.
    for old in (root / "tensorboard").glob("events.out.tfevents.*"):
        old.unlink(missing_ok=True)
    writer = SummaryWriter(str(root / "tensorboard"))
    for name, fig in drawn.items():
        writer.add_figure(f"study/{name}", fig)
    for label, points in weight_only_series(results["ptq"]).items():  # one chart per series, step = bits
        for bits, acc1 in points:
            writer.add_scalar(f"study/acc1_vs_bits/{label.replace(' ', '_')}", acc1, global_step=bits)
    # For comparing studies side by side: fp32 and the best PTQ row at each bit-width, not every recipe.
    metrics = {"ptq/fp32/acc1": results["fp32_acc1"]} if results["fp32_acc1"] is not None else {}
    for points in weight_only_series(results["ptq"]).values():
        for bits, acc1 in points:
            metrics[f"ptq/best_int{bits}/acc1"] = max(acc1, metrics.get(f"ptq/best_int{bits}/acc1", 0.0))
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


def build_report(
    study_dir: str | Path, stages: Collection[str] | None = None, claim: Callable[[str], None] | None = None
) -> Path:
    """Write results.json, report.md and the PNGs into ``study_dir``, and the figures, scalars and
    hparams into ``<study_dir>/tensorboard``; returns report.md's path. ``stages`` names the stage
    folders to read (default: every folder); ``claim`` is called with each top-level name before it
    is written (the study records it as its own)."""
    root = Path(study_dir)
    if (root / "tensorboard").is_symlink():  # its old event files are deleted: only in a folder of its own
        raise QlightError(f"{root / 'tensorboard'} is a symlink: the report writes only inside {root}; remove it")
    claim = claim or (lambda name: None)
    results = collect(root, stages)
    drawn = figures(results)
    for name, fig in drawn.items():
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        claim(f"{name}.png")
        atomic_write_bytes(root / f"{name}.png", png.getvalue())
    report = _markdown(results, list(drawn))
    for name in ("report.md", "results.json", "tensorboard"):
        claim(name)
    atomic_write_text(root / "report.md", report)
    atomic_write_text(root / "results.json", json.dumps(results, indent=2))
    _tensorboard(root, results, drawn, report)
    for fig in drawn.values():
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
