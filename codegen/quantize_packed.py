"""Int8 GEMM kernels that read weights packed once, at compile time; VNNI (``vpdpbusd``) or AVX2 core.

``quantize_kernels.py``'s AVX2 kernels repack their weights inside the kernel on every call. Here the
pack is its own param-only kernel, so ``relax_prep.lift_param_transforms`` moves it to
``main_transform_params`` (run once by ``BuiltModule.transform_params``); the GEMM kernel takes:

* ``wp``: the C weight matrices ``[N, K]`` as ``[C·Np/L, Kp/G, L, G]`` int8 tiles, zero padded
  (``L × G`` = 16 × 4 for VNNI, 8 × 4 for AVX-VNNI, 8 × 2 for AVX2; ``Np`` = N rounded up to a register tile);
* ``bias_adj[c, n] = bias_q[c, n] − x_zp·Σ_k w[c, n, k]`` (int32): the zero-point correction folded
  into the bias, also at compile time. int32 addition is associative (mod 2³²), so
  ``acc + bias_adj`` is the reference's ``acc − zp·wsum + bias_q`` bit for bit.

The inner product, per ISA (``isa.features(target)``):

* **VNNI** (AVX-512 VNNI): ``vpdpbusd`` — 4 u8×s8 products per int32 lane, 16 lanes. Each product
  fits in int16 (|255·−128| < 2¹⁵) and the 4-sum is added in int32 *without* saturation (that is
  ``vpdpbusds``), so the int32 accumulation is exact, like the reference.
* **AVX-VNNI** (VNNI without AVX-512, e.g. Alder Lake): the same on 8 lanes (ymm), 8 × 4 tiles.
* **AVX2**: ``vpmaddwd`` on operands widened to int16 (``quantize_kernels._dot_intrin``, exact).

Register tile: ``MB`` rows × ``NV`` vectors of L channels; loops ``[column panel, row block, k]``,
so one panel of packed weights stays in cache while every row block streams past it; parallel over
(panel, row block). Convolutions run the direct kernel of ``quantize_conv.py`` on the same cores
(im2col + this GEMM was 7.1 ms against 0.86 ms direct on ResNet-18's 56×56×64 3×3 conv, one thread).

The int8 GEMM through the BLAS (MKL's AMX/VNNI product) is ``quantize_blas.py``; the Relax rewrite that
picks between these kernels and that one is ``quantize_prepack.py``.
"""
from __future__ import annotations

import json

from tvm import s_tir, te, tirx
from tvm.script import tirx as T

from . import isa
from .kernel_families import KERNEL_ATTR, OP_PATTERN_OPAQUE, SCHEDULE_ATTR
from .quantize_kernels import (ARGS_ATTR, SCHEDULE_TAG, _f32, _gemm_core, _intrin_name, _round_up,
                               _schedule_gemm, _schedule_simple, has_avx2)

__all__ = ["Layout", "layout_for", "pack_weights_func", "bias_adjust_func", "qlinear_packed_func",
           "qmatmul_vnni_func", "as_kernel"]


# ----------------------------------------------------------------------------- VNNI tensor intrinsic

def _vnni_intrin(lanes: int):
    """``lanes`` int32 accumulators += 4 u8 (broadcast) × [lanes, 4] s8: vpdpbusd on zmm (16) or ymm (8)."""
    nbytes = 4 * lanes
    llvm_name = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"  # .256 is VEX-encoded AVX-VNNI without AVX-512

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            # LLVM >= 19 types the byte operands <N x i8> (older LLVM: <N/4 x i32>; same register)
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes),
                              dtype=f"int8x{nbytes}")
            b = B.vload([0, 0], dtype=f"int8x{nbytes}")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                f"int32x{lanes}", T.llvm_lookup_intrinsic_id(llvm_name), C.vload([0], dtype=f"int32x{lanes}"), a, b)

    return desc, impl


def _register(name: str, lanes: int) -> str:
    try:
        s_tir.TensorIntrin.register(name, *_vnni_intrin(lanes))
    except Exception:  # noqa: BLE001 - already registered by an earlier import of this module
        pass
    return name


VNNI_INTRIN = _register("fxpress_dot_16x4_u8i8i32_vnni512", 16)
AVX_VNNI_INTRIN = _register("fxpress_dot_8x4_u8i8i32_vnni256", 8)


class Layout:
    """Packed-weight tile ``lanes × group`` and register tile ``rows × vectors`` of one inner product."""

    def __init__(self, name: str, lanes: int, group: int, rows: int, vectors: int, intrin: str):
        self.name, self.lanes, self.group, self.rows, self.vectors, self.intrin = name, lanes, group, rows, vectors, intrin

    @property
    def panel(self) -> int:  # output channels of one register tile
        return self.lanes * self.vectors

    def __repr__(self) -> str:
        return f"Layout({self.name})"


VNNI = Layout("vnni", 16, 4, 4, 4, VNNI_INTRIN)  # 16 zmm accumulators of 32
AVX_VNNI = Layout("avx-vnni", 8, 4, 4, 3, AVX_VNNI_INTRIN)  # 12 ymm accumulators of 16
AVX2 = Layout("avx2", 8, 2, 4, 3, "")  # as quantize_kernels: 12 ymm accumulators of 16


def layout_for(target) -> Layout | None:
    """The packed layout for an llvm ``target``: VNNI with AVX-512 VNNI, AVX-VNNI (256-bit, e.g. Alder
    Lake) with that, AVX2 with AVX2, else None."""
    if target is None or target.kind.name != "llvm" or not has_avx2(target):
        return None
    facts = isa.features(target)
    if facts.vnni:  # isa.features: AVX-512 VNNI when the target has AVX-512, else AVX-VNNI
        return VNNI if facts.avx512f else AVX_VNNI
    return AVX2


def _intrin(layout: Layout, x_dtype: str) -> str:
    return layout.intrin or _intrin_name(x_dtype)


# ----------------------------------------------------------------------------- param-only kernels

def _weight_at(w, w_shape):
    """w_at(c, n, k) over [C, N, K] for a linear weight [C, N, K] or a conv weight [C, O, I, KH, KW]."""
    if len(w_shape) == 3:
        return lambda c, n, k: w[c, n, k]
    _, _, _, KH, KW = w_shape
    return lambda c, n, k: w[c, n, k // (KH * KW), (k % (KH * KW)) // KW, k % KW]


def _nk(w_shape) -> tuple[int, int, int]:
    C, N = w_shape[:2]
    K = 1
    for d in w_shape[2:]:
        K *= int(d)
    return int(C), int(N), K


def packed_shape(w_shape, layout: Layout) -> list[int]:
    C, N, K = _nk(w_shape)
    return [C * _round_up(N, layout.panel) // layout.lanes, _round_up(K, layout.group) // layout.group,
            layout.lanes, layout.group]


def _simple_parallel(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    _schedule_simple(sch, name)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def pack_weights_func(w_shape, layout: Layout) -> tirx.PrimFunc:
    """w [C, N, K] (or conv [C, O, I, KH, KW]) int8 → ``packed_shape`` tiles, zeros past N and K."""
    C, N, K = _nk(w_shape)
    L, G = layout.lanes, layout.group
    tiles = _round_up(N, layout.panel) // L
    w = te.placeholder(tuple(w_shape), "int8", name="w")
    w_at = _weight_at(w, w_shape)

    def value(jo, ko, ni, ki):
        c, n, k = jo // tiles, (jo % tiles) * L + ni, ko * G + ki
        return tirx.if_then_else(tirx.all(n < N, k < K), w_at(c, tirx.min(n, N - 1), tirx.min(k, K - 1)),
                                 tirx.const(0, "int8"))

    wp = te.compute(tuple(packed_shape(w_shape, layout)), value, name="q_wpack")
    return _simple_parallel(te.create_prim_func([w, wp]), "q_wpack")


def bias_adjust_func(w_shape, x_zp: int) -> tirx.PrimFunc:
    """bias_adj[c, n] = bias_q[c, n] − x_zp·Σ_k w[c, n, k] (int32)."""
    C, N, K = _nk(w_shape)
    w = te.placeholder(tuple(w_shape), "int8", name="w")
    bq = te.placeholder((C, N), "int32", name="bias_q")
    w_at = _weight_at(w, w_shape)
    k = te.reduce_axis((0, K), name="k")
    wsum = te.compute((C, N), lambda c, n: te.sum(w_at(c, n, k).astype("int32"), axis=k), name="q_wsum")
    adj = te.compute((C, N), lambda c, n: bq[c, n] - wsum[c, n] * tirx.const(x_zp, "int32"), name="q_bias_adj")
    sch = s_tir.Schedule(te.create_prim_func([w, bq, adj]))
    for name in ("q_wsum", "q_bias_adj"):
        _schedule_simple(sch, name)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


# ----------------------------------------------------------------------------- packed GEMM kernels

def _packed_gemm(x_at, Mp: int, Kp: int, wp, cols: int, layout: Layout):
    return _gemm_core(x_at, Mp, Kp, wp, cols, lanes=layout.lanes, group=layout.group)


def _schedule_packed_gemm(sch: s_tir.Schedule, layout: Layout, x_dtype: str) -> None:
    """Tiles of rows × (vectors·lanes); panel-major so a weight panel is reused by every row block."""
    _schedule_gemm(sch, _intrin(layout, x_dtype), rows=layout.rows, vectors=layout.vectors, lanes=layout.lanes,
                   group=layout.group, panel_major=True)


def _epilogue(acc_at, ws, badj, C: int, x_scale: float):
    """sum_c float32(acc_c + bias_adj[c, n]) · (ws[c, n]·x_scale), clusters in order (as the reference)."""

    def value(n):
        total = None
        for c in range(C):
            t = (acc_at(c) + badj[c, n]).astype("float32") * (ws[c, n] * _f32(x_scale))
            total = t if total is None else total + t
        return total

    return value


def _check(x_dtype: str, layout: Layout) -> None:
    if layout.group == VNNI.group and x_dtype != "uint8":
        raise ValueError(f"the VNNI kernel takes uint8 activations (vpdpbusd is u8 × s8), got {x_dtype}")


def _finish(func: tirx.PrimFunc, kind: str, layout: Layout, **args) -> tirx.PrimFunc:
    return func.with_attrs({"tirx.is_scheduled": True, SCHEDULE_ATTR: SCHEDULE_TAG,
                            ARGS_ATTR: json.dumps({"kind": kind, "layout": layout.name, **args})})


def qlinear_packed_func(M: int, K: int, C: int, N: int, x_scale: float, x_zp: int, layout: Layout,
                        x_dtype: str = "uint8") -> tirx.PrimFunc:
    """``qlinear_func``'s numbers from (xq [M, K], wp, w_scale [C, N], bias_adj [C, N]) → y [M, N]."""
    _check(x_dtype, layout)
    Mp, Kp, Np = _round_up(M, layout.rows), _round_up(K, layout.group), _round_up(N, layout.panel)
    x = te.placeholder((M, K), x_dtype, name="xq")
    wp = te.placeholder(tuple(packed_shape([C, N, K], layout)), "int8", name="wp")
    ws = te.placeholder((C, N), "float32", name="w_scale")
    badj = te.placeholder((C, N), "int32", name="bias_adj")
    if Mp == M and Kp == K:
        x_at = lambda m, k: x[m, k]  # noqa: E731 - nothing to pad: read the input directly
    else:  # padded k meets zero weights, so the padding value is irrelevant
        xp = te.compute((Mp, Kp), lambda m, k: tirx.if_then_else(
            tirx.all(m < M, k < K), x[tirx.min(m, M - 1), tirx.min(k, K - 1)], tirx.const(0, x_dtype)), name="q_xpad")
        x_at = lambda m, k: xp[m, k]  # noqa: E731
    acc = _packed_gemm(x_at, Mp, Kp, wp, C * Np, layout)
    y = te.compute((M, N), lambda m, n: _epilogue(lambda c: acc[m, c * Np + n], ws, badj, C, x_scale)(n),
                   name="q_out")
    sch = s_tir.Schedule(te.create_prim_func([x, wp, ws, badj, y]))
    _schedule_packed_gemm(sch, layout, x_dtype)
    _schedule_simple(sch, "q_xpad")
    _schedule_simple(sch, "q_out", vec=True)
    return _finish(sch.mod["main"], "qlinear_packed", layout, M=M, K=K, C=C, N=N, x_scale=x_scale, x_zp=x_zp,
                   x_dtype=x_dtype)


def qmatmul_vnni_func(G: int, M: int, K: int, N: int, a_scale: float, a_zp: int, b_scale: float, b_zp: int,
                      a_dtype: str = "uint8", b_dtype: str = "uint8") -> tirx.PrimFunc:
    """``qmatmul_func`` (act × act) on the VNNI core. Both operands change every call, so b is packed
    in-kernel; vpdpbusd wants s8 there, so uint8 b enters as b' = b − 128 (exact in int8) and
    Σ(a−za)(b−zb) = Σa·b' + (128 − zb)·Σa − za·Σb + K·za·zb, all in int32."""
    if a_dtype != "uint8":
        raise ValueError(f"the VNNI kernel takes a uint8 first operand (vpdpbusd is u8 × s8), got {a_dtype}")
    shift = 128 if b_dtype == "uint8" else 0
    vectors = max(1, min(VNNI.vectors, -(-N // VNNI.lanes)))  # attention's N = head dim is often 32
    layout = Layout("vnni", VNNI.lanes, VNNI.group, 8 if vectors <= 2 else VNNI.rows, vectors, VNNI.intrin)
    Mp, Kp, Np = _round_up(M, layout.rows), _round_up(K, layout.group), _round_up(N, layout.panel)
    L, Gk = layout.lanes, layout.group
    a = te.placeholder((G, M, K), a_dtype, name="aq")
    b = te.placeholder((G, K, N), b_dtype, name="bq")
    bp = te.compute((G, Np // L, Kp // Gk, L, Gk), lambda g, no, ko, ni, ki: tirx.if_then_else(
        tirx.all(no * L + ni < N, ko * Gk + ki < K),
        (b[g, tirx.min(ko * Gk + ki, K - 1), tirx.min(no * L + ni, N - 1)].astype("int32") - shift).astype("int8"),
        tirx.const(0, "int8")), name="q_wpack")
    if Mp == M and Kp == K:
        a_at = lambda g, m, k: a[g, m, k]  # noqa: E731
    else:
        ap = te.compute((G, Mp, Kp), lambda g, m, k: tirx.if_then_else(
            tirx.all(m < M, k < K), a[g, tirx.min(m, M - 1), tirx.min(k, K - 1)], tirx.const(0, a_dtype)),
            name="q_xpad")
        a_at = lambda g, m, k: ap[g, m, k]  # noqa: E731
    k = te.reduce_axis((0, Kp), name="k")
    acc = te.compute((G, Mp, Np), lambda g, m, j: te.sum(
        a_at(g, m, k).astype("int32") * bp[g, j // L, k // Gk, j % L, k % Gk].astype("int32"), axis=k), name="q_acc")
    ka, kb = te.reduce_axis((0, K), name="ka"), te.reduce_axis((0, K), name="kb")
    asum = te.compute((G, M), lambda g, m: te.sum(a[g, m, ka].astype("int32"), axis=ka), name="q_asum")
    bsum = te.compute((G, N), lambda g, n: te.sum(b[g, kb, n].astype("int32"), axis=kb), name="q_wsum")
    i32 = lambda v: tirx.const(int(v), "int32")  # noqa: E731
    y = te.compute((G, M, N), lambda g, m, n: (acc[g, m, n] + i32(shift - b_zp) * asum[g, m] - i32(a_zp) * bsum[g, n]
                                               + i32(K * a_zp * b_zp)).astype("float32")
                   * (_f32(a_scale) * _f32(b_scale)), name="q_out")
    sch = s_tir.Schedule(te.create_prim_func([a, b, y]))
    _schedule_packed_gemm(sch, layout, a_dtype)
    pack = sch.get_sblock("q_wpack")
    sch.parallel(sch.fuse(*sch.get_loops(pack)[:2]))
    for name in ("q_xpad", "q_asum", "q_wsum"):
        _schedule_simple(sch, name)
    _schedule_simple(sch, "q_out", vec=True)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


# ----------------------------------------------------------------------------- kernels as Relax sees them

def as_kernel(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` marked as build() marks hand-written kernels (opaque to FuseOps), without a global symbol."""
    if "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")  # te.create_prim_func names every kernel "main"
    return func.with_attrs({KERNEL_ATTR: 1, "op_pattern": OP_PATTERN_OPAQUE})
