import urllib.error

import pytest
import torch

from qlight.data import (
    CIFAR100DataModule,
    ensure_cifar100,
    load_cifar100,
    normalize,
    random_crop_flip,
    synthetic_images,
)
from qlight.data import cifar100 as cifar_module
from qlight.errors import QlightError


def test_reads_cifar100_format_through_torchvision(cifar_dir):
    dm = CIFAR100DataModule(data_dir=str(cifar_dir), batch_size=16, val_size=16, verify_checksums=False, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 48 and len(dm.val_set) == 16 and len(dm.test_set) == 32
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 32)
    assert labels.dtype == torch.long and int(labels.max()) < 100
    # The same pixels as the pickle: the first test image round-trips through torchvision's layout.
    raw_images, _ = load_cifar100(cifar_dir, train=False, verify_checksums=False)
    assert torch.equal(dm.test_set.tensors[0][0], raw_images[0])


def test_validation_split_is_seeded(cifar_dir):
    def val_labels(seed):
        dm = CIFAR100DataModule(data_dir=str(cifar_dir), val_size=16, seed=seed, verify_checksums=False)
        dm.setup("fit")
        return dm.val_set.tensors[1]

    assert torch.equal(val_labels(0), val_labels(0))
    assert not torch.equal(val_labels(0), val_labels(1))


def test_real_checksums_reject_a_subset(cifar_dir):
    with pytest.raises(QlightError, match="verify_checksums"):
        ensure_cifar100(cifar_dir, download=False, verify_checksums=True)


def test_offline_without_dataset_says_where_to_put_it(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(cifar_module, "download_url", no_network)
    with pytest.raises(QlightError) as info:
        ensure_cifar100(tmp_path, download=True)
    message = str(info.value)
    assert "could not be downloaded" in message and "cifar-100-python.tar.gz" in message
    assert "configs/smoke.yaml" in message and "\n" not in message


def test_corrupt_archive_is_reported_and_kept(tmp_path):
    archive = tmp_path / "cifar-100-python.tar.gz"
    archive.write_bytes(b"not a tarball")
    with pytest.raises(QlightError, match="corrupt"):
        ensure_cifar100(tmp_path, download=True)
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
