"""``passes="auto"``: per-layer choice across techniques under an accuracy budget (issue #20).

``fxpress.compile(model, x, passes="auto", evaluate=fn, max_drop=0.01, objective="latency" | "size",
calibration=...)`` measures ``fn(model)``, estimates per layer what each candidate (fp32, int8, weight-only
int4, low rank at a few ranks, shift/add) costs in output error and saves in size or measured latency,
searches (search.py) with few calls of ``fn``, and returns the CompiledModel of the best configuration
whose drop is <= max_drop, with ``cm.auto`` (an AutoReport) and an "auto" row in ``cm.report``.
"""
from __future__ import annotations

from .driver import AUTO_OPTIONS, compile_auto
from .report import AutoReport

__all__ = ["AUTO_OPTIONS", "AutoReport", "compile_auto"]
