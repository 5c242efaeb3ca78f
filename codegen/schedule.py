"""dlight default schedules: which rules run on which target, and why.

CUDA: the stock GPU rule list (the same one ``relax.backend.cuda`` uses). It is not optional:
a PrimFunc without thread bindings fails TVM's memory verification on a GPU target.

CPU: only ``dl.cpu.Reduction`` and only on functions that are not contractions. Measured here
(docs/tvm-0.27-codegen.md): per core the rule's code is within 7% of the unscheduled loops on
softmax, layer norm and pooling, and it adds a parallel loop over rows, which made a 64x128x256
softmax 1.9x faster on 2 idle cores. It also matches conv2d/matmul with a fused epilogue; on
conv2d+batch-norm it costs 12.7x the CPU time, so contractions are skipped.
``dl.cpu.GEMV`` only ever matches contractions (and was slower there), so it is not used.
Contractions get cpu_schedules.schedule_contraction (parallel, register-blocked, vectorized;
measured in docs/tuning.md: 40-90x less CPU time per conv/matmul kernel than the plain loops).

Tuned records: with a MetaSchedule database in scope (``with db:``, see tuning_db.py and
tune.py), functions it has records for get their tuned schedule first and the default rules
leave them alone (they are marked ``tirx.is_scheduled``).
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr

from .cpu_schedules import (schedule_contraction, schedule_gemv, schedule_injective, schedule_window_reduction,
                            vectorize_reductions)
from .tuning_db import apply_database


def schedule_gpu(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    mod = apply_database(mod, target)
    rules = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                    dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    with target:
        return rules(mod)


def schedule_cpu(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    mod = apply_database(mod, target)
    # ApplyDefaultSchedule rewrites the module it is given in place, so it gets a scratch one.
    eligible = tvm.IRModule({gv: f for gv, f in mod.functions_items()
                             if isinstance(f, tirx.PrimFunc) and not is_contraction(f)})
    with target:
        scheduled = dl.ApplyDefaultSchedule(dl.cpu.Reduction())(eligible)
    out = mod.clone()
    for gv, func in scheduled.functions_items():
        if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
            with target:
                func = vectorize_reductions(func, target)
        out.update_func(gv, func)
    for gv, func in out.functions_items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        with target:
            if is_contraction(func):
                done = schedule_gemv(func, target) or schedule_contraction(func, target)
            else:
                done = schedule_injective(func, target) or schedule_window_reduction(func, target)
        if done is not None:
            out.update_func(gv, done.with_attr("tirx.is_scheduled", True))
    return out


def is_contraction(func: tirx.PrimFunc) -> bool:
    """True if a reduction block reads two or more buffers along its reduction axes.

    That is the shape of conv, matmul and GEMV (``C += A[.., k] * B[k, ..]``); softmax, norms and
    pooling reduce a single buffer (``s += x[.., k]``, other reads are per-row statistics).
    """
    found = False

    def visit(block: s_tir.SBlock) -> None:
        nonlocal found
        axes = {iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
        if not axes:
            return
        along = [r for r in block.reads
                 if any(collect_vars_used_in_prim_expr(rng.min) & axes for rng in r.region)]
        found = found or len(along) >= 2

    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, visit))
    return found
