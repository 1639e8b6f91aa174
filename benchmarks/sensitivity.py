"""Time of LayerSensitivity on VGG-11-BN: every quantizable layer at every bit-width from 2 to 8.

    python benchmarks/sensitivity.py    # 2,000 held-out images in batches of 250, round to nearest

Synthetic CIFAR-sized images and an untrained model: the KL and top-1 columns mean nothing, the time does
not depend on them. Targets (issue #11): at most 60 s on one GPU, at most 10 minutes on the CPU. Prints the
wall time of the whole ``trainer.test`` call and one JSON line.
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

from qlight import CIFAR100DataModule, ImageClassifier, LayerSensitivity


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="held-out images")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--bits", type=int, nargs="+", default=list(range(2, 9)))
    parser.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    parser.add_argument("--workdir", help="where the callback writes (default: a new temporary folder)")
    args = parser.parse_args(argv)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="qlight-sensitivity-")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    batches = -(-args.images // args.batch_size)
    data = CIFAR100DataModule(
        batch_size=args.batch_size,
        val_size=0,
        synthetic=True,
        synthetic_train_size=args.batch_size,
        synthetic_test_size=args.images,
        num_workers=0,
    )
    probe = LayerSensitivity(
        bits=args.bits,
        method=args.method,
        eval_batches=batches,
        calibration_batches=1,
        output_dir=os.path.join(args.workdir, "sensitivity"),
    )
    trainer = Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        callbacks=[probe],
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
    layers = len({row["layer"] for row in probe.results})
    print(f"\n{device}, torch {torch.__version__}, load average {os.getloadavg()}")
    print(f"  {layers} layers x {len(args.bits)} bit-widths on {args.images} images: {wall:.1f} s")
    summary = {
        "device": device,
        "torch": torch.__version__,
        "layers": layers,
        "bits": args.bits,
        "images": args.images,
        "method": args.method,
        "wall_seconds": round(wall, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
