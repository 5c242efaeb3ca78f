"""dlight default schedules: which rules run on which target, and why.

CUDA: the stock GPU rule list (the same one ``relax.backend.cuda`` uses). It is not optional:
a PrimFunc without thread bindings fails TVM's memory verification on a GPU target.

CPU: only ``dl.cpu.Reduction`` and only on functions that are not contractions. Measured on
this project's models (docs/tvm-0.27-codegen.md): the rule halves softmax/layer-norm time on
2 threads, but it also matches conv2d/matmul with a fused epilogue, where it wraps everything
in one parallel loop over the batch and made a fused conv+bn 7-14x slower. ``dl.cpu.GEMV`` is
left out: it only matches contractions and was slower than the unscheduled loop every time.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr


def schedule_gpu(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    rules = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                    dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    with target:
        return rules(mod)


def schedule_cpu(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    # ApplyDefaultSchedule rewrites the module it is given in place, so it gets a scratch one.
    eligible = tvm.IRModule({gv: f for gv, f in mod.functions_items()
                             if isinstance(f, tirx.PrimFunc) and not is_contraction(f)})
    with target:
        scheduled = dl.ApplyDefaultSchedule(dl.cpu.Reduction())(eligible)
    out = mod.clone()
    for gv, func in scheduled.functions_items():
        out.update_func(gv, func)
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
