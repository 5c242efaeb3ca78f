"""A tiny CNN on scikit-learn's 8x8 digits: a model with real labels, so
compiler passes can be checked for accuracy and not just closeness."""

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ._seed import seeded

# Bump when the architecture or training recipe changes so stale disk caches
# are never loaded into a different model.
_RECIPE = "v1"
_BATCH = 32
_LR = 3e-3


def digits_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images [N, 1, 8, 8] in [0, 1], int64 labels.

    A stratified 75/25 split, fixed for a given seed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # pixels are 0..16
    y = torch.tensor(labels, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed, stratify=y.numpy()
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def digits_cnn(seed: int = 0) -> nn.Sequential:
    """Untrained digits CNN, seeded init, in eval mode."""
    with seeded(seed):
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(64, 10),
        )
    return model.eval()


def _cache_path(seed: int, epochs: int) -> Path:
    root = os.environ.get("FXPRESS_CACHE_DIR") or Path.home() / ".cache" / "fxpress"
    return Path(root) / f"digits_cnn-{_RECIPE}-seed{seed}-epochs{epochs}.pt"


# Callers may build models under no_grad or inference_mode (e.g. a registry
# build inside an evaluation loop); training needs autograd regardless.
@torch.inference_mode(False)
@torch.enable_grad()
def _train(seed: int, epochs: int) -> nn.Sequential:
    x, y, _, _ = digits_data(seed)
    model = digits_cnn(seed)
    threads = torch.get_num_threads()
    # One thread makes the float reductions, and so the weights, identical on
    # every machine; the model is small enough that this costs little.
    torch.set_num_threads(1)
    try:
        with seeded(seed):  # dropout draws from the global generator
            order = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(model.parameters(), lr=_LR)
            model.train()
            for _ in range(epochs):
                for idx in torch.randperm(len(y), generator=order).split(_BATCH):
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _save_atomic(state: dict, path: Path) -> None:
    # Write beside the target then rename, so a crash or a concurrent process
    # never sees a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=None)
def trained_digits_cnn(seed: int = 0, epochs: int = 10) -> nn.Sequential:
    """Digits CNN trained on ``digits_data(seed)``'s train split, in eval mode.

    Cached per process (the same module object is returned: deep-copy it
    before mutating) and on disk under $FXPRESS_CACHE_DIR or ~/.cache/fxpress.
    """
    path = _cache_path(seed, epochs)
    if path.exists():
        model = digits_cnn(seed)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = _train(seed, epochs)
    _save_atomic(model.state_dict(), path)
    return model


@torch.no_grad()
def accuracy(
    model_or_callable: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of a module or any callable mapping an input batch to logits."""
    correct = 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        correct += (model_or_callable(xb).argmax(dim=1) == yb).sum().item()
    return correct / len(y)
