"""Small kernels run on one core.

TVM's CPU thread pool wakes every worker for each parallel loop and waits for all of them. For a
kernel of a few microseconds the wake-up costs more than the work, and on a machine whose cores are
busy with other processes a worker that is not scheduled stalls the whole call: a 0.2 ms transformer
took a 100 ms median under load with two threads and 0.11 ms with one (ONNX Runtime, which only splits
work above a cost threshold, was unaffected). So a parallel loop whose whole nest does fewer than
``PARALLEL_MIN_WORK`` innermost iterations (multiply-adds for a contraction, elements for the rest) is
made serial after scheduling. ``FXPRESS_PARALLEL_MIN_WORK`` overrides the threshold (0 keeps every
parallel loop).
"""
from __future__ import annotations

import os

import tvm
import tvm_ffi
from tvm import s_tir, tirx

PARALLEL_MIN_WORK = 1 << 17  # ~10-30 us of single-core work: above a pool wake-up's few us


def min_work() -> int:
    value = os.environ.get("FXPRESS_PARALLEL_MIN_WORK")
    return PARALLEL_MIN_WORK if value in (None, "") else int(value)


def iterations(stmt) -> int:
    """Innermost-statement executions under ``stmt``; a loop of unknown extent counts as large."""
    if isinstance(stmt, tirx.For):
        extent = int(stmt.extent) if isinstance(stmt.extent, tirx.IntImm) else 1 << 30
        return extent * iterations(stmt.body)
    if isinstance(stmt, tirx.SeqStmt):
        return sum(iterations(s) for s in stmt.seq)
    if isinstance(stmt, s_tir.SBlockRealize):
        return iterations(stmt.block)
    if isinstance(stmt, s_tir.SBlock):
        return iterations(stmt.body) + (iterations(stmt.init) if stmt.init is not None else 0)
    if isinstance(stmt, tirx.Evaluate) and _calls_out(stmt.value):
        return 1 << 30  # an extern call (the BLAS route's share of a GEMM): its work is not in the loops
    if isinstance(stmt, tirx.IfThenElse):
        other = iterations(stmt.else_case) if stmt.else_case is not None else 0
        return max(iterations(stmt.then_case), other)
    body = getattr(stmt, "body", None)
    return iterations(body) if isinstance(body, tirx.Stmt) else 1


# Calls whose work the loop nest does not show (a library call, e.g. the BLAS route's GEMM share).
_EXTERN_CALLS = {"tirx.call_extern", "tirx.call_pure_extern", "tirx.call_packed", "tirx.call_cpacked",
                 "tirx.call_packed_lowered", "tirx.call_cpacked_lowered"}


def _calls_out(expr) -> bool:
    op = getattr(expr, "op", None)
    return isinstance(expr, tvm.ir.expr.Call) and getattr(op, "name", None) in _EXTERN_CALLS


def serialize_small_loops(func: tirx.PrimFunc, threshold: int) -> tirx.PrimFunc:
    """``func`` with every parallel loop of less than ``threshold`` work made serial."""
    def visit(loop: tirx.For) -> tirx.For:
        if loop.kind != tirx.ForKind.PARALLEL or iterations(loop) >= threshold:
            return loop
        return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body,
                        loop.thread_binding, loop.annotations, loop.step, loop.span)

    body = tvm_ffi.structural_map(func.body, (tirx.For, visit))
    return func if body.same_as(func.body) else func.with_body(body)


def serialize_small_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    """Apply ``serialize_small_loops`` to every PrimFunc of ``mod`` (a CPU build's scheduled module)."""
    threshold = min_work()
    if threshold <= 0:
        return mod
    out = mod.clone()
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            new = serialize_small_loops(func, threshold)
            if not new.same_as(func):
                out.update_func(gv, new)
    return out
