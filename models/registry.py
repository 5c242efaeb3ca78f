"""Named reference models in two sizes, so tools can enumerate and build them.

"full" is the real configuration (224x224 images, 128-token sequences);
"small" is a scaled-down variant that runs in well under a second on 2 CPU cores.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .bert import bert_small
from .digits import digits_data, trained_digits_cnn
from .mobilenet import SMALL_BLOCKS, mobilenet_v2
from .resnet import resnet18
from .vit import vit_tiny

SIZES = ("small", "full")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple]
    description: str
    has_labels: bool = False  # True when digits_data() supplies matching labels


def _gen() -> torch.Generator:
    # A fresh generator per call keeps example inputs identical on every call.
    return torch.Generator().manual_seed(0)


def _images(batch: int, size: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(batch, 3, size, size, generator=_gen()),)


def _tokens(batch: int, seq: int, vocab: int) -> Callable[[], tuple]:
    return lambda: (torch.randint(0, vocab, (batch, seq), generator=_gen()),)


def _digits(batch: int) -> Callable[[], tuple]:
    return lambda: (digits_data()[2][:batch],)


def _trained_digits() -> nn.Module:
    # The trained model is cached and shared; hand out a copy so passes that
    # rewrite modules in place cannot corrupt the cache.
    return copy.deepcopy(trained_digits_cnn())


_SPECS: dict[str, dict[str, ModelSpec]] = {
    "resnet18": {
        "full": ModelSpec("resnet18", resnet18, _images(1, 224), "ResNet-18, 224x224, 1000 classes"),
        "small": ModelSpec(
            "resnet18",
            lambda: resnet18(width=16, num_classes=10),
            _images(2, 32),
            "ResNet-18 width 16, 32x32, 10 classes",
        ),
    },
    "mobilenet_v2": {
        "full": ModelSpec("mobilenet_v2", mobilenet_v2, _images(1, 224), "MobileNetV2 1.0, 224x224, 1000 classes"),
        "small": ModelSpec(
            "mobilenet_v2",
            lambda: mobilenet_v2(width_mult=0.35, num_classes=10, blocks=SMALL_BLOCKS),
            _images(2, 32),
            "MobileNetV2 0.35 with fewer blocks, 32x32, 10 classes",
        ),
    },
    "vit_tiny": {
        "full": ModelSpec("vit_tiny", vit_tiny, _images(1, 224), "ViT-Tiny/16, 224x224, 1000 classes"),
        "small": ModelSpec(
            "vit_tiny",
            lambda: vit_tiny(image_size=32, patch=8, dim=64, depth=2, heads=4, num_classes=10),
            _images(2, 32),
            "ViT dim 64 depth 2 heads 4, patch 8, 32x32, 10 classes",
        ),
    },
    "bert_small": {
        "full": ModelSpec("bert_small", bert_small, _tokens(1, 128, 30522), "BERT hidden 384 x 6 layers, seq 128, 2 classes"),
        "small": ModelSpec(
            "bert_small",
            lambda: bert_small(vocab=1000, hidden=64, layers=2, heads=4, ffn=128),
            _tokens(2, 16, 1000),
            "BERT hidden 64 x 2 layers, vocab 1000, seq 16, 2 classes",
        ),
    },
    "digits_cnn": {
        "full": ModelSpec("digits_cnn", _trained_digits, _digits(64), "trained digits CNN, 8x8, batch 64", True),
        "small": ModelSpec("digits_cnn", _trained_digits, _digits(8), "trained digits CNN, 8x8, batch 8", True),
    },
}


def names() -> list[str]:
    return list(_SPECS)


def get(name: str, size: str = "small") -> ModelSpec:
    if name not in _SPECS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(_SPECS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    return _SPECS[name][size]


# ----------------------------------------------------------------------------- dynamic models
# Models with data-dependent control flow (compile them with passes=["split_branches", ...]). Kept
# apart from names()/get() so tools that enumerate the static models are unaffected.


def dynamic_names() -> list[str]:
    from .dynamic import DYNAMIC_SPECS

    return list(DYNAMIC_SPECS)


def get_dynamic(name: str):
    """The DynamicModelSpec of a dynamic reference model (see fxpress.models.dynamic)."""
    from .dynamic import DYNAMIC_SPECS

    if name not in DYNAMIC_SPECS:
        raise KeyError(f"unknown dynamic model {name!r}; known: {', '.join(DYNAMIC_SPECS)}")
    return DYNAMIC_SPECS[name]
