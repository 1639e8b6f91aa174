"""Hostile inputs (issue #31): image bombs and odd images, class paths that fail, CLI values Lightning
refuses with a traceback, and a DDP rank whose parent died. Each ends in one line, or in bounded time."""

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from torchvision.io import write_png
from torchvision.transforms.v2 import functional as F

from qlight import ImageFolderDataModule
from qlight.cli import main
from qlight.data import image_folder
from qlight.data.image_folder import channel_stats
from qlight.errors import QlightError

ROOT = Path(__file__).resolve().parents[1]


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A 1-bit grey PNG of ``width`` x ``height`` zero pixels: a few hundred bytes at most for any size."""
    row = b"\x00" * (1 + (width + 7) // 8)
    data = zlib.compressobj(9)
    body = b"".join(data.compress(row) for _ in range(height)) + data.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _folder(root: Path, per_class: int = 2) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for index, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                image = torch.randint(0, 100, (3, 10, 12), generator=generator, dtype=torch.uint8) + 100 * index
                write_png(image, str(root / split / name / f"{i}.png"))
    return root


def _load_error(root: Path) -> str:
    with pytest.raises(QlightError) as info:
        ImageFolderDataModule(str(root), image_size=8, batch_size=2).setup("fit")
    message = str(info.value)
    assert "\n" not in message and "/__w/" not in message and ".cpp" not in message
    return message


@pytest.mark.parametrize(("width", "height"), [(20_000, 20_000), (8_000, 7_000), (999_999, 1)])
def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch, width, height):
    root = _folder(tmp_path / "images")
    _png_header_only(root / "train" / "a" / "bomb.png", width, height)
    decode = image_folder.decode_image

    def decode_small(path, *args, **kwargs):
        assert "bomb" not in path, "decoded before its size was checked"
        return decode(path, *args, **kwargs)

    monkeypatch.setattr(image_folder, "decode_image", decode_small)
    message = _load_error(root)
    assert "bomb.png is " in message and "over the limit of 50,000,000 pixels (65,535 a side)" in message


def test_a_long_strip_is_cropped_before_it_is_resized(tmp_path, monkeypatch):
    root = _folder(tmp_path / "images")
    _png_header_only(root / "train" / "a" / "strip.png", 60_000, 1)
    resize, sizes = F.resize, []

    def recorded(image, *args, **kwargs):
        resized = resize(image, *args, **kwargs)
        sizes.append(resized.numel())
        return resized

    monkeypatch.setattr(F, "resize", recorded)
    data = ImageFolderDataModule(str(root), image_size=32, batch_size=2)
    data.setup("fit")
    assert data.train_set.tensors[0].shape == (5, 3, 32, 32)
    assert max(sizes) == 3 * 32 * 32  # resizing the strip's short side to 32 first takes 184 MB


def test_16_bit_bmp_and_tiff_images_are_read_as_8_bit_rgb(tmp_path):
    root = _folder(tmp_path / "images")
    grey16 = np.full((10, 12), 0xAB00 + 0x7F, dtype=np.uint16)
    Image.fromarray(grey16).save(root / "train" / "a" / "deep.png")
    Image.fromarray(grey16).save(root / "train" / "a" / "deep.tiff")
    colour = np.zeros((10, 12, 3), dtype=np.uint8)
    colour[..., 1] = 77
    Image.fromarray(colour).save(root / "train" / "b" / "plain.bmp")
    Image.fromarray(colour).save(root / "train" / "b" / "plain.tif")
    data = ImageFolderDataModule(str(root), image_size=8, batch_size=2)
    data.setup("fit")
    images, labels = data.train_set.tensors
    assert images.dtype == torch.uint8 and len(labels) == 8
    deep = images[(images == 0xAB).flatten(1).all(1)]
    plain = images[(images[:, 1] == 77).flatten(1).all(1) & (images[:, 0] == 0).flatten(1).all(1)]
    assert (len(deep), len(plain)) == (2, 2)  # 16-bit keeps its top byte, not 255 (clipped)


def test_an_animated_image_is_read_as_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (12, 12), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "animated.png"  # a GIF under a name the image folder picks up
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:])
    pixels = image_folder.read_image(path, 8)
    assert pixels.shape == (3, 8, 8) and pixels[0].float().mean() > 200 and pixels[2].float().mean() < 50


def test_unreadable_images_are_one_line_without_torchvision_build_paths(tmp_path):
    root = _folder(tmp_path / "images")
    good = (root / "train" / "a" / "0.png").read_bytes()
    (root / "train" / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    assert "truncated.png cannot be read as an image (Out of bound read in decode_png." in _load_error(root)
    (root / "train" / "a" / "truncated.png").unlink()
    (root / "train" / "a" / "bad\nerror: all fine.png").write_bytes(b"not an image" * 40)
    message = _load_error(root)
    assert "bad\\nerror: all fine.png' cannot be read as an image (not in a format" in message


def test_an_empty_class_folder_is_refused(tmp_path):
    root = _folder(tmp_path / "images")
    (root / "train" / "c" / "deeper").mkdir(parents=True)
    (root / "train" / "c" / "notes.txt").write_text("no image")
    assert "train has class folders without images" in _load_error(root) and "'c'" in _load_error(root)
    (root / "val" / "a").rename(root / "val" / "elsewhere")  # a class the test split lacks is fine there
    (root / "train" / "c" / "notes.txt").unlink()
    (root / "train" / "c" / "deeper").rmdir()
    (root / "train" / "c").rmdir()
    (root / "val" / "elsewhere").rename(root / "val" / "a")
    ImageFolderDataModule(str(root), image_size=8).setup("fit")


def test_mean_and_std_are_exact_and_take_no_float_copy_of_the_images():
    images = torch.randint(0, 256, (20, 3, 9, 9), dtype=torch.uint8)
    mean, std = channel_stats(images)
    pixels = images.transpose(0, 1).reshape(3, -1).double() / 255
    assert mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-12)
    assert std == pytest.approx(pixels.std(1).tolist(), abs=1e-12)
    images = torch.full((25_000, 3, 32, 32), 7, dtype=torch.uint8)  # 77 MB; a float copy is 307 MB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
        assert channel_stats(images)[0] == pytest.approx((7 / 255,) * 3)
    largest_mib = max(event.cpu_memory_usage for event in profiled.events()) / 2**20
    assert largest_mib < 20, f"channel_stats allocated {largest_mib:.0f} MiB at once"


def _exit_code(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def _one_error_line(capsys) -> str:
    """The error line the CLI ended with (Lightning's warnings may come before it), after no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err
    return err.strip().splitlines()[-1]


SYNTHETIC = ["--data.synthetic=true", "--data.synthetic_train_size=8", "--data.synthetic_test_size=4"]
SYNTHETIC += ["--data.val_size=4", "--model.backbone=test_any_data.TinyRGB", "--trainer.accelerator=cpu"]
SYNTHETIC += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.max_epochs=1"]


def _fit(tmp_path, *args: str) -> list[str]:
    return ["fit", *SYNTHETIC, f"--trainer.logger.init_args.save_dir={tmp_path}", *args]


@pytest.mark.parametrize("augment_on_device", [True, False])
def test_a_batch_larger_than_the_training_set_is_one_line(tmp_path, capsys, augment_on_device):
    args = ["--data.batch_size=1000000000", f"--data.augment_on_device={augment_on_device}", "--data.num_workers=0"]
    assert _exit_code(_fit(tmp_path, *args)) == 2
    assert "data.batch_size=1000000000 is more than the 4 training images per device" in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trainer.precision=fp8"], "trainer.precision fp8 is not supported: give one of 16-mixed, bf16-mixed"),
        (["--trainer.precision", "64-true"], "trainer.precision 64-true is not supported"),
        (["--trainer.devices=0"], "Lightning refuses the trainer settings (MisconfigurationException: `Trainer(devi"),
        (["--trainer.devices=-1"], "Lightning refuses the trainer settings (TypeError: `devices` selected with"),
        (["--trainer.max_epochs=-1"], "the cosine schedule runs per step and needs a finite length"),
        (["--model.backbone=torch.nn.Identity"], "backbone torch.nn.Identity has no parameters to train"),
        (["--model.backbone=torch.nn.Flatten"], "backbone torch.nn.Flatten has no parameters to train"),
    ],
)
def test_trainer_and_model_settings_lightning_refuses_are_one_line(tmp_path, capsys, args, message):
    assert _exit_code(_fit(tmp_path, "--data.batch_size=2", *args)) == 2
    assert message in _one_error_line(capsys)


class _Marker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_checkpoint_that_asks_to_run_code_is_one_line_and_runs_nothing(tmp_path, capsys):
    marker, checkpoint = tmp_path / "ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Marker(marker)}, checkpoint)
    assert _exit_code(["test", *SYNTHETIC, "--data.batch_size=2", f"--ckpt_path={checkpoint}"]) == 2
    line = _one_error_line(capsys)
    assert "a checkpoint asks to unpickle what weights-only loading refuses" in line and "posix.system" in line
    assert not marker.exists()


def test_settings_of_another_datamodule_are_one_line(tmp_path, capsys):
    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    args = ["fit", "--config", str(smoke), "--data", "ImageFolderDataModule", f"--data.root={tmp_path}"]
    assert _exit_code(args) == 2
    line = _one_error_line(capsys)
    assert "ImageFolderDataModule takes no synthetic, synthetic_train_size, synthetic_test_size:" in line
    assert "val_size" not in line and "batch_size" not in line  # settings both classes take are not named


@pytest.mark.skipif(torch.cuda.is_available(), reason="the point is a machine without a GPU")
@pytest.mark.parametrize(
    "accelerator", [["--trainer.accelerator=gpu"], ["--trainer.accelerator=cuda", "--trainer.devices=4"]]
)
def test_a_gpu_on_a_machine_without_one_is_one_line(tmp_path, capsys, accelerator):
    assert _exit_code(_fit(tmp_path, *accelerator)) == 2
    assert "Lightning refuses the trainer settings (MisconfigurationException:" in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("class Net(nn.Module)\n    pass\n", "its module raised SyntaxError: expected ':' (broken_"),
        ("raise RuntimeError('boom\\nat import')\n", "its module raised RuntimeError: boom at import: fix it"),
        (
            "class Net(nn.Module):\n    def __init__(self, num_classes):\n        raise ValueError('no width')\n",
            "with init_args {'num_classes': 100}: ValueError: no width",
        ),
    ],
)
def test_a_user_network_that_fails_to_import_or_build_is_one_line(tmp_path, monkeypatch, capsys, source, message):
    module = f"broken_{len(source)}"  # a module name per case: Python caches what it imported
    (tmp_path / f"{module}.py").write_text("from torch import nn\n" + source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _exit_code(_fit(tmp_path, f"--model.backbone={module}.Net")) == 2
    err = _one_error_line(capsys)
    assert f"backbone {module}.Net" in err and message in err


# A rank as Lightning's launcher starts it, without the import of torch: the module alone, by its path.
RANK = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("launched_rank", {str(ROOT / "qlight" / "launched_rank.py")!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.end_with_launcher()
print("ready", flush=True)
time.sleep(120)
"""
# Rank 0: records its pid, starts rank 1 (LOCAL_RANK=1) and waits, to be SIGKILLed.
LAUNCHER = f"""
import os, subprocess, sys, time
exec({RANK.split("print")[0]!r})
child = subprocess.Popen([sys.executable, "-c", {RANK!r}], env={{**os.environ, "LOCAL_RANK": "1"}},
                         stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "ready\\n"
print(child.pid, flush=True)
time.sleep(120)
"""


def _ended(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in "ZX"  # a zombie has ended
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_started_rank_ends_when_rank_0_is_killed(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True)
    try:
        rank_1 = int(launcher.stdout.readline())
        assert not _ended(rank_1)
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 10
    while not _ended(rank_1) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _ended(rank_1):
        os.kill(rank_1, signal.SIGKILL)
        pytest.fail("rank 1 outlived rank 0 by 10 s")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_rank_whose_launcher_ended_before_it_started_exits_at_once():
    env = {**os.environ, "LOCAL_RANK": "1", "QLIGHT_LAUNCHER_PID": str(os.getppid())}  # not the rank's parent
    out = subprocess.run([sys.executable, "-c", RANK], env=env, capture_output=True, text=True, timeout=20)
    assert out.returncode == 1 and "which started this rank, has ended" in out.stderr
