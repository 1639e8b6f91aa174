"""The callbacks' ``runtimes``: each model also in ONNX Runtime, with its agreement, size and speed."""

import json
import sys

import pytest
import torch
from digits import DigitsNet, trainer

from qlight import PostTrainingQuantization, QlightError, QuantizationAwareTraining, load_quantized
from qlight.quantization.runtimes.agreement import compare_logits
from qlight.study.report import build_report
from qlight.tables import read_csv, write_csv

ONNX = ("eager", "onnxruntime")


def rows_by_runtime(path):
    return {(r["recipe"], r["runtime"]): r for r in read_csv(path)}


def test_onnx_rows_agree_with_eager_pytorch_for_weight_only_int8_int4_and_mixed(tmp_path, digits_checkpoint):
    model = DigitsNet.load_from_checkpoint(digits_checkpoint)
    recipes = ["int8", "int4", "int4@per_kernel_position", "mixed@4"]
    ptq = PostTrainingQuantization(
        recipes, runtimes=ONNX, calibration_batches=2, speed_repeats=1, output_dir=str(tmp_path)
    )
    trainer(tmp_path, [ptq]).test(model, verbose=False)
    rows = rows_by_runtime(tmp_path / "results.csv")
    images = len(model.test_data)
    names = ["fp32", "int8", "int4", "int4@per_kernel_position", "mixed@4"]
    # ONNX Runtime sums each layer's products in another float32 order than PyTorch (differences near
    # 1e-5 measured): a logit gap of that size may flip one test image, so top-1 is held within one.
    for name in names:
        eager, onnx = rows[name, "eager"], rows[name, "onnxruntime"]
        assert onnx["error"] == "" and float(onnx["agreement"]) >= 99.5, onnx
        assert abs(float(onnx["acc1"]) - float(eager["acc1"])) * images <= 1 + 1e-6, (eager, onnx)
        assert eager["agreement"] == "" and float(onnx["max_logit_diff"]) < 0.1
        assert int(onnx["size_bytes"]) == (tmp_path / f"{name}.onnx").stat().st_size
        assert float(onnx["images_per_s"]) > 0 and float(onnx["speedup"]) > 0
    assert float(rows["fp32", "onnxruntime"]["speedup"]) == float(rows["fp32", "eager"]["speedup"]) == 1.0
    assert "dequantizes the weights once, at load" in rows["int4", "onnxruntime"]["note"]
    assert rows["mixed@4", "onnxruntime"]["bits"] == rows["mixed@4", "eager"]["bits"]  # the realised average
    options = load_quantized(tmp_path / "int4.onnx").session.get_session_options()
    assert options.get_session_config_entry("session.disable_quant_qdq") == "1"  # dequantized once, at load
    files = json.loads((tmp_path / "ptq_files.json").read_text())
    assert {f"{name}.onnx" for name in names} <= set(files)


@torch.library.custom_op("qlight_test::shifted", mutates_args=())
def shifted(x: torch.Tensor) -> torch.Tensor:
    return x + 1.0


@shifted.register_fake
def _(x):
    return torch.empty_like(x)


class CustomOpNet(DigitsNet):
    """The digits CNN with a custom operator after the convolutions: ONNX has no translation for it."""

    def forward(self, x, scale: float = 1.0):
        return self.net[7:](shifted(self.net[:7](x))) * scale


def test_a_model_onnx_cannot_export_records_its_error_and_the_eager_rows_go_on(tmp_path, digits_checkpoint):
    model = CustomOpNet.load_from_checkpoint(digits_checkpoint)
    ptq = PostTrainingQuantization(["int8"], runtimes=ONNX, speed_repeats=0, output_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="int8 in onnxruntime failed"):
        trainer(tmp_path, [ptq]).test(model, verbose=False)
    rows = rows_by_runtime(tmp_path / "results.csv")
    assert len(rows) == 4
    for name in ("fp32", "int8"):
        assert rows[name, "eager"]["error"] == "" and float(rows[name, "eager"]["acc1"]) > 0.9
        error = rows[name, "onnxruntime"]["error"]
        assert error and "\n" not in error and rows[name, "onnxruntime"]["acc1"] == ""
    assert (tmp_path / "int8.pt").is_file() and not (tmp_path / "int8.onnx").exists()


def test_a_known_limit_of_the_runtime_is_its_rows_error_without_a_traceback(tmp_path, digits_checkpoint, capfd):
    ptq = PostTrainingQuantization(["bf16"], runtimes=ONNX, speed_repeats=0, output_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="bf16 in onnxruntime failed: Unsupported: .* no bfloat16 Conv"):
        trainer(tmp_path, [ptq]).test(DigitsNet.load_from_checkpoint(digits_checkpoint), verbose=False)
    rows = rows_by_runtime(tmp_path / "results.csv")
    assert "no bfloat16 Conv" in rows["bf16", "onnxruntime"]["error"] and rows["bf16", "eager"]["error"] == ""
    assert "Traceback" not in "".join(capfd.readouterr())


def test_agreement_counts_predictions_and_warns_below_99_5_percent():
    reference = torch.eye(10).repeat(100, 1)  # 1000 images, class i % 10
    got = reference.clone()
    got[0] = torch.tensor([0.0, 2.0] + [0.0] * 8)  # one image predicted as another class
    one = compare_logits(reference, got)
    assert (one.same, one.count, one.agreement, one.max_logit_diff) == (999, 1000, 99.9, 2.0)
    assert one.warning("int4 in onnxruntime") is None
    got[:10] = got[0]  # ten of 1000 differ (9 of them had class 1..9: 9 more disagree)
    ten = compare_logits(reference, got)
    assert ten.agreement == pytest.approx(99.1)
    assert ten.warning("int4 in onnxruntime") == (
        "int4 in onnxruntime agrees with the PyTorch model on 99.10% of 1000 test images (under 99.5%)"
    )
    with pytest.raises(ValueError, match="cannot be compared"):
        compare_logits(reference, got[:5])


def test_runtimes_are_checked_in_init_and_a_missing_onnx_extra_is_one_line(monkeypatch):
    with pytest.raises(QlightError, match="runtimes takes one or more of eager, onnxruntime, inductor"):
        PostTrainingQuantization(["int8"], runtimes=["tensorrt"])
    with pytest.raises(QlightError, match="QuantizationAwareTraining runtimes takes one or more of eager, onnxr"):
        QuantizationAwareTraining(runtimes=["inductor"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(QlightError, match=r'needs onnxruntime: pip install "qlight\[onnx\]"'):
        PostTrainingQuantization(["int8"], runtimes=ONNX)
    assert PostTrainingQuantization(["int8"]).runtimes == ("eager",)  # nothing asked of the extra


def test_qat_with_runtimes_writes_model_onnx_and_a_converted_row_for_it(tmp_path):
    qat = QuantizationAwareTraining(weight_bits=4, runtimes=["onnxruntime"], output_dir=str(tmp_path))
    model = DigitsNet()
    trainer(tmp_path, [qat], max_epochs=2).fit(model)
    converted = [r for r in read_csv(tmp_path / "results.csv") if r["fake_quant"] == "converted"]
    eager, onnx = converted
    assert (eager["runtime"], onnx["runtime"]) == ("eager", "onnxruntime")
    assert float(onnx["agreement"]) >= 99.5 and onnx["error"] == ""
    # Float summation order differs between the runtimes (as above): within one test image.
    assert abs(float(onnx["acc1"]) - float(eager["acc1"])) * len(model.test_data) <= 1 + 1e-6
    assert int(onnx["size_bytes"]) == (tmp_path / "model.onnx").stat().st_size
    assert int(eager["size_bytes"]) == (tmp_path / "model.pt").stat().st_size
    assert float(onnx["images_per_s"]) > 0


def test_the_study_report_has_a_deployed_table_and_keeps_eager_rows_for_its_analyses(tmp_path):
    columns = ["recipe", "bits", "granularity", "method", "runtime", "acc1", "agreement", "size_mib"]
    columns += ["images_per_s", "speedup", "device", "note"]
    cpu = {"device": "cpu (2 threads)"}
    rows = [
        {"recipe": "fp32", "bits": 32, "method": "cast", "runtime": "eager", "acc1": 0.90, "images_per_s": 1000, **cpu},
        {"recipe": "fp32", "bits": 32, "method": "cast", "runtime": "onnxruntime", "acc1": 0.89, "agreement": 99.0},
        {"recipe": "int4", "bits": 4, "granularity": "per_channel", "method": "rtn", "runtime": "eager", "acc1": 0.88},
        {"recipe": "int4", "bits": 4, "granularity": "per_channel", "method": "rtn", "runtime": "onnxruntime"},
    ]
    rows[1].update(size_mib=0.08, images_per_s=3000, speedup=1.0, **cpu)
    rows[3].update(acc1=0.88, agreement=100.0, size_mib=0.02, images_per_s=2400, speedup=0.8, note="dequantizes")
    (tmp_path / "ptq").mkdir()
    write_csv(rows, tmp_path / "ptq" / "results.csv", columns)
    build_report(tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["fp32_acc1"] == 0.90 and [r["runtime"] for r in results["ptq"]] == ["eager", "eager"]
    assert [(r["recipe"], r["runtime"]) for r in results["deployed"]] == [
        ("fp32", "onnxruntime"),
        ("int4", "onnxruntime"),
    ]
    report = (tmp_path / "report.md").read_text()
    assert "## Deployed" in report
    assert "| recipe | runtime | top-1 % | agreement % | size MiB | images/s | speedup | note |" in report
    assert "| int4 | onnxruntime | 88.00 | 100.00 | 0.020 | 2,400 | 0.80x | dequantizes |" in report
    assert "accuracy_vs_throughput.png" in {p.name for p in tmp_path.glob("*.png")}
