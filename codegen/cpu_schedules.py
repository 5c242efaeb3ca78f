"""A fixed CPU schedule for contractions (conv2d, matmul, batch matmul, with fused epilogues).

Untuned, LegalizeOps' loops run one scalar multiply-add at a time on one core. This schedule is
the classic register-blocked direct kernel, chosen by a rule instead of by search:

  * the **vector axis** is the spatial axis that indexes the output's last (contiguous) dimension
    (``xx`` of NCHW conv, ``j`` of matmul); its inner tile ``V`` is vectorized;
  * the **reuse axis** is the largest other spatial axis that the vector-loaded input does not
    depend on (the output channel of a conv, the row of a matmul); its inner tile ``F`` is
    unrolled, so each loaded input vector feeds ``F`` accumulators;
  * loop order: [fused outer spatial loops: parallel] [reduction loops] [F: unrolled] [V: vector];
    the ``F x V`` accumulator tile is a ``cache_write`` block, the epilogue (batch norm, bias,
    activation...) is inlined and computed per tile right after it.

Tile sizes, measured on this project's CI CPU (AMD EPYC, AVX2, 8 fp32 lanes; single-thread CPU
time, every V x F combination per kernel of ResNet-18 width 32 at 112x112 and a BERT layer of
hidden 384 at sequence 64, docs/tuning.md): when the vector extent is a multiple of the lane
count, ``V`` = 2 x lanes (or lanes) and ``F`` fills ~12 accumulator registers; otherwise ``V``
= the largest divisor <= lanes (7 for 28-, 14- and 7-wide feature maps) and ``F`` = 8. Vectors
that are not a multiple of the lane count (14, 28) were 1.3-4x slower. The chosen sizes were
within 0-15% of the best combination for every kernel measured.

Returns None (caller keeps the old behaviour) for anything that does not match: several
contraction blocks, non-constant shapes, loops that are not one-per-iter-var.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr, normalize_prim_func

ACCUMULATORS = 12  # vector registers given to the accumulator tile (x86 AVX2 has 16)


def vector_lanes(target: tvm.target.Target, bits: int = 32) -> int:
    """Lanes of ``bits``-wide elements in the widest vector unit the target really has (isa.py)."""
    from .isa import features

    try:
        return features(target).lanes_fp32 * 32 // bits
    except ValueError:
        return 128 // bits


def is_contraction_block(block: s_tir.SBlock) -> bool:
    """A reduction block reading two or more buffers along its reduction axes."""
    axes = {iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
    if not axes:
        return False
    along = [r for r in block.reads
             if any(collect_vars_used_in_prim_expr(rng.min) & axes for rng in r.region)]
    return len(along) >= 2


def _largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def tile_sizes(vector_extent: int, reuse_extent: int, lanes: int) -> tuple[int, int]:
    """(V, F) for a vector axis and a reuse axis of these extents (see module docstring)."""
    if lanes > 8 and vector_extent % lanes and vector_extent % 8 == 0:
        lanes = 8  # a 56- or 24-wide map on AVX-512: whole 256-bit vectors beat 14- or 12-wide ones
    if vector_extent % (2 * lanes) == 0:
        v = 2 * lanes
    elif vector_extent % lanes == 0:
        v = lanes
    else:
        v = _largest_divisor(vector_extent, lanes)
    registers = -(-v // lanes)
    f_limit = max(1, ACCUMULATORS // registers) if v % lanes == 0 else 8
    return v, _largest_divisor(reuse_extent, f_limit)


def schedule_contraction(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
    """The scheduled function, or None if ``func`` is not a single-contraction kernel."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    mains = [bi for bi in infos if bi.is_reduction() and is_contraction_block(sch.get(bi.block_rv))]
    if len(mains) != 1:
        return None
    main_name = mains[0].name
    has_if_then_else = tvm.get_global_func("s_tir.schedule.HasIfThenElse")
    # Epilogue and prologue elementwise blocks: inline. Padding stays a separate (parallel) stage:
    # inlined, its bounds check would sit in the innermost loop.
    for bi in infos:
        if bi.name == main_name or not bi.is_injective():
            continue
        block = sch.get_sblock(bi.name)
        if has_if_then_else(sch.get(block)):
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001 - ScheduleError: keep the block as it is
            pass

    main = sch.get_sblock(main_name)
    stmt = sch.get(main)
    loops = sch.get_loops(main)
    kinds = ["R" if iv.iter_type == tirx.IterVar.CommReduce else "S" for iv in stmt.iter_vars]
    if len(loops) != len(stmt.iter_vars) or "R" in kinds[:kinds.index("R")] or "S" in kinds[kinds.index("R"):]:
        return None
    if any(iv.iter_type not in (tirx.IterVar.CommReduce, tirx.IterVar.DataPar) for iv in stmt.iter_vars):
        return None
    if not all(isinstance(iv.dom.extent, tirx.IntImm) for iv in stmt.iter_vars):
        return None
    ivars = [iv.var for iv in stmt.iter_vars]
    exts = [int(iv.dom.extent) for iv in stmt.iter_vars]
    ns = kinds.index("R")
    if not all(isinstance(sch.get(loop).extent, tirx.IntImm) for loop in loops):
        return None

    write = stmt.writes[0]
    last = collect_vars_used_in_prim_expr(write.region[-1].min)
    vax = next((i for i in range(ns) if ivars[i] in last), None)
    if vax is None:
        return None
    streamed = set()
    for r in stmt.reads:
        if r.source.same_as(write.source):
            continue
        region_vars = [collect_vars_used_in_prim_expr(g.min) for g in r.region]
        if any(ivars[vax] in vs for vs in region_vars):
            for vs in region_vars:
                streamed |= vs
    candidates = [i for i in range(ns) if i != vax and ivars[i] not in streamed and exts[i] > 1]
    rax = max(candidates, key=lambda i: exts[i]) if candidates else None
    lanes = vector_lanes(target, tvm.DataType(write.source.dtype).bits)
    v, f = tile_sizes(exts[vax], exts[rax] if rax is not None else 1, lanes)

    outer, inner_f, inner_v = [], None, None
    for i in range(ns):
        if i == vax:
            if 1 < v < exts[i]:
                o, inner_v = sch.split(loops[i], factors=[None, v])
                outer.append(o)
            else:
                inner_v = loops[i]
        elif i == rax:
            if 1 < f < exts[i]:
                o, inner_f = sch.split(loops[i], factors=[None, f])
                outer.append(o)
            else:
                inner_f = loops[i]
        else:
            outer.append(loops[i])
    if not outer:
        return None  # the whole output is one tile: too small to be worth it
    reductions = list(loops[ns:])
    inner = ([inner_f] if inner_f is not None else []) + [inner_v]
    sch.reorder(*outer, *reductions, *inner)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]

    accumulate = sch.cache_write(main, 0, "global")
    sch.reverse_compute_at(accumulate, fused, preserve_unit_loops=True)
    for block in [accumulate, *sch.get_consumers(accumulate)]:
        if block is not accumulate:
            try:
                sch.reverse_compute_at(block, fused, preserve_unit_loops=True)
            except Exception:  # noqa: BLE001 - ScheduleError: keep the block as it is
                continue
        try:
            sch.vectorize(sch.get_loops(block)[-1])
        except Exception:  # noqa: BLE001 - ScheduleError: keep the block as it is
            pass
    # parallel/vectorize/unroll need the reduction block whole: before decompose_reduction.
    sch.parallel(fused)
    sch.vectorize(inner_v)
    if inner_f is not None:
        sch.unroll(inner_f)
    sch.decompose_reduction(main, reductions[0])

    # What is left outside the tile loop (padding): parallel over its outer loops.
    for bi in infos:
        if bi.name == main_name:
            continue
        try:
            block = sch.get_sblock(bi.name)
        except Exception:  # noqa: BLE001 - ScheduleError
            continue  # inlined
        block_loops = sch.get_loops(block)
        if len(block_loops) < 2 or sch.get(block_loops[0]).kind != tirx.ForKind.SERIAL:
            continue
        if any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(block).iter_vars):
            continue
        try:
            sch.parallel(sch.fuse(*block_loops[:-1]))
        except Exception:  # noqa: BLE001 - ScheduleError: keep the block as it is
            pass
    return sch.mod["main"]


GEMV_ROWS = 4  # output rows per tile: each loaded vector of the shared operand feeds this many rows
GEMV_PARALLEL_MIN = 1 << 18  # multiply-adds below which a GEMV stays on one core (pool wake-up)


def schedule_gemv(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
    """A contraction whose output's contiguous axis is too short to vectorize (a matmul with N = 1, a
    conv onto a 1x1 map routed as im2col + matmul), vectorized along its reduction instead.

    Needs one reduction axis that is the last, unit-stride index of every operand it reads (``A[i, k]
    * x[k]``). The reduction is split by the lane count and rfactored: each tile of ``GEMV_ROWS``
    output rows keeps ``lanes`` partial sums per row in a vector accumulator, then adds them up.
    Measured: 128x576 GEMV (a 3x3 conv, 64 -> 128 channels, onto a 1x1 map) 80 µs scalar → ~3 µs.
    Returns None for anything else (the caller tries schedule_contraction)."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    mains = [bi for bi in infos if bi.is_reduction() and is_contraction_block(sch.get(bi.block_rv))]
    if len(mains) != 1 or any(not bi.is_injective() for bi in infos if bi is not mains[0]):
        return None
    main = sch.get_sblock(mains[0].name)
    stmt = sch.get(main)
    loops = sch.get_loops(main)
    kinds = ["R" if iv.iter_type == tirx.IterVar.CommReduce else "S" for iv in stmt.iter_vars]
    if kinds.count("R") != 1 or kinds[-1] != "R" or len(loops) != len(kinds) or len(kinds) < 2:
        return None
    if not all(isinstance(iv.dom.extent, tirx.IntImm) for iv in stmt.iter_vars):
        return None
    write = stmt.writes[0]
    lanes = vector_lanes(target, tvm.DataType(write.source.dtype).bits)
    last_out = collect_vars_used_in_prim_expr(write.region[-1].min)
    row_extent = next((int(iv.dom.extent) for iv in stmt.iter_vars if iv.var in last_out), 1)
    if row_extent >= lanes // 2:
        return None  # the output row vectorizes: schedule_contraction's register tile is the better kernel
    rvar, k = stmt.iter_vars[-1].var, int(stmt.iter_vars[-1].dom.extent)
    for r in stmt.reads:
        # unit dims do not move the address: the (1, K, 1) column of a matvec is contiguous along K
        dims = [g for g, n in zip(r.region, r.source.shape) if not (isinstance(n, tirx.IntImm) and int(n) == 1)]
        used = [collect_vars_used_in_prim_expr(g.min) for g in dims]
        if any(rvar in vs for vs in used[:-1]):
            return None
        if used and rvar in used[-1] and not dims[-1].min.same_as(rvar):
            return None  # strided or offset along the reduction: not one contiguous vector load
    width = lanes if k % lanes == 0 else _largest_divisor(k, lanes)
    if width < 4:
        return None
    spatial = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    rows = int(sch.get(spatial).extent)
    r_outer, r_inner = sch.split(loops[-1], factors=[None, width])
    partial = sch.rfactor(r_inner, factor_axis=len(write.region))
    p_loops = sch.get_loops(partial)  # (spatial, r_outer, r_inner) with r_inner now spatial
    tile = _largest_divisor(rows, GEMV_ROWS)
    row_outer, row_inner = sch.split(p_loops[0], factors=[None, tile])
    sch.reorder(row_outer, p_loops[1], row_inner, p_loops[2])
    accumulate = sch.cache_write(partial, 0, "global")
    sch.reverse_compute_at(accumulate, row_outer, preserve_unit_loops=True)
    sch.reverse_compute_at(main, row_outer, preserve_unit_loops=True)
    lane_loop, row_loop = sch.get_loops(main)[-2:]
    sch.reorder(row_loop, lane_loop)  # each row's partial sums added in a row: no gathers across rows
    if rows * k >= GEMV_PARALLEL_MIN and rows // tile > 1:
        sch.parallel(row_outer)
    sch.unroll(row_inner)
    sch.vectorize(p_loops[2])
    sch.vectorize(sch.get_loops(accumulate)[-1])
    sch.decompose_reduction(partial, p_loops[1])
    return sch.mod["main"]


PARALLEL_MIN = 16384  # elements below which an injective kernel stays on one core (pool wake-up)
TRANSPOSE_TILE = 16


def schedule_injective(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
    """Elementwise/broadcast/transpose kernels: one loop nest, parallel outside, vector inside.

    A transpose-like nest (the output's last axis is not the input's last axis) is tiled
    ``TRANSPOSE_TILE`` x ``TRANSPOSE_TILE`` so both sides stay in cache lines.
    """
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos or not all(bi.is_injective() for bi in infos):
        return None
    for bi in infos[:-1]:
        try:
            sch.compute_inline(bi.block_rv)
        except Exception:  # noqa: BLE001 - ScheduleError: block stays
            pass
    infos = normalize_prim_func(sch)
    if not infos or len(infos) != 1:
        return None
    block = infos[0].block_rv
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    exts = [sch.get(loop).extent for loop in loops]
    if not loops or not all(isinstance(e, tirx.IntImm) for e in exts):
        return None
    exts = [int(e) for e in exts]
    total = 1
    for e in exts:
        total *= e
    lanes = vector_lanes(target, tvm.DataType(stmt.writes[0].source.dtype).bits)
    ivars = [iv.var for iv in stmt.iter_vars]
    if len(ivars) != len(loops) or not stmt.writes or not stmt.writes[0].region:
        return None  # 0-d outputs (e.g. a branch condition) stay unscheduled
    write_last = collect_vars_used_in_prim_expr(stmt.writes[0].region[-1].min)
    transposed = None
    for r in stmt.reads:
        if not r.region:
            continue
        read_last = collect_vars_used_in_prim_expr(r.region[-1].min)
        if read_last and not (read_last & write_last) and len(read_last) == 1:
            axis = next((i for i, v in enumerate(ivars) if v in read_last), None)
            if axis is not None and axis != len(loops) - 1:
                transposed = axis
    t = TRANSPOSE_TILE
    if (transposed is not None and exts[-1] % t == 0 and exts[transposed] % t == 0
            and exts[-1] >= t and exts[transposed] >= t):
        a_o, a_i = sch.split(loops[transposed], factors=[None, t])
        b_o, b_i = sch.split(loops[-1], factors=[None, t])
        rest = [loop for i, loop in enumerate(loops[:-1]) if i != transposed]
        sch.reorder(*rest, a_o, b_o, a_i, b_i)
        outer = sch.fuse(*rest, a_o, b_o)
        if total >= PARALLEL_MIN:
            sch.parallel(outer)
        sch.vectorize(b_i)
        return sch.mod["main"]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    inner = lanes * 4 if total % (lanes * 4) == 0 else lanes if total % lanes == 0 else None
    if inner is None:
        if total >= PARALLEL_MIN:
            sch.parallel(fused)
        return sch.mod["main"]
    o, i = sch.split(fused, factors=[None, inner])
    if total >= PARALLEL_MIN:
        sch.parallel(o)
    sch.vectorize(i)
    return sch.mod["main"]


def vectorize_reductions(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """Row reductions as dl.cpu.Reduction leaves them (sum, max, variance over the last axis) are a
    serial chain of scalar adds per row: latency-bound. Each whose innermost loop is a reduction of
    ``lanes`` iterations is rfactored over that loop, so ``lanes`` partial results accumulate in one
    vector register and a short final pass adds them. Blocks that do not fit are left as they are.
    Measured (one thread, loaded machine): LayerNorm 128x384 + softmax 12x128x128, 0.36 → 0.26 ms."""
    import tvm_ffi

    lanes = vector_lanes(target)
    names: list[str] = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, lambda b: names.append(b.name_hint)))
    sch = s_tir.Schedule(func)
    changed = False
    for name in names:
        try:
            block = sch.get_sblock(name)
        except Exception:  # noqa: BLE001 - ScheduleError: block gone
            continue
        stmt = sch.get(block)
        reduce_vars = {iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
        if len(reduce_vars) != 1 or stmt.init is None:
            continue
        loops = sch.get_loops(block)
        inner = sch.get(loops[-1]) if loops else None
        if inner is None or not isinstance(inner.extent, tirx.IntImm) or int(inner.extent) != lanes:
            continue
        try:
            rf = sch.rfactor(loops[-1], factor_axis=0)
            sch.vectorize(sch.get_loops(rf)[-1])
            changed = True
        except Exception:  # noqa: BLE001 - ScheduleError: rfactor takes only a reduction that is the
            continue       # first block under its outermost loop (softmax's max, not its sum)
    return sch.mod["main"] if changed else func


def schedule_window_reduction(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
    """Pooling over a KH x KW window (average pools; NCHW floor-mode max pools take pooling.py's kernel),
    optionally behind its padding block, which neither dl.cpu.Reduction nor the injective rule takes:
    left alone it ran serial and scalar (ResNet's 3x3/2 max pool on 64x112x112: 0.56 ms on 2 cores).
    Parallel over the outer spatial axes, the padding read in place, window loops (unrolled) outside the
    output row, the row vectorized (stride-2 reads become shuffles); the reduction's own op is kept, so
    NaN handling is the legalized function's. None when the function is not one window reduction over
    [.., OH, OW]."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos or len(infos) > 2 or infos[-1].is_injective():
        return None
    pad = infos[0].block_rv if len(infos) == 2 else None
    if pad is not None and not infos[0].is_injective():
        return None
    block = infos[-1].block_rv
    stmt = sch.get(block)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    spatial = [k == tirx.IterVar.DataPar for k in kinds]
    n_sp = sum(spatial)
    # spatial axes first, then the window: [.., OH, OW, KH, KW]
    if n_sp < 3 or spatial != [True] * n_sp + [False] * (len(kinds) - n_sp) or stmt.init is None:
        return None
    if len(stmt.reads) != 1 or is_contraction_block(stmt):
        return None
    loops = sch.get_loops(block)
    exts = [sch.get(loop).extent for loop in loops]
    if len(loops) != len(kinds) or not all(isinstance(e, tirx.IntImm) for e in exts):
        return None
    ow = int(exts[n_sp - 1])
    lanes = vector_lanes(target, tvm.DataType(stmt.writes[0].source.dtype).bits)
    vec = next((v for v in (lanes, lanes // 2, lanes // 4) if v >= 4 and ow % v == 0), None)
    outer = sch.fuse(*loops[:n_sp - 2])
    row, col, window = loops[n_sp - 2], loops[n_sp - 1], loops[n_sp:]
    sch.reorder(outer, row, *window, col)
    total = 1
    for e in exts[:n_sp]:
        total *= int(e)
    if total >= PARALLEL_MIN:
        sch.parallel(outer)
    if pad is not None:
        try:  # padding read in place (a select per tap): a padded copy of the plane cost more than the pool
            sch.compute_inline(pad)
        except Exception:  # noqa: BLE001 - ScheduleError: the padding stays its own pass
            pass
    # vectorized while the block still has its init (a block without one is neither complete nor a
    # reduction, and TVM refuses to vectorize over it); the init is split out afterwards
    if vec is not None:
        _, c_i = sch.split(col, factors=[None, vec])
        sch.vectorize(c_i)
    init = sch.decompose_reduction(block, window[0])
    for loop in window:
        sch.unroll(loop)
    if vec is not None:
        _, ii = sch.split(sch.get_loops(init)[-1], factors=[None, vec])
        sch.vectorize(ii)
    return sch.mod["main"]

