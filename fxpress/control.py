"""Markers a model's forward uses to tell ``split_branches`` about its control flow. Torch-free.

``fxpress.bound(value, max_iter)`` returns ``value`` unchanged, so the model runs exactly as before
in eager PyTorch; when fxpress compiles the model, the call marks the loop it heads as a bounded
data-dependent loop that runs at most ``max_iter`` times:

    while fxpress.bound(h.norm() > self.tol, max_iter=8):     # a while loop on a tensor condition
        h = self.cell(h)

    for i in fxpress.bound(range(n), max_iter=16):           # a for loop whose trip count is data
        ...                                                    # (or a static loop kept rolled)

``on_exceed`` says what the compiled host program does when the loop wants iteration
``max_iter + 1``: ``"error"`` (default: raise, since eager PyTorch would keep going) or ``"stop"``
(leave the loop, i.e. the bound is part of the model's meaning).
"""
from __future__ import annotations

ON_EXCEED = ("error", "stop")


def bound(value, max_iter: int, on_exceed: str = "error"):
    """Declare that the loop headed by ``value`` runs at most ``max_iter`` times; returns ``value``."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"fxpress.bound: max_iter must be a non-negative int, got {max_iter!r}")
    if on_exceed not in ON_EXCEED:
        raise ValueError(f"fxpress.bound: on_exceed must be one of {ON_EXCEED}, got {on_exceed!r}")
    return value


__all__ = ["ON_EXCEED", "bound"]
