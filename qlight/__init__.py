"""qlight: quantization studies of image classifiers with PyTorch Lightning and torchao."""

from importlib.metadata import PackageNotFoundError, version

from qlight.classifier import ImageClassifier
from qlight.data import CIFAR10DataModule, CIFAR100DataModule, ImageFolderDataModule
from qlight.errors import QlightError
from qlight.models import vgg11_bn
from qlight.quantization import (
    BEST_METHOD,
    LayerSensitivity,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    StaticQuantizationAwareTraining,
    load_quantized,
)

try:
    __version__ = version("qlight")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "BEST_METHOD",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "ImageClassifier",
    "LayerSensitivity",
    "PostTrainingQuantization",
    "QlightError",
    "QuantizationAwareTraining",
    "StaticQuantizationAwareTraining",
    "__version__",
    "load_quantized",
    "vgg11_bn",
]
