import pickle
from pathlib import Path

import numpy as np
import pytest
import torch


def write_cifar100(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """Write a tiny dataset in CIFAR-100's on-disk format (python pickles train/test/meta)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{name} batch",
            "fine_labels": rng.integers(0, 100, n).tolist(),
            "coarse_labels": rng.integers(0, 20, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {
        "fine_label_names": [f"class_{i}" for i in range(100)],
        "coarse_label_names": [f"super_{i}" for i in range(20)],
    }
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    return write_cifar100(tmp_path / "data")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def fresh_dynamo():
    """No compiled code or Dynamo counters from other tests in this one, and none left behind."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _trained_digits(tmp_path_factory, width: int, pooled: bool = False) -> Path:
    from digits import DigitsNet, PooledDigitsNet, trainer

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(f"digits_w{width}")
    t = trainer(root, max_epochs=8)
    t.fit((PooledDigitsNet if pooled else DigitsNet)(width=width))
    path = root / "digits.ckpt"
    t.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A small CNN trained on scikit-learn's digits (about 99% test accuracy)."""
    return _trained_digits(tmp_path_factory, width=8)


@pytest.fixture(scope="session")
def narrow_digits_checkpoint(tmp_path_factory) -> Path:
    """The same CNN at half the width (about 97%): fragile enough that round-to-nearest int2 loses
    about half its accuracy, where the width-8 one loses a few points."""
    return _trained_digits(tmp_path_factory, width=4)


@pytest.fixture(scope="session")
def pooled_digits_checkpoint(tmp_path_factory) -> Path:
    """:class:`digits.PooledDigitsNet` at width 4 (about 96%), where layers differ in fragility."""
    return _trained_digits(tmp_path_factory, width=4, pooled=True)
