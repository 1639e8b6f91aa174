import pathlib
import pickle
import urllib.error
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from qlight import ImageClassifier
from qlight.data import (
    CIFAR100DataModule,
    ensure_cifar,
    load_cifar,
    normalize,
    random_crop_flip,
    synthetic_images,
)
from qlight.data import cifar as cifar_module
from qlight.data.device_batches import EpochShard, to_device
from qlight.errors import QlightError
from tests.conftest import write_cifar100


def test_reads_cifar100_format(cifar_dir):
    dm = CIFAR100DataModule(data_dir=str(cifar_dir), batch_size=16, val_size=16, verify_checksums=False, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 48 and len(dm.val_set) == 16 and len(dm.test_set) == 32
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 32)
    assert labels.dtype == torch.long and int(labels.max()) < 100
    # The same pixels and labels as the pickle, in (N, C, H, W) order.
    with open(cifar_dir / "cifar-100-python" / "test", "rb") as file:
        raw = pickle.load(file, encoding="latin1")
    assert torch.equal(dm.test_set.tensors[0][3], torch.from_numpy(raw["data"][3].reshape(3, 32, 32)))
    assert dm.test_set.tensors[1].tolist() == raw["fine_labels"]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "ran"))


@pytest.mark.parametrize("verify_checksums", [True, False])
def test_crafted_cifar_pickles_run_no_code(tmp_path, verify_checksums):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "ran.txt"
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(pickle.dumps({"data": RunsCode(marker), "fine_labels": [0]}, protocol=2))
    with pytest.raises(QlightError) as info:
        dm = CIFAR100DataModule(data_dir=str(tmp_path), download=False, verify_checksums=verify_checksums)
        dm.prepare_data()
        dm.setup("fit")
    assert not marker.exists() and "\n" not in str(info.value)
    assert "checksums" in str(info.value) if verify_checksums else "is not plain data" in str(info.value)


@pytest.mark.parametrize("label", [-1, 100])
def test_labels_outside_cifar100s_classes_are_refused(tmp_path, label):
    root = write_cifar100(tmp_path)
    path = root / "cifar-100-python" / "test"
    entry = pickle.loads(path.read_bytes(), encoding="latin1")
    entry["fine_labels"][5] = label
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(QlightError, match="labels outside 0..99") as info:
        load_cifar(root, train=False)
    assert str(label) in str(info.value).split("labels outside 0..99")[1]


def test_validation_split_is_seeded(cifar_dir):
    def val_labels(seed):
        dm = CIFAR100DataModule(data_dir=str(cifar_dir), val_size=16, seed=seed, verify_checksums=False)
        dm.setup("fit")
        return dm.val_set.tensors[1]

    assert torch.equal(val_labels(0), val_labels(0))
    assert not torch.equal(val_labels(0), val_labels(1))


def test_real_checksums_reject_a_subset(cifar_dir):
    with pytest.raises(QlightError, match="verify_checksums"):
        ensure_cifar(cifar_dir, download=False, verify_checksums=True)


def test_offline_without_dataset_says_where_to_put_it(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(cifar_module, "download_url", no_network)
    with pytest.raises(QlightError) as info:
        ensure_cifar(tmp_path, download=True)
    message = str(info.value)
    assert "could not be downloaded" in message and "cifar-100-python.tar.gz" in message
    assert "configs/smoke.yaml" in message and "\n" not in message


def test_corrupt_archive_is_reported_and_kept(tmp_path):
    archive = tmp_path / "cifar-100-python.tar.gz"
    archive.write_bytes(b"not a tarball")
    with pytest.raises(QlightError, match="corrupt"):
        ensure_cifar(tmp_path, download=True)
    assert archive.read_bytes() == b"not a tarball"


def test_device_augmentation_shapes_range_and_seed():
    images, _ = synthetic_images(8, 10, seed=0)
    a = random_crop_flip(images, generator=torch.Generator().manual_seed(1))
    b = random_crop_flip(images, generator=torch.Generator().manual_seed(1))
    c = random_crop_flip(images, generator=torch.Generator().manual_seed(2))
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    out = normalize(a)
    assert out.dtype == torch.float32 and -3 < out.mean() < 3 and out.abs().max() < 5


def test_crop_flip_is_a_translation_or_mirror():
    image = torch.arange(3 * 32 * 32, dtype=torch.int32).reshape(1, 3, 32, 32)
    for seed in range(10):
        out = random_crop_flip(image, padding=4, generator=torch.Generator().manual_seed(seed))[0]
        candidates = []
        padded = torch.nn.functional.pad(image[0], (4, 4, 4, 4))
        for dy in range(9):
            for dx in range(9):
                crop = padded[:, dy : dy + 32, dx : dx + 32]
                candidates += [crop, crop.flip(2)]
        assert any(torch.equal(out, c) for c in candidates)


def test_synthetic_classes_share_structure():
    images, labels = synthetic_images(400, 4, seed=0)
    means = torch.stack([images[labels == k].float().mean(0) for k in range(4)])
    within = (images[labels == 0].float() - means[0]).pow(2).mean()
    between = (means[0] - means[1]).pow(2).mean()
    assert between > 0.5 * within  # class means differ by much more than noise averaged over ~100 images


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    def epoch(seed, number):
        shard = EpochShard(100, seed, torch.device("cpu"))
        shard.set_epoch(number)
        return shard.indices()

    assert sorted(epoch(0, 0).tolist()) == list(range(100))
    assert torch.equal(epoch(0, 3), epoch(0, 3))
    assert not torch.equal(epoch(0, 0), epoch(0, 1)) and not torch.equal(epoch(0, 0), epoch(1, 0))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_draw_disjoint_shards_of_equal_size(world_size):
    shards = [EpochShard(100, 0, torch.device("cpu"), rank, world_size).indices() for rank in range(world_size)]
    drawn = torch.cat(shards)
    assert {len(s) for s in shards} == {100 // world_size}
    assert len(set(drawn.tolist())) == len(drawn)  # disjoint
    # The shards are the rank-strided slices of the one permutation every rank draws.
    order = EpochShard(100, 0, torch.device("cpu")).indices()
    assert all(torch.equal(s, order[r : len(s) * world_size : world_size]) for r, s in enumerate(shards))


def test_training_batches_are_gathered_from_the_data_on_the_trainers_device():
    dm = CIFAR100DataModule(batch_size=16, val_size=16, synthetic=True, synthetic_train_size=116)
    device = SimpleNamespace(root_device=torch.device("cpu"))
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, strategy=device, state=SimpleNamespace(fn="fit"))
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 50 // 16  # rank 1's 50 of 100 images, whole batches only
    images, labels = dm.train_set.tensors
    for x, y in batches:  # each batch is the images of its labels' indices, in the epoch's shard
        assert x.dtype == torch.uint8 and x.shape == (16, 3, 32, 32) and y.shape == (16,)
    shard = loader.sampler.indices()
    assert torch.equal(batches[1][0], images[shard[16:32]]) and torch.equal(batches[1][1], labels[shard[16:32]])
    # Evaluation batches are views of the placed test tensors: nothing copied per batch.
    test_images = dm._on(dm.test_set, "test")[0]
    first = next(iter(dm.test_dataloader()))[0]
    assert first.untyped_storage().data_ptr() == test_images.untyped_storage().data_ptr()


def test_cpu_workers_path_when_not_augmenting_on_the_device():
    dm = CIFAR100DataModule(
        batch_size=8, val_size=8, synthetic=True, synthetic_train_size=40, augment_on_device=False, num_workers=0
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    images, labels = next(iter(loader))
    assert isinstance(loader, DataLoader) and images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8


def test_data_that_does_not_fit_on_the_device_says_how_to_go_on(monkeypatch):
    def out_of_memory(tensor, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 150.00 MiB")

    monkeypatch.setattr(torch.Tensor, "to", out_of_memory)
    with pytest.raises(QlightError) as info:
        to_device((torch.zeros(10, dtype=torch.uint8),), torch.device("cpu"), "the training images")
    assert "--data.augment_on_device false" in str(info.value) and "\n" not in str(info.value)


class RecordLabels(Callback):
    def __init__(self) -> None:
        self.labels: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.append(batch[1].tolist())


def _fit(root, ckpt_path=None, callbacks=()):
    record = RecordLabels()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record, *callbacks],
        default_root_dir=root,
    )
    data = CIFAR100DataModule(batch_size=16, val_size=16, synthetic=True, synthetic_train_size=144)
    model = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 100)), lr=0.01)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return record.labels


def test_a_run_resumed_mid_epoch_or_at_its_end_continues_the_same_order(tmp_path):
    every_4 = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full = _fit(tmp_path / "a", callbacks=[every_4])  # 8 batches per epoch, 24 steps
    assert len(full) == 24 and full[:8] != full[8:16]
    for step in (4, 12, 8):  # mid-epoch 0, mid-epoch 1, the end of epoch 0
        resumed = _fit(tmp_path / f"b{step}", ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt")
        assert resumed == full[step:], step
