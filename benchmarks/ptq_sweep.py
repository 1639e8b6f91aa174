"""Time of the whole PTQ sweep with the best low-bit method on VGG-11-BN, as the study's PTQ stage runs it.

    python benchmarks/ptq_sweep.py    # smoke size: 10 recipes, 32 calibration batches of 64, 512 test images

Synthetic CIFAR-sized images and an untrained model: the accuracies mean nothing, the time does not depend
on them. Prints each recipe's seconds (one-time work such as GPTQ's Hessians of the float model lands in the
first recipe that needs it), the wall time of the whole ``trainer.test`` call, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import Any

import torch
from lightning.pytorch import Trainer

from qlight import CIFAR100DataModule, ImageClassifier, PostTrainingQuantization
from qlight.quantization.recipes.base import BEST_METHOD

STUDY_SMOKE_RECIPES = ["fp32", "fp16", "bf16", "int8", "int6", "int5", "int4", "int3", "int2", "int8_static"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=STUDY_SMOKE_RECIPES)
    parser.add_argument("--methods", nargs="+", default=[BEST_METHOD])
    parser.add_argument("--calibration-batches", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-images", type=int, default=512)
    parser.add_argument("--workdir", help="where the callback writes (default: a new temporary folder)")
    args = parser.parse_args(argv)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="qlight-ptq-sweep-")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    data = CIFAR100DataModule(
        batch_size=args.batch_size,
        val_size=0,
        synthetic=True,
        synthetic_train_size=args.batch_size * args.calibration_batches,
        synthetic_test_size=args.test_images,
        num_workers=0,
    )
    ptq = PostTrainingQuantization(
        args.recipes,
        methods=args.methods,
        run_on=["test"],
        calibration_batches=args.calibration_batches,
        output_dir=os.path.join(args.workdir, "ptq"),
    )
    trainer = Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        callbacks=[ptq],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.workdir,
    )
    torch.manual_seed(0)
    start = time.perf_counter()
    trainer.test(ImageClassifier(), data, verbose=False)
    wall = time.perf_counter() - start
    device = torch.cuda.get_device_name() if gpu else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"\n{device}, torch {torch.__version__}, {len(ptq.results)} rows, load average {os.getloadavg()}")
    for row in ptq.results:
        print(f"  {row['recipe']:<48}{row['seconds']:>8.1f} s  {row.get('error') or ''}")
    print(f"  {'whole trainer.test call':<48}{wall:>8.1f} s")
    summary = {
        "device": device,
        "torch": torch.__version__,
        "recipes": len(ptq.results),
        "calibration_batches": args.calibration_batches,
        "batch_size": args.batch_size,
        "test_images": args.test_images,
        "seconds": {row["recipe"]: row["seconds"] for row in ptq.results},
        "wall_seconds": wall,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
