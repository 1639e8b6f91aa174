"""qlight: quantization studies of image classifiers with PyTorch Lightning and torchao."""

from qlight.classifier import ImageClassifier
from qlight.data import CIFAR100DataModule
from qlight.errors import QlightError
from qlight.models import vgg11_bn
from qlight.quantization import PostTrainingQuantization, QuantizationAwareTraining, load_quantized

__all__ = [
    "CIFAR100DataModule",
    "ImageClassifier",
    "PostTrainingQuantization",
    "QlightError",
    "QuantizationAwareTraining",
    "load_quantized",
    "vgg11_bn",
]
