import copy

import pytest
import torch
from digits import DigitsNet, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchao.quantization.qat import FakeQuantizedLinear

from qlight import PostTrainingQuantization, QlightError, QuantizationAwareTraining, load_quantized
from qlight.quantization import FakeQuantizedConv2d
from qlight.quantization.qat.fake_quant import (
    FusedFakeQuantizer,
    TorchaoFakeQuantizer,
    activation_fake_quant_config,
    weight_fake_quant_config,
)


def prepared(tmp_path, bits=3, **kwargs):
    model = DigitsNet()
    qat = QuantizationAwareTraining(weight_bits=bits, **kwargs)
    qat.setup(trainer(tmp_path, max_epochs=2), model, "fit")
    return model, qat


def effective_weight(module):
    return module.weight_fake_quantizer(module.weight)


@pytest.mark.parametrize("granularity", ["per_channel", "per_kernel_position"])
def test_every_layer_runs_fake_quantized_weights_with_gradients(tmp_path, granularity):
    model, _ = prepared(tmp_path, bits=3, granularity=granularity)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    swapped = {name for name, m in layers.items() if isinstance(m, (FakeQuantizedConv2d, FakeQuantizedLinear))}
    # The 1-input-channel conv has one-element groups per kernel position: it stays float there.
    assert swapped == set(layers) - ({"net.0"} if granularity == "per_kernel_position" else set())
    x = torch.randn(4, 8, 8, 8)
    conv = model.net[3]
    w = effective_weight(conv)
    groups = w.flatten(1) if granularity == "per_channel" else w.permute(0, 2, 3, 1).reshape(-1, w.shape[1])
    assert max(len(torch.unique(g)) for g in groups) <= 8
    if granularity == "per_kernel_position":  # 9 kernel positions, each with its own scale
        assert len(torch.unique(w[0])) > 8
    assert not torch.equal(w, conv.weight)
    assert torch.equal(conv(x), F.conv2d(x, w, conv.bias, padding=1))
    linear = model.net[-1]
    assert max(len(torch.unique(row)) for row in effective_weight(linear)) <= 8
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in layers.values())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize(
    "config, shape, dtype, whole_rows",
    [
        (weight_fake_quant_config, (16, 3, 3, 3), torch.float32, False),  # conv weight: a scale per (out, kh, kw)
        (weight_fake_quant_config, (16, 3, 3, 3), torch.float32, True),  # conv weight: a scale per out-channel
        (weight_fake_quant_config, (32, 16, 1, 1), torch.float32, False),
        (weight_fake_quant_config, (10, 64), torch.float32, True),  # linear weight
        (weight_fake_quant_config, (10, 64), torch.bfloat16, True),
        (activation_fake_quant_config, (4, 16, 5, 5), torch.float32, False),  # conv input: a scale per pixel
        (activation_fake_quant_config, (6, 32), torch.bfloat16, False),  # linear input under autocast
        (activation_fake_quant_config, (2, 8, 3, 3), torch.float16, False),  # conv input under 16-mixed
    ],
)
def test_fused_fake_quant_is_torchaos_forward_with_a_straight_through_gradient(bits, config, shape, dtype, whole_rows):
    torch.manual_seed(bits)
    offset = 0.3 if config is activation_fake_quant_config else 0.0
    x = (torch.randn(shape) * torch.rand(shape[0], *[1] * (len(shape) - 1)) + offset).to(dtype)
    x[0] = 0  # an all-zero group takes the eps scale
    fused, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    quantizer = FusedFakeQuantizer(config(bits), whole_rows)
    out = quantizer(fused)
    expected = TorchaoFakeQuantizer(config(bits), whole_rows)(reference)  # torchao's IntxFakeQuantizer on rows
    assert torch.equal(out, expected)
    grad = torch.randn(shape, dtype=dtype)
    out.backward(grad)
    expected.backward(grad)
    scale, zero_point = quantizer.qparams(x)
    codes = torch.round(x * (1.0 / scale)) + zero_point
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert torch.equal(fused.grad, grad * ((codes >= qmin) & (codes <= qmax)))
    # torchao's clamp drops the gradient at the boundary codes too, and its grad * eps / eps is
    # inexact on the zero group; elsewhere the two agree.
    interior = (codes > qmin) & (codes < qmax)
    interior[0] = False
    torch.testing.assert_close(fused.grad[interior], reference.grad[interior])  # tolerance per dtype


def _layers_alone(model):
    """A copy of ``model`` whose weight quantizers each run alone (no weight group)."""
    alone = copy.deepcopy(model)
    for module in alone.modules():
        if isinstance(module, FusedFakeQuantizer):
            module.group = None
    return alone


def _train_steps(model, batches, accumulate=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for index, (x, y) in enumerate(batches):
        F.cross_entropy(model(x), y).backward()
        if (index + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("granularity", ["per_channel", "per_kernel_position"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_weights_fake_quantized_together_train_exactly_as_each_layer_alone(tmp_path, granularity, accumulate):
    # A plan with three bit-widths, so one group holds layers of different ranges.
    bits = {"net.0": 2, "net.3": 3, "net.8": 4, "net.10": 8}
    model, qat = prepared(tmp_path, bits=bits, granularity=granularity)
    assert {m.weight_fake_quantizer.group for m in model.modules() if isinstance(m, FakeQuantizedConv2d)} != {None}
    alone = _layers_alone(model)
    torch.manual_seed(0)
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(6)]
    # Optimizer steps change the weights between forwards; with accumulate=2 two backward passes
    # run between steps, through two forwards of unchanged weights.
    trained = _train_steps(model, batches, accumulate)
    assert all(torch.equal(a, b) for a, b in zip(trained, _train_steps(alone, batches, accumulate), strict=True))
    model.eval()
    alone.eval()
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(model(x), alone(x))
        conv = model.net[3]
        first = conv.weight_fake_quantizer(conv.weight)
        model(x)
        assert conv.weight_fake_quantizer(conv.weight) is first  # evaluation quantizes the weights once
        for layer in (conv, alone.net[3]):
            layer.weight.mul_(0.5)  # changed in place, as load_state_dict does
        assert torch.equal(model(x), alone(x))
    converted = qat.convert(model)  # the conversion reads each layer alone: the same codes
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-5
    model.train()(x).sum()  # a forward whose graph no backward has consumed yet
    copy.deepcopy(model)  # the copy leaves that graph behind (a graph cannot be deep-copied)


def test_weight_group_steps_aside_for_other_tensors_and_dtypes(tmp_path):
    model, _ = prepared(tmp_path, bits=4)
    conv = model.net[3]
    other = torch.randn_like(conv.weight)
    quantizer = conv.weight_fake_quantizer
    assert torch.equal(quantizer(other), quantizer.fake_quantize(other))
    assert not torch.equal(quantizer(other), quantizer(conv.weight))
    half = _layers_alone(model).to(torch.bfloat16)
    model.to(torch.bfloat16)  # the group runs float32 weights only; bfloat16 ones go layer by layer
    x = torch.randn(4, 1, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), half(x))


def test_a_compiled_qat_model_traces_as_one_graph_and_trains_as_eager(tmp_path, fresh_dynamo):
    model, _ = prepared(tmp_path, bits=4, activation_bits=8)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    torch.manual_seed(0)
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    for a, b in zip(_train_steps(compiled, batches), _train_steps(eager, batches), strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(batches[0][0]), eager.eval()(batches[0][0]))


def test_qat_callback_trains_a_compiled_lightning_module_as_an_eager_one(tmp_path, fresh_dynamo):
    tables = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = DigitsNet()
        qat = QuantizationAwareTraining(weight_bits=4, activation_bits=8, output_dir=str(tmp_path / str(compiled)))
        fit = trainer(tmp_path, [qat], max_epochs=1, limit_train_batches=8, limit_val_batches=2)
        batches = DataLoader(model.train_data, batch_size=64)  # no shuffling: compiling draws random numbers
        fit.fit(torch.compile(model, backend="aot_eager") if compiled else model, train_dataloaders=batches)
        tables.append([(row["split"], row["fake_quant"], row["acc1"]) for row in qat.results])
    # The converted copy once ran the original model in training mode: another accuracy, and the
    # test images leaked into its BatchNorm statistics.
    assert [row[:2] for row in tables[1]] == [row[:2] for row in tables[0]] and tables[0][-1][1] == "converted"
    assert all(abs(a[2] - b[2]) <= 0.01 for a, b in zip(*tables, strict=True)), tables
    assert tables[0][-1][2] > 0.5, tables


def test_forward_kwargs_pass_through(tmp_path):
    model, _ = prepared(tmp_path)
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(model(x, scale=2.0), 2 * model(x))


def test_converted_model_matches_fake_quant_model(tmp_path):
    model, qat = prepared(tmp_path, bits=4)
    model.eval()
    converted = qat.convert(model)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-5
    assert isinstance(converted.net[3], nn.Conv2d) and not isinstance(converted.net[3], FakeQuantizedConv2d)


def test_bad_arguments(tmp_path):
    with pytest.raises(QlightError, match="between 2 and 8"):
        QuantizationAwareTraining(weight_bits=1)
    with pytest.raises(QlightError, match="needs weight_bits"):
        QuantizationAwareTraining(weight_bits=None, activation_bits=8)
    with pytest.raises(QlightError, match="unknown granularity 'per_row'"):
        QuantizationAwareTraining(granularity="per_row")
    with pytest.raises(QlightError, match="past max_epochs"):
        prepared(tmp_path, start_epoch=2)


def test_bad_baseline_checkpoints(tmp_path):
    with pytest.raises(QlightError, match="does not exist"):
        prepared(tmp_path, baseline_ckpt=str(tmp_path / "missing.ckpt"))
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": DigitsNet(width=4).state_dict()}, other)
    with pytest.raises(QlightError, match="another architecture"):
        prepared(tmp_path, baseline_ckpt=str(other))


def test_qat_beats_ptq_at_two_bits_on_real_digits(tmp_path, digits_checkpoint):
    ptq = PostTrainingQuantization(recipes=["int2"], output_dir=str(tmp_path / "ptq"))
    trainer(tmp_path, [ptq]).test(DigitsNet.load_from_checkpoint(digits_checkpoint))
    ptq_acc = ptq.results[-1]["acc1"]
    torch.manual_seed(0)
    qat = QuantizationAwareTraining(
        weight_bits=2, baseline_ckpt=str(digits_checkpoint), output_dir=str(tmp_path / "qat")
    )
    trainer(tmp_path, [qat], max_epochs=3).fit(DigitsNet(lr=0.01))
    rows = qat.results
    assert [r["epoch"] for r in rows if r["split"] == "val"] == [0, 1, 2]
    converted = rows[-1]
    assert converted["fake_quant"] == "converted"
    assert converted["acc1"] > ptq_acc + 0.01, (converted, ptq_acc)
    assert converted["images_per_s"] > 0 and converted["latency_ms"] > 0 and converted["device"].startswith("cpu")
    model = load_quantized(tmp_path / "qat" / "model.pt")
    x, y = DigitsNet().test_data.tensors
    with torch.no_grad():
        assert abs((model(x).argmax(1) == y).float().mean().item() - converted["acc1"]) < 1e-6
    assert (tmp_path / "qat" / "results.csv").read_text().count("\n") == 5


def test_qat_with_int8_activations_trains_under_bf16_autocast(tmp_path, digits_checkpoint):
    qat = QuantizationAwareTraining(
        weight_bits=4, activation_bits=8, baseline_ckpt=str(digits_checkpoint), output_dir=str(tmp_path)
    )
    model = DigitsNet(lr=0.01)
    trainer(tmp_path, [qat], max_epochs=1, precision="bf16-mixed").fit(model)
    assert [r["fake_quant"] for r in qat.results] == ["on", "converted"]
    assert min(r["acc1"] for r in qat.results) > 0.9, qat.results


def test_resume_mid_qat_and_test_from_a_qat_checkpoint(tmp_path, digits_checkpoint):
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    qat = QuantizationAwareTraining(weight_bits=3, baseline_ckpt=str(digits_checkpoint), output_dir=str(tmp_path))
    trainer(tmp_path, [qat, ckpts], max_epochs=2).fit(DigitsNet(lr=0.01))
    first = tmp_path / "ckpt" / "epoch=0.ckpt"

    resumed = QuantizationAwareTraining(weight_bits=3, output_dir=str(tmp_path / "resumed"))
    model = DigitsNet(lr=0.01)
    trainer(tmp_path, [resumed], max_epochs=2).fit(model, ckpt_path=str(first))
    assert [r["epoch"] for r in resumed.results] == [0, 1, 2]  # epoch 0 restored from the checkpoint
    assert isinstance(model.net[3], FakeQuantizedConv2d)

    tester = QuantizationAwareTraining(weight_bits=3, output_dir=str(tmp_path / "test"))
    model = DigitsNet()
    result = trainer(tmp_path, [tester]).test(model, ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    assert model.net[3].weight_fake_quantizer.enabled
    expected = copy.deepcopy(model).eval()
    x, y = model.test_data.tensors
    with torch.no_grad():
        assert abs((expected(x).argmax(1) == y).float().mean().item() - result[0]["test_acc"]) < 1e-6

    with pytest.raises(QlightError, match="weight_bits"):
        trainer(tmp_path, [QuantizationAwareTraining(weight_bits=4)], max_epochs=2).fit(
            DigitsNet(), ckpt_path=str(first)
        )


def test_learned_scales_train_and_convert_exactly(tmp_path, digits_checkpoint):
    model, qat = prepared(tmp_path, bits=3, learned_scales=True)
    conv = model.net[3]
    scale = conv.weight_fake_quantizer.scale
    assert isinstance(scale, nn.Parameter) and any(p is scale for p in model.parameters())
    assert "net.3.weight_fake_quantizer.scale" in model.state_dict()
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "weight_fake_quantizer"):
                m.weight_fake_quantizer.scale.mul_(1.3)  # no longer the weights' max: conversion must keep them
    model.eval()
    converted = qat.convert(model)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-5

    learned = QuantizationAwareTraining(
        weight_bits=2, learned_scales=True, baseline_ckpt=str(digits_checkpoint), output_dir=str(tmp_path)
    )
    trainer(tmp_path, [learned], max_epochs=1).fit(DigitsNet(lr=0.01))
    assert learned.results[-1]["fake_quant"] == "converted" and learned.results[-1]["acc1"] > 0.8


def test_qat_under_ddp_writes_once_with_synced_metrics(tmp_path, digits_checkpoint):
    qat = QuantizationAwareTraining(
        weight_bits=4, baseline_ckpt=str(digits_checkpoint), output_dir=str(tmp_path / "qat")
    )
    trainer(tmp_path, [qat], max_epochs=1, devices=2, strategy="ddp_spawn").fit(DigitsNet(lr=0.01))
    rows = (tmp_path / "qat" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,split") and len(rows) == 3  # header, epoch 0, converted
    x, y = DigitsNet().test_data.tensors
    with torch.no_grad():
        acc = (load_quantized(tmp_path / "qat" / "model.pt")(x).argmax(1) == y).float().mean().item()
    assert abs(acc - float(rows[-1].split(",")[3])) < 1e-6  # the converted row counts every test image once
