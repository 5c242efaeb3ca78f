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

import torch

__all__ = ["kmeans_1d", "cluster_masks"]


def kmeans_1d(values: torch.Tensor, k: int = 3, iters: int = 100, max_points: int = 1 << 20) -> torch.Tensor:
    """Sorted cluster centres of 1-D k-means (Lloyd's algorithm, quantile initialisation).

    In one dimension the clusters are intervals, so assignment is a threshold search on the centres'
    midpoints. Deterministic: a fixed-seed subsample is used above ``max_points`` values.
    """
    v = values.detach().double().reshape(-1)
    if v.numel() > max_points:
        v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:max_points]]
    v, _ = torch.sort(v)
    if v.numel() == 0:
        return torch.zeros(k, dtype=torch.float64)
    q = torch.tensor([(2 * i + 1) / (2 * k) for i in range(k)], dtype=torch.float64)
    centres = torch.quantile(v, q) if v.numel() < (1 << 24) else v[(q * (v.numel() - 1)).long()]
    for _ in range(iters):
        bounds = (centres[1:] + centres[:-1]) / 2
        idx = torch.bucketize(v, bounds)
        new = centres.clone()
        for c in range(k):
            sel = v[idx == c]
            if sel.numel():
                new[c] = sel.mean()
        if torch.allclose(new, centres, rtol=0, atol=1e-12):
            break
        centres = torch.sort(new).values
    return centres


def cluster_masks(w: torch.Tensor, k: int = 3) -> list[torch.Tensor]:
    """Boolean masks (same shape as ``w``), lower → upper, that partition ``w`` by 1-D k-means."""
    centres = kmeans_1d(w, k)
    bounds = ((centres[1:] + centres[:-1]) / 2).to(torch.float64)
    idx = torch.bucketize(w.detach().double(), bounds)
    return [idx == c for c in range(k)]
