"""Lowering of the low_rank family's ops (``fxpress::lowrank_linear``, ``fxpress::lowrank_conv2d``).

Relax: ``lowrank_linear`` becomes either two ``R.matmul`` (+ bias add), which the default pipeline
legalizes into two GEMM kernels with the rank-r intermediate in memory, or one hand-written fused
two-GEMM TIR kernel (``codegen/low_rank_kernels.py``) that keeps each row's rank-r intermediate in a
local buffer. ``choose_linear_impl`` picks between them from the shapes (the rule comes from
measurements recorded in docs/passes/low_rank.md); ``FXPRESS_LOWRANK_IMPL=fused|matmul`` overrides it.
``lowrank_conv2d`` becomes a k×k conv2d to r channels and a 1×1 conv2d with the bias.

ONNX: ``MatMul → MatMul → Add`` and ``Conv → Conv`` (standard ops only).
"""
from __future__ import annotations

import os

import torch

import fxpress.passes.low_rank.ops  # noqa: F401 - the ops must exist before torch.ops.fxpress.* is read

from .registry import register_onnx_translation, register_relax_converter

_LINEAR = torch.ops.fxpress.lowrank_linear.default
_CONV = torch.ops.fxpress.lowrank_conv2d.default

IMPL_ENV = "FXPRESS_LOWRANK_IMPL"


def choose_linear_impl(rows: int | None, in_features: int, rank: int, out_features: int, dtype: str) -> str:
    """'fused' (one TIR kernel) or 'matmul' (two Relax matmuls) for one lowrank_linear call."""
    forced = os.environ.get(IMPL_ENV, "").strip().lower()
    if forced in ("fused", "matmul"):
        return forced
    try:
        from fxpress.codegen import low_rank_kernels
    except ImportError:
        return "matmul"
    return low_rank_kernels.preferred_impl(rows, in_features, rank, out_features, dtype)


def _static_shape(expr) -> list[int] | None:
    from tvm import relax, tirx

    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    dims = []
    for d in ty.shape.values:
        if not isinstance(d, tirx.IntImm):
            return None
        dims.append(int(d.value))
    return dims


@register_relax_converter(_LINEAR)
def _lowrank_linear_relax(node, importer):
    from tvm import relax

    bb = importer.block_builder
    x, U, V, bias = (importer.env[a] for a in node.args[:4])
    xs, us, vs = _static_shape(x), _static_shape(U), _static_shape(V)
    dtype = str(x.ty.dtype)
    if xs is not None and us is not None and vs is not None:
        rows = 1
        for d in xs[:-1]:
            rows *= d
        impl = choose_linear_impl(rows, us[0], us[1], vs[1], dtype)
        if impl == "fused":
            from fxpress.codegen.low_rank_kernels import emit_fused_lowrank_linear

            return emit_fused_lowrank_linear(bb, x, U, V, bias, xs, us[1], vs[1], dtype)
    h = bb.emit(relax.op.matmul(x, U))
    y = bb.emit(relax.op.matmul(h, V))
    return bb.emit(relax.op.add(y, bias))


@register_relax_converter(_CONV)
def _lowrank_conv2d_relax(node, importer):
    from tvm import relax

    bb = importer.block_builder
    x, U, V, bias = (importer.env[a] for a in node.args[:4])
    stride, padding, dilation = (list(map(int, a)) for a in node.args[4:7])
    h = bb.emit(relax.op.nn.conv2d(x, U, strides=stride, padding=padding, dilation=dilation))
    vs = _static_shape(V)
    out_ch, rank = (vs[0], vs[1]) if vs is not None else (None, None)
    V4 = bb.emit(relax.op.reshape(V, (out_ch, rank, 1, 1))) if vs is not None else bb.emit(
        relax.op.expand_dims(V, axis=[2, 3]))
    y = bb.emit(relax.op.nn.conv2d(h, V4))
    return bb.emit(relax.op.add(y, relax.op.reshape(bias, (1, -1, 1, 1))))


# ----------------------------------------------------------------------------- ONNX
# Plain Python functions: the dynamo exporter traces them with onnxscript, so attributes can be
# computed in Python (ONNX Conv wants pads as [top, left, bottom, right]).
from onnxscript import FLOAT  # noqa: E402
from onnxscript import opset18 as op  # noqa: E402


@register_onnx_translation(_LINEAR)
def lowrank_linear_onnx(x: FLOAT, U: FLOAT, V: FLOAT, bias: FLOAT) -> FLOAT:
    return op.Add(op.MatMul(op.MatMul(x, U), V), bias)


@register_onnx_translation(_CONV)
def lowrank_conv2d_onnx(x: FLOAT, U: FLOAT, V: FLOAT, bias: FLOAT, stride: list[int], padding: list[int],
                        dilation: list[int]) -> FLOAT:
    pads = [int(p) for p in padding] * 2
    h = op.Conv(x, U, strides=[int(s) for s in stride], pads=pads, dilations=[int(d) for d in dilation])
    V4 = op.Unsqueeze(V, op.Constant(value_ints=[2, 3]))
    return op.Conv(h, V4, bias)
