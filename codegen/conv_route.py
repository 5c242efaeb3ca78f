"""Relax pass: fp32 ``nn.conv2d`` → im2col + ``matmul``, so that RouteGemmToBlas sends it to the GEMM shim.

What is rewritten: ``relax.nn.conv2d`` with NCHW data, OIHW kernel, NCHW output, ``groups == 1``,
float32 in and out, static shapes and at least ``MIN_FLOPS``. Grouped and depthwise convs, other
dtypes, dynamic shapes and small convs keep TVM's direct kernel (cpu_schedules.py).

  * 1x1, stride 1, no padding: no copy at all, ``W[O, C] x X[N, C, H*W]`` (two reshapes).
  * anything else: ``cols[N, C*KH*KW, OH*OW] = im2col(X)`` (one hand-scheduled kernel, padding,
    stride and dilation folded in), then ``W[O, C*KH*KW] x cols`` → ``[N, O, OH*OW]`` → NCHW.

The weight's reshape reads a parameter only, so relax_prep.lift_param_transforms moves it to
compile time. The GEMM's left operand is the shared weight and its right operand is batched,
which RouteGemmToBlas accepts (one call per image, or each image's columns, or the weight's
rows, split over the cores). Bias, batch-norm scale/shift, ReLU and the residual after the conv fuse into one
elementwise kernel after the GEMM, as they do after a Linear.

The im2col kernel is marked opaque (FuseOps never fuses it: fused as a prologue, the previous
layer's batch norm and ReLU would be recomputed KH*KW times per element, and the kernel would
lose its schedule) and scheduled here: padding is written once into a scratch buffer, then every
output row is a copy from it with no bounds test, parallel over input channels, the row
vectorized.

Which convs: ``route_conv`` decides: strided convs and convs whose output rows are narrower than 8. Elsewhere TVM's direct kernel (epilogue fused, no extra pass)
was as fast as OpenBLAS and so faster than im2col + GEMM + epilogue, 1x1 convs included
(docs/tuning.md, "Convolutions through the GEMM", has the measurements).

Runs only for an llvm target and when the GEMM shim is available, the same conditions as
RouteGemmToBlas (``FXPRESS_BLAS=0`` turns both off). ``FXPRESS_CONV_GEMM=0`` turns off this
rewrite alone; ``FXPRESS_CONV_GEMM=all`` routes every eligible conv above MIN_FLOPS (measurements).
"""
from __future__ import annotations

import os

import tvm
from tvm import relax, s_tir, te, tirx, topi

from . import blas
from .gemm_route import MIN_FLOPS as GEMM_MIN_FLOPS
from .gemm_route import _static_shape
from .kernel_families import OP_PATTERN_OPAQUE
from .relax_prep import rewrite_functions

MIN_FLOPS = GEMM_MIN_FLOPS
KERNEL_NAME = "im2col"


def mode() -> str:
    """``FXPRESS_CONV_GEMM``: "0" off, "all" every eligible conv (for measurements), else the rule."""
    value = os.environ.get("FXPRESS_CONV_GEMM", "1")
    return value if value in ("0", "all") else "rule"


def _attr_ints(attrs, name: str) -> list[int]:
    return [int(v) for v in getattr(attrs, name)]


def conv_geometry(call: relax.Call) -> dict | None:
    """The conv's sizes when it is one this pass may rewrite (layout, groups, dtype, static shapes), else None."""
    attrs = call.attrs
    if (attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or attrs.out_layout != "NCHW"
            or int(attrs.groups) != 1):
        return None
    if attrs.out_dtype is not None and str(attrs.out_dtype) not in ("", "void", "float32"):
        return None
    x_shape, w_shape = _static_shape(call.args[0]), _static_shape(call.args[1])
    if x_shape is None or w_shape is None or len(x_shape) != 4 or len(w_shape) != 4:
        return None
    n, c, h, w = x_shape
    o, c2, kh, kw = w_shape
    if c2 != c:
        return None
    pad = _attr_ints(attrs, "padding")
    pad = pad * 2 if len(pad) == 2 else pad  # (top, left, bottom, right)
    sh, sw = _attr_ints(attrs, "strides")
    dh, dw = _attr_ints(attrs, "dilation")
    oh = (h + pad[0] + pad[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pad[1] + pad[3] - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        return None
    return {"n": n, "c": c, "h": h, "w": w, "o": o, "kh": kh, "kw": kw, "pad": pad, "stride": (sh, sw),
            "dilation": (dh, dw), "oh": oh, "ow": ow}


def is_pointwise(g: dict) -> bool:
    """A 1x1, stride-1, unpadded conv: already a GEMM on the NCHW tensor as it is."""
    return g["kh"] == g["kw"] == 1 and g["stride"] == (1, 1) and not any(g["pad"])


def conv_flops(g: dict) -> int:
    return 2 * g["n"] * g["o"] * g["c"] * g["kh"] * g["kw"] * g["oh"] * g["ow"]


# Output pixels per image above which a strided conv stays TVM's. 1024 from the Zen 4 / OpenBLAS
# timings (the 112x112 stem lost there); on the Intel Xeon of 2026-12-07 the stem through im2col +
# MKL (or OpenBLAS) beat TVM's direct kernel (1.4 vs 2.2 ms; ResNet-18 15.0 -> 13.0 ms), so none now.
MAX_STRIDED_PIXELS = float("inf")


def max_strided_pixels() -> float:
    """``FXPRESS_CONV_STRIDED_MAX`` (pixels, or "inf"), else MAX_STRIDED_PIXELS; for A/B measurements."""
    value = os.environ.get("FXPRESS_CONV_STRIDED_MAX")
    return float(value) if value else MAX_STRIDED_PIXELS
NARROW_MAP = 8  # output rows narrower than this go through the GEMM at any stride
# Narrow convs go through the GEMM from this size on, below MIN_FLOPS too: a 3x3 64->128 conv onto a
# 1x1 map (147 kFLOP) took 80 µs in TVM's direct kernel, ~4 µs as im2col + sgemm.
NARROW_MIN_FLOPS = 1 << 14


def route_conv(g: dict, how: str = "rule") -> bool:
    """Whether this conv goes through the GEMM (``how="all"``: every eligible one above MIN_FLOPS).

    The rule, from single-conv A/B timings (docs/tuning.md): TVM's direct kernel vectorizes along
    the output row, so it loses on strided rows (strided loads) and on rows narrower than a vector;
    elsewhere it is as fast as OpenBLAS, and the GEMM's extra passes (im2col, the epilogue no
    longer fused into the conv) make the route slower. A strided conv with a large output map (the
    7x7 stem at 112x112) lost on Zen 4 with OpenBLAS and wins on an Intel Xeon (MAX_STRIDED_PIXELS).
    """
    if g["ow"] < NARROW_MAP and conv_flops(g) >= NARROW_MIN_FLOPS:
        return True  # any size: TVM's direct kernel cannot vectorize a row this narrow (scalar, ~2 GFLOP/s)
    if conv_flops(g) < MIN_FLOPS:
        return False
    if how == "all":
        return True
    strided = g["stride"] != (1, 1) and g["oh"] * g["ow"] <= max_strided_pixels()
    return strided or g["ow"] < NARROW_MAP


def _te_im2col(x, g: dict):
    """cols[n, (c, kh, kw), (oh, ow)] = padded x[n, c, oh*sh + kh*dh, ow*sw + kw*dw]."""
    top, left, bottom, right = g["pad"]
    if any(g["pad"]):
        x = topi.nn.pad(x, [0, 0, top, left], [0, 0, bottom, right], name="im2col_pad")
    kh, kw, oh, ow = g["kh"], g["kw"], g["oh"], g["ow"]
    (sh, sw), (dh, dw) = g["stride"], g["dilation"]

    def col(n, k, p):
        c, r = k // (kh * kw), k % (kh * kw)
        return x[n, c, (p // ow) * sh + (r // kw) * dh, (p % ow) * sw + (r % kw) * dw]

    return te.compute((g["n"], g["c"] * kh * kw, oh * ow), col, name="im2col")


def im2col_func(g: dict) -> tirx.PrimFunc:
    """The scheduled im2col PrimFunc for a conv of geometry ``g`` (see the module docstring)."""
    x = te.placeholder((g["n"], g["c"], g["h"], g["w"]), "float32", name="x")
    cols = _te_im2col(x, g)
    sch = s_tir.Schedule(te.create_prim_func([x, cols]))
    main = sch.get_sblock("im2col")
    n, k, p = sch.get_loops(main)
    # split the flat axes back into (c, kh, kw) and (oh, ow): the indices simplify to plain
    # arithmetic, and the innermost loop is one contiguous output row
    c, r = sch.split(k, factors=[g["c"], g["kh"] * g["kw"]])
    sch.split(r, factors=[g["kh"], g["kw"]])
    _, pw = sch.split(p, factors=[g["oh"], g["ow"]])
    outer = sch.fuse(n, c)
    sch.parallel(outer)
    sch.vectorize(pw)
    if any(g["pad"]):
        # pad each channel just before its rows are copied: the padded plane stays in cache
        pad = sch.get_sblock("im2col_pad")
        sch.compute_at(pad, outer)
        sch.vectorize(sch.get_loops(pad)[-1])
    func = sch.mod["main"]
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")  # the module names it (im2col, im2col1, ...)
    return func.with_attrs({"op_pattern": OP_PATTERN_OPAQUE, "tirx.is_scheduled": True})


@relax.expr_functor.mutator
class _ConvRewriter(relax.PyExprMutator):
    def __init__(self, mod, how: str):
        super().__init__(mod)
        self.how = how
        self.rewritten = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
            return call
        g = conv_geometry(call)
        if g is None or not route_conv(g, self.how):
            return call
        self.rewritten += 1
        x, weight = call.args
        n, c, o, kh, kw, oh, ow = (g[k] for k in ("n", "c", "o", "kh", "kw", "oh", "ow"))
        bb = self.builder_
        w2d = bb.emit(relax.op.reshape(weight, [o, c * kh * kw]))
        if is_pointwise(g):
            cols = bb.emit(relax.op.reshape(x, [n, c, oh * ow]))
        else:
            gv = bb.add_func(im2col_func(g), KERNEL_NAME)
            cols = bb.emit(relax.call_tir(gv, [x], relax.TensorType([n, c * kh * kw, oh * ow], "float32")))
        y = bb.emit(relax.op.matmul(w2d, cols))
        return relax.op.reshape(y, [n, o, oh, ow])


@tvm.transform.module_pass(opt_level=0, name="FxpressRouteConvToGemm")
class RouteConvToGemm:
    """fp32 conv2d → im2col + matmul (see the module docstring); identity off llvm or without the shim.
    Must run before RouteGemmToBlas, which then routes the matmuls."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=True)
        how = mode()
        if target is None or target.kind.name != "llvm" or how == "0" or not blas.available():
            return mod
        return rewrite_functions(mod, _ConvRewriter(mod, how))
