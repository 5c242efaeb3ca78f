"""How far a graph's outputs are from a reference: the one error measure every stage, pass and report uses.

A leaf module (torch and fxpress.errors only), so tracing, the pass manager and the passes can all
measure without importing each other.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fxpress.errors import PassError


def output_error(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(max abs error, relative error) over all outputs.

    Relative error is max|y - ref| / max|ref| per output (the worst output wins): robust to
    reference values near zero, where an element-wise ratio would explode.
    """
    if len(outputs) != len(reference):
        raise PassError(f"graph returns {len(outputs)} tensors, the original model {len(reference)}")
    max_abs = max_rel = 0.0
    for y, r in zip(outputs, reference):
        if y.shape != r.shape:
            raise PassError(f"output shape changed: {tuple(y.shape)} vs original {tuple(r.shape)}")
        if not y.is_floating_point():
            err = float((y != r).float().mean()) if y.numel() else 0.0  # fraction of mismatches
            max_abs, max_rel = max(max_abs, err), max(max_rel, err)
            continue
        # NaN must count as an infinite error: max() with a NaN operand keeps the other one, so a
        # graph that returns NaN would otherwise report 0 and pass the tolerance guard. Entries equal
        # to the reference (same inf, or NaN where the reference is NaN) are no error.
        y64, r64 = y.double(), r.double()
        same = (y64 == r64) | (torch.isnan(y64) & torch.isnan(r64))
        diff = torch.nan_to_num(torch.where(same, 0.0, (y64 - r64).abs()), nan=float("inf"),
                               posinf=float("inf"))
        d = float(diff.max()) if y.numel() else 0.0
        finite = r64[torch.isfinite(r64)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        max_abs = max(max_abs, d)
        max_rel = max(max_rel, d / scale if scale > 0 else d)
    return max_abs, max_rel
