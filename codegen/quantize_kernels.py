"""TIR kernels for the quantize family: integer GEMM / conv / matmul with int32 accumulation.

Each kernel reproduces its reference op in ``fxpress.passes.quantize.ops`` bit for bit in the integer
part (``acc = sum (xq - zp) * w`` in int32) and op for op in the float32 epilogue
(``sum_c float32(acc_c + bias_q[c]) * (w_scale[c] * x_scale)``), so TVM's output matches the FX graph
up to nothing (tests check a max error of a few ulps at most).

Two definitions per op:

* a *generic* TE kernel (``*_func``) — plain reductions over the natural layouts. The Relax converters
  (``lowering/quantize_lowering.py``) emit it. It is what runs when nothing schedules it (CUDA: dlight binds
  it; llvm: unscheduled loops, correct but slow);
* an *AVX2* kernel (``*_avx2_func``) with the same parameters, built and scheduled here: weights are
  repacked in-kernel into ``[N/8, K/2, 8, 2]`` tiles, and the inner product is tensorized with
  ``vpmaddwd`` (16 u8×s8 products summed pairwise into 8 int32 lanes, exact: no int16 saturation,
  unlike ``vpmaddubsw``), register-tiled 4 rows × 24 output channels and parallel over tiles.

``apply_default_schedules(mod, target)`` replaces every generic kernel of this family (marked
``fxpress.schedule = "quantize"``, with its construction arguments in ``fxpress.quantize_args``) by
the AVX2 kernel when the llvm target has AVX2, and marks it ``tirx.is_scheduled`` so dlight leaves it
alone. SplitQuant's three clusters are three GEMMs over the same packed input tile: the ``C·N``
output columns of one GEMM, summed per channel in the epilogue.
"""
from __future__ import annotations

import json

import tvm
from tvm import s_tir, te, tirx
from tvm.script import tirx as T

from .flat_elementwise import flat_elementwise
from .kernel_families import SCHEDULE_ATTR, schedule_tagged

SCHEDULE_TAG = "quantize"
ARGS_ATTR = "fxpress.quantize_args"

__all__ = [
    "quantize_func", "dequantize_func", "qlinear_func", "qconv2d_func", "qmatmul_func", "qlinear_dynamic_func",
    "qlinear_avx2_func", "qconv2d_avx2_func", "apply_default_schedules", "has_avx2", "SCHEDULE_ATTR", "SCHEDULE_TAG",
]


def _f32(v: float):
    return tirx.const(float(v), "float32")


def _i32(v: int):
    return tirx.const(int(v), "int32")


def _tag(func: tirx.PrimFunc, kind: str, **args) -> tirx.PrimFunc:
    return func.with_attrs({SCHEDULE_ATTR: SCHEDULE_TAG, ARGS_ATTR: json.dumps({"kind": kind, **args})})


def _quant_value(v, scale: float, zp: int, qmin: int, qmax: int, dtype: str):
    q = tirx.nearbyint(v / _f32(scale)) + _f32(zp)  # round half to even, like torch.round / ORT
    return tirx.max(tirx.min(q, _f32(qmax)), _f32(qmin)).astype(dtype)


def _dequant_value(q, scale: float, zp: int):
    return (q.astype("float32") - _f32(zp)) * _f32(scale)


def _qdtype(qmin: int) -> str:
    return "uint8" if qmin >= 0 else "int8"


# ----------------------------------------------------------------------------- elementwise

def quantize_func(shape, scale: float, zp: int, qmin: int, qmax: int, in_dtype: str = "float32") -> tirx.PrimFunc:
    x = te.placeholder(tuple(shape), in_dtype, name="x")
    y = te.compute(x.shape, lambda *i: _quant_value(x(*i).astype("float32"), scale, zp, qmin, qmax, _qdtype(qmin)),
                   name="q_quantize")
    return _tag(te.create_prim_func([x, y]), "quantize", shape=list(shape), scale=scale, zp=zp, qmin=qmin,
                qmax=qmax, in_dtype=in_dtype)


def dequantize_func(shape, scale: float, zp: int, in_dtype: str) -> tirx.PrimFunc:
    q = te.placeholder(tuple(shape), in_dtype, name="q")
    y = te.compute(q.shape, lambda *i: _dequant_value(q(*i), scale, zp), name="q_dequantize")
    return _tag(te.create_prim_func([q, y]), "dequantize", shape=list(shape), scale=scale, zp=zp, in_dtype=in_dtype)


# ----------------------------------------------------------------------------- generic integer kernels

def _epilogue(acc_at, wsum, ws, bq, C: int, x_scale: float, x_zp: int):
    """fn(_, channel) -> sum_c float32(acc_at(c) - zp·wsum[c, ch] + bq[c, ch]) · (ws[c, ch]·x_scale)."""

    def value(_, ch):
        total = None
        for c in range(C):
            a = acc_at(c) - wsum[c, ch] * _i32(x_zp) + bq[c, ch]
            t = a.astype("float32") * (ws[c, ch] * _f32(x_scale))
            total = t if total is None else total + t
        return total

    return value


def qlinear_func(M: int, K: int, C: int, N: int, x_scale: float, x_zp: int, x_dtype: str = "uint8") -> tirx.PrimFunc:
    """y[m, n] = sum_c float32(sum_k xq[m,k]·w[c,n,k] − zp·sum_k w[c,n,k] + bq[c,n]) · (ws[c,n]·x_scale)."""
    x = te.placeholder((M, K), x_dtype, name="xq")
    w = te.placeholder((C, N, K), "int8", name="w")
    ws = te.placeholder((C, N), "float32", name="w_scale")
    bq = te.placeholder((C, N), "int32", name="bias_q")
    k = te.reduce_axis((0, K), name="k")
    acc = te.compute((M, C, N), lambda m, c, n: te.sum(x[m, k].astype("int32") * w[c, n, k].astype("int32"), axis=k),
                     name="q_acc")
    kk = te.reduce_axis((0, K), name="kk")
    wsum = te.compute((C, N), lambda c, n: te.sum(w[c, n, kk].astype("int32"), axis=kk), name="q_wsum")
    y = te.compute((M, N), lambda m, n: _epilogue(lambda c: acc[m, c, n], wsum, ws, bq, C, x_scale, x_zp)(None, n),
                   name="q_out")
    return _tag(te.create_prim_func([x, w, ws, bq, y]), "qlinear", M=M, K=K, C=C, N=N, x_scale=x_scale, x_zp=x_zp,
                x_dtype=x_dtype)


def _conv_out(H, W, KH, KW, stride, padding, dilation):
    OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return OH, OW


def _padded_input(x, padding, zp: int, name: str):
    B, Cin, H, W = (int(s) for s in x.shape)
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    return te.compute((B, Cin, H + 2 * ph, W + 2 * pw), lambda b, c, h, ww: tirx.if_then_else(
        tirx.all(h >= ph, h < H + ph, ww >= pw, ww < W + pw), x[b, c, h - ph, ww - pw],
        tirx.const(zp, x.dtype)), name=name)


def qconv2d_func(x_shape, w_shape, x_scale: float, x_zp: int, stride, padding, dilation, groups: int,
                 x_dtype: str = "uint8") -> tirx.PrimFunc:
    """NCHW integer conv; the input is padded with its zero point (real 0)."""
    B, Cin, H, W = x_shape
    C, O, Ig, KH, KW = w_shape
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    OH, OW = _conv_out(H, W, KH, KW, stride, padding, dilation)
    og = O // groups
    x = te.placeholder(tuple(x_shape), x_dtype, name="xq")
    w = te.placeholder(tuple(w_shape), "int8", name="w")
    ws = te.placeholder((C, O), "float32", name="w_scale")
    bq = te.placeholder((C, O), "int32", name="bias_q")
    xp = _padded_input(x, padding, x_zp, "q_pad")
    ri, rh, rw = te.reduce_axis((0, Ig), "ri"), te.reduce_axis((0, KH), "rh"), te.reduce_axis((0, KW), "rw")
    acc = te.compute((B, C, O, OH, OW), lambda b, c, o, i, j: te.sum(
        xp[b, (o // og) * Ig + ri, i * stride[0] + rh * dilation[0], j * stride[1] + rw * dilation[1]].astype("int32")
        * w[c, o, ri, rh, rw].astype("int32"), axis=[ri, rh, rw]), name="q_acc")
    si, sh, sw = te.reduce_axis((0, Ig), "si"), te.reduce_axis((0, KH), "sh"), te.reduce_axis((0, KW), "sw")
    wsum = te.compute((C, O), lambda c, o: te.sum(w[c, o, si, sh, sw].astype("int32"), axis=[si, sh, sw]),
                      name="q_wsum")
    y = te.compute((B, O, OH, OW), lambda b, o, i, j: _epilogue(
        lambda c: acc[b, c, o, i, j], wsum, ws, bq, C, x_scale, x_zp)(None, o), name="q_out")
    return _tag(te.create_prim_func([x, w, ws, bq, y]), "qconv2d", x_shape=list(x_shape), w_shape=list(w_shape),
                x_scale=x_scale, x_zp=x_zp, stride=stride, padding=padding, dilation=dilation, groups=groups,
                x_dtype=x_dtype)


def qmatmul_func(G: int, M: int, K: int, N: int, a_scale: float, a_zp: int, b_scale: float, b_zp: int,
                 a_dtype: str = "uint8", b_dtype: str = "uint8") -> tirx.PrimFunc:
    """Batched act × act: y[g] = float32(sum_k (a[g]-a_zp)(b[g]-b_zp)) · (a_scale·b_scale)."""
    a = te.placeholder((G, M, K), a_dtype, name="aq")
    b = te.placeholder((G, K, N), b_dtype, name="bq")
    k = te.reduce_axis((0, K), name="k")
    acc = te.compute((G, M, N), lambda g, m, n: te.sum(
        (a[g, m, k].astype("int32") - _i32(a_zp)) * (b[g, k, n].astype("int32") - _i32(b_zp)), axis=k), name="q_acc")
    y = te.compute((G, M, N), lambda g, m, n: acc[g, m, n].astype("float32") * (_f32(a_scale) * _f32(b_scale)),
                   name="q_out")
    return _tag(te.create_prim_func([a, b, y]), "qmatmul", G=G, M=M, K=K, N=N, a_scale=a_scale, a_zp=a_zp,
                b_scale=b_scale, b_zp=b_zp, a_dtype=a_dtype, b_dtype=b_dtype)


def qlinear_dynamic_func(M: int, K: int, C: int, N: int) -> tirx.PrimFunc:
    """Dynamic quantization (ONNX DynamicQuantizeLinear's uint8 scale/zero point from x) + integer GEMM."""
    x = te.placeholder((M, K), "float32", name="x")
    w = te.placeholder((C, N, K), "int8", name="w")
    ws = te.placeholder((C, N), "float32", name="w_scale")
    bias = te.placeholder((N,), "float32", name="bias")
    r0, r1 = te.reduce_axis((0, M), "r0"), te.reduce_axis((0, K), "r1")
    lo = te.compute((1,), lambda _: te.min(x[r0, r1], axis=[r0, r1]), name="q_min")
    s0, s1 = te.reduce_axis((0, M), "s0"), te.reduce_axis((0, K), "s1")
    hi = te.compute((1,), lambda _: te.max(x[s0, s1], axis=[s0, s1]), name="q_max")

    def qscale(_):
        s = (tirx.max(hi[0], _f32(0.0)) - tirx.min(lo[0], _f32(0.0))) / _f32(255.0)
        return tirx.Select(s == _f32(0.0), _f32(1.0), s)

    scale = te.compute((1,), qscale, name="q_scale")
    zp = te.compute((1,), lambda _: tirx.max(tirx.min(tirx.nearbyint((_f32(0.0) - tirx.min(lo[0], _f32(0.0)))
                                                                      / scale[0]), _f32(255.0)), _f32(0.0)),
                    name="q_zp")
    xq = te.compute((M, K), lambda m, kk: tirx.max(tirx.min(tirx.nearbyint(x[m, kk] / scale[0]) + zp[0], _f32(255.0)),
                                                   _f32(0.0)).astype("int32") - zp[0].astype("int32"), name="q_xq")
    k = te.reduce_axis((0, K), name="k")
    acc = te.compute((M, C, N), lambda m, c, n: te.sum(xq[m, k] * w[c, n, k].astype("int32"), axis=k), name="q_acc")

    def out(m, n):
        total = None
        for c in range(C):
            t = acc[m, c, n].astype("float32") * (scale[0] * ws[c, n])
            total = t if total is None else total + t
        return total + bias[n]

    y = te.compute((M, N), out, name="q_out")
    return _tag(te.create_prim_func([x, w, ws, bias, y]), "qlinear_dynamic", M=M, K=K, C=C, N=N)


# ----------------------------------------------------------------------------- AVX2 tensor intrinsic

def _dot_intrin(a_dtype: str, b_dtype: str = "int8"):
    ext = "int16x2"

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((2,), a_dtype, offset_factor=1), B: T.Buffer((8, 2), b_dtype, offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), a_dtype, offset_factor=1), B: T.Buffer((8, 2), b_dtype, offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            a16 = T.cast(A.vload([0], a_dtype + "x2"), ext)
            a = T.reinterpret(T.broadcast(T.reinterpret(a16, dtype="int32"), 8), dtype="int16x16")
            b = T.cast(B.vload([0, 0], dtype=b_dtype + "x16"), "int16x16")  # sign- or zero-extends
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                "int32x8", T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a, b)

    return desc, impl


_INTRINS: dict[tuple[str, str], str] = {}


def _intrin_name(a_dtype: str, b_dtype: str = "int8") -> str:
    key = (a_dtype, b_dtype)
    if key not in _INTRINS:
        short = {"uint8": "u8", "int8": "i8"}
        name = f"fxpress_dot_8x2_{short[a_dtype]}{short[b_dtype]}i32_avx2"
        try:
            s_tir.TensorIntrin.register(name, *_dot_intrin(a_dtype, b_dtype))
        except Exception:  # noqa: BLE001 - already registered by an earlier import of this module
            pass
        _INTRINS[key] = name
    return _INTRINS[key]


def has_avx2(target) -> bool:
    from tvm.target import codegen

    try:
        return target.kind.name == "llvm" and bool(codegen.target_has_features("avx2", target))
    except Exception:  # noqa: BLE001
        return False


MB, NV = 4, 3  # register tile: 4 rows × 3 vectors of 8 output channels (12 ymm accumulators)


def _gemm_core(x_at, Mp: int, Kp: int, wpack, Np: int, name: str = "q_acc", lanes: int = 8, group: int = 2):
    """acc[m, j] = Σ_k x[m, k] · w[j, k] over weights packed as [Np/lanes, Kp/group, lanes, group]."""
    k = te.reduce_axis((0, Kp), name="k")
    return te.compute((Mp, Np), lambda m, j: te.sum(
        x_at(m, k).astype("int32") * wpack[j // lanes, k // group, j % lanes, k % group].astype("int32"), axis=k),
        name=name)


def _schedule_gemm(sch: s_tir.Schedule, intrin: str, *, rows: int = MB, vectors: int = NV, lanes: int = 8,
                   group: int = 2, panel_major: bool = False, block_name: str = "q_acc") -> None:
    """[batch,] M × N tiles of rows × (vectors·lanes), parallel over tiles, the lanes × group inner product
    tensorized with ``intrin``. ``panel_major`` walks a weight panel across every row block (weights packed
    once, reused by all rows) instead of rows first."""
    b = sch.get_sblock(block_name)
    *batch, i, j, kk = sch.get_loops(b)
    io, ii = sch.split(i, [None, rows])
    jo, jv, ji = sch.split(j, [None, vectors, lanes])
    ko, ki = sch.split(kk, [None, group])
    tiles = (jo, io) if panel_major else (io, jo)
    sch.reorder(*batch, *tiles, ko, ii, jv, ji, ki)
    outer = sch.fuse(*batch, *tiles)
    sch.parallel(outer)
    cb = sch.cache_write(b, 0, "local")
    sch.reverse_compute_at(cb, outer)
    init = sch.decompose_reduction(b, ko)
    sch.tensorize(sch.blockize(ji), intrin)
    sch.unroll(ii)
    sch.unroll(jv)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(cb)[-1])


def _schedule_simple(sch: s_tir.Schedule, name: str, vec: bool = False) -> None:
    try:
        b = sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - block inlined or absent
        return
    loops = sch.get_loops(b)
    iters = sch.get(b).iter_vars
    spatial = [lp for lp, iv in zip(loops, iters) if iv.iter_type != tirx.IterVar.CommReduce]
    if not spatial:
        return
    if len(spatial) > 1:
        outer = sch.fuse(*spatial[:-1])
        sch.parallel(outer)
        if vec and len(loops) == len(spatial):
            ext = int(sch.get(spatial[-1]).extent)
            if ext % 8 == 0:
                _, v = sch.split(spatial[-1], [None, 8])
                sch.vectorize(v)
    else:
        sch.parallel(spatial[0])


def _pack_weights(w_at, C: int, N: int, K: int, Np1: int, Kp: int, dtype: str = "int8"):
    """[C·Np1/8, Kp/2, 8, 2] tiles of the C weight matrices [N, K] (each padded to Np1 rows, zeros).

    Tile row ``jo`` is cluster ``jo // (Np1/8)``: index arithmetic depends on the outer loop only, and
    the bounds test is left out when nothing is padded."""
    t1 = Np1 // 8

    def value(jo, ko, ni, ki):
        c, n, k = jo // t1, (jo % t1) * 8 + ni, ko * 2 + ki
        if N % 8 == 0 and K % 2 == 0:
            return w_at(c, n, k)
        return tirx.if_then_else(tirx.all(n < N, k < K), w_at(c, tirx.min(n, N - 1), tirx.min(k, K - 1)),
                                 tirx.const(0, dtype))

    return te.compute((C * t1, Kp // 2, 8, 2), value, name="q_wpack")


def _schedule_pack(sch: s_tir.Schedule, name: str = "q_wpack") -> None:
    b = sch.get_sblock(name)
    loops = sch.get_loops(b)
    sch.parallel(sch.fuse(*loops[:-3]) if len(loops) > 4 else loops[0])
    sch.unroll(loops[-1])


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def qlinear_avx2_func(M: int, K: int, C: int, N: int, x_scale: float, x_zp: int, x_dtype: str = "uint8") -> tirx.PrimFunc:
    """Same parameters and numbers as ``qlinear_func``; weights repacked in-kernel, vpmaddwd inner product."""
    x = te.placeholder((M, K), x_dtype, name="xq")
    w = te.placeholder((C, N, K), "int8", name="w")
    ws = te.placeholder((C, N), "float32", name="w_scale")
    bq = te.placeholder((C, N), "int32", name="bias_q")
    Mp, Kp, Np1 = _round_up(M, MB), _round_up(K, 2), _round_up(N, 8 * NV)
    wp = _pack_weights(lambda c, n, k: w[c, n, k], C, N, K, Np1, Kp)
    if Mp == M and Kp == K:
        x_at = lambda m, k: x[m, k]  # noqa: E731 - nothing to pad: read the input directly
    else:
        xp = te.compute((Mp, Kp), lambda m, k: tirx.if_then_else(
            tirx.all(m < M, k < K), x[tirx.min(m, M - 1), tirx.min(k, K - 1)], tirx.const(0, x_dtype)), name="q_xpad")
        x_at = lambda m, k: xp[m, k]  # noqa: E731
    acc = _gemm_core(x_at, Mp, Kp, wp, C * Np1)
    kk = te.reduce_axis((0, K), name="kk")
    wsum = te.compute((C, N), lambda c, n: te.sum(w[c, n, kk].astype("int32"), axis=kk), name="q_wsum")
    y = te.compute((M, N), lambda m, n: _epilogue(lambda c: acc[m, c * Np1 + n], wsum, ws, bq, C, x_scale, x_zp)(None, n),
                   name="q_out")
    sch = s_tir.Schedule(te.create_prim_func([x, w, ws, bq, y]))
    _schedule_gemm(sch, _intrin_name(x_dtype))
    _schedule_pack(sch)
    for name in ("q_xpad", "q_wsum"):
        _schedule_simple(sch, name)
    _schedule_simple(sch, "q_out", vec=True)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def qconv2d_avx2_func(x_shape, w_shape, x_scale: float, x_zp: int, stride, padding, dilation, groups: int,
                      x_dtype: str = "uint8") -> tirx.PrimFunc:
    """``qconv2d_func`` as im2col (padded with the zero point) + the tensorized GEMM; groups == 1."""
    B, Cin, H, W = x_shape
    C, O, Ig, KH, KW = w_shape
    assert groups == 1, "qconv2d_avx2_func handles groups == 1"
    OH, OW = _conv_out(H, W, KH, KW, stride, padding, dilation)
    K = Ig * KH * KW
    M = B * OH * OW
    Mp, Kp, Np1 = _round_up(M, MB), _round_up(K, 2), _round_up(O, 8 * NV)
    x = te.placeholder(tuple(x_shape), x_dtype, name="xq")
    w = te.placeholder(tuple(w_shape), "int8", name="w")
    ws = te.placeholder((C, O), "float32", name="w_scale")
    bq = te.placeholder((C, O), "int32", name="bias_q")
    ph, pw = padding

    def col_value(m, k):
        b, r = m // (OH * OW), m % (OH * OW)
        oh, ow = r // OW, r % OW
        ci, r2 = k // (KH * KW), k % (KH * KW)
        kh, kw = r2 // KW, r2 % KW
        h = oh * stride[0] + kh * dilation[0] - ph
        ww = ow * stride[1] + kw * dilation[1] - pw
        inside = tirx.all(m < M, k < K, h >= 0, h < H, ww >= 0, ww < W)
        return tirx.if_then_else(inside, x[tirx.min(b, B - 1), tirx.min(ci, Cin - 1), tirx.max(tirx.min(h, H - 1), 0),
                                           tirx.max(tirx.min(ww, W - 1), 0)],
                                 tirx.const(x_zp, x_dtype))

    col = te.compute((Mp, Kp), col_value, name="q_xpad")
    wp = _pack_weights(lambda c, o, k: w[c, o, k // (KH * KW), (k % (KH * KW)) // KW, k % KW], C, O, K, Np1, Kp)
    acc = _gemm_core(lambda m, k: col[m, k], Mp, Kp, wp, C * Np1)
    si, sh, sw = te.reduce_axis((0, Ig), "si"), te.reduce_axis((0, KH), "sh"), te.reduce_axis((0, KW), "sw")
    wsum = te.compute((C, O), lambda c, o: te.sum(w[c, o, si, sh, sw].astype("int32"), axis=[si, sh, sw]),
                      name="q_wsum")
    # padded k (>= K) multiplies zero weights, so its (zero-point) input adds nothing
    y = te.compute((B, O, OH, OW), lambda b, o, i, j: _epilogue(
        lambda c: acc[b * OH * OW + i * OW + j, c * Np1 + o], wsum, ws, bq, C, x_scale, x_zp)(None, o), name="q_out")
    sch = s_tir.Schedule(te.create_prim_func([x, w, ws, bq, y]))
    _schedule_gemm(sch, _intrin_name(x_dtype))
    _schedule_pack(sch)
    for name in ("q_xpad", "q_wsum", "q_out"):
        _schedule_simple(sch, name)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def qmatmul_avx2_func(G: int, M: int, K: int, N: int, a_scale: float, a_zp: int, b_scale: float, b_zp: int,
                      a_dtype: str = "uint8", b_dtype: str = "uint8") -> tirx.PrimFunc:
    """``qmatmul_func`` with the tensorized GEMM (u8 × u8 products are exact in vpmaddwd too); zero
    points come out of the sum: Σ(a−za)(b−zb) = Σab − za·Σb − zb·Σa + K·za·zb."""
    a = te.placeholder((G, M, K), a_dtype, name="aq")
    b = te.placeholder((G, K, N), b_dtype, name="bq")
    Mp, Kp, Np = _round_up(M, MB), _round_up(K, 2), _round_up(N, 8 * NV)
    bp = te.compute((G, Np // 8, Kp // 2, 8, 2), lambda g, no, ko, ni, ki: tirx.if_then_else(
        tirx.all(no * 8 + ni < N, ko * 2 + ki < K), b[g, tirx.min(ko * 2 + ki, K - 1), tirx.min(no * 8 + ni, N - 1)],
        tirx.const(0, b_dtype)), name="q_wpack")
    ap = te.compute((G, Mp, Kp), lambda g, m, k: tirx.if_then_else(
        tirx.all(m < M, k < K), a[g, tirx.min(m, M - 1), tirx.min(k, K - 1)], tirx.const(0, a_dtype)), name="q_xpad")
    k = te.reduce_axis((0, Kp), name="k")
    acc = te.compute((G, Mp, Np), lambda g, m, j: te.sum(
        ap[g, m, k].astype("int32") * bp[g, j // 8, k // 2, j % 8, k % 2].astype("int32"), axis=k), name="q_acc")
    ka, kb = te.reduce_axis((0, K), name="ka"), te.reduce_axis((0, K), name="kb")
    asum = te.compute((G, M), lambda g, m: te.sum(a[g, m, ka].astype("int32"), axis=ka), name="q_asum")
    bsum = te.compute((G, N), lambda g, n: te.sum(b[g, kb, n].astype("int32"), axis=kb), name="q_wsum")
    y = te.compute((G, M, N), lambda g, m, n: (acc[g, m, n] - _i32(a_zp) * bsum[g, n] - _i32(b_zp) * asum[g, m]
                                               + _i32(K * a_zp * b_zp)).astype("float32")
                   * (_f32(a_scale) * _f32(b_scale)), name="q_out")
    sch = s_tir.Schedule(te.create_prim_func([a, b, y]))
    _schedule_gemm(sch, _intrin_name(a_dtype, b_dtype))
    _schedule_pack(sch)
    for name in ("q_xpad", "q_asum", "q_wsum"):
        _schedule_simple(sch, name)
    _schedule_simple(sch, "q_out", vec=True)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _elementwise_cpu(kind: str, args: dict) -> tirx.PrimFunc:
    """The CPU form of a quantize / dequantize kernel: the same value expression, flat loops."""
    if kind == "quantize":
        out_dtype = _qdtype(args["qmin"])
        return flat_elementwise(args["shape"], args["in_dtype"], out_dtype, lambda v: _quant_value(
            v.astype("float32"), args["scale"], args["zp"], args["qmin"], args["qmax"], out_dtype))
    return flat_elementwise(args["shape"], args["in_dtype"], "float32",
                             lambda q: _dequant_value(q, args["scale"], args["zp"]))


def _schedule_generic_cpu(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Parallel over the outer spatial loops of every block (kernels without an AVX2 form)."""
    sch = s_tir.Schedule(func)
    for b in list(sch.get_child_blocks(sch.get_sblock("root"))):
        name = sch.get(b).name_hint
        _schedule_simple(sch, name, vec=False)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _vnni(target) -> bool:
    from .quantize_packed import VNNI, layout_for

    return layout_for(target) is VNNI


def cpu_kernel(func: tirx.PrimFunc, target) -> tirx.PrimFunc:
    """The CPU kernel for a generic kernel of this family (AVX2 form when the target has AVX2)."""
    args = json.loads(str(func.attrs[ARGS_ATTR]))
    kind = args.pop("kind")
    avx2 = has_avx2(target)
    if kind in ("quantize", "dequantize"):
        out = _elementwise_cpu(kind, args)
    elif kind == "qlinear" and avx2:
        out = qlinear_avx2_func(**args)
    elif kind == "qconv2d" and avx2 and args["groups"] == 1:
        out = qconv2d_avx2_func(**args)
    elif kind == "qmatmul" and args["a_dtype"] == "uint8" and _vnni(target):
        from .quantize_packed import qmatmul_vnni_func  # that module builds on this one

        out = qmatmul_vnni_func(**args)
    elif kind == "qmatmul" and avx2:
        out = qmatmul_avx2_func(**args)
    else:
        out = _schedule_generic_cpu(func)
    if "global_symbol" in out.attrs:
        out = out.without_attr("global_symbol")
    if "global_symbol" in func.attrs:
        out = out.with_attr("global_symbol", func.attrs["global_symbol"])
    return out.with_attrs({SCHEDULE_ATTR: SCHEDULE_TAG, ARGS_ATTR: func.attrs[ARGS_ATTR]})


def schedule_cuda(func: tirx.PrimFunc, threads: int = 128) -> tirx.PrimFunc:
    """CUDA: padding inlined; every other block gets one thread per output element, its reduction
    (if any) serial in a register. Simple and always valid; dlight's matmul rules do not take the
    multi-block kernels here (SplitQuant's epilogue reads three accumulators)."""
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    for b in list(sch.get_child_blocks(root)):
        if sch.get(b).name_hint == "q_pad":
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001 - keep it as its own kernel
                pass
    for b in list(sch.get_child_blocks(root)):
        iters = sch.get(b).iter_vars
        loops = sch.get_loops(b)
        spatial = [lp for lp, iv in zip(loops, iters) if iv.iter_type != tirx.IterVar.CommReduce]
        reduce_ = [lp for lp, iv in zip(loops, iters) if iv.iter_type == tirx.IterVar.CommReduce]
        local = sch.cache_write(b, 0, "local") if reduce_ else None
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        n = int(sch.get(fused).extent)
        t = min(threads, 1 << max(0, (n - 1).bit_length()))
        bx, tx = sch.split(fused, [None, t])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        if local is not None:
            sch.reverse_compute_at(local, tx)
            sch.decompose_reduction(b, reduce_[0])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def apply_default_schedules(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Give every quantize kernel in ``mod`` its hand schedule: the CPU kernel on llvm (AVX2 form when
    the CPU has it), one thread per output on CUDA."""
    from fxpress.codegen.targets import resolve_target

    target = resolve_target(target)
    kind = target.kind.name

    def schedule(func: tirx.PrimFunc, _name: str) -> tirx.PrimFunc | None:
        if kind == "llvm":
            return cpu_kernel(func, target)
        if kind == "cuda":
            return schedule_cuda(func)
        return None  # other kinds: leave the generic kernel

    return schedule_tagged(mod, SCHEDULE_TAG, schedule)
