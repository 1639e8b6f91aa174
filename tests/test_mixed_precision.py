import itertools
import json
import random
import re

import pytest
import torch
from digits import PooledDigitsNet, trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlight import LayerSensitivity, PostTrainingQuantization, QlightError, QuantizationAwareTraining, load_quantized
from qlight.quantization.callbacks.sensitivity import heatmap
from qlight.quantization.grid.sizes import weight_bytes
from qlight.quantization.recipes.allocation import allocate_bits
from qlight.quantization.recipes.plans import realised_plan
from qlight.tables import read_csv


def brute_force(damage, cost, budget):
    layers = list(damage)
    best = None
    for choice in itertools.product(*(damage[layer] for layer in layers)):
        spent = sum(cost[layer][bits] for layer, bits in zip(layers, choice, strict=True))
        harm = sum(damage[layer][bits] for layer, bits in zip(layers, choice, strict=True))
        if spent <= budget and (best is None or harm < best[0]):
            best = (harm, dict(zip(layers, choice, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(50))
def test_the_allocation_equals_a_brute_force_search_on_a_four_layer_toy(seed):
    rng = random.Random(seed)
    bits = [2, 3, 4, 6, 8]
    damage = {f"layer{i}": {b: rng.random() * (9 - b) ** rng.uniform(1, 3) for b in bits} for i in range(4)}
    cost = {layer: {b: rng.randint(1, 50) * b for b in bits} for layer in damage}
    budget = rng.randint(sum(min(c.values()) for c in cost.values()), sum(max(c.values()) for c in cost.values()))
    plan = allocate_bits(damage, cost, budget)
    harm, _ = brute_force(damage, cost, budget)
    assert sum(cost[layer][b] for layer, b in plan.items()) <= budget
    assert sum(damage[layer][b] for layer, b in plan.items()) == pytest.approx(harm)


def test_a_budget_below_the_cheapest_plan_names_the_smallest_feasible_one():
    cost = {"a": {2: 10, 8: 40}, "b": {2: 5, 8: 20}}
    with pytest.raises(QlightError, match="smallest feasible budget is 15"):
        allocate_bits({"a": {2: 1.0, 8: 0.0}, "b": {2: 1.0, 8: 0.0}}, cost, 14)


def _ptq(tmp_path, checkpoint, recipes, name="ptq", logger=False):
    ptq = PostTrainingQuantization(recipes=recipes, output_dir=str(tmp_path / name), speed_repeats=0)
    trainer(tmp_path / name, [ptq], logger=logger).test(PooledDigitsNet.load_from_checkpoint(checkpoint))
    return {row["recipe"]: row for row in read_csv(tmp_path / name / "results.csv")}


def _packed_layer_bytes(path):
    """Bytes of each quantized layer's codes and scales in a saved file, by layer."""
    state = torch.load(path, weights_only=True)["state_dict"]
    return {
        key.rpartition(".")[0]: entry["codes"].numel() + entry["scale"].numel() * 5
        for key, entry in state.items()
        if isinstance(entry, dict)
    }


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, pooled_digits_checkpoint):
    """One PTQ run of uniform int3 and mixed recipes at its bytes and at two file sizes."""
    root = tmp_path_factory.mktemp("mixed")
    recipes = ["int3", "mixed@3", "mixed@0.0145MiB", "mixed@0.02MiB"]
    logger = TensorBoardLogger(root, name="tb")
    return _ptq(root, pooled_digits_checkpoint, recipes, logger=logger), root / "ptq"


def test_mixed_beats_uniform_int3_within_its_bytes_and_the_plan_reloads(tmp_path, mixed_run, pooled_digits_checkpoint):
    rows, out = mixed_run
    assert not any(row["error"] for row in rows.values()), rows
    assert float(rows["mixed@3"]["acc1"]) >= float(rows["int3"]["acc1"]) + 0.02, rows
    plan = json.loads((out / "mixed@3.plan.json").read_text())
    assert len(set(plan.values())) > 1 and float(rows["mixed@3"]["bits"]) <= 3
    events = EventAccumulator(str(next((out.parent / "tb").rglob("events.*")))).Reload()
    assert "ptq/plan/mixed@3/text_summary" in events.Tags()["tensors"]
    assert "ptq/sensitivity/mixed@3" in events.Tags()["images"]
    # Uniform recipes are one chart with the bits as its step; no one-point chart per uniform recipe.
    assert [event.step for event in events.Scalars("ptq/acc1_vs_bits/per_channel_rtn")] == [3]
    assert {"ptq/fp32/acc1", "ptq/mixed@3/acc1"} <= set(events.Tags()["scalars"])
    assert "ptq/int3/acc1" not in events.Tags()["scalars"]
    sensitivity = read_csv(out / "mixed@3.sensitivity.csv")  # what the plan was allocated from
    assert len(sensitivity) == 5 * 7 and (out / "mixed@3.sensitivity.png").stat().st_size > 1000
    kl = {(r["layer"], int(r["bits"])): float(r["kl"]) for r in sensitivity}
    assert all(kl[layer, 2] > kl[layer, 8] for layer in plan)
    # The byte costs the allocator uses are the packed sizes in the file, so the plan's bytes are real.
    uniform, mixed = _packed_layer_bytes(out / "int3.pt"), _packed_layer_bytes(out / "mixed@3.pt")
    assert mixed.keys() == uniform.keys() and sum(mixed.values()) <= sum(uniform.values())
    for layer, bits in plan.items():
        shape = PooledDigitsNet().get_submodule(layer).weight.shape
        assert mixed[layer] == weight_bytes(shape, bits, "per_channel")
    for budget in (0.0145, 0.02):  # a MiB budget holds for the whole file
        assert int(rows[f"mixed@{budget:g}MiB"]["size_bytes"]) <= budget * 2**20
    assert realised_plan(load_quantized(out / "mixed@3.pt")) == plan
    # The saved plan, given back as a plan file, rebuilds the same model.
    again = _ptq(tmp_path, pooled_digits_checkpoint, [f"mixed@{out / 'mixed@3.plan.json'}"], name="again")
    assert again["mixed@mixed@3.plan.json"]["acc1"] == rows["mixed@3"]["acc1"]
    # The same codes and scales; the file's size differs by the longer name (and its 64-byte alignment).
    assert _packed_layer_bytes(tmp_path / "again" / "mixed@mixed@3.plan.json.pt") == mixed


def test_budgets_and_plans_that_cannot_work_say_why(tmp_path, pooled_digits_checkpoint, capfd):
    rows = _ptq(tmp_path, pooled_digits_checkpoint, ["mixed@0.001MiB"])
    assert re.fullmatch(
        r"Unsupported: mixed@0.001MiB cannot be met: the smallest feasible budget is mixed@0\.0\d+MiB",
        rows["mixed@0.001MiB"]["error"],
    )
    assert "Traceback" not in "".join(capfd.readouterr())  # a known limit, not a fault
    with pytest.raises(QlightError, match="mixed@1.5: a budget below 2 bits cannot be met"):
        _ptq(tmp_path, pooled_digits_checkpoint, ["mixed@1.5"], name="low")
    layers = "its quantizable layers: net.0, net.3, net.7, net.10, net.15"
    cases = [
        ("other", {"features.0": 4}, f"names 'features.0', not a quantizable layer .*; {layers}$"),
        ("wide", {"net.0": 9}, "gives 'net.0' 9 bits: bits are whole numbers 2..8$"),
        ("text", {"net.0": "4"}, "gives 'net.0' '4' bits: bits are whole numbers 2..8$"),
    ]
    for name, plan, message in cases:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(plan))
        with pytest.raises(QlightError, match=f"plan {re.escape(str(path))} {message}"):
            _ptq(tmp_path, pooled_digits_checkpoint, [f"mixed@{path}"], name=name)
    with pytest.raises(QlightError, match="no plan file at"):
        _ptq(tmp_path, pooled_digits_checkpoint, [f"mixed@{tmp_path / 'missing.json'}"], name="missing")


def test_a_file_whose_codes_disagree_with_its_plan_is_refused(tmp_path, mixed_run):
    # Files before the plan was read off the weights' bits also stored it: it is still checked.
    payload = torch.load(mixed_run[1] / "mixed@3.pt", weights_only=True)
    path = tmp_path / "mixed@3.pt"
    state = payload["state_dict"]
    plan = {key.rpartition(".")[0]: entry["bits"] for key, entry in state.items() if isinstance(entry, dict)}
    layer = next(name for name, bits in plan.items() if bits != 8)
    payload["plan"] = {**plan, layer: 8}
    torch.save(payload, path)
    with pytest.raises(QlightError, match=f"{layer}.weight holds .*-bit codes, but the file's plan gives it 8"):
        load_quantized(path)


def test_layer_sensitivity_writes_its_table_and_figure_and_names_the_layers(tmp_path, pooled_digits_checkpoint):
    probe = LayerSensitivity(bits=[2, 4, 8], eval_batches=2, output_dir=str(tmp_path / "s"))
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, [probe], logger=logger).test(PooledDigitsNet.load_from_checkpoint(pooled_digits_checkpoint))
    rows = read_csv(tmp_path / "s" / "sensitivity.csv")
    assert [(r["layer"], r["bits"]) for r in rows[:3]] == [("net.0", "2"), ("net.0", "4"), ("net.0", "8")]
    assert len(rows) == 15 and (tmp_path / "s" / "sensitivity.png").stat().st_size > 1000
    for layer in ("net.0", "net.3", "net.7", "net.10", "net.15"):  # fewer bits, more damage
        kl = [float(r["kl"]) for r in rows if r["layer"] == layer]
        assert kl[0] > kl[1] > kl[2] >= 0, (layer, kl)
    assert float(next(r["acc1"] for r in rows if r["layer"] == "net.0" and r["bits"] == "2")) < 0.9
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.*")))).Reload()
    assert "sensitivity/kl" in events.Tags()["images"]
    with pytest.raises(QlightError, match="has no Conv2d or Linear 'net.1'; its quantizable layers: net.0, net.3"):
        trainer(tmp_path, [LayerSensitivity(layers=["net.1"])]).test(PooledDigitsNet())


def test_qat_from_a_mixed_plan_converts_exactly_to_that_plan(tmp_path, mixed_run, pooled_digits_checkpoint):
    rows, out = mixed_run
    plan_file = out / "mixed@3.plan.json"
    plan = json.loads(plan_file.read_text())
    torch.manual_seed(0)
    qat = QuantizationAwareTraining(
        weight_bits=str(plan_file), baseline_ckpt=str(pooled_digits_checkpoint), output_dir=str(tmp_path / "qat")
    )
    trainer(tmp_path, [qat], max_epochs=2).fit(PooledDigitsNet(lr=0.01))
    converted = qat.results[-1]
    assert converted["fake_quant"] == "converted" and converted["acc1"] >= float(rows["mixed@3"]["acc1"]) - 0.01
    model = load_quantized(tmp_path / "qat" / "model.pt")
    assert realised_plan(model) == plan
    x, y = PooledDigitsNet().test_data.tensors
    with torch.no_grad():
        assert abs((model(x).argmax(1) == y).float().mean().item() - converted["acc1"]) < 1e-6
    with pytest.raises(QlightError, match=r"plan weight_bits names 'net.1', .*quantizable layers: net.0, net.3"):
        trainer(tmp_path, [QuantizationAwareTraining(weight_bits={"net.1": 4})], max_epochs=1).fit(PooledDigitsNet())
    with pytest.raises(QlightError, match="keep_first/keep_last do not combine with a plan"):
        QuantizationAwareTraining(weight_bits=plan, keep_first=True)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"net.0": ' + "9" * 5000 + "}", "is not a JSON plan of layer -> bits \\(ValueError"),
        ("[" * 200_000 + "]" * 200_000, "is not a JSON plan of layer -> bits \\(RecursionError"),
        ("{}", "write a non-empty object of layer -> bits"),
        ('{"' + "x" * 2_000_000 + '": 4}', "holds 2,000,007 bytes: a plan is .* at most 1 MiB"),
        ('{"' + "x" * 5_000 + '": 9}', "gives 'xxxx.*\\.\\.\\. \\(5,000 characters\\) 9 bits"),
    ],
    ids=["a 5,000-digit number", "nested 200,000 deep", "empty", "2 MB", "a 5,000-character name"],
)
def test_plan_files_are_checked_when_the_callbacks_are_built(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content)
    for build in (lambda: PostTrainingQuantization([f"mixed@{path}"]), lambda: QuantizationAwareTraining(str(path))):
        with pytest.raises(QlightError, match=message) as info:
            build()
        assert len(str(info.value)) < 500


def test_budgets_of_8_bits_or_more_and_same_named_plans_are_refused(tmp_path):
    with pytest.raises(QlightError, match="mixed@100: at 8 bits or above every layer gets 8 bits, .*: use int8"):
        PostTrainingQuantization(["mixed@100"])
    for folder, bits in (("a", 3), ("b", 5)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.json").write_text(json.dumps({"net.0": bits}))
    with pytest.raises(QlightError, match="two different plans would both be named mixed@x.json"):
        PostTrainingQuantization([f"mixed@{tmp_path / 'a' / 'x.json'}", f"mixed@{tmp_path / 'b' / 'x.json'}"])
    (tmp_path / "b" / "x.json").write_text(json.dumps({"net.0": 3}))  # the same plan: one row
    ptq = PostTrainingQuantization([f"mixed@{tmp_path / 'a' / 'x.json'}", f"mixed@{tmp_path / 'b' / 'x.json'}"])
    assert [r.name for r in ptq.recipes] == ["fp32", "mixed@x.json"]


def test_the_heatmap_outlines_the_bits_a_plan_chose():
    rows = [{"layer": layer, "bits": bits, "kl": 0.1 / bits} for layer in ("a", "b", "c") for bits in (2, 3, 4)]
    figure = heatmap(rows, chosen={"a": 4, "b": 2, "gone": 3})  # a layer the rows lack is left out
    (outline,) = figure.axes[0].get_lines()
    assert list(zip(outline.get_xdata(), outline.get_ydata(), strict=True)) == [(2, 0), (0, 1)]  # (bits, layer)
    assert not heatmap(rows).axes[0].get_lines()
