"""Training and inference throughput of qlight against a plain PyTorch loop, in one process.

    python benchmarks/bench.py            # full sizes (meant for a GPU)
    python benchmarks/bench.py --quick    # small sizes on whatever device is present (CPU: ~5 min)

Prints each table as soon as it is measured, then one JSON line with ``fit_vs_plain`` (qlight fit
images/s over the plain loop's), ``qat_vs_plain`` and ``qat_act_vs_plain`` (QAT int4 weights, and
with int8 activations: step time over the plain loop's), ``qat_vs_fit`` and ``qat_act_vs_fit`` (the
same over a qlight fit step), ``w8a8_step_vs_float`` (W8A8 QAT step time over a float step, both in
fp32, on the training device), ``syncs_per_step`` (on a GPU: synchronizing CUDA calls per
steady-state step, and where they are made), ``int8_vs_fp32`` (the faster CPU int8 path's images/s
over fp32's, batch 64), ``fit_host_vs_plain``, ``qat_host_vs_fit`` and ``qat_act_host_vs_fit`` (host
ms per step, (h): qlight fit over the plain loop, QAT over qlight fit), ``w8a8_int8_vs_ptq``
(images/s of the converted W8A8 QAT graph over PTQ int8_static's, on the CPU) and the rest.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from qlight import (
    CIFAR100DataModule,
    ImageClassifier,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    StaticQuantizationAwareTraining,
    load_quantized,
)
from qlight.data import EpochBatches, EpochShard, normalize, random_crop_flip, synthetic_images
from qlight.models import VGG, vgg11_bn
from qlight.models.vgg import CFGS, make_layers
from qlight.quantization import StaticPT2E, parse_recipe, quantizable_modules
from qlight.quantization.io.serialization import quantized_bytes
from qlight.quantization.qat import fake_quant
from qlight.quantization.qat.fake_quant import (
    FusedFakeQuantizer,
    TorchaoFakeQuantizer,
    activation_fake_quant_config,
    weight_fake_quant_config,
)
from qlight.quantization.runtimes.speed import measure_speed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def narrow_vgg11() -> VGG:
    """VGG-11's layers and ops at 1/16 of its widths: the same host work per step, little arithmetic."""
    return VGG(make_layers([v if v == "M" else v // 16 for v in CFGS["vgg11"]]), num_classes=100, hidden=32)


def plain_loop(
    images: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
    backbone: Callable[[], nn.Module] = vgg11_bn,
    compiled: bool = False,
) -> float:
    """(a) The baseline: data on the device, the same augmentation, model, optimizer and schedule."""
    model = backbone().to(device)
    model = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.warmup + args.steps)
    images, labels = images.to(device), labels.to(device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        index = torch.randint(0, len(labels), (args.batch_size,), device=device)
        x = normalize(random_crop_flip(images[index]))
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


class StepTimer(Callback):
    """Images/s between the end of warm-up and the last training batch."""

    def __init__(self, warmup: int, batch_size: int) -> None:
        self.warmup, self.batch_size = warmup, batch_size
        self.start = self.images_per_s = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        sync(pl_module.device)
        self.images_per_s = (trainer.global_step - self.warmup) * self.batch_size / (time.perf_counter() - self.start)


@functools.cache
def _datamodule(batch_size: int, images: int, test_images: int) -> CIFAR100DataModule:
    # One per size: every run then reuses the generated images and their copy on the device.
    return CIFAR100DataModule(
        batch_size=batch_size, val_size=0, synthetic=True, synthetic_train_size=images, synthetic_test_size=test_images
    )


def datamodule(args: argparse.Namespace) -> CIFAR100DataModule:
    return _datamodule(args.batch_size, args.images, args.test_images)


def trainer(args: argparse.Namespace, callbacks: list, max_steps: int) -> Trainer:
    return Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        benchmark=args.accelerator == "gpu",
        default_root_dir=args.workdir,
    )


def qlight_fit(
    args: argparse.Namespace, extra: list, backbone: Callable[[], nn.Module] = vgg11_bn, compiled: bool = False
) -> float:
    """(b)/(c) Trainer + ImageClassifier + CIFAR100DataModule's on-device path, optionally with QAT."""
    timer = StepTimer(args.warmup, args.batch_size)
    model = ImageClassifier(backbone(), lr=args.lr)
    trainer(args, [timer, *extra], args.warmup + args.steps).fit(
        torch.compile(model) if compiled else model, datamodule(args)
    )
    return timer.images_per_s


def host_step_runs(
    images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace
) -> dict[str, Callable[[], float]]:
    """(h) Host time per training step: VGG-11's op graph at 1/16 width, batch 2, on the CPU, so
    arithmetic is negligible and what remains is the per-step Python and dispatch work that a GPU
    step has to hide behind its kernels. Runs QAT with qlight's fused fake-quant and with torchao's."""
    # lr 0.01: at batch 2, lr 0.1 can train NaN into the weights, which QAT's conversion refuses.
    small = {"batch_size": 2, "steps": args.host_steps, "warmup": 10, "lr": 0.01}
    host = argparse.Namespace(**{**vars(args), **small, "accelerator": "cpu", "precision": "32-true"})
    cpu = torch.device("cpu")

    def ms(images_per_s: float) -> float:
        return 1e3 * host.batch_size / images_per_s

    def qat(torchao: bool, compiled: bool = False, **kwargs: Any) -> float:
        quantizer = TorchaoFakeQuantizer if torchao else fake_quant.fake_quantizer
        callback = QuantizationAwareTraining(weight_bits=4, eval_every_epoch=False, **kwargs)
        with mock.patch.object(fake_quant, "fake_quantizer", quantizer):
            return ms(qlight_fit(host, [callback], narrow_vgg11, compiled))

    runs = {
        "plain loop": lambda: ms(plain_loop(images, labels, host, cpu, narrow_vgg11)),
        "qlight fit": lambda: ms(qlight_fit(host, [], narrow_vgg11)),
        "+ QAT int4 weights (fused)": lambda: qat(False),
        "+ QAT int4 weights (torchao)": lambda: qat(True),
        "+ QAT int4 w + int8 act (fused)": lambda: qat(False, activation_bits=8),
        "+ QAT int4 w + int8 act (torchao)": lambda: qat(True, activation_bits=8),
    }
    if args.host_compiled:  # the first step of each compiles, inside the warm-up
        runs |= {
            "compiled: plain loop": lambda: ms(plain_loop(images, labels, host, cpu, narrow_vgg11, compiled=True)),
            "compiled: qlight fit": lambda: ms(qlight_fit(host, [], narrow_vgg11, compiled=True)),
            "compiled: + QAT int4 w + int8 act": lambda: qat(False, compiled=True, activation_bits=8),
        }
    return runs


def cpu_settings(args: argparse.Namespace) -> argparse.Namespace:
    """The W8A8 measurements' settings: the CPU (where the int8 graph runs), fp32 (the only dtype of
    torchao's fused fake-quant), at most batch 32 and 12 timed steps after 3 warm-up."""
    limits = {"batch_size": 32, "steps": 12, "warmup": 3}
    smaller = {key: min(getattr(args, key), limit) for key, limit in limits.items()}
    return argparse.Namespace(**{**vars(args), "accelerator": "cpu", "precision": "32-true", **smaller})


def w8a8_settings(args: argparse.Namespace) -> argparse.Namespace:
    """(i)'s settings: fp32 (the only dtype of torchao's fused fake-quant) on the training device; on
    the CPU also (j)'s sizes."""
    if args.accelerator == "cpu":
        return cpu_settings(args)
    return argparse.Namespace(**{**vars(args), "precision": "32-true"})


def w8a8_training_runs(args: argparse.Namespace) -> dict[str, Callable[[], float]]:
    """(i) Images/s of qlight's fit path in fp32, float and with W8A8 QAT
    (``StaticQuantizationAwareTraining``), whose converted graph goes to ``<workdir>/qat_w8a8``."""
    settings = w8a8_settings(args)
    out = str(Path(args.workdir) / "qat_w8a8")
    return {
        "float": lambda: qlight_fit(settings, []),
        "W8A8 QAT": lambda: qlight_fit(
            settings, [StaticQuantizationAwareTraining(eval_every_epoch=False, output_dir=out)]
        ),
    }


class SyncCounter(Callback):
    """(s) The synchronizing CUDA calls of training steps ``first`` to ``last`` (torch's sync debug
    mode), by the line of Python that made each."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.steps = first, last, last - first
        self.sites: Counter[str] = Counter()
        self._caught: warnings.catch_warnings | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.first:
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.last and self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self._caught = None
            records = [r for r in self._records if "synchroniz" in str(r.message)]
            self.sites.update(f"{Path(r.filename).name}:{r.lineno}" for r in records)


def sync_counts(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """(s) Host syncs per steady-state step (steps 10 to 20) of fit, QAT and W8A8 QAT on the GPU."""
    out = Path(args.workdir) / "syncs"
    qat = str(out / "qat")
    configs: dict[str, tuple[argparse.Namespace, Callable[[], list]]] = {
        "qlight fit": (args, list),
        "+ QAT int4 weights": (args, lambda: [QuantizationAwareTraining(4, eval_every_epoch=False, output_dir=qat)]),
        "+ QAT int4 w + int8 act": (
            args,
            lambda: [QuantizationAwareTraining(4, activation_bits=8, eval_every_epoch=False, output_dir=qat)],
        ),
        "W8A8 QAT (fp32)": (
            w8a8_settings(args),
            lambda: [StaticQuantizationAwareTraining(eval_every_epoch=False, output_dir=str(out / "w8a8"))],
        ),
    }
    result = {}
    for name, (settings, extra) in configs.items():
        counter = SyncCounter(10, 20)
        model = ImageClassifier(lr=settings.lr)
        trainer(settings, [counter, *extra()], 20).fit(model, datamodule(settings))
        total = sum(counter.sites.values())
        result[name] = {"per_step": total / counter.steps, "sites": dict(counter.sites.most_common(5))}
    return result


def w8a8_inference(args: argparse.Namespace) -> dict[str, float]:
    """(j) CPU images/s of the W8A8 QAT graph saved by (i) and of PTQ int8_static's graph of the same
    network, both loaded from their files: the same kind of int8 graph, so the same speed is expected.
    Best of the repeats."""
    cpu = cpu_settings(args)
    x = normalize(synthetic_images(cpu.batch_size, 100, seed=0)[0])
    source, recipe = ImageClassifier().eval(), StaticPT2E(8)
    ptq = recipe.quantize(copy.deepcopy(source), quantizable_modules(source), [x])
    ptq_file = Path(args.workdir) / "int8_static.pt2"
    ptq_file.write_bytes(quantized_bytes(ptq, recipe, [], source, x))
    models = {
        "W8A8 QAT (converted)": load_quantized(Path(args.workdir) / "qat_w8a8" / "model.pt2"),
        "PTQ int8_static": load_quantized(ptq_file),
    }
    result: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, model in models.items():
            result[name] = max(result.get(name, 0.0), _throughput(model, x, cpu, torch.device("cpu")))
    return result


def data_path(args: argparse.Namespace, device: torch.device) -> float:
    """(f) Drawing and augmenting batches alone, as the fit path does: the data on the device."""
    dm = datamodule(args)
    dm.setup("fit")
    images, labels = (t.to(device) for t in dm.train_set.tensors)
    loader = EpochBatches(images, labels, args.batch_size, EpochShard(len(labels), 0, device))
    batches, start, seen = 0, 0.0, 0
    while batches < args.warmup + args.steps * 4:
        loader.sampler.set_epoch(loader.sampler.epoch + 1)
        for x, _ in loader:
            if batches == args.warmup:
                sync(device)
                start, seen = time.perf_counter(), 0
            seen += len(normalize(random_crop_flip(x)))
            batches += 1
            if batches >= args.warmup + args.steps * 4:
                break
    sync(device)
    return seen / (time.perf_counter() - start)


def ptq_seconds(args: argparse.Namespace) -> dict[str, float]:
    """(d) Time to quantize and evaluate each recipe on the test set."""
    ptq = PostTrainingQuantization(args.recipes, run_on=["test"], calibration_batches=4, save_models=False)
    trainer(args, [ptq], 1).test(ImageClassifier(), datamodule(args), verbose=False)
    return {row["recipe"]: row["seconds"] for row in ptq.results}


def inference(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """(e) Forward throughput of VGG-11-BN on the device in float casts and weight-only int8."""
    source = ImageClassifier().eval()
    x, _ = synthetic_images(args.batch_size, 100, seed=0)
    x = normalize(x)
    targets = quantizable_modules(source)
    result = {}
    for name in args.inference:
        recipe = parse_recipe(name)
        model = recipe.quantize(copy.deepcopy(source).to(device), targets)
        result[name] = _throughput(model, x.to(device, recipe.input_dtype), args, device)
        if device.type == "cuda" and recipe.dtype in (torch.float16, torch.bfloat16):
            model = model.to(memory_format=torch.channels_last)
            batch = x.to(device, recipe.input_dtype).contiguous(memory_format=torch.channels_last)
            result[f"{name} channels_last"] = _throughput(model, batch, args, device)
    return result


def cpu_int8(args: argparse.Namespace) -> dict[str, float]:
    """(k) CPU images/s of VGG-11-BN at batch 64: fp32 against the static int8 graph as PT2E leaves it,
    compiled by Inductor and run by ONNX Runtime; interleaved repeats, best of each."""
    source = vgg11_bn().eval()
    x = normalize(synthetic_images(64, 100, seed=0)[0])
    targets = quantizable_modules(source)
    models = {"fp32": source}
    for name in ("int8_static", "int8_static_inductor", "int8_static_onnx"):
        models[name] = parse_recipe(name).quantize(copy.deepcopy(source), targets, [x])
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, model in models.items():
            best[name] = max(best.get(name, 0.0), measure_speed(model, x, repeats=3, budget_s=5.0).images_per_s)
    return best


@torch.no_grad()
def _throughput(model: torch.nn.Module, batch: torch.Tensor, args: argparse.Namespace, device: torch.device) -> float:
    for _ in range(args.warmup):
        model(batch)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        model(batch)
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def fake_quant_host_ms(args: argparse.Namespace) -> dict[str, float]:
    """(g) Host cost of one fake-quant call, forward + backward, on a tiny tensor (so pure overhead),
    torchao's IntxFakeQuantizer against qlight's fused one. A GPU step pays it once per layer."""
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    calls = max(args.steps * 25, 50)

    def per_call(quantizer: torch.nn.Module) -> float:
        for _ in range(calls // 5):
            quantizer(x).sum().backward()
        start = time.perf_counter()
        for _ in range(calls):
            quantizer(x).sum().backward()
        return (time.perf_counter() - start) / calls * 1e3

    configs = {"weights int4": weight_fake_quant_config(4), "activations int8": activation_fake_quant_config(8)}
    kinds = {"torchao": TorchaoFakeQuantizer, "fused": FusedFakeQuantizer}
    result: dict[str, float] = {}
    for _ in range(args.repeats):
        baseline = per_call(torch.nn.Identity())
        for what, config in configs.items():
            for kind, cls in kinds.items():
                key = f"{what}, {kind}"
                result[key] = min(result.get(key, float("inf")), per_call(cls(config)) - baseline)
    return result


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes on whatever device is present")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, help="unmeasured steps first")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions; the best of each is kept")
    parser.add_argument("--host-steps", type=_at_least_one, default=200, help="measured steps per configuration of (h)")
    parser.add_argument("--host-repeats", type=_at_least_one, default=7, help="interleaved repetitions of (h); medians")
    parser.add_argument(
        "--host-compiled", action="store_true", help="(h) also under torch.compile (about 1 min of compiling)"
    )
    parser.add_argument("--images", type=int, help="synthetic training images")
    parser.add_argument("--test-images", type=int, help="synthetic test images for PTQ")
    parser.add_argument(
        "--recipes", nargs="+", default=["fp32", "fp16", "bf16", "int8", "int6", "int4", "int2", "int8_static"]
    )
    parser.add_argument("--inference", nargs="+", default=["fp32", "fp16", "bf16", "int8"])
    parser.add_argument("--skip-cpu-int8", action="store_true", help="skip (k), which compiles VGG-11 (about 1 min)")
    parser.add_argument("--skip-host", action="store_true", help="skip (h), the CPU proxy of host time per step")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate of the timed training runs")
    parser.add_argument("--workdir", help="where the callbacks may write (default: a new temporary folder)")
    args = parser.parse_args(argv)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="qlight-bench-")
    gpu = torch.cuda.is_available()
    quick = {"batch_size": 32, "steps": 12, "warmup": 3, "repeats": 3, "images": 2048, "test_images": 128}
    full = {"batch_size": 512, "steps": 200, "warmup": 30, "repeats": 2, "images": 50000, "test_images": 10000}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.accelerator = "gpu" if gpu else "cpu"
    args.precision = "bf16-mixed" if gpu else "32-true"
    return args


def _print_section(title: str, values: dict[str, float], spec: str) -> None:
    # Each section as soon as it is measured: a GPU session has minutes, not hours, to read them.
    print(title if values else f"{title}: skipped")
    for name, value in values.items():
        print(f"  {name:<38}{value:>12{spec}}")
    sys.stdout.flush()


def _host_steps(args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    host_runs = host_step_runs(images, labels, args)
    host_repeats: dict[str, list[float]] = {name: [] for name in host_runs}
    for _ in range(args.host_repeats):  # (h) is the noisiest: more repeats, and ratios within a repeat
        for name, run in host_runs.items():
            host_repeats[name].append(run())
    return host_repeats


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    torch.backends.cudnn.benchmark = True
    device_name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    runs = f"best of {args.repeats} x {args.steps} steps after {args.warmup} warm-up"
    print(f"{device_name}, torch {torch.__version__}, batch {args.batch_size}, {args.precision}, {runs}", flush=True)
    images, labels = synthetic_images(args.images, 100, seed=0)
    training: dict[str, Callable[[], float]] = {
        "plain loop": lambda: plain_loop(images, labels, args, device),
        "qlight fit": lambda: qlight_fit(args, []),
        "qlight fit + QAT int4 weights": lambda: qlight_fit(
            args, [QuantizationAwareTraining(weight_bits=4, eval_every_epoch=False)]
        ),
        "qlight fit + QAT int4 w + int8 act": lambda: qlight_fit(
            args, [QuantizationAwareTraining(weight_bits=4, activation_bits=8, eval_every_epoch=False)]
        ),
        "data path (load + augment)": lambda: data_path(args, device),
    }
    w8a8_runs = w8a8_training_runs(args)
    rows: dict[str, float] = {}
    w8a8_rows: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, best of each: drift and noisy neighbours hit all alike
        for name, run in training.items():
            rows[name] = max(rows.get(name, 0.0), run())
        for name, run in w8a8_runs.items():
            w8a8_rows[name] = max(w8a8_rows.get(name, 0.0), run())
    _print_section("training (images/s)", rows, ".0f")
    w8a8 = w8a8_settings(args)
    _print_section(
        f"W8A8 QAT training on {w8a8.accelerator} (images/s, batch {w8a8.batch_size}, fp32)", w8a8_rows, ".1f"
    )
    syncs = sync_counts(args) if device.type == "cuda" else {}
    for name, counted in syncs.items():
        print(f"(s) host syncs per step, {name}: {counted['per_step']:.1f} {counted['sites']}", flush=True)
    inference_ips = inference(args, device)
    _print_section("inference (images/s)", inference_ips, ".0f")
    w8a8_ips = w8a8_inference(args)
    _print_section(f"int8 graphs on the CPU (images/s, batch {cpu_settings(args).batch_size})", w8a8_ips, ".0f")
    seconds = ptq_seconds(args)
    _print_section(f"PTQ quantize + evaluate ({args.test_images} test images, seconds)", seconds, ".2f")
    fake_quant_ms = fake_quant_host_ms(args)
    _print_section("fake-quant host cost per layer and step (ms, tiny tensor)", fake_quant_ms, ".3f")
    int8_ips = {} if args.skip_cpu_int8 else cpu_int8(args)
    _print_section("CPU inference, VGG-11-BN, batch 64 (images/s)", int8_ips, ".0f")
    host_repeats = {} if args.skip_host else _host_steps(args, images, labels)
    host_ms = {name: statistics.median(values) for name, values in host_repeats.items()}
    host_title = (
        f"host time per training step (ms, median of {args.host_repeats}; VGG-11 ops at 1/16 width, batch 2, CPU)"
    )
    _print_section(host_title, host_ms, ".2f")

    def host_ratio(name: str, baseline: str) -> float | None:
        if name not in host_repeats:
            return None
        return statistics.median(a / b for a, b in zip(host_repeats[name], host_repeats[baseline], strict=True))

    summary = {
        "device": device_name,
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "fit_vs_plain": rows["qlight fit"] / rows["plain loop"],
        "qat_vs_plain": rows["plain loop"] / rows["qlight fit + QAT int4 weights"],
        "qat_act_vs_plain": rows["plain loop"] / rows["qlight fit + QAT int4 w + int8 act"],
        "qat_vs_fit": rows["qlight fit"] / rows["qlight fit + QAT int4 weights"],
        "qat_act_vs_fit": rows["qlight fit"] / rows["qlight fit + QAT int4 w + int8 act"],
        "data_vs_model": rows["data path (load + augment)"] / rows["plain loop"],
        "train_images_per_s": rows,
        "syncs_per_step": {name: counted["per_step"] for name, counted in syncs.items()} or None,
        "sync_sites": {name: counted["sites"] for name, counted in syncs.items()} or None,
        "inference_images_per_s": inference_ips,
        "cpu_int8_images_per_s": int8_ips,
        "int8_vs_fp32": max(v for k, v in int8_ips.items() if k != "fp32") / int8_ips["fp32"] if int8_ips else None,
        "fit_host_vs_plain": host_ratio("qlight fit", "plain loop"),
        "qat_host_vs_fit": host_ratio("+ QAT int4 weights (fused)", "qlight fit"),
        "qat_act_host_vs_fit": host_ratio("+ QAT int4 w + int8 act (fused)", "qlight fit"),
        "qat_act_host_vs_fit_compiled": host_ratio("compiled: + QAT int4 w + int8 act", "compiled: qlight fit"),
        "ptq_seconds": seconds,
        "ptq_sweep_seconds": sum(seconds.values()),
        "host_ms_per_step": host_ms,
        "fake_quant_host_ms": fake_quant_ms,
        "w8a8_device": w8a8.accelerator,
        "w8a8_step_vs_float": w8a8_rows["float"] / w8a8_rows["W8A8 QAT"],
        "w8a8_int8_vs_ptq": w8a8_ips["W8A8 QAT (converted)"] / w8a8_ips["PTQ int8_static"],
        "w8a8_train_images_per_s": w8a8_rows,
        "w8a8_cpu_inference_images_per_s": w8a8_ips,
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
