"""SplitQuant (Song & Lin, 2025): split a layer's weights into lower / middle / upper clusters.

k-means (k = 3, on the scalar weight values of the layer) partitions the weights; the layer becomes
three layers with the same input whose weights are the original ones masked to one cluster each
(zeros elsewhere). Their sum is the original layer exactly, but each part gets its own quantization
scales: the bulk of the weights (middle cluster) no longer shares a scale with the outliers, so it
keeps resolution at low bit widths.

Here the three parts never become three layers at run time: they are the ``C = 3`` weight clusters of
one ``fxpress::qlinear`` / ``qconv2d`` (``w[c]``, ``w_scale[c]``), which every backend computes as one
kernel — three integer GEMMs sharing the quantized input, summed in the float epilogue.
"""
from __future__ import annotations

import math

import torch

__all__ = ["kmeans_1d", "cluster_masks"]


def kmeans_1d(values: torch.Tensor, k: int = 3, iters: int = 100, max_points: int = 1 << 20) -> torch.Tensor:
    """Sorted cluster centres of 1-D k-means (Lloyd's algorithm).

    Lloyd's algorithm finds a local optimum that depends on where it starts: from quantiles it splits
    the bulk of a bell-shaped layer into thirds and leaves rare outliers inside the outer thirds; from
    the extremes it gives the outliers clusters of their own. Both starts (and a mix) are run and the
    partition with the smallest within-cluster sum of squares (the k-means objective) is kept. In one
    dimension the clusters are intervals, so assignment is a threshold search on the centres' midpoints.
    Deterministic: a fixed-seed subsample is used above ``max_points`` values.
    """
    v = values.detach().double().reshape(-1)
    if v.numel() > max_points:
        v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:max_points]]
    v, _ = torch.sort(v)
    if v.numel() == 0:
        return torch.zeros(k, dtype=torch.float64)
    q = torch.tensor([(2 * i + 1) / (2 * k) for i in range(k)], dtype=torch.float64)
    quant = torch.quantile(v, q) if v.numel() < (1 << 24) else v[(q * (v.numel() - 1)).long()]
    ends = torch.linspace(float(v[0]), float(v[-1]), k, dtype=torch.float64)
    ends[k // 2] = v[v.numel() // 2] if k % 2 else ends[k // 2]
    cs = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(v, 0)])
    cs2 = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(v * v, 0)])
    best, best_sse = None, math.inf
    for init in (quant, ends, (quant + ends) / 2):
        centres, sse = _lloyd(v, cs, cs2, torch.sort(init).values, iters)
        if sse < best_sse:
            best, best_sse = centres, sse
    return best


def _lloyd(v: torch.Tensor, cs: torch.Tensor, cs2: torch.Tensor, centres: torch.Tensor,
           iters: int) -> tuple[torch.Tensor, float]:
    """Lloyd iterations on sorted ``v`` with prefix sums (O(k log n) per step); returns (centres, SSE)."""
    n = v.numel()
    for _ in range(iters + 1):
        cuts = torch.searchsorted(v, (centres[1:] + centres[:-1]) / 2)
        lo = torch.cat([torch.zeros(1, dtype=torch.long), cuts])
        hi = torch.cat([cuts, torch.tensor([n])])
        cnt = (hi - lo).double()
        s1 = cs[hi] - cs[lo]
        new = torch.where(cnt > 0, s1 / cnt.clamp_min(1), centres)
        sse = float((cs2[hi] - cs2[lo] - torch.where(cnt > 0, s1 * s1 / cnt.clamp_min(1), torch.zeros_like(s1))).sum())
        new = torch.sort(new).values
        if torch.allclose(new, centres, rtol=0, atol=1e-12):
            break
        centres = new
    return centres, sse


def cluster_masks(w: torch.Tensor, k: int = 3) -> list[torch.Tensor]:
    """Boolean masks (same shape as ``w``), lower → upper, that partition ``w`` by 1-D k-means."""
    centres = kmeans_1d(w, k)
    bounds = ((centres[1:] + centres[:-1]) / 2).to(torch.float64)
    idx = torch.bucketize(w.detach().double(), bounds)
    return [idx == c for c in range(k)]
