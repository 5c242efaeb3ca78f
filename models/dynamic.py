"""Dynamic reference models: data-dependent Python control flow, for ``split_branches``.

One model per family of dynamic network that DyCL (ISSTA'23) evaluates, plus the two cases DyCL could
not compile (an input-dependent loop, a branch whose sides have different shapes):

- ``early_exit``   Shallow-Deep / BranchyNet: a classifier head after every stage, return as soon as
                   the softmax confidence passes that exit's threshold (an early ``return`` in a loop).
- ``gated_skip``   SkipNet: residual blocks whose gate (a tiny net on the block input) decides per
                   sample whether the block runs (``if`` inside submodules, inlined).
- ``blockdrop``    BlockDrop: a policy net looks at the input once and decides which blocks to drop.
- ``refine_loop``  an iterative refinement that runs until the state is small enough: a ``while`` on a
                   tensor condition, bounded with ``fxpress.bound``.
- ``shape_branch`` a coarse (stride 2, 16 channels) or fine (8 channels) path chosen by the input;
                   the code after the branch sees different shapes on each side.

Weights are seeded; every threshold/gate bias is calibrated at build time on N(0, 1) inputs (the
distribution ``DynamicModelSpec.sample`` draws from) so that random inputs take every path often.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import fxpress

from ._seed import seeded
from .dynamic_families import AttentionDecoder, CounterLoop, GreedyDecoder, RaNet, SampleGate

_CAL = 256  # calibration inputs per decision


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU())


class _Head(nn.Module):
    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


def _randn(n: int, *shape: int, seed: int = 1234) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- early exit

class EarlyExitNet(nn.Module):
    """Three conv stages, an exit head after each; leave at the first exit whose confidence (max softmax
    probability, the least confident sample of the batch) passes its threshold."""

    def __init__(self, width: int = 8, num_classes: int = 10, seed: int = 0):
        super().__init__()
        with seeded(seed):
            self.stages = nn.ModuleList([_conv(3, width), _conv(width, width), _conv(width, width)])
            self.exits = nn.ModuleList([_Head(width, num_classes) for _ in range(3)])
        self.thresholds = [1.0, 1.0]
        self._calibrate()
        self.eval()

    def forward(self, x):
        for i in range(len(self.stages)):
            x = self.stages[i](x)
            logits = self.exits[i](x)
            if i < len(self.thresholds):
                conf = torch.softmax(logits, dim=1).max(dim=1).values.min()
                if conf > self.thresholds[i]:
                    return logits
        return logits

    @torch.no_grad()
    def _calibrate(self):
        x = _randn(_CAL, 3, 8, 8)
        alive = torch.ones(_CAL, dtype=torch.bool)
        for i in range(len(self.thresholds)):
            x = self.stages[i](x)
            conf = torch.softmax(self.exits[i](x), dim=1).max(dim=1).values
            # a third of all inputs leaves at each exit
            q = 1.0 - 1.0 / (len(self.thresholds) + 1 - i)
            self.thresholds[i] = float(torch.quantile(conf[alive], q))
            alive &= conf <= self.thresholds[i]


# ----------------------------------------------------------------------------- SkipNet

class GatedBlock(nn.Module):
    """A residual block that runs only when its gate says so (SkipNet); per sample at batch 1."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1))
        self.gate = nn.Linear(width, 1)

    def forward(self, x):
        g = torch.sigmoid(self.gate(x.mean(dim=(2, 3))))
        if g > 0.5:
            x = torch.relu(x + self.body(x))
        return x


class GatedSkipNet(nn.Module):
    # seed 2: the two gates are close to independent on N(0, 1) inputs (each of the 4 paths ~20-30%)
    def __init__(self, width: int = 8, blocks: int = 2, num_classes: int = 10, seed: int = 2):
        super().__init__()
        with seeded(seed):
            self.stem = _conv(3, width)
            self.blocks = nn.ModuleList([GatedBlock(width) for _ in range(blocks)])
            self.head = _Head(width, num_classes)
        self._calibrate()
        self.eval()

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)

    @torch.no_grad()
    def _calibrate(self):
        h = self.stem(_randn(_CAL, 3, 8, 8))
        for blk in self.blocks:
            logit = blk.gate(h.mean(dim=(2, 3)))[:, 0]
            blk.gate.bias -= logit.median()  # half of the samples run the block
            run = (torch.sigmoid(blk.gate(h.mean(dim=(2, 3)))) > 0.5)[:, :, None, None]
            h = torch.where(run, torch.relu(h + blk.body(h)), h)


# ----------------------------------------------------------------------------- BlockDrop

class BlockDropNet(nn.Module):
    """A policy net reads the input once and keeps or drops each residual block (BlockDrop)."""

    def __init__(self, width: int = 8, blocks: int = 2, num_classes: int = 10, seed: int = 0):
        super().__init__()
        with seeded(seed):
            self.policy = nn.Linear(3 * 8 * 8, blocks)
            self.stem = _conv(3, width)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
                                         for _ in range(blocks)])
            self.head = _Head(width, num_classes)
        with torch.no_grad():
            self.policy.bias -= self.policy(_randn(_CAL, 3 * 8 * 8)).median(dim=0).values
        self.eval()

    def forward(self, x):
        keep = torch.sigmoid(self.policy(x.flatten(1))) > 0.5
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            if keep[:, i]:
                h = h + block(h)
        return self.head(h)


# ----------------------------------------------------------------------------- bounded loop

class RefineLoop(nn.Module):
    """Shrink a state with a contraction until its norm is below ``tol`` (input-dependent trip count,
    at most ``max_steps``: the contraction at least halves the norm and the start norm is bounded).
    Returns the decoded state and the number of steps taken."""

    def __init__(self, features: int = 16, dim: int = 16, num_classes: int = 10, max_steps: int = 8,
                 seed: int = 0):
        super().__init__()
        with seeded(seed):
            self.enc = nn.Linear(features, dim)
            self.scale = nn.Linear(features, 1)
            self.cell = nn.Linear(dim, dim, bias=False)
            self.dec = nn.Linear(dim, num_classes)
        with torch.no_grad():
            q, _ = torch.linalg.qr(self.cell.weight)
            self.cell.weight.copy_(q)  # orthogonal: each step scales the norm by 0.5 * tanh(r)/r <= 0.5
            self.scale.weight *= 3.0 / self.scale.weight.norm()
        self.max_steps = max_steps
        # After one step |h| <= 0.5 * sqrt(dim) (tanh is bounded) and every further step at least halves
        # it, so with this tolerance no input needs more than max_steps steps: a true bound.
        self.tol = 0.5 * dim ** 0.5 / 2 ** (max_steps - 1.5)
        self.eval()

    def _start(self, x):
        return torch.tanh(self.enc(x)) * torch.exp(self.scale(x).clamp(-6.0, 3.0))

    def forward(self, x):
        h = self._start(x)
        steps = torch.zeros((), dtype=torch.int64)
        while fxpress.bound(h.norm() > self.tol, max_iter=self.max_steps):
            h = 0.5 * torch.tanh(self.cell(h))
            steps = steps + 1
        return self.dec(h), steps


# ----------------------------------------------------------------------------- different shapes

class ShapeBranchNet(nn.Module):
    """Coarse path (stride 2, 16 channels → 16x4x4) or fine path (8 channels → 8x8x8) by the input's
    mean activation; the pooling head after the branch is written once but sees both shapes."""

    def __init__(self, width: int = 8, num_classes: int = 10, seed: int = 0):
        super().__init__()
        with seeded(seed):
            self.stem = nn.Conv2d(3, width, 3, padding=1)
            self.coarse = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
            self.fine = nn.Conv2d(width, width, 3, padding=1)
            self.head = nn.Linear(4, num_classes)
        with torch.no_grad():
            self.split_at = float(torch.relu(self.stem(_randn(_CAL, 3, 8, 8))).mean(dim=(1, 2, 3)).median())
        self.eval()

    def forward(self, x):
        h = torch.relu(self.stem(x))
        if h.mean() > self.split_at:
            h = torch.relu(self.coarse(h))
        else:
            h = torch.relu(self.fine(h))
        z = h.flatten(1)
        stats = torch.stack([z.mean(1), z.max(1).values, z.std(1), z.abs().mean(1)], dim=1)
        return self.head(stats)


# ----------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class DynamicModelSpec:
    """A dynamic reference model: how to build it, example inputs, fxpress options it needs, and a
    sampler of random inputs (the distribution its thresholds were calibrated on)."""

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple]
    description: str
    sample: Callable[[int], tuple]                     # seed → input tuple (batch 1)
    options: dict = field(default_factory=dict)        # compile(options={"split_branches": options})
    decisions: str = ""                                # what varies between paths


def _img_sampler(seed: int) -> tuple:
    return (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed)),)


def _vec_sampler(seed: int) -> tuple:
    return (torch.randn(1, 16, generator=torch.Generator().manual_seed(seed)),)


def _sampler(*shape: int) -> Callable[[int], tuple]:
    return lambda seed: (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)),)


DYNAMIC_SPECS: dict[str, DynamicModelSpec] = {
    "early_exit": DynamicModelSpec(
        "early_exit", EarlyExitNet, lambda: _img_sampler(0), "3 conv stages, exit after each by confidence",
        _img_sampler, decisions="which of 3 exits"),
    "gated_skip": DynamicModelSpec(
        "gated_skip", GatedSkipNet, lambda: _img_sampler(0), "SkipNet: 2 gated residual blocks",
        _img_sampler, decisions="each block run or skipped (4 paths)"),
    "blockdrop": DynamicModelSpec(
        "blockdrop", BlockDropNet, lambda: _img_sampler(0), "BlockDrop: a policy net drops 2 blocks",
        _img_sampler, decisions="which blocks are kept (4 paths)"),
    "refine_loop": DynamicModelSpec(
        "refine_loop", RefineLoop, lambda: _vec_sampler(0), "while loop until the norm is small, at most 8",
        _vec_sampler, decisions="number of iterations (0..8)"),
    "shape_branch": DynamicModelSpec(
        "shape_branch", ShapeBranchNet, lambda: _img_sampler(0), "coarse 16x4x4 vs fine 8x8x8 path",
        _img_sampler, decisions="coarse or fine path"),
    "greedy_decoder": DynamicModelSpec(
        "greedy_decoder", GreedyDecoder, lambda: _sampler(1, 16)(0), "GRUCell greedy decoding, break at end token",
        _sampler(1, 16), decisions="tokens decoded (1..4)"),
    "counter_loop": DynamicModelSpec(
        "counter_loop", CounterLoop, lambda: _sampler(1, 16)(0), "while y.norm() > tol and i < 4 (int counter)",
        _sampler(1, 16), decisions="iterations (0..4)"),
    "ranet": DynamicModelSpec(
        "ranet", RaNet, lambda: _sampler(1, 3, 16, 16)(0), "RaNet: half resolution first, exit or upsample",
        _sampler(1, 3, 16, 16), decisions="small-resolution exit or full resolution"),
    "sample_gate": DynamicModelSpec(
        "sample_gate", SampleGate, lambda: _sampler(2, 16)(0), "per-sample gate over batch-1 slices (batch 2)",
        _sampler(2, 16), decisions="each sample's block run or skipped (4 paths)"),
    "attn_decoder": DynamicModelSpec(
        "attn_decoder", AttentionDecoder, lambda: _sampler(1, 6, 8)(0),
        "attention decoder growing its output by torch.cat, learned stop", _sampler(1, 6, 8),
        decisions="steps decoded (1..4)"),
}
