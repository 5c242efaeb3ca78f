"""What the hand-written kernel families (``codegen/<family>_kernels.py``) share.

A family tags its generic kernels ``{SCHEDULE_ATTR: <family tag>}``; its ``apply_default_schedules``
(run by ``build.apply_kernel_schedules`` before dlight) swaps them for scheduled ones with
``schedule_tagged``.
"""
from __future__ import annotations

from typing import Callable

import tvm
from tvm import tirx

SCHEDULE_ATTR = "fxpress.schedule"
OP_PATTERN_OPAQUE = 8  # relax OpPatternKind::kOpaque: FuseOps never fuses a kernel marked with it
KERNEL_ATTR = "fxpress.kernel"  # = 1 on every hand-written PrimFunc (build.py; tuning leaves them alone)

__all__ = ["KERNEL_ATTR", "OP_PATTERN_OPAQUE", "SCHEDULE_ATTR", "schedule_tagged"]


def schedule_tagged(mod: tvm.IRModule, tag: str,
                    schedule: Callable[[tirx.PrimFunc, str], tirx.PrimFunc | None]) -> tvm.IRModule:
    """A copy of ``mod`` in which every PrimFunc tagged ``SCHEDULE_ATTR == tag`` and not yet
    ``tirx.is_scheduled`` is replaced by ``schedule(func, name)``. Where ``schedule`` returns None
    the kernel is left as it is (no schedule for this target, or the family chose to skip it)."""
    out = mod.clone()
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
            continue
        if str(func.attrs.get(SCHEDULE_ATTR, "")) != tag or func.attrs.get("tirx.is_scheduled", False):
            continue
        scheduled = schedule(func, gv.name_hint)
        if scheduled is not None:
            # a kernel built afresh (not scheduled from func) keeps func's marks: opaque to FuseOps
            kept = {k: func.attrs[k] for k in (KERNEL_ATTR, "op_pattern") if k in func.attrs}
            out.update_func(gv, scheduled.with_attrs(kept) if kept else scheduled)
    return out
