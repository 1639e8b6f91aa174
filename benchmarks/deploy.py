"""Deployed models in ONNX Runtime on the CPU: agreement with eager PyTorch and speed.

(a) PTQ with ``runtimes=["eager", "onnxruntime"]`` on the digits CNN of ``tests/digits.py`` (the README's
    Deploy table); (b) the same for the narrow ResNet-20 and MobileNetV2 of ``tests/test_backbones.py``
    on the digits as 3x16x16 images, every weight-only bit-width in both granularities and a mixed plan;
    (c) VGG-11-BN (random weights, batch 64): fp32, weight-only int8 and int4, and ``int8_static`` in ONNX
    Runtime against eager fp32, interleaved repeats, best of each.

    PYTHONPATH=tests python benchmarks/deploy.py [--sections a b c]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from digits import DigitsCNN, DigitsData, DigitsRGB, trainer

from qlight import ImageClassifier, PostTrainingQuantization
from qlight.data import normalize, synthetic_images
from qlight.models import BACKBONES, vgg11_bn
from qlight.quantization.callbacks.deployment import deploy
from qlight.quantization.recipes.base import parse_recipe, quantizable_modules
from qlight.quantization.runtimes.speed import measure_speed

DIGITS_RECIPES = ["fp16", "bf16", "int8", "int4", "int4@per_kernel_position", "int3", "int2"]
DIGITS_RECIPES += ["int2+gptq+bn_reestimation+bias_correction", "mixed@2.5", "int8_static", "w4a8_static"]
NARROW = {"resnet20": (0.5, 6), "mobilenet_v2": (0.25, 5)}  # as tests/test_backbones.py


def _ptq(root: Path, model: ImageClassifier, data, recipes: list[str], epochs: int, **kwargs) -> list[dict]:
    ptq = PostTrainingQuantization(recipes, runtimes=["eager", "onnxruntime"], output_dir=str(root / "ptq"), **kwargs)
    torch.manual_seed(0)
    trainer(root, [ptq], max_epochs=epochs).fit(model, data)
    return ptq.results


def digits_table(root: Path) -> None:
    """(a) the README's Deploy table."""
    rows = _ptq(root / "a", ImageClassifier(DigitsCNN(), num_classes=10, lr=0.05), DigitsData(), DIGITS_RECIPES, 6)
    images = len(DigitsData().test_data)
    print(f"(a) digits CNN, {images} test images; images/s at batch 128, speedup against fp32 in the same runtime")
    print("| recipe | runtime | top-1 % | agreement % | file bytes | images/s | speedup |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if row.get("error"):
            print(f"| {row['requested']} | {row['runtime']} | error: {row['error']} | | | | |")
            continue
        agreement = f"{row['agreement']:.2f}" if row.get("agreement") is not None else ""
        speed = f"{row['images_per_s']:,.0f} | {row['speedup']:.2f}x" if row.get("speedup") else " | "
        cells = [row["requested"], row["runtime"], f"{100 * row['acc1']:.2f}", agreement, f"{row['size_bytes']:,}"]
        print(f"| {' | '.join(cells)} | {speed} |")


def narrow_backbones(root: Path) -> None:
    """(b) ONNX Runtime's top-1 against eager PyTorch's, in test images."""
    recipes = [f"int{bits}" for bits in range(2, 9)] + ["mixed@3"]
    granularities = ["per_channel", "per_kernel_position"]
    for name, (width, epochs) in NARROW.items():
        model = ImageClassifier(BACKBONES[name](num_classes=10, width_mult=width), num_classes=10, lr=0.05)
        rows = _ptq(root / name, model, DigitsRGB(), recipes, epochs, granularity=granularities, speed_repeats=0)
        images = len(DigitsRGB().test_data)
        eager = {r["recipe"]: r for r in rows if r["runtime"] == "eager"}
        worst, lowest = 0, 100.0
        for row in rows:
            if row["runtime"] != "onnxruntime" or row["recipe"] == "fp32":
                continue
            if row.get("error"):
                print(f"(b) {name} {row['recipe']}: error {row['error']}")
                continue
            worst = max(worst, round(abs(row["acc1"] - eager[row["recipe"]]["acc1"]) * images))
            lowest = min(lowest, row["agreement"])
        print(
            f"(b) {name} w{width}: {len(eager) - 1} recipes, ONNX Runtime top-1 within {worst} test images of eager, "
        )
        print(f"    lowest agreement {lowest:.2f}% ({images} test images)")


def vgg_int8(repeats: int) -> None:
    """(c) VGG-11-BN at batch 64: images/s in ONNX Runtime (fp32, weight-only, int8_static) and eager fp32."""
    source = vgg11_bn().eval()
    x = normalize(synthetic_images(64, 100, seed=0)[0])
    targets = quantizable_modules(source)
    models = {"fp32 eager": source, "fp32 onnxruntime": deploy(source, "onnxruntime", x)[0]}
    for name in ("int8", "int4", "int8_static"):
        quantized = parse_recipe(name).quantize(copy.deepcopy(source), targets, [x])
        models[f"{name} onnxruntime"] = deploy(quantized, "onnxruntime", x)[0]
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, model in models.items():
            best[name] = max(best.get(name, 0.0), measure_speed(model, x, repeats=3, budget_s=5.0).images_per_s)
    base = best["fp32 onnxruntime"]
    print(f"(c) VGG-11-BN, batch 64, {torch.get_num_threads()} threads, best of {repeats}:")
    for name, value in best.items():
        print(f"    {name}: {value:,.0f} images/s, {value / base:.2f}x fp32 onnxruntime")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of (c)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qlight-deploy-"))
    if "a" in args.sections:
        digits_table(root)
    if "b" in args.sections:
        narrow_backbones(root)
    if "c" in args.sections:
        vgg_int8(args.repeats)


if __name__ == "__main__":
    main()
