"""The registered backbones on real images (the digits as 3x16x16), and what they bring to the methods:
residual adds, depthwise convolutions, adaptive pooling."""

import copy
import re

import pytest
import torch
from digits import DigitsRGB, trainer
from torch import nn

from qlight import BEST_METHOD, ImageClassifier, PostTrainingQuantization, QlightError
from qlight.models import BACKBONES, build_backbone
from qlight.quantization.grid.intx import intx_weight
from qlight.quantization.io.onnx_export import onnx_bytes
from qlight.quantization.methods import gptq_weight, input_hessians, inverse_hessian
from qlight.quantization.recipes.base import parse_recipe, quantizable_modules
from qlight.quantization.runtimes.ort import OnnxRuntimeModule

# Narrow enough to train in seconds on two cores; epochs to about 95% top-1 or better.
NARROW = {
    "resnet20": (0.5, 6),
    "resnet56": (0.25, 6),
    "resnet18": (0.125, 6),
    "mobilenet_v2": (0.25, 5),
}


@pytest.mark.parametrize("name", sorted(NARROW))
def test_backbone_trains_keeps_int8_and_the_methods_win_at_int3(tmp_path, name):
    width_mult, epochs = NARROW[name]
    model = ImageClassifier(BACKBONES[name](num_classes=10, width_mult=width_mult), num_classes=10, lr=0.05)
    recipes = ["int8", "int3", f"int3+{BEST_METHOD}"]
    ptq = PostTrainingQuantization(recipes, output_dir=str(tmp_path / "ptq"), save_models=False, speed_repeats=0)
    trainer(tmp_path, [ptq], max_epochs=epochs).fit(model, DigitsRGB())
    acc = {row["recipe"]: row["acc1"] for row in ptq.results}
    assert acc["fp32"] > 0.9
    assert abs(acc["int8"] - acc["fp32"]) < 0.01
    assert acc[f"int3+{BEST_METHOD}"] > acc["int3"] + 0.05  # round to nearest loses 7 (ResNet-18) to 55 points
    if name == "resnet20":  # residual adds in ONNX Runtime (mobilenet_v2 passes too, at twice the export time)
        x, y = DigitsRGB().test_data.tensors
        for recipe in ("int4", "int8"):
            quantized = parse_recipe(recipe).quantize(copy.deepcopy(model).eval(), quantizable_modules(model))
            with torch.no_grad():
                top1 = [
                    int((m(x).argmax(1) == y).sum()) for m in (quantized, OnnxRuntimeModule(onnx_bytes(quantized, x)))
                ]
            assert abs(top1[0] - top1[1]) <= 1, (recipe, top1)


def test_registered_backbones_have_their_published_sizes():
    sizes = {name: sum(p.numel() for p in BACKBONES[name](num_classes=100).parameters()) for name in NARROW}
    assert sizes == {"resnet20": 278_324, "resnet56": 861_620, "resnet18": 11_220_132, "mobilenet_v2": 2_351_972}
    for name in NARROW:  # 32x32 stems: no map shrinks to nothing before the head
        assert BACKBONES[name](num_classes=7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_a_torchvision_model_and_a_class_path_build_with_the_data_classes():
    resnet = build_backbone("torchvision:resnet18", 7)
    assert resnet.fc.out_features == 7 and resnet(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    linear = build_backbone({"class_path": "torch.nn.Linear", "init_args": {"in_features": 3, "out_features": 2}}, 9)
    assert linear.out_features == 2  # no num_classes parameter: not passed
    assert build_backbone("digits.DigitsCNN", 4).head[-1].out_features == 4
    narrow = build_backbone({"class_path": "qlight.models.resnet20", "init_args": {"width_mult": 0.5}}, 3)
    assert narrow.fc.out_features == 3 and narrow.fc.in_features == 32  # a function that builds one


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resnet", "unknown backbone 'resnet': give a registered name (mobilenet_v2, resnet18"),
        ("torchvision:resnet7", "torchvision has no classification model 'resnet7'"),
        ("digits.Nope", "cannot import backbone digits.Nope"),
        ("digits.DigitsData", "backbone digits.DigitsData is not an nn.Module subclass"),
        ("digits.digits_tensors", "backbone digits.digits_tensors returned a tuple, not an nn.Module"),
        ({"class_path": "digits.DigitsCNN", "init_args": {"depth": 3}}, "cannot build backbone digits.DigitsCNN"),
        ({"init_args": {}}, "backbone {'init_args': {}} needs the keys class_path"),
    ],
)
def test_a_backbone_that_cannot_be_built_is_one_line(spec, message):
    with pytest.raises(QlightError, match="^" + re.escape(message)) as error:
        build_backbone(spec, 10)
    assert "\n" not in str(error.value)


def test_grouped_gptq_solves_each_group_on_its_own_inputs():
    grouped = nn.Conv2d(8, 6, 3, padding=1, groups=2)
    x = torch.randn(16, 8, 6, 6)
    x[:, 4:] = x[:, 4:] * 3 + x[:, :4]  # the groups see different inputs
    hessians = input_hessians(grouped, [""], [x])[""]
    for group in range(2):
        alone = nn.Conv2d(4, 3, 3, padding=1)
        rows = slice(3 * group, 3 * group + 3)
        alone.weight.data = grouped.weight.data[rows]
        hessian = input_hessians(alone, [""], [x[:, 4 * group : 4 * group + 4]])[""]
        torch.testing.assert_close(hessians[group], hessian[0])
        codes, _ = gptq_weight(grouped.weight, 3, "per_channel", inverse_hessian(hessians))
        expected, _ = gptq_weight(alone.weight, 3, "per_channel", inverse_hessian(hessian))
        assert torch.equal(codes.qdata[rows], expected.qdata)


def test_gptq_beats_round_to_nearest_on_a_depthwise_conv_of_real_images():
    images = DigitsRGB().train_data.tensors[0][:256]
    mixing = nn.Conv2d(3, 16, 1)
    depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    with torch.no_grad():
        inputs = mixing(images)
        exact = depthwise(inputs)
    inverse = inverse_hessian(input_hessians(depthwise, [""], [inputs])[""])
    gptq, fallback = gptq_weight(depthwise.weight, 3, "per_channel", inverse)
    rtn = intx_weight(depthwise.weight, 3, "per_channel")
    assert fallback == ""

    def error(weight):
        return (nn.functional.conv2d(inputs, weight.dequantize(), padding=1, groups=16) - exact).pow(2).mean()

    assert error(gptq) < 0.8 * error(rtn)
