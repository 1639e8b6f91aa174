"""The study's report: results.json, report.md, PNG plots and the same figures in TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from qlight.quantization.reporting import markdown_table, read_csv  # noqa: E402
from qlight.study.curves import BitCurve, epochs_to_match, first_bits_with_gap, fit_bit_curve  # noqa: E402

if TYPE_CHECKING:
    from qlight.study.runner import Study

GAP = 0.01  # "the bit-width where the gap to fp32 first exceeds 1 point"


def _number(value: str) -> float | int | str | None:
    if value == "":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _rows(path: Path) -> list[dict[str, Any]]:
    return [{k: _number(v) for k, v in row.items()} for row in read_csv(path)] if path.is_file() else []


def _ptq_points(rows: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], float | None, list[tuple[int, float]]]:
    """Measured PTQ rows by recipe, the fp32 accuracy and the sorted (bits, acc1) of weight-only recipes."""
    by_name = {r["recipe"]: r for r in rows if r.get("acc1") is not None}
    ints = sorted(
        (r["bits"], r["acc1"]) for name, r in by_name.items() if name.startswith("int") and "static" not in name
    )
    return by_name, by_name.get("fp32", {}).get("acc1"), ints


def collect(study: Study) -> dict[str, Any]:
    """Every number of the study, read back from the files its stages wrote."""
    root = study.dir
    results: dict[str, Any] = {"config": study._fingerprint(), "errors": dict(study.errors)}
    baseline = root / "baseline" / "baseline.json"
    results["baseline"] = json.loads(baseline.read_text()) if baseline.is_file() else None
    ptq = _rows(root / "ptq" / "results.csv")
    results["ptq"] = ptq
    by_name, fp32, ints = _ptq_points(ptq)
    curve = None
    if fp32 is not None and len({b for b, _ in ints}) >= 2:
        fit = fit_bit_curve([b for b, _ in ints], [a for _, a in ints])
        curve = {
            "model": "acc(b) = plateau - drop * 4^(-b)  (quantization noise variance ~ 2^(-2b)), least squares",
            "plateau": fit.plateau,
            "drop": fit.drop,
            "first_bits_gap_over_1pt_measured": first_bits_with_gap(
                [b for b, _ in ints], [a for _, a in ints], fp32, GAP
            ),
            "bits_gap_1pt_fitted": fit.bits_for_gap(fp32, GAP),
        }
    results["bit_curve"] = curve
    qat: dict[str, Any] = {}
    for bits in study.config.qat.bits:
        rows = _rows(root / f"qat_int{bits}" / "results.csv")
        if not rows:
            continue
        per_epoch = [r["acc1"] for r in rows if r["fake_quant"] != "converted"]
        converted = next((r["acc1"] for r in rows if r["fake_quant"] == "converted"), None)
        ptq_acc = by_name.get(f"int{bits}", {}).get("acc1")
        qat[str(bits)] = {
            "acc1_per_epoch": per_epoch,
            "converted_acc1": converted,
            "ptq_acc1": ptq_acc,
            "epochs_to_match_ptq": epochs_to_match(per_epoch, ptq_acc) if ptq_acc is not None else None,
            "epochs_to_match_fp32": epochs_to_match(per_epoch, fp32) if fp32 is not None else None,
        }
    results["qat"] = qat
    precisions, note = study.precisions()
    results["precision"] = {
        p: json.loads((root / "precision" / f"{p}.json").read_text())
        for p in precisions
        if (root / "precision" / f"{p}.json").is_file()
    }
    results["precision_note"] = note
    return results


def _figures(results: dict[str, Any]) -> dict[str, plt.Figure]:
    figures: dict[str, plt.Figure] = {}
    by_name, fp32, ints = _ptq_points(results["ptq"])
    if ints:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*ints), "o", label="PTQ weight-only")
        curve = results["bit_curve"]
        if curve:
            grid = [2 + i * 0.05 for i in range(121)]
            fitted = BitCurve(curve["plateau"], curve["drop"])
            ax.plot(grid, [fitted(b) for b in grid], "-", alpha=0.6, label="fit: plateau - drop·4^-b")
            if curve["first_bits_gap_over_1pt_measured"] is not None:
                ax.axvline(curve["first_bits_gap_over_1pt_measured"], color="red", ls=":", label="gap > 1 pt")
        qat = sorted(
            (int(b), q["converted_acc1"]) for b, q in results["qat"].items() if q["converted_acc1"] is not None
        )
        if qat:
            ax.plot(*zip(*qat), "s", label="QAT (converted)")
        if fp32 is not None:
            ax.axhline(fp32, color="black", ls="--", label="fp32")
        ax.set(xlabel="weight bits", ylabel="test top-1", title="Accuracy vs bit-width")
        ax.legend()
        figures["accuracy_vs_bits"] = fig
    sized = [(r["size_mib"], r["acc1"], n) for n, r in by_name.items() if r.get("size_mib")]
    if sized:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([s for s, _, _ in sized], [a for _, a, _ in sized], "o")
        for size, acc, name in sized:
            ax.annotate(name, (size, acc), textcoords="offset points", xytext=(3, 3), fontsize=8)
        ax.set(xscale="log", xlabel="file size (MiB, log)", ylabel="test top-1", title="Accuracy vs model size")
        figures["accuracy_vs_size"] = fig
    if results["qat"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (bits, q) in enumerate(sorted(results["qat"].items(), key=lambda kv: -int(kv[0]))):
            color = f"C{i}"
            epochs = range(1, len(q["acc1_per_epoch"]) + 1)
            ax.plot(epochs, q["acc1_per_epoch"], "o-", color=color, label=f"QAT int{bits}")
            if q["ptq_acc1"] is not None:
                ax.axhline(q["ptq_acc1"], color=color, ls=":", label=f"PTQ int{bits}")
            if q["epochs_to_match_ptq"]:
                e = q["epochs_to_match_ptq"]
                ax.plot([e], [q["acc1_per_epoch"][e - 1]], "*", color=color, markersize=14)
        if fp32 is not None:
            ax.axhline(fp32, color="black", ls="--", label="fp32")
        ax.set(xlabel="QAT epoch", ylabel="test top-1 (fake-quant)", title="QAT per epoch (★ = matches PTQ)")
        ax.legend(fontsize=7)
        figures["qat_epochs"] = fig
    if results["precision"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for p, r in results["precision"].items():
            if r["losses"]:
                ax.plot(*zip(*r["losses"]), label=p)
        ax.set(xlabel="step", ylabel="training loss", title="Training loss by precision")
        ax.legend()
        figures["precision_loss"] = fig
        fig, ax = plt.subplots(figsize=(7, 4))
        labels, shares = [], {"overflow": [], "underflow": [], "subnormal": []}
        for p, r in results["precision"].items():
            for key, v in r["values"].items():
                labels.append(f"{key}\n({p})" if len(results["precision"]) > 1 else key)
                for outcome in shares:
                    shares[outcome].append(100 * v[f"{outcome}_share"])
        width = 0.27
        for j, (outcome, values) in enumerate(shares.items()):
            ax.bar([i + (j - 1) * width for i in range(len(labels))], values, width, label=outcome)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set(ylabel="% of sampled values (symlog)", title="Values lost when cast: fp16 vs bf16")
        ax.legend()
        figures["precision_numerics"] = fig
    return figures


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _markdown(results: dict[str, Any], images: list[str]) -> str:
    cfg = results["config"]
    data = cfg["data"]
    source = (
        f"synthetic ({data['synthetic_train_size']} train / {data['synthetic_test_size']} test images)"
        if data["synthetic"]
        else "CIFAR-100"
    )
    lines = ["# qlight quantization study", ""]
    lines += [
        f"Model: {cfg['model'].get('num_classes')}-class VGG-11-BN; data: {source}; baseline: "
        + (f"{cfg['baseline']['ckpt']}" if cfg["baseline"]["ckpt"] else f"{cfg['baseline']['epochs']} epochs")
        + f"; trainer: {cfg['trainer']}.",
        "",
    ]
    if results["baseline"]:
        b = results["baseline"]
        lines += [
            f"Baseline test top-1 {_pct(b['test_acc1'])}%, top-5 {_pct(b['test_acc5'])}% ({b['checkpoint']}).",
            "",
        ]
    lines += ["## Post-training quantization", "", "Every Conv2d and Linear; sizes are bytes of the saved file.", ""]
    if results["ptq"]:
        rows = [
            {
                "recipe": r["recipe"],
                "bits": r["bits"],
                "top-1 %": _pct(r.get("acc1")),
                "Δ vs fp32 (pt)": None if r.get("delta_acc1") is None else f"{100 * r['delta_acc1']:+.2f}",
                "size MiB": None if r.get("size_mib") is None else f"{r['size_mib']:.2f}",
                "compression": None if r.get("compression") is None else f"{r['compression']:.1f}x",
                "error": r.get("error"),
            }
            for r in results["ptq"]
        ]
        lines += [markdown_table(rows, list(rows[0]))]
    else:
        lines += ["(no PTQ results)", ""]
    lines += ["## Accuracy vs bit-width", ""]
    curve = results["bit_curve"]
    if curve:
        fitted = curve["bits_gap_1pt_fitted"]
        lines += [
            f"Fitted model: {curve['model']}: plateau {_pct(curve['plateau'])}%, drop {curve['drop']:.3f}.",
            f"First measured bit-width more than 1 point below fp32: {curve['first_bits_gap_over_1pt_measured'] or 'none'}; "
            f"the fit crosses 1 point at {'n/a' if fitted is None else f'{fitted:.2f}'} bits.",
            "",
        ]
    else:
        lines += ["(needs fp32 and at least two integer bit-widths)", ""]
    lines += [
        "## Quantization-aware training",
        "",
        "From the baseline, fake-quant on every Conv2d and Linear, evaluated on the test set after each epoch (the same split as PTQ).",
        "",
    ]
    if results["qat"]:
        rows = [
            {
                "bits": b,
                "PTQ top-1 %": _pct(q["ptq_acc1"]),
                "QAT last epoch %": _pct(q["acc1_per_epoch"][-1] if q["acc1_per_epoch"] else None),
                "QAT converted %": _pct(q["converted_acc1"]),
                "epochs to match PTQ": q["epochs_to_match_ptq"] or "not reached",
                "epochs to match fp32": q["epochs_to_match_fp32"] or "not reached",
            }
            for b, q in results["qat"].items()
        ]
        lines += [markdown_table(rows, list(rows[0]))]
    else:
        lines += ["(no QAT results)", ""]
    lines += ["## fp16 vs bf16", ""]
    if results["precision_note"]:
        lines += [f"Note: {results['precision_note']}.", ""]
    if results["precision"]:
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
            for p, r in results["precision"].items()
        ]
        lines += [
            markdown_table(rows, list(rows[0])),
            "Sampled values cast to each format (% of finite non-zero values):",
            "",
        ]
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
            for p, r in results["precision"].items()
            for k, v in r["values"].items()
        ]
        lines += [markdown_table(rows, list(rows[0])) if rows else ""]
    by_name = {r["recipe"]: r for r in results["ptq"]}
    casts = [
        f"{n}: top-1 {_pct(by_name[n].get('acc1'))}%, {by_name[n].get('size_mib') or 0:.2f} MiB"
        for n in ("fp16", "bf16")
        if n in by_name
    ]
    if casts:
        lines += ["PTQ casts of the baseline: " + "; ".join(casts) + ".", ""]
    lines += ["## Plots", ""] + [f"![{name}]({name}.png)" for name in images] + [""]
    if results["errors"]:
        lines += ["## Stages that failed", ""] + [f"- {k}: {v}" for k, v in results["errors"].items()] + [""]
    return "\n".join(lines)


def build_report(study: Study) -> Path:
    """Write results.json, report.md and the PNGs into the study directory, and the figures,
    scalars and hparams into ``<study_dir>/tensorboard/report``; returns report.md's path."""
    results = collect(study)
    figures = _figures(results)
    writer = SummaryWriter(str(study.dir / "tensorboard" / "report"))
    for name, fig in figures.items():
        fig.tight_layout()
        fig.savefig(study.dir / f"{name}.png", dpi=110)
        writer.add_figure(f"study/{name}", fig)
        plt.close(fig)
    report = _markdown(results, list(figures))
    (study.dir / "report.md").write_text(report)
    (study.dir / "results.json").write_text(json.dumps(results, indent=2))
    metrics = {f"ptq/{r['recipe']}/acc1": r["acc1"] for r in results["ptq"] if r.get("acc1") is not None}
    metrics.update(
        {
            f"qat/int{b}/converted_acc1": q["converted_acc1"]
            for b, q in results["qat"].items()
            if q["converted_acc1"] is not None
        }
    )
    hparams = {
        "seed": study.config.seed,
        "baseline_epochs": study.config.baseline.epochs,
        "qat_epochs": study.config.qat.epochs,
        "qat_lr": study.config.qat.lr,
        "synthetic": study.config.data.synthetic,
    }
    if metrics:
        writer.add_hparams(hparams, metrics, run_name=".")
    writer.add_text("study/report", report)
    writer.close()
    _print_summary(study.dir, results)
    return study.dir / "report.md"


def _print_summary(directory: Path, results: dict[str, Any]) -> None:
    print(f"\nReport: {directory / 'report.md'}")
    for r in results["ptq"]:
        size = "" if r.get("size_mib") is None else f"{r['size_mib']:7.2f} MiB"
        print(f"  PTQ {r['recipe']:<12} top-1 {_pct(r.get('acc1')):>6}%  {size}  {r.get('error') or ''}")
    for b, q in results["qat"].items():
        print(
            f"  QAT int{b:<9} top-1 {_pct(q['converted_acc1']):>6}%  epochs to match PTQ: {q['epochs_to_match_ptq'] or 'not reached'}"
        )
