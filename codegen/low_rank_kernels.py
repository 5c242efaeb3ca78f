"""TIR kernels for low-rank layers: one fused two-GEMM kernel for ``fxpress::lowrank_linear``.

``y[m, n] = Σ_j (Σ_k x[m, k] · U[k, j]) · V[j, n] + bias[n]`` with x: [M, K], U: [K, R], V: [R, N].

The two relax matmuls that the converter emits otherwise become two kernels with the rank-R
intermediate ``h = x @ U`` written to and read back from memory. The fused kernel computes ``h``
for a tile of ``tm`` rows into a local buffer (R·tm floats, in cache), then the output tile from it:

  parallel for each tile of tm rows:
      h_local[tm, R]  = x[rows, :] @ U          (k outer, R vectorized)
      for each tile of tn output channels:
          acc[tm, tn] = h_local @ V[:, cols]     (j outer, tn vectorized, registers)
          y[rows, cols] = acc + bias

It is written in TE, scheduled by hand here, and marked ``tirx.is_scheduled`` so dlight leaves it
alone; codegen.build marks every hand-written PrimFunc opaque, so FuseOps does not merge it with
its neighbours either. Whether the converter uses it is decided by ``preferred_impl`` from the
measurements in docs/passes/low_rank.md (bench: ``benchmarks/bench_low_rank.py --kernels``):
up to 32 rows it beats the two separately scheduled matmuls, beyond that it does not.
"""
from __future__ import annotations

import tvm
from tvm import relax, s_tir, te, tirx

from .. import families
from .kernel_families import SCHEDULE_ATTR, schedule_tagged

SCHEDULE_TAG = "low_rank"

__all__ = ["lowrank_linear_te", "lowrank_linear_func", "schedule_cpu", "emit_fused_lowrank_linear",
           "preferred_impl"]


def lowrank_linear_te(x: te.Tensor, U: te.Tensor, V: te.Tensor, bias: te.Tensor) -> te.Tensor:
    M, K = (int(s) for s in x.shape)
    K2, R = (int(s) for s in U.shape)
    R2, N = (int(s) for s in V.shape)
    assert K == K2 and R == R2, f"lowrank_linear: shapes x{list(x.shape)} U{list(U.shape)} V{list(V.shape)}"
    k = te.reduce_axis((0, K), name="k")
    h = te.compute((M, R), lambda m, j: te.sum(x[m, k] * U[k, j], axis=k), name="lr_h")
    j = te.reduce_axis((0, R), name="j")
    acc = te.compute((M, N), lambda m, n: te.sum(h[m, j] * V[j, n], axis=j), name="lr_acc")
    return te.compute((M, N), lambda m, n: acc[m, n] + bias[n], name="lr_out")


def lowrank_linear_func(M: int, K: int, R: int, N: int, dtype: str = "float32", scheduled: bool = True,
                        target: str = "llvm", name: str | None = None) -> tirx.PrimFunc:
    """The kernel for static shapes; ``name`` sets its global symbol (default ``fxpress_lowrank_linear_MxKxRxN``)."""
    x = te.placeholder((M, K), dtype, name="x")
    U = te.placeholder((K, R), dtype, name="U")
    V = te.placeholder((R, N), dtype, name="V")
    b = te.placeholder((N,), dtype, name="bias")
    func = te.create_prim_func([x, U, V, b, lowrank_linear_te(x, U, V, b)])
    func = func.with_attrs({SCHEDULE_ATTR: SCHEDULE_TAG,
                            "global_symbol": name or f"fxpress_lowrank_linear_{M}x{K}x{R}x{N}"})
    if not scheduled:
        return func
    return schedule_cuda(func) if target == "cuda" else schedule_cpu(func)


def _divisor(n: int, prefs) -> int:
    for p in prefs:
        if p <= n and n % p == 0:
            return p
    return 1


def schedule_cpu(func: tirx.PrimFunc, vec: int = 8, tm: int | None = None, tn: int | None = None) -> tirx.PrimFunc:
    """The fused row-tile schedule described in the module docstring.

    ``tm`` rows share one rank-R intermediate in a local buffer; ``tn`` output channels (a multiple
    of the vector width where possible) form the register tile of the second GEMM.
    """
    sch = s_tir.Schedule(func)
    out, acc, h = sch.get_sblock("lr_out"), sch.get_sblock("lr_acc"), sch.get_sblock("lr_h")
    M, N = (int(sch.get(lp).extent) for lp in sch.get_loops(out))
    R = int(sch.get(sch.get_loops(h)[1]).extent)
    tm = tm or _divisor(M, (4, 2))
    tn = tn or _divisor(N, (2 * vec, vec, 4, 2))
    m, n = sch.get_loops(out)
    mo, mi = sch.split(m, [None, tm])
    no, ni = sch.split(n, [None, tn])
    sch.reorder(mo, no, mi, ni)
    sch.compute_at(acc, no)
    sch.compute_at(h, mo)
    sch.set_scope(h, 0, "local")
    sch.set_scope(acc, 0, "local")
    # h tile: loops (mi?, j, k) → (j_outer, k, mi?, j_inner): a [tm × tj] register block of the
    # rank-R intermediate accumulates over k while x[mi, k] is broadcast and U[k, j-tile] streamed.
    # (compute_at drops unit loops, hence the optional mi.)
    hl = sch.get_loops(h)[1:]
    hj, hk = hl[-2], hl[-1]
    hm = hl[0] if len(hl) == 3 else None
    tj = _divisor(R, (2 * vec, vec, 4, 2))
    hjo, hji = sch.split(hj, [None, tj])
    sch.reorder(*[lp for lp in (hjo, hk, hm, hji) if lp is not None])
    if hm is not None:
        sch.unroll(hm)
    if tj > 1:
        sch.vectorize(hji)
    # acc tile: loops (mi?, ni?, j) → (j, mi?, ni?): register tile, output channels vectorized.
    al = sch.get_loops(acc)[2:]
    aj, spatial = al[-1], al[:-1]
    am = an = None
    if len(spatial) == 2:
        am, an = spatial
    elif len(spatial) == 1:
        am, an = (spatial[0], None) if tn == 1 else (None, spatial[0])
    sch.reorder(aj, *[lp for lp in (am, an) if lp is not None])
    if am is not None:
        sch.unroll(am)
    if an is not None:
        sch.vectorize(an)
    if tn > 1:
        sch.vectorize(ni)
    sch.parallel(mo)
    # Vectorize first: a loop over a reduction block that has lost its init cannot be vectorized.
    sch.decompose_reduction(h, hk)
    sch.decompose_reduction(acc, aj)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_cuda(func: tirx.PrimFunc, threads: int = 128) -> tirx.PrimFunc:
    """CUDA fallback: one thread per output element (recomputes h per output; correct, not fast).

    The converter only picks the fused kernel on llvm; this exists so a module that carries the
    kernel still builds for cuda.
    """
    sch = s_tir.Schedule(func)
    for name in ("lr_h", "lr_acc", "lr_out"):
        block = sch.get_sblock(name)
        iters = sch.get(block).iter_vars
        loops = sch.get_loops(block)
        spatial = [lp for lp, iv in zip(loops, iters) if iv.iter_type != tirx.IterVar.CommReduce]
        fused = sch.fuse(*spatial)
        bx, tx = sch.split(fused, [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def apply_default_schedules(mod: tvm.IRModule, target: tvm.target.Target | str) -> tvm.IRModule:
    """Schedule every unscheduled low-rank kernel in ``mod`` (``fxpress.schedule == "low_rank"``)
    for ``target``; same contract as ``shift_add_kernels.apply_default_schedules``."""
    kind = target.kind.name if isinstance(target, tvm.target.Target) else str(target)
    return schedule_tagged(mod, SCHEDULE_TAG,
                           lambda func, _name: schedule_cuda(func) if kind == "cuda" else schedule_cpu(func))


# ----------------------------------------------------------------------------- choosing and emitting

def build_schedules_kernels() -> bool:
    """Whether codegen.build gives this family's kernels their hand schedule (it runs
    ``apply_default_schedules`` of every kernel module fxpress/families.py lists, before dlight). Without
    that the fused kernel would stay unscheduled: slow on llvm, and unbindable by dlight on cuda."""
    return __name__ in families.module_names("kernels")


FUSED_MAX_ROWS = 32


def preferred_impl(rows: int | None, in_features: int, rank: int, out_features: int, dtype: str) -> str:
    """'fused' or 'matmul' for one lowrank_linear call.

    Measured on llvm through codegen.build, single-thread CPU time (docs/passes/low_rank.md,
    ``bench_low_rank.py --kernels``): against the two matmuls with codegen's register-blocked
    contraction schedule, the fused kernel took 0.73-1.03x the time at 1-32 rows (one launch, the
    rank-r intermediate stays in cache) and 1.00-1.13x at 64-512 rows. So: fused up to
    ``FUSED_MAX_ROWS`` rows of float32 with static shapes, when the build schedules the kernel.
    """
    if dtype != "float32" or not rows or rows > FUSED_MAX_ROWS:
        return "matmul"
    return "fused" if build_schedules_kernels() else "matmul"


def emit_fused_lowrank_linear(bb: relax.BlockBuilder, x, U, V, bias, x_shape: list[int], rank: int,
                              out_features: int, dtype: str):
    """Emit ``call_tir`` to the fused kernel for x of static shape ``x_shape`` ([..., K])."""
    K = x_shape[-1]
    M = 1
    for d in x_shape[:-1]:
        M *= d
    name = f"fxpress_lowrank_linear_{M}x{K}x{rank}x{out_features}"
    # Unscheduled and tagged: the build's apply_default_schedules schedules it for its target.
    gv = bb.add_func(lowrank_linear_func(M, K, rank, out_features, dtype, scheduled=False, name=name), name)
    x2 = bb.emit(relax.op.reshape(x, (M, K))) if len(x_shape) != 2 else x
    y = bb.emit(relax.call_tir(gv, [x2, U, V, bias], relax.TensorType((M, out_features), dtype)))
    if len(x_shape) != 2:
        y = bb.emit(relax.op.reshape(y, (*x_shape[:-1], out_features)))
    return y
