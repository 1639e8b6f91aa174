"""A LightningModule that is not qlight's, on scikit-learn's bundled digits (real 8x8 images)."""

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors():
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


def conv_stack(width: int) -> list[nn.Module]:
    """Two 3x3 convs with BatchNorm and ReLU, then a 2x2 max-pool: 1x8x8 digits to 2*width x 4 x 4."""
    return [
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]


class DigitsNet(pl.LightningModule):
    def __init__(self, width: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            *conv_stack(width), nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Linear(64, 10)
        )
        x, y = digits_tensors()
        self.train_data = TensorDataset(x[:1400], y[:1400])
        self.test_data = TensorDataset(x[1400:], y[1400:])

    def forward(self, x, scale: float = 1.0):
        return self.net(x) * scale

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(self.train_data, batch_size=64, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.test_data, batch_size=128)

    def test_dataloader(self):
        return DataLoader(self.test_data, batch_size=128)


class DigitsData(pl.LightningDataModule):
    """The same digits as a DataModule, for qlight's ImageClassifier (10 classes)."""

    num_classes = 10

    def __init__(self, shuffle: bool = True) -> None:
        super().__init__()
        x, y = digits_tensors()
        self.shuffle = shuffle
        self.train_data = TensorDataset(x[:1400], y[:1400])
        self.test_data = TensorDataset(x[1400:], y[1400:])

    def train_dataloader(self):
        return DataLoader(self.train_data, batch_size=64, shuffle=self.shuffle)

    def val_dataloader(self):
        return DataLoader(self.test_data, batch_size=128)

    def test_dataloader(self):
        return DataLoader(self.test_data, batch_size=128)


class DigitsRGB(DigitsData):
    """The digits as 3 x ``size`` x ``size`` images (bilinear), for backbones made for RGB images."""

    def __init__(self, size: int = 16, shuffle: bool = True) -> None:
        super().__init__(shuffle)
        for data in (self.train_data, self.test_data):
            images, labels = data.tensors
            images = nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
            data.tensors = (images.expand(-1, 3, -1, -1).contiguous(), labels)


def trainer(tmp_path, callbacks=(), max_epochs=6, **kwargs):
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=kwargs.pop("devices", 1),
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=kwargs.pop("logger", False),
        **kwargs,
    )


class PooledDigitsNet(DigitsNet):
    """A VGG-like CNN on the digits, four convs and global pooling: its layers are of comparable size
    and unequally fragile, so a bit allocation has room (round-to-nearest int3 loses about 17 points
    at width 4, a per-layer allocation at the same bytes about 3)."""

    def __init__(self, width: int = 4, lr: float = 0.05) -> None:
        super().__init__(width, lr)
        w = width
        self.net = nn.Sequential(
            *conv_stack(w),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, 10),
        )


class DigitsCNN(nn.Module):
    """A user's own backbone for the digits (1x8x8 inputs), built by class path with ``num_classes``."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(*conv_stack(width))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.head(self.features(x))
