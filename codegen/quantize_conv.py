"""Direct (im2col-free) int8 conv2d on packed weights, VNNI or AVX2 inner product.

im2col copies every input byte ``KH·KW`` times through index arithmetic with divisions; on ResNet-18 it
cost more than the GEMM itself. Here the input is relaid out once per call to channels-last, padded
with the zero point and with channels rounded up to the dot-product group (``q_xpad``
``[B, H+2ph, W+2pw, Cg]``, the input's size), so the ``G`` channels one ``vpdpbusd`` lane multiplies are
contiguous bytes. The reduction runs over ``(kh, kw, channel)``; weights are packed once, at compile
time, to ``[C·Np/L, KH·KW·Cg/G, L, G]`` in that k order (``pack_conv_weights_func``).

Register tile: ``rows`` consecutive output columns (``OW`` padded up to a multiple of rows; the padding
columns read clamped inputs and are never stored) × ``vectors·L`` channels. With one weight cluster
the float epilogue runs inside the tile, straight from the accumulators' cache lines, writing NCHW.
"""
from __future__ import annotations

from tvm import s_tir, te, tirx

from .quantize_kernels import _conv_out, _round_up, _schedule_simple
from .quantize_packed import Layout, _check, _epilogue, _finish, _intrin, _simple_parallel

__all__ = ["conv_packed_shape", "pack_conv_weights_func", "qconv2d_direct_func"]


def conv_packed_shape(w_shape, layout: Layout) -> list[int]:
    C, O, Ig, KH, KW = (int(d) for d in w_shape)
    Cg = _round_up(Ig, layout.group)
    return [C * _round_up(O, layout.panel) // layout.lanes, KH * KW * Cg // layout.group, layout.lanes, layout.group]


def pack_conv_weights_func(w_shape, layout: Layout) -> tirx.PrimFunc:
    """conv weight [C, O, I, KH, KW] int8 → tiles with k = (kh·KW + kw)·Cg + i; zeros past O and I."""
    C, O, Ig, KH, KW = (int(d) for d in w_shape)
    L, G = layout.lanes, layout.group
    Cg, tiles = _round_up(Ig, G), _round_up(O, layout.panel) // L
    w = te.placeholder(tuple(w_shape), "int8", name="w")

    def value(jo, ko, ni, ki):
        c, o, k = jo // tiles, (jo % tiles) * L + ni, ko * G + ki
        r, i = k // Cg, k % Cg
        return tirx.if_then_else(tirx.all(o < O, i < Ig),
                                 w[c, tirx.min(o, O - 1), tirx.min(i, Ig - 1), r // KW, r % KW], tirx.const(0, "int8"))

    wp = te.compute(tuple(conv_packed_shape(w_shape, layout)), value, name="q_wpack")
    return _simple_parallel(te.create_prim_func([w, wp]), "q_wpack")


def qconv2d_direct_func(x_shape, w_shape, x_scale: float, x_zp: int, stride, padding, dilation, layout: Layout,
                        x_dtype: str = "uint8") -> tirx.PrimFunc:
    """``qconv2d_func`` (groups == 1) from (xq NCHW, packed weights, w_scale [C, O], bias_adj [C, O])."""
    _check(x_dtype, layout)
    B, Cin, H, W = (int(d) for d in x_shape)
    C, O, Ig, KH, KW = (int(d) for d in w_shape)
    if Ig != Cin:
        raise ValueError(f"qconv2d_direct_func handles groups == 1 (weight in-channels {Ig} != input {Cin})")
    sh, sw = stride
    dh, dw = dilation
    ph, pw = padding
    OH, OW = _conv_out(H, W, KH, KW, stride, padding, dilation)
    L, G, R = layout.lanes, layout.group, layout.rows
    Cg, Np, OWp = _round_up(Cin, G), _round_up(O, layout.panel), _round_up(OW, R)
    Hp, Wp = H + 2 * ph, W + 2 * pw
    x = te.placeholder((B, Cin, H, W), x_dtype, name="xq")
    wp = te.placeholder(tuple(conv_packed_shape(w_shape, layout)), "int8", name="wp")
    ws = te.placeholder((C, O), "float32", name="w_scale")
    badj = te.placeholder((C, O), "int32", name="bias_adj")

    xt = te.compute((B, Hp, Wp, Cg), lambda b, h, w, c: tirx.if_then_else(
        tirx.all(h >= ph, h < H + ph, w >= pw, w < W + pw, c < Cin),
        x[b, tirx.min(c, Cin - 1), tirx.max(tirx.min(h - ph, H - 1), 0), tirx.max(tirx.min(w - pw, W - 1), 0)],
        tirx.const(x_zp, x_dtype)), name="q_xpad")
    rh, rw, rc = te.reduce_axis((0, KH), "rh"), te.reduce_axis((0, KW), "rw"), te.reduce_axis((0, Cg), "rc")
    cg4 = Cg // G
    acc = te.compute((B, OH, OWp, C * Np), lambda b, i, j, n: te.sum(
        xt[b, i * sh + rh * dh, tirx.min(j, OW - 1) * sw + rw * dw, rc].astype("int32")
        * wp[n // L, (rh * KW + rw) * cg4 + rc // G, n % L, rc % G].astype("int32"), axis=[rh, rw, rc]), name="q_acc")
    y = te.compute((B, O, OH, OW), lambda b, o, i, j: _epilogue(
        lambda c: acc[b, i, j, c * Np + o], ws, badj, C, x_scale)(o), name="q_out")

    sch = s_tir.Schedule(te.create_prim_func([x, wp, ws, badj, y]))
    blk = sch.get_sblock("q_acc")
    b, i, j, n, kh, kw, kc = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, R])
    no, nv, nl = sch.split(n, [None, layout.vectors, L])
    kco, kci = sch.split(kc, [None, G])
    sch.reorder(no, b, i, jo, kh, kw, kco, ji, nv, nl, kci)
    outer = sch.fuse(no, b, i, jo)
    sch.parallel(outer)
    cb = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(cb, outer)
    init = sch.decompose_reduction(blk, kh)
    sch.tensorize(sch.blockize(nl), _intrin(layout, x_dtype))
    sch.unroll(ji)
    sch.unroll(nv)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(cb)[-1])
    _schedule_simple(sch, "q_xpad")
    _schedule_simple(sch, "q_out")
    return _finish(sch.mod["main"], "qconv2d_direct", layout, x_shape=[B, Cin, H, W], w_shape=[C, O, Ig, KH, KW],
                   x_scale=x_scale, x_zp=x_zp, stride=list(stride), padding=list(padding),
                   dilation=list(dilation), x_dtype=x_dtype)
