"""The GPU check: the benchmark, the PTQ sweep, layer sensitivity, W8A8 QAT from the CLI and a
shortened study, each in its own process with a time limit (about 4 minutes in all on one H200, no
torch.compile). Every line is printed as it comes; the last line is one JSON object, also written to
``$OUT/gpu_check.json``:

    python benchmarks/gpu_check.py            # on the GPU (benchmarks/gpu_check.sh installs what it lacks)
    python benchmarks/gpu_check.py --quick    # the same steps on tiny sizes, on the CPU: does the check run?
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOISE = re.compile(r"Warning|warn\(|^\s*$")
STAGE = re.compile(r"^\[study\] (\S+): (?:done in (\d+)s|(FAILED) after (\d+)s)")
BENCH_KEYS = (
    "fit_vs_plain",
    "qat_vs_plain",
    "qat_act_vs_plain",
    "qat_vs_fit",
    "qat_act_vs_fit",
    "w8a8_step_vs_float",
    "w8a8_device",
    "syncs_per_step",
    "sync_sites",
    "train_images_per_s",
)


@dataclass
class Step:
    name: str
    timeout_s: int
    args: list[str]


def steps(out: Path, quick: bool) -> list[Step]:
    """What the check runs; ``quick``: the same on tiny sizes, on the CPU."""
    python = [sys.executable]
    logs = f"--trainer.logger.init_args.save_dir={out / 'logs'}"
    bench = ["--skip-host", "--skip-cpu-int8", f"--workdir={out / 'bench'}"]
    study = [
        f"--study_dir={out / 'study'}",
        "--data.synthetic=true",
        "--baseline.epochs=3",
        "--qat.epochs=2",
        "--qat.bits=[4]",
        "--qat.plans=[]",
        "--precision.epochs=2",
        "--precision.sample_every_n_steps=10",
        "--ptq.recipes=[fp32,fp16,bf16,int8,int4,int3,int2,mixed@3,int8_static]",
        "--ptq.calibration_batches=4",
    ]
    w8a8 = ["--config=configs/qat_w8a8.yaml", "--config=configs/smoke.yaml", "--trainer.enable_progress_bar=false"]
    if quick:
        bench += ["--quick", "--steps=2", "--warmup=1", "--repeats=1", "--images=64", "--test-images=16"]
        bench += ["--batch-size=4", "--recipes", "fp32", "int8", "--inference", "fp32"]
        sweep = ["--recipes", "fp32", "int4", "--calibration-batches=1", "--batch-size=4", "--test-images=8"]
        sensitivity = ["--images=8", "--batch-size=4", "--bits", "2", "8"]
        study += ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--data.synthetic_train_size=256"]
        study += ["--data.synthetic_test_size=64", "--data.val_size=64", "--data.batch_size=32", "--baseline.epochs=1"]
        study += ["--qat.epochs=1", "--precision.epochs=1", "--ptq.recipes=[fp32,int8,int2,int8_static]"]
        w8a8 += ["--trainer.max_epochs=1", "--data.synthetic_train_size=256", "--data.val_size=64"]
    else:
        bench += ["--images=20480", "--test-images=4096"]
        sweep = ["--test-images=10000"]
        sensitivity = []
        study += ["--data.synthetic_train_size=10240", "--data.synthetic_test_size=2048", "--data.val_size=1024"]
        w8a8 += ["--trainer.accelerator=gpu"]
    return [
        Step("bench", 150, [*python, "benchmarks/bench.py", *bench]),
        Step("ptq_sweep", 75, [*python, "benchmarks/ptq_sweep.py", *sweep, f"--workdir={out / 'sweep'}"]),
        Step("sensitivity", 40, [*python, "benchmarks/sensitivity.py", *sensitivity, f"--workdir={out / 'sens'}"]),
        Step("w8a8_cli", 60, [*python, "-m", "qlight", "fit", *w8a8, logs]),
        Step("study", 120, [*python, "-m", "qlight", "study", "--config=configs/study.yaml", *study]),
    ]


def run(step: Step, out: Path) -> dict[str, Any]:
    """Run ``step``, printing its lines as they come (warnings left out) and keeping them in
    ``<out>/<name>.log``; stopped after its time limit."""
    print(f"== {step.name}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(step.args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(step.timeout_s, proc.kill)
    timer.start()
    lines = []
    with open(out / f"{step.name}.log", "w") as log:
        for line in proc.stdout:
            log.write(line)
            if not NOISE.search(line):
                lines.append(line.rstrip("\n"))
                print(f"  {lines[-1]}", flush=True)
    rc = proc.wait()
    timer.cancel()
    seconds = round(time.perf_counter() - start, 1)
    timed_out = seconds >= step.timeout_s
    print(f"== {step.name}: rc={rc}{' (time limit)' if timed_out else ''}, {seconds} s", flush=True)
    return {"rc": rc, "seconds": seconds, "timed_out": timed_out, "lines": lines}


def _last_json(lines: list[str]) -> dict[str, Any]:
    for line in reversed(lines):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The check's one JSON object from the steps' results."""
    bench = _last_json(results["bench"]["lines"])
    stages: dict[str, float | None] = {}
    for line in results["study"]["lines"]:
        match = STAGE.match(line)
        if match:
            name, done, failed, after = match.groups()
            stages[name] = None if failed else float(done)
    return {
        **{key: bench.get(key) for key in BENCH_KEYS},
        "ptq_sweep_seconds": _last_json(results["ptq_sweep"]["lines"]).get("wall_seconds"),
        "sensitivity_seconds": _last_json(results["sensitivity"]["lines"]).get("wall_seconds"),
        "w8a8_cli_ok": results["w8a8_cli"]["rc"] == 0,
        "study_stage_seconds": stages,
        "study_complete": results["study"]["rc"] == 0 and bool(stages) and None not in stages.values(),
        "step_seconds": {name: result["seconds"] for name, result in results.items()},
        "step_rc": {name: result["rc"] for name, result in results.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU: a trial of the check itself")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="where logs and results go")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {step.name: run(step, out) for step in steps(out, args.quick)}
    summary = summarize(results)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
