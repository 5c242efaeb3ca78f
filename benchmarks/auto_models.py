"""Three small models trained here in seconds on datasets that ship inside scikit-learn (no download).

- ``digits_cnn``: fxpress.models' digits CNN (conv 16, conv 32, two Linears), trained by
  ``models.digits.trained_digits_cnn`` on sklearn's 8x8 digits (weights cached under ~/.cache/fxpress).
- ``digits_transformer``: a 2-layer pre-norm transformer encoder that reads the 8 rows of a digits image as
  8 tokens of 8 pixels (d_model 128, 4 heads, FFN 256, mean-pooled), trained here on the same split.
- ``cancer_mlp``: a 4-layer MLP (30 -> 512 -> 512 -> 512 -> 2) on sklearn's breast-cancer table
  (standardized features), trained here.

Every model's weights come from the training loops below (seeded, single-threaded, deterministic);
``split()`` gives (train, search, held_out) where the search half is what passes="auto" evaluates on and
held_out is never shown to it.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class DigitsTransformer(nn.Module):
    def __init__(self, d: int = 128, heads: int = 4, ff: int = 256, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(1, 8, d))
        self.blocks = nn.Sequential(*(Block(d, heads, ff) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):  # x: [B, 1, 8, 8] -> 8 tokens (rows) of 8 pixels
        h = self.blocks(self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos)
        return self.head(self.norm(h).mean(dim=1))


def cancer_mlp_module() -> nn.Module:
    return nn.Sequential(nn.Linear(30, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 2))


@torch.inference_mode(False)
@torch.enable_grad()
def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 2e-3, seed: int = 0) -> nn.Module:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=g).split(32):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _halves(x, y):
    h = len(x) // 2
    return (x[:h], y[:h]), (x[h:], y[h:])


def digits_cnn():
    from fxpress.models import digits_data, trained_digits_cnn
    import copy

    xtr, ytr, xte, yte = digits_data()
    return copy.deepcopy(trained_digits_cnn()), (xtr, ytr), *_halves(xte, yte)


def digits_transformer():
    from fxpress.models import digits_data

    xtr, ytr, xte, yte = digits_data()
    torch.manual_seed(0)
    model = train(DigitsTransformer(), xtr, ytr, epochs=25)
    return model, (xtr, ytr), *_halves(xte, yte)


def cancer_mlp():
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    xs, ys = load_breast_cancer(return_X_y=True)
    x, y = torch.tensor(xs, dtype=torch.float32), torch.tensor(ys)
    itr, ite = train_test_split(torch.arange(len(y)).numpy(), test_size=0.4, random_state=0, stratify=ys)
    mu, sd = x[itr].mean(0), x[itr].std(0) + 1e-6
    x = (x - mu) / sd
    torch.manual_seed(0)
    model = train(cancer_mlp_module(), x[itr], y[itr], epochs=30, lr=1e-3)
    return model, (x[itr], y[itr]), *_halves(x[ite], y[ite])


MODELS = {"digits_cnn": digits_cnn, "digits_transformer": digits_transformer, "cancer_mlp": cancer_mlp}
