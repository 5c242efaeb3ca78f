"""TIR kernels for shift/add layers: matmul and conv2d that read packed power-of-two codes.

No weight multiplications. Each code (uint8, ``sign << 4 | e``, ``e == 15`` = zero; see
``fxpress/shift_codes.py``) is unpacked inside the reduction and applied to the activation
in one of two ways (``frac_bits`` picks, exactly like the reference ops):

* float path (``frac_bits < 0``) — *exponent add*: reinterpret the float32 activation as int32 and
  subtract ``e << 23`` from its bits (``x * 2^-e`` exactly; flushed to 0 when it would underflow),
  negate by the sign bit, add in float32. (``T.ldexp`` was measured too: LLVM lowers it to a libm
  call per element, 35-70x slower; it is not offered.)
* integer path (``frac_bits = F >= 0``) — *integer shift*: activations are quantized once to
  int32 fixed point (``floor(x * 2^F + 0.5)``, clamped), each term is the rounding arithmetic
  shift ``(xq + (2^e >> 1)) >> e``, negated by the sign, summed in int32 (exact). One multiply per
  *output* (``acc * scale * 2^-F``) remains.

Kernels are written in TE (``te.compute`` → ``te.create_prim_func``), so they are ordinary
s_tir-block PrimFuncs: MetaSchedule can tune them and dlight's GPU fallback can bind them. The
Relax converters (``lowering/shift_add_lowering.py``) emit them with ``BlockBuilder.emit_te``; each
carries ``fxpress.schedule = "shift_add"`` so ``apply_default_schedules`` can give it the hand
schedule below (CPU: register-tiled, parallel over output tiles, vectorized over output channels;
CUDA: one thread per output with a register accumulator). Layouts put the output channel last
(``codes[t, k, n]``, ``codes[t, ic, kh, kw, oc]``) so the CPU schedule's vector loads are contiguous.
"""
from __future__ import annotations

import logging

import tvm
from tvm import s_tir, te, tirx

from fxpress.shift_codes import EXP_BITS, ZERO_EXP, int_clamp_limit

from .kernel_families import SCHEDULE_ATTR, schedule_tagged

log = logging.getLogger("fxpress.codegen")

SCHEDULE_TAG = "shift_add"
ACC_BLOCK = "shift_acc"  # the main reduction block of every kernel here

__all__ = [
    "shift_linear_te", "shift_conv2d_te", "binary_attention_te", "shift_linear_func",
    "shift_conv2d_func", "binary_attention_func", "dense_linear_func", "dense_conv2d_func",
    "schedule_cpu", "schedule_cuda", "apply_default_schedules", "SCHEDULE_ATTR", "SCHEDULE_TAG",
]


# ----------------------------------------------------------------------------- term arithmetic

def _unpack(code):
    c = code.astype("int32")
    return c & ZERO_EXP, (c >> EXP_BITS) & 1


def _float_term(xv, code):
    """±x·2^-e by subtracting e from the float's exponent field; 0 for the zero code / underflow."""
    e, s = _unpack(code)
    bits = tirx.reinterpret("int32", xv)
    ok = tirx.all((bits & 0x7F800000) > (e << 23), e != ZERO_EXP)
    shifted = bits - (e << 23)
    signed = tirx.Select(s == 1, shifted ^ tirx.const(-(2**31), "int32"), shifted)  # flip the sign bit
    return tirx.reinterpret("float32", tirx.Select(ok, signed, tirx.const(0, "int32")))


def _int_term(xq, code):
    """±round(xq / 2^e) with an arithmetic shift; 0 for the zero code."""
    e, s = _unpack(code)
    m = tirx.const(0, "int32") - s                       # 0 or -1
    v = (xq + ((tirx.const(1, "int32") << e) >> 1)) >> e
    return tirx.Select(e == ZERO_EXP, tirx.const(0, "int32"), (v ^ m) - m)


def _quantize(xv, frac_bits: int, limit: int):
    v = tirx.floor(xv * tirx.const(float(2.0**frac_bits), "float32") + tirx.const(0.5, "float32"))
    lim = tirx.const(float(limit), "float32")
    return tirx.max(tirx.min(v, lim), -lim).astype("int32")


def _i(v) -> int:
    return int(v)


# ----------------------------------------------------------------------------- TE definitions

def shift_linear_te(x: te.Tensor, codes: te.Tensor, scale: te.Tensor, bias: te.Tensor, frac_bits: int) -> te.Tensor:
    """``y[m, n] = (sum_{t,k} term(x[m, k], codes[t, k, n])) * scale[n] + bias[n]``; x: [M, K] float32."""
    M, K = (_i(s) for s in x.shape)
    T, K2, N = (_i(s) for s in codes.shape)
    assert K == K2, f"shift_linear: x has {K} features, codes {K2}"
    k = te.reduce_axis((0, K), name="k")
    if frac_bits < 0:
        def body(m, n):
            return te.sum(sum(_float_term(x[m, k], codes[t, k, n]) for t in range(T)), axis=k)

        acc = te.compute((M, N), body, name=ACC_BLOCK)
        return te.compute((M, N), lambda m, n: acc[m, n] * scale[n] + bias[n], name="shift_out")
    limit = int_clamp_limit(T, K)
    xq = te.compute((M, K), lambda m, kk: _quantize(x[m, kk], frac_bits, limit), name="shift_xq")

    def ibody(m, n):
        return te.sum(sum(_int_term(xq[m, k], codes[t, k, n]) for t in range(T)), axis=k)

    acc = te.compute((M, N), ibody, name=ACC_BLOCK)
    step = float(2.0**-frac_bits)
    return te.compute((M, N), lambda m, n: acc[m, n].astype("float32") * (scale[n] * tirx.const(step, "float32"))
                      + bias[n], name="shift_out")


def _conv_geometry(x, codes, stride, padding, dilation):
    B, C, H, W = (_i(s) for s in x.shape)
    T, ICg, KH, KW, OC = (_i(s) for s in codes.shape)
    OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return B, C, H, W, T, ICg, KH, KW, OC, OH, OW


def shift_conv2d_te(x: te.Tensor, codes: te.Tensor, scale: te.Tensor, bias: te.Tensor, stride, padding,
                    dilation, groups: int, frac_bits: int) -> te.Tensor:
    """NCHW conv: ``y[b, o, i, j] = (sum_{t,c,kh,kw} term(xpad[...], codes[t, c, kh, kw, o])) * scale[o] + bias[o]``."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    B, C, H, W, T, ICg, KH, KW, OC, OH, OW = _conv_geometry(x, codes, stride, padding, dilation)
    assert C == ICg * groups, f"shift_conv2d: x has {C} channels, codes expect {ICg * groups}"
    ocg = OC // groups
    ph, pw = padding
    int_path = frac_bits >= 0
    limit = int_clamp_limit(T, ICg * KH * KW)

    def load(b, c, h, w):
        v = x[b, c, h - ph, w - pw]
        return _quantize(v, frac_bits, limit) if int_path else v

    if ph or pw or int_path:
        zero = tirx.const(0, "int32" if int_path else "float32")
        src = te.compute(
            (B, C, H + 2 * ph, W + 2 * pw),
            lambda b, c, h, w: tirx.if_then_else(
                tirx.all(h >= ph, h < H + ph, w >= pw, w < W + pw), load(b, c, h, w), zero),
            name="shift_xq" if int_path else "shift_pad")
    else:
        src = x
    rc = te.reduce_axis((0, ICg), name="rc")
    rh = te.reduce_axis((0, KH), name="rh")
    rw = te.reduce_axis((0, KW), name="rw")
    term = _int_term if int_path else _float_term

    def body(b, o, i, j):
        xin = src[b, (o // ocg) * ICg + rc, i * stride[0] + rh * dilation[0], j * stride[1] + rw * dilation[1]]
        return te.sum(sum(term(xin, codes[t, rc, rh, rw, o]) for t in range(T)), axis=[rc, rh, rw])

    acc = te.compute((B, OC, OH, OW), body, name=ACC_BLOCK)
    if int_path:
        step = tirx.const(float(2.0**-frac_bits), "float32")
        return te.compute((B, OC, OH, OW),
                          lambda b, o, i, j: acc[b, o, i, j].astype("float32") * (scale[o] * step) + bias[o],
                          name="shift_out")
    return te.compute((B, OC, OH, OW), lambda b, o, i, j: acc[b, o, i, j] * scale[o] + bias[o], name="shift_out")


def binary_attention_te(q: te.Tensor, k: te.Tensor, v: te.Tensor) -> te.Tensor:
    """Sign-binarized additive attention on [G, N, D] / [G, N, Dv] (G = batch × heads).

    ``kv[d, e] = sum_j ±v[j, e]`` (sign of k[j, d]), ``num[i, e] = D·sum_j v[j, e] + sum_d ±kv[d, e]``
    (sign of q[i, d]), ``den[i] = N·D + sum_d ±sum_j sgn(k[j, d])``, ``out = num / den``.
    """
    G, N, D = (_i(s) for s in q.shape)
    Nk = _i(k.shape[1])
    Dv = _i(v.shape[2])
    zero = tirx.const(0.0, "float32")
    j = te.reduce_axis((0, Nk), name="j")
    kv = te.compute((G, D, Dv), lambda g, d, e: te.sum(
        tirx.Select(k[g, j, d] >= zero, v[g, j, e], zero - v[g, j, e]), axis=j), name=ACC_BLOCK)
    j2 = te.reduce_axis((0, Nk), name="j2")
    vs = te.compute((G, Dv), lambda g, e: te.sum(v[g, j2, e], axis=j2), name="attn_vsum")
    j3 = te.reduce_axis((0, Nk), name="j3")
    one = tirx.const(1.0, "float32")
    ks = te.compute((G, D), lambda g, d: te.sum(tirx.Select(k[g, j3, d] >= zero, one, zero - one), axis=j3),
                    name="attn_ksum")
    d1 = te.reduce_axis((0, D), name="d1")
    num = te.compute((G, N, Dv), lambda g, i, e: te.sum(
        tirx.Select(q[g, i, d1] >= zero, kv[g, d1, e], zero - kv[g, d1, e]), axis=d1), name="attn_num")
    d2 = te.reduce_axis((0, D), name="d2")
    den = te.compute((G, N), lambda g, i: te.sum(
        tirx.Select(q[g, i, d2] >= zero, ks[g, d2], zero - ks[g, d2]), axis=d2), name="attn_den")
    nd = tirx.const(float(Nk * D), "float32")
    dd = tirx.const(float(D), "float32")

    def out(g, i, e):
        dn = den[g, i] + nd
        return tirx.Select(dn > zero, (num[g, i, e] + dd * vs[g, e]) / tirx.max(dn, one), zero)

    return te.compute((G, N, Dv), out, name="attn_out")


# ----------------------------------------------------------------------------- PrimFuncs (tests, benchmarks)

def _attrs(func: tirx.PrimFunc) -> tirx.PrimFunc:
    return func.with_attr(SCHEDULE_ATTR, SCHEDULE_TAG)


def shift_linear_func(M: int, K: int, N: int, terms: int = 1, frac_bits: int = -1) -> tirx.PrimFunc:
    x = te.placeholder((M, K), "float32", name="x")
    codes = te.placeholder((terms, K, N), "uint8", name="codes")
    scale = te.placeholder((N,), "float32", name="scale")
    bias = te.placeholder((N,), "float32", name="bias")
    y = shift_linear_te(x, codes, scale, bias, frac_bits)
    return _attrs(te.create_prim_func([x, codes, scale, bias, y]))


def shift_conv2d_func(x_shape, codes_shape, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
                      frac_bits: int = -1) -> tirx.PrimFunc:
    x = te.placeholder(tuple(x_shape), "float32", name="x")
    codes = te.placeholder(tuple(codes_shape), "uint8", name="codes")
    oc = codes_shape[-1]
    scale = te.placeholder((oc,), "float32", name="scale")
    bias = te.placeholder((oc,), "float32", name="bias")
    y = shift_conv2d_te(x, codes, scale, bias, stride, padding, dilation, groups, frac_bits)
    return _attrs(te.create_prim_func([x, codes, scale, bias, y]))


def binary_attention_func(G: int, N: int, D: int, Dv: int | None = None) -> tirx.PrimFunc:
    q = te.placeholder((G, N, D), "float32", name="q")
    k = te.placeholder((G, N, D), "float32", name="k")
    v = te.placeholder((G, N, Dv or D), "float32", name="v")
    return _attrs(te.create_prim_func([q, k, v, binary_attention_te(q, k, v)]))


def dense_linear_func(M: int, K: int, N: int) -> tirx.PrimFunc:
    """The dense fp32 baseline with the same layout and block names (benchmarks)."""
    x = te.placeholder((M, K), "float32", name="x")
    w = te.placeholder((K, N), "float32", name="w")
    bias = te.placeholder((N,), "float32", name="bias")
    k = te.reduce_axis((0, K), name="k")
    acc = te.compute((M, N), lambda m, n: te.sum(x[m, k] * w[k, n], axis=k), name=ACC_BLOCK)
    y = te.compute((M, N), lambda m, n: acc[m, n] + bias[n], name="shift_out")
    return _attrs(te.create_prim_func([x, w, bias, y]))


def dense_conv2d_func(x_shape, w_shape, stride=(1, 1), padding=(0, 0)) -> tirx.PrimFunc:
    """Dense fp32 conv baseline in the shift kernel's weight layout [IC, KH, KW, OC] (benchmarks)."""
    B, C, H, W = x_shape
    IC, KH, KW, OC = w_shape
    x = te.placeholder(tuple(x_shape), "float32", name="x")
    w = te.placeholder(tuple(w_shape), "float32", name="w")
    bias = te.placeholder((OC,), "float32", name="bias")
    ph, pw = padding
    OH = (H + 2 * ph - KH) // stride[0] + 1
    OW = (W + 2 * pw - KW) // stride[1] + 1
    xp = te.compute((B, C, H + 2 * ph, W + 2 * pw), lambda b, c, h, ww: tirx.if_then_else(
        tirx.all(h >= ph, h < H + ph, ww >= pw, ww < W + pw), x[b, c, h - ph, ww - pw],
        tirx.const(0.0, "float32")), name="shift_pad")
    rc, rh, rw = te.reduce_axis((0, IC), "rc"), te.reduce_axis((0, KH), "rh"), te.reduce_axis((0, KW), "rw")
    acc = te.compute((B, OC, OH, OW), lambda b, o, i, j: te.sum(
        xp[b, rc, i * stride[0] + rh, j * stride[1] + rw] * w[rc, rh, rw, o], axis=[rc, rh, rw]), name=ACC_BLOCK)
    y = te.compute((B, OC, OH, OW), lambda b, o, i, j: acc[b, o, i, j] + bias[o], name="shift_out")
    return _attrs(te.create_prim_func([x, w, bias, y]))


# ----------------------------------------------------------------------------- schedules

def _divisor(n: int, prefs) -> int:
    for p in prefs:
        if p <= n and n % p == 0:
            return p
    return 1


def _blocks(sch: s_tir.Schedule) -> list:
    root = sch.get_sblock("root") if _has_block(sch, "root") else None
    if root is not None:
        return list(sch.get_child_blocks(root))
    return list(sch.get_child_blocks(sch.get_loops(sch.get_sblock(ACC_BLOCK))[0]))


def _has_block(sch, name) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # noqa: BLE001 - s_tir raises a generic error for a missing block
        return False


def _is_reduction(sch, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _extents(sch, loops) -> list[int]:
    return [int(sch.get(lp).extent) for lp in loops]


def _cpu_elementwise(sch, block, vec: int = 8) -> None:
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops)
    n = int(sch.get(fused).extent)
    v = _divisor(n, (vec, 4, 2))
    outer, inner = sch.split(fused, [None, v])
    sch.parallel(outer)
    if v > 1:
        sch.vectorize(inner)


def _cpu_reduction_outer_parallel(sch, block) -> None:
    """Auxiliary reductions (attention sums): parallel over the spatial loops, serial reduction."""
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    spatial = [lp for lp, iv in zip(loops, iters) if iv.iter_type != tirx.IterVar.CommReduce]
    if spatial:
        sch.parallel(sch.fuse(*spatial[:-1]) if len(spatial) > 1 else spatial[0])


def _cpu_tiled_acc(sch, block, vec: int = 8) -> None:
    """Register-tile [rows × (2·vec) output channels], reduction outside the tile, vectorize channels.

    Works for both kernels: the last spatial axis of the matmul is the output channel (contiguous
    codes); for conv the tile is [oc × ow] with ow vectorized (contiguous input rows).
    """
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    spatial = [lp for lp, iv in zip(loops, iters) if iv.iter_type != tirx.IterVar.CommReduce]
    reduce_ = [lp for lp, iv in zip(loops, iters) if iv.iter_type == tirx.IterVar.CommReduce]
    ext = _extents(sch, spatial)
    if len(spatial) == 2:  # matmul: [M, N]; tile rows, vectorize N
        m, n = spatial
        tm = _divisor(ext[0], (4, 2))
        tn = _divisor(ext[1], (2 * vec, vec, 4, 2))
        m0, m1 = sch.split(m, [None, tm])
        n0, n1 = sch.split(n, [None, tn])
        sch.reorder(m0, n0, *reduce_, m1, n1)
        outer = [m0, n0]
        unroll, vecl = m1, n1
    else:  # conv: [B, OC, OH, OW]; tile OC (unrolled) × OW (vectorized)
        b, o, h, w = spatial
        to = _divisor(ext[1], (4, 2))
        tw = _divisor(ext[3], (vec, 4, 2))
        o0, o1 = sch.split(o, [None, to])
        w0, w1 = sch.split(w, [None, tw])
        sch.reorder(b, o0, h, w0, *reduce_, o1, w1)
        outer = [b, o0, h, w0]
        unroll, vecl = o1, w1
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, outer[-1])
    sch.parallel(sch.fuse(*outer))
    sch.unroll(unroll)
    if int(sch.get(vecl).extent) > 1:
        sch.vectorize(vecl)
    sch.decompose_reduction(block, reduce_[0])
    lloops = sch.get_loops(local)
    if len(lloops) >= 2 and int(sch.get(lloops[-1]).extent) > 1:  # [0] is the parallel tile loop
        sch.vectorize(lloops[-1])


def schedule_cpu(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The default CPU schedule of a kernel from this module (marked ``tirx.is_scheduled``)."""
    sch = s_tir.Schedule(func)
    names = [sch.get(b).name_hint for b in _blocks(sch)]
    for name in names:
        block = sch.get_sblock(name)
        if name == ACC_BLOCK and len(sch.get(block).iter_vars) in (3, 7) and _is_gemm_like(sch, block):
            _cpu_tiled_acc(sch, block)
        elif _is_reduction(sch, block):
            _cpu_reduction_outer_parallel(sch, block)
        else:
            _cpu_elementwise(sch, block)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _is_gemm_like(sch, block) -> bool:
    iters = sch.get(block).iter_vars
    n_spatial = sum(iv.iter_type != tirx.IterVar.CommReduce for iv in iters)
    return n_spatial in (2, 4)


def schedule_cuda(func: tirx.PrimFunc, threads: int = 128) -> tirx.PrimFunc:
    """The default CUDA schedule: one thread per output element, accumulator in a register.

    Every block's spatial loops are fused and split over ``blockIdx.x`` × ``threadIdx.x``;
    reductions run serially per thread into a ``local`` accumulator.
    """
    sch = s_tir.Schedule(func)
    names = [sch.get(b).name_hint for b in _blocks(sch)]
    for name in names:
        block = sch.get_sblock(name)
        iters = sch.get(block).iter_vars
        loops = sch.get_loops(block)
        spatial = [lp for lp, iv in zip(loops, iters) if iv.iter_type != tirx.IterVar.CommReduce]
        reduce_ = [lp for lp, iv in zip(loops, iters) if iv.iter_type == tirx.IterVar.CommReduce]
        if reduce_:
            local = sch.cache_write(block, 0, "local")
        fused = sch.fuse(*spatial)
        n = int(sch.get(fused).extent)
        t = min(threads, 1 << max(0, (n - 1).bit_length()))
        bx, tx = sch.split(fused, [None, t])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        if reduce_:
            sch.reverse_compute_at(local, tx)
            sch.decompose_reduction(block, reduce_[0])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def apply_default_schedules(mod: tvm.IRModule, target: tvm.target.Target | str) -> tvm.IRModule:
    """Give every shift/add kernel in ``mod`` (``fxpress.schedule == "shift_add"``) its hand schedule.

    Meant to run before dlight (which then leaves these kernels alone: they are marked
    ``tirx.is_scheduled``); kernels already scheduled or tuned are left as they are.
    """
    kind = target.kind.name if isinstance(target, tvm.target.Target) else str(target)

    def schedule(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc | None:
        try:
            return schedule_cuda(func) if kind == "cuda" else schedule_cpu(func)
        except Exception as err:  # noqa: BLE001 - a schedule bug must not fail the build
            # Unscheduled is still correct: plain loops on CPU, dlight's GPU fallback binds threads.
            log.warning("shift_add: default %s schedule failed for %s (%s); left to dlight",
                        kind, name, str(err).splitlines()[0] if str(err) else type(err).__name__)
            return None

    return schedule_tagged(mod, SCHEDULE_TAG, schedule)

