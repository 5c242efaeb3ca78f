"""Calibration observers (activation ranges), the interpreter that feeds them (``Tap``), and weight
clipping for the quantize pass.

Activations are quantized per tensor, asymmetric (uint8 by default). An observer sees every
calibration batch of one tensor and proposes a clipping range [lo, hi] (always holding 0, so real
zero — ReLU outputs, conv padding — is exactly representable):

* ``minmax``     the smallest and largest value seen.
* ``percentile`` the ``percentile``-th / (100 - ``percentile``)-th percentiles of the values seen
                 (outliers clipped).
* ``mse``        the range minimising the mean squared quantize→dequantize error over the values
                 seen (grid search over shrunk min-max ranges; the optimum trades rounding error
                 against clipping error).

Percentile and MSE work on a bounded uniform sample of the values (``max_samples`` per tensor,
every batch contributes) plus the exact min/max, so memory stays flat for any calibration size.

Weights are quantized per output channel, symmetric (``[-qmax, qmax]``). ``weight_clip`` returns a
clipping magnitude per channel: the channel's max |w| (``minmax``) or the MSE-optimal one (``mse``).
"""
from __future__ import annotations

import math

import torch
from torch import fx

from ..graph import is_inplace
from .ops import qparams_asym

ACT_OBSERVERS = ("minmax", "percentile", "mse")
WEIGHT_CLIPS = ("minmax", "mse")


class Observer:
    """Collects statistics of one activation tensor over calibration batches."""

    def __init__(self, method: str = "minmax", percentile: float = 99.99, max_samples: int = 1 << 18,
                 qmin: int = 0, qmax: int = 255, seed: int = 0):
        if method not in ACT_OBSERVERS:
            raise ValueError(f"unknown activation observer {method!r}; choose one of {', '.join(ACT_OBSERVERS)}")
        self.method, self.percentile, self.max_samples = method, float(percentile), int(max_samples)
        self.qmin, self.qmax = qmin, qmax
        self.lo, self.hi = math.inf, -math.inf
        self.count = 0
        self._samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if not x.numel():
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("calibration produced non-finite activations (inf/nan); check the calibration inputs")
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.count += x.numel()
        if self.method != "minmax":
            per_batch = max(1, self.max_samples // 8)
            if x.numel() > per_batch:
                x = x[torch.randint(0, x.numel(), (per_batch,), generator=self._gen)]
            self._samples.append(x)
            total = sum(s.numel() for s in self._samples)
            if total > self.max_samples:  # thin uniformly: keep every batch represented
                merged = torch.cat(self._samples)
                keep = torch.randperm(merged.numel(), generator=self._gen)[: self.max_samples]
                self._samples = [merged[keep]]

    @property
    def seen(self) -> bool:
        return self.count > 0

    def samples(self) -> torch.Tensor:
        return torch.cat(self._samples) if self._samples else torch.tensor([self.lo, self.hi])

    def range(self) -> tuple[float, float]:
        """The clipping range [lo, hi] (holds 0)."""
        if not self.seen:
            raise ValueError("observer saw no data")
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if self.method == "minmax":
            return lo, hi
        s = self.samples()
        if self.method == "percentile":
            q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0], dtype=torch.float64)
            plo, phi = torch.quantile(s.double(), q).tolist()
            return min(plo, 0.0), max(phi, 0.0)
        return mse_range(s, lo, hi, self.qmin, self.qmax)

    def qparams(self) -> tuple[float, int, tuple[float, float]]:
        lo, hi = self.range()
        scale, zp = qparams_asym(lo, hi, self.qmin, self.qmax)
        return scale, zp, (lo, hi)


def fake_quant_asym(x: torch.Tensor, scale: float, zp: int, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale


def mse_range(samples: torch.Tensor, lo: float, hi: float, qmin: int, qmax: int,
              steps: int = 100, min_ratio: float = 0.05) -> tuple[float, float]:
    """[lo', hi'] = r·[lo, hi] (r in [min_ratio, 1], each end shrunk independently on a coarse grid) with
    the smallest quantization MSE over ``samples``."""
    if hi <= lo:
        return lo, hi
    x = samples.float()
    if x.numel() > (1 << 16):
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 16]]
    ratios = torch.linspace(min_ratio, 1.0, steps).tolist()
    best, best_err = (lo, hi), math.inf
    # Shrink both ends together first, then refine each end on its own around the best.
    for r in ratios:
        l, h = lo * r, hi * r
        err = _qerr(x, l, h, qmin, qmax)
        if err < best_err:
            best, best_err = (l, h), err
    l0, h0 = best
    for rl in torch.linspace(0.6, 1.4, 9).tolist():
        for rh in torch.linspace(0.6, 1.4, 9).tolist():
            l, h = max(lo, l0 * rl), min(hi, h0 * rh)
            if h <= l:
                continue
            err = _qerr(x, l, h, qmin, qmax)
            if err < best_err:
                best, best_err = (l, h), err
    return best


def _qerr(x: torch.Tensor, lo: float, hi: float, qmin: int, qmax: int) -> float:
    scale, zp = qparams_asym(lo, hi, qmin, qmax)
    return float(((fake_quant_asym(x, scale, zp, qmin, qmax) - x) ** 2).mean())


# ----------------------------------------------------------------------------- weights

def code_range(w: torch.Tensor, qmax: int, mask: torch.Tensor | None = None,
               one_sided: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-output-channel integer code range (lo, hi) and the number of steps the clip spans (levels).

    Symmetric: ``[-qmax, qmax]``, levels = qmax. With ``one_sided`` (SplitQuant's outer clusters), a
    channel whose selected weights all have one sign uses every code on that side instead:
    ``[0, 2·qmax+1]`` or ``[-(2·qmax+1), 0]`` (capped at 127, the int8 container) — a 4-bit code
    then has 15 steps over the cluster instead of 7, and 0 (the masked weights) stays exact.
    """
    flat = w.detach().reshape(w.shape[0], -1)
    n = w.shape[0]
    lo = torch.full((n,), -qmax, dtype=torch.float32)
    hi = torch.full((n,), qmax, dtype=torch.float32)
    levels = torch.full((n,), qmax, dtype=torch.float32)
    if one_sided:
        m = mask.reshape(n, -1) if mask is not None else torch.ones_like(flat, dtype=torch.bool)
        wide = float(min(2 * qmax + 1, 127))
        pos = (torch.where(m, flat, torch.zeros_like(flat)) >= 0).all(1)
        neg = (torch.where(m, flat, torch.zeros_like(flat)) <= 0).all(1) & ~pos
        lo = torch.where(pos, torch.zeros_like(lo), torch.where(neg, torch.full_like(lo, -wide), lo))
        hi = torch.where(neg, torch.zeros_like(hi), torch.where(pos, torch.full_like(hi, wide), hi))
        levels = torch.where(pos | neg, torch.full_like(levels, wide), levels)
    return lo, hi, levels


def weight_clip(w: torch.Tensor, qmax: int, method: str = "minmax", mask: torch.Tensor | None = None,
                grid: int = 40, one_sided: bool = False) -> torch.Tensor:
    """Per-output-channel clipping magnitude (dim 0 is the output channel).

    ``mask`` (same shape as w, bool) restricts the statistics to the weights it selects (a SplitQuant
    cluster); channels with no selected weight get 0. ``one_sided``: see ``code_range``.
    """
    if method not in WEIGHT_CLIPS:
        raise ValueError(f"unknown weight clipping {method!r}; choose one of {', '.join(WEIGHT_CLIPS)}")
    flat = w.detach().float().reshape(w.shape[0], -1)
    m = mask.reshape(w.shape[0], -1) if mask is not None else torch.ones_like(flat, dtype=torch.bool)
    a = torch.where(m, flat.abs(), torch.zeros_like(flat))
    amax = a.max(dim=1).values
    if method == "minmax":
        return amax
    lo, hi, levels = code_range(w, qmax, mask, one_sided)
    # MSE: per channel, try clip = r * amax on a grid and keep the r with the least squared error.
    best = amax.clone()
    best_err = _wqerr(flat, m, amax, lo, hi, levels)
    lo_ratio = 0.2 if qmax <= 7 else 0.5
    for r in torch.linspace(lo_ratio, 1.0, grid)[:-1].tolist():
        clip = amax * r
        err = _wqerr(flat, m, clip, lo, hi, levels)
        better = err < best_err
        best = torch.where(better, clip, best)
        best_err = torch.where(better, err, best_err)
    return best


def _wqerr(flat, mask, clip, lo, hi, levels) -> torch.Tensor:
    scale = torch.where(clip > 0, clip / levels, torch.ones_like(clip))[:, None]
    q = torch.maximum(torch.minimum(torch.round(flat / scale), hi[:, None]), lo[:, None]) * scale
    return (((q - flat) ** 2) * mask).sum(1)


def quantize_weight(w: torch.Tensor, clip: torch.Tensor, qmax: int, mask: torch.Tensor | None = None,
                    one_sided: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 scale per output channel); zero where ``mask`` is False.

    Codes lie in ``[-qmax, qmax]``, or on one side up to ``2·qmax+1`` for ``one_sided`` clusters.
    """
    lo, hi, levels = code_range(w, qmax, mask, one_sided)
    scale = torch.where(clip > 0, clip / levels, torch.ones_like(clip)).float()
    shape = [-1] + [1] * (w.dim() - 1)
    q = torch.round(w.detach().float() / scale.reshape(shape))
    q = torch.maximum(torch.minimum(q, hi.reshape(shape)), lo.reshape(shape))
    if mask is not None:
        q = torch.where(mask, q, torch.zeros_like(q))
    return q.to(torch.int8), scale


# ----------------------------------------------------------------------------- calibration runs

class Tap(fx.Interpreter):
    """Runs the graph and shows the outputs of chosen nodes to their observers.

    A tensor written in place after it is made (``h.add_(1.0)``) is observed where its quantized consumers
    read it instead, since that is the value they quantize."""

    def __init__(self, gm, observers: dict[str, Observer], keep_names: set[str], first: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.observers, self.keep_names, self.first = observers, keep_names, first
        self.keep = False
        self.mutated = mutated_sources(gm, set(observers))
        # consumer node -> the mutated sources it reads
        self.late = {u: [s for s in self.mutated if s in {a.name for a in u.all_input_nodes}]
                     for n in gm.graph.nodes if n.name in self.mutated for u in n.users if not is_inplace(gm, u)}

    def run_node(self, n: fx.Node):
        for src in self.late.get(n, ()):
            self._see(src, self.env[next(a for a in n.all_input_nodes if a.name == src)])
        out = super().run_node(n)
        if n.name in self.observers and n.name not in self.mutated:
            self._see(n.name, out)
        return out

    def _see(self, name: str, out) -> None:
        if isinstance(out, torch.Tensor):
            self.observers[name].observe(out)
            if self.keep and name in self.keep_names and name not in self.first:
                self.first[name] = out.detach().clone()


def mutated_sources(gm: fx.GraphModule, names: set[str]) -> set[str]:
    """Names among ``names`` whose tensor some node writes in place."""
    return {n.name for n in gm.graph.nodes if n.name in names and any(is_inplace(gm, u) for u in n.users)}
