"""Soak test of the study's resume: SIGKILL ``python -m qlight study`` at random moments, rerun it,
and check that it ends with a complete report, redid at most the epoch each kill interrupted, and
left a file of the user's in the study folder alone.

    python benchmarks/kill_soak.py --kills 10          # configs/study_smoke.yaml, shrunk; CPU

Prints one line per kill and a JSON summary last; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Post-training quantization", "## Quantization-aware training", "## fp16 vs bf16", "## Plots")


def study_command(study_dir: Path, config: Path) -> list[str]:
    smoke = ROOT / "configs" / "study_smoke.yaml"
    return [sys.executable, "-m", "qlight", "study", "--config", str(smoke), "--config", str(config)] + [
        f"--study_dir={study_dir}"
    ]


def shrunk_config(workdir: Path, train_images: int, batch_size: int, epochs: int) -> Path:
    """The smoke study with every training step logged, so that redone steps can be counted."""
    smoke = yaml.safe_load((ROOT / "configs" / "study_smoke.yaml").read_text())
    override = {
        "trainer": {**smoke["trainer"], "log_every_n_steps": 1},
        "data": {"synthetic_train_size": train_images, "synthetic_test_size": 128, "val_size": 128}
        | {"batch_size": batch_size},
        "baseline": {"epochs": epochs},
        "ptq": {"recipes": ["fp32", "int8", "int4", "int2"], "calibration_batches": 2},
        "qat": {"bits": [4], "plans": [], "epochs": epochs, "lr": 0.01},
        "precision": {"epochs": epochs, "sample_every_n_steps": 5},
    }
    path = workdir / "soak.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def logged_steps(stage_dir: Path) -> Counter:
    """How often each training step was logged, over every run's TensorBoard file of a stage."""
    counts: Counter = Counter()
    for events in (stage_dir / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events)).Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            counts.update(event.step for event in accumulator.Scalars("train/loss"))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="kill no later than this after a start")
    parser.add_argument("--train-images", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", help="default: a new temporary folder")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qlight-soak-"))
    study_dir = workdir / "study"
    study_dir.mkdir(parents=True, exist_ok=True)
    mine = study_dir / "my_notes.txt"
    mine.write_text("a file of the user's")
    command = study_command(study_dir, shrunk_config(workdir, args.train_images, args.batch_size, args.epochs))
    kills = 0
    for round_ in range(args.kills):
        log = open(workdir / f"run{round_}.log", "w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        delay = rng.uniform(1.0, args.max_seconds)
        try:
            process.wait(timeout=delay)
            print(f"run {round_}: finished before its kill at {delay:.1f}s (exit {process.returncode})", flush=True)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            kills += 1
            running = [line for line in (workdir / f"run{round_}.log").read_text().splitlines() if "[study]" in line]
            print(f"run {round_}: killed at {delay:.1f}s during: {running[-1] if running else 'start-up'}", flush=True)
        log.close()
    final = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    report = (study_dir / "report.md").read_text() if (study_dir / "report.md").is_file() else ""
    steps_per_epoch = (args.train_images - 128) // args.batch_size
    redone = {}
    for stage in sorted(p for p in study_dir.iterdir() if (p / "tensorboard").is_dir()):
        counts = logged_steps(stage)
        redone[stage.name] = sum(n - 1 for n in counts.values())
    checks = {
        "final run exit 0": final.returncode == 0,
        "report complete": all(section in report for section in SECTIONS) and "Stages that failed" not in report,
        "user's file kept": mine.is_file() and mine.read_text() == "a file of the user's",
        "at most one epoch redone per kill": sum(redone.values()) <= kills * steps_per_epoch,
    }
    summary = {
        "kills": kills,
        "steps_per_epoch": steps_per_epoch,
        "redone_steps": redone,
        "checks": checks,
        "workdir": str(workdir),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(summary))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
