"""qlight: quantization studies of image classifiers with PyTorch Lightning and torchao."""

from qlight.classifier import ImageClassifier
from qlight.data import CIFAR100DataModule
from qlight.errors import QlightError
from qlight.models import vgg11_bn

__all__ = ["CIFAR100DataModule", "ImageClassifier", "QlightError", "vgg11_bn"]
