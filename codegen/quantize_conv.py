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

import collections
import json

import tvm
from tvm import relax, s_tir, te, tirx

from .quantize_kernels import ARGS_ATTR, _conv_out, _round_up, _schedule_simple
from .quantize_packed import (AVX2, AVX_VNNI, VNNI, Layout, _check, _epilogue, _finish, _intrin, _simple_parallel,
                              as_kernel)

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
                        x_dtype: str = "uint8", relu: bool = False) -> tirx.PrimFunc:
    """``qconv2d_func`` (groups == 1) from (xq NCHW, packed weights, w_scale [C, O], bias_adj [C, O]);
    ``relu``: the ReLU that follows it, applied in the epilogue (the output is never NaN)."""
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
    def out(b, o, i, j):
        v = _epilogue(lambda c: acc[b, i, j, c * Np + o], ws, badj, C, x_scale)(o)
        return tirx.max(v, tirx.const(0.0, "float32")) if relu else v

    y = te.compute((B, O, OH, OW), out, name="q_out")

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
                   dilation=list(dilation), x_dtype=x_dtype, relu=relu)


# ----------------------------------------------------------------------------- ReLU into the epilogue

@relax.expr_functor.visitor
class _VarUses(relax.PyExprVisitor):
    def __init__(self):
        super().__init__()
        self.count: collections.Counter = collections.Counter()

    def visit_var_(self, var):
        self.count[var] += 1

    def visit_dataflow_var_(self, var):
        self.count[var] += 1


@relax.expr_functor.mutator
class _ReluFolder(relax.PyExprMutator):
    """Rewrites the ReLU's result binding to the conv-with-ReLU call and drops the bindings it replaces."""

    def __init__(self, mod: tvm.IRModule, pairs: dict, dropped: set):
        super().__init__(mod)
        self.pairs, self.dropped = pairs, dropped  # result var -> conv call; vars whose bindings go
        self.relu_kernels: dict = {}  # conv kernel name -> GlobalVar of its ReLU form

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.dropped:
            return
        conv = self.pairs.get(binding.var)
        if conv is None:
            return super().visit_var_binding_(binding)
        args = [self.visit_expr(a) for a in conv.args[1].fields]
        new = relax.call_tir(self.relu_kernels[conv.args[0].name_hint], args, conv.ty)
        self.set_var_remap(binding.var, self.builder_.emit(new))


def _relu_pairs(func: relax.Function, convs: dict) -> tuple[dict, set]:
    """(result var → conv call, vars to drop) for ``r = relu(y)`` and torch's NaN-keeping form
    ``where(isnan(y), y, relu(y))`` on a direct int8 conv's output ``y`` used by nothing else.
    The conv's output is finite (float32 of an int32 sum times finite scales), so both are max(y, 0)."""
    relu_op, isnan_op = tvm.ir.Op.get("relax.nn.relu"), tvm.ir.Op.get("relax.isnan")
    where_op, call_tir = tvm.ir.Op.get("relax.where"), tvm.ir.Op.get("relax.call_tir")
    uses = _VarUses()
    uses.visit_expr(func)
    bound: dict = {}

    def call_of(var, op):
        v = bound.get(var) if isinstance(var, relax.DataflowVar) else None
        return v if isinstance(v, relax.Call) and v.op == op else None

    def conv_of(var):
        v = call_of(var, call_tir)
        return v if v is not None and isinstance(v.args[0], relax.GlobalVar) and v.args[0].name_hint in convs else None

    pairs, dropped = {}, set()
    for block in getattr(func.body, "blocks", []):
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                continue
            bound[b.var] = b.value
            if not isinstance(b.var, relax.DataflowVar) or not isinstance(b.value, relax.Call):
                continue
            v = b.value
            if v.op == relu_op and conv_of(v.args[0]) is not None and uses.count[v.args[0]] == 1:
                pairs[b.var] = conv_of(v.args[0])
                dropped.add(v.args[0])
            elif v.op == where_op:
                cond, y, r = v.args
                nan, relu = call_of(cond, isnan_op), call_of(r, relu_op)
                if (nan is not None and relu is not None and nan.args[0].same_as(y) and relu.args[0].same_as(y)
                        and conv_of(y) is not None and uses.count[y] == 3 and uses.count[cond] == 1
                        and uses.count[r] == 1):
                    pairs[b.var] = conv_of(y)
                    dropped.update((y, cond, r))
    return pairs, dropped


def fold_relu_into_conv(mod: tvm.IRModule) -> tvm.IRModule:
    """Give each direct int8 conv followed only by a ReLU a kernel with the ReLU in its epilogue: the int8
    conv is opaque to FuseOps, so the ReLU was a separate fp32 pass over the output (ResNet-18: 1.9 ms of
    18.6)."""
    layouts = {lay.name: lay for lay in (VNNI, AVX_VNNI, AVX2)}
    convs = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and ARGS_ATTR in func.attrs:
            args = json.loads(str(func.attrs[ARGS_ATTR]))
            if args.get("kind") == "qconv2d_direct" and not args.get("relu") and args.get("layout") in layouts:
                convs[gv.name_hint] = args
    pairs, dropped = {}, set()
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            p, d = _relu_pairs(func, convs)
            pairs.update(p)
            dropped.update(d)
    if not pairs:
        return mod
    folder = _ReluFolder(mod, pairs, dropped)
    for name in {c.args[0].name_hint for c in pairs.values()}:
        args = dict(convs[name])
        del args["kind"], args["relu"]
        layout = layouts[args.pop("layout")]
        folder.relu_kernels[name] = folder.builder_.add_func(
            as_kernel(qconv2d_direct_func(layout=layout, relu=True, **args)), name + "_relu")
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            folder.builder_.update_func(gv, folder.visit_expr(func))
    return folder.builder_.get()
