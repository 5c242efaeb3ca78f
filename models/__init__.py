"""Reference models in plain torch: seeded, eval mode, traceable by fx and export."""

from .bert import bert_small
from .digits import accuracy, digits_cnn, digits_data, trained_digits_cnn
from .mobilenet import mobilenet_v2
from .registry import ModelSpec, get, names
from .resnet import resnet18
from .vit import vit_tiny

__all__ = [
    "ModelSpec",
    "accuracy",
    "bert_small",
    "digits_cnn",
    "digits_data",
    "get",
    "mobilenet_v2",
    "names",
    "resnet18",
    "trained_digits_cnn",
    "vit_tiny",
]
