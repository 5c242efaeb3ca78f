"""Lowering of the shift/add ops: Relax ``call_tir`` to the kernels in codegen/, and ONNX decompositions.

Relax: ``shift_linear`` → reshape to 2-D, ``emit_te(shift_linear_te)`` (a PrimFunc that reads the
uint8 codes; see ``codegen/shift_add_kernels.py``), reshape back. ``shift_conv2d`` and
``binary_attention`` likewise. The PrimFuncs carry ``fxpress.schedule = "shift_add"`` so
``apply_default_schedules`` can find them, and codegen marks them opaque kernels.

ONNX: standard opset-18 ops only. The packed codes stay a uint8 initializer and are decoded in
the graph with a 32-entry lookup table (``Gather``: code → ±2^-e or 0, exact; the codes pass through
an identity ``DequantizeLinear`` first, which the exporter's constant folder never folds), summed over terms,
then ``MatMul`` / ``Conv`` and the per-channel scale and bias. ONNX Runtime may constant-fold the
decode into a dense weight *in memory* at session start; the file keeps the codes. The integer
path is emulated in float (activations quantized to the same fixed point; the per-term rounding of
the shift is not reproduced, a difference of at most half a fixed-point step per term).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fxpress.errors import LoweringError
from fxpress.passes.shift_add import ops  # registers torch.ops.fxpress.shift_* (and their costs)

from .registry import register_onnx_translation, register_relax_converter


def _ty(expr):
    """The Relax type of an expression (TVM 0.27 renamed ``struct_info`` to ``ty``)."""
    return expr.ty if hasattr(expr, "ty") else expr.struct_info


def _static_shape(expr, what: str) -> list[int]:
    shape = _ty(expr).shape
    try:
        return [int(s) for s in shape]
    except (TypeError, ValueError) as e:
        raise LoweringError(f"{what}: the shift/add kernels need static shapes, got {shape}; "
                            "compile with fixed-shape example inputs") from e


def _as_f32(bb, expr):
    from tvm import relax

    if _ty(expr).dtype != "float32":
        return bb.emit(relax.op.astype(expr, "float32")), _ty(expr).dtype
    return expr, None


def _emit(bb, fn, *args, name: str, **kwargs):
    from fxpress.codegen.shift_add_kernels import SCHEDULE_ATTR, SCHEDULE_TAG

    return bb.emit_te(fn, *args, primfunc_name_hint=name, primfunc_attrs={SCHEDULE_ATTR: SCHEDULE_TAG}, **kwargs)


@register_relax_converter(torch.ops.fxpress.shift_linear.default)
def _shift_linear_relax(node, importer):
    from tvm import relax

    from fxpress.codegen.shift_add_kernels import shift_linear_te

    bb = importer.block_builder
    x, codes, scale, bias = (importer.env[a] for a in node.args[:4])
    frac_bits = int(node.args[4])
    xs = _static_shape(x, f"shift_linear '{node.name}' input")
    T, K, N = _static_shape(codes, f"shift_linear '{node.name}' codes")
    x, orig_dtype = _as_f32(bb, x)
    rows = math.prod(xs[:-1])
    x2 = bb.emit(relax.op.reshape(x, (rows, K))) if len(xs) != 2 else x
    y = _emit(bb, shift_linear_te, x2, codes, scale, bias, frac_bits, name="shift_linear")
    if len(xs) != 2:
        y = bb.emit(relax.op.reshape(y, (*xs[:-1], N)))
    return bb.emit(relax.op.astype(y, orig_dtype)) if orig_dtype else y


@register_relax_converter(torch.ops.fxpress.shift_conv2d.default)
def _shift_conv2d_relax(node, importer):
    from tvm import relax  # noqa: F401

    from fxpress.codegen.shift_add_kernels import shift_conv2d_te

    bb = importer.block_builder
    x, codes, scale, bias = (importer.env[a] for a in node.args[:4])
    stride, padding, dilation, groups, frac_bits = node.args[4:9]
    _static_shape(x, f"shift_conv2d '{node.name}' input")
    x, orig_dtype = _as_f32(bb, x)
    y = _emit(bb, shift_conv2d_te, x, codes, scale, bias, list(stride), list(padding), list(dilation),
              int(groups), int(frac_bits), name="shift_conv2d")
    from tvm import relax as rx

    return bb.emit(rx.op.astype(y, orig_dtype)) if orig_dtype else y


@register_relax_converter(torch.ops.fxpress.binary_attention.default)
def _binary_attention_relax(node, importer):
    from tvm import relax

    from fxpress.codegen.shift_add_kernels import binary_attention_te

    bb = importer.block_builder
    q, k, v = (importer.env[a] for a in node.args[:3])
    qs = _static_shape(q, f"binary_attention '{node.name}' q")
    ks = _static_shape(k, f"binary_attention '{node.name}' k")
    vs = _static_shape(v, f"binary_attention '{node.name}' v")
    g = math.prod(qs[:-2])
    q, orig_dtype = _as_f32(bb, q)
    k, _ = _as_f32(bb, k)
    v, _ = _as_f32(bb, v)
    q3 = bb.emit(relax.op.reshape(q, (g, qs[-2], qs[-1])))
    k3 = bb.emit(relax.op.reshape(k, (g, ks[-2], ks[-1])))
    v3 = bb.emit(relax.op.reshape(v, (g, vs[-2], vs[-1])))
    y = _emit(bb, binary_attention_te, q3, k3, v3, name="binary_attention")
    y = bb.emit(relax.op.reshape(y, (*qs[:-1], vs[-1])))
    return bb.emit(relax.op.astype(y, orig_dtype)) if orig_dtype else y


# ----------------------------------------------------------------------------- ONNX

def _code_table() -> np.ndarray:
    """Value of every 5-bit code without the scale: ±2^-e, or 0 for e == 15."""
    return ops.CODE_VALUES.numpy().astype(np.float32)


def _decode_onnx(op, codes):
    """uint8 codes [T, ...] → float32 unscaled weight [...] (sum over terms)."""
    import onnx

    table = op.Constant(value=onnx.numpy_helper.from_array(_code_table(), name="shift_code_table"))
    # The codes enter through DequantizeLinear (scale 1, zero point 0: exact), which the exporter's
    # constant folder preserves by design; without it, small layers' decode chains were folded into
    # dense float initializers in the saved file.
    zp = op.Constant(value=onnx.numpy_helper.from_array(np.array(0, np.uint8), name="shift_code_zp"))
    idx = op.DequantizeLinear(codes, op.Constant(value_float=1.0), zp)
    vals = op.Gather(table, op.Cast(idx, to=onnx.TensorProto.INT64), axis=0)
    return op.ReduceSum(vals, op.Constant(value_ints=[0]), keepdims=0)


def _quantize_onnx(op, x, frac_bits: int, limit: int):
    v = op.Floor(op.Add(op.Mul(x, op.Constant(value_float=float(2.0**frac_bits))), op.Constant(value_float=0.5)))
    lim = float(limit)
    v = op.Clip(v, op.Constant(value_float=-lim), op.Constant(value_float=lim))
    return op.Mul(v, op.Constant(value_float=float(2.0**-frac_bits)))


def _shift_linear_onnx(x, codes, scale, bias, frac_bits: int):
    from onnxscript import opset18 as op

    w = _decode_onnx(op, codes)                                  # [K, N]
    if frac_bits >= 0:
        T, K = codes.shape[0], codes.shape[1]
        x = _quantize_onnx(op, x, frac_bits, ops.int_clamp_limit(int(T), int(K)))
    return op.Add(op.Mul(op.MatMul(x, w), scale), bias)


def _shift_conv2d_onnx(x, codes, scale, bias, stride, padding, dilation, groups: int, frac_bits: int):
    from onnxscript import opset18 as op

    w = op.Transpose(_decode_onnx(op, codes), perm=[3, 0, 1, 2])  # [OC, ICg, KH, KW]
    if frac_bits >= 0:
        T, icg, kh, kw = (int(s) for s in codes.shape[:4])
        x = _quantize_onnx(op, x, frac_bits, ops.int_clamp_limit(T, icg * kh * kw))
    p = list(padding)
    y = op.Conv(x, w, strides=list(stride), pads=[p[0], p[1], p[0], p[1]], dilations=list(dilation),
                group=int(groups))
    shape = op.Constant(value_ints=[1, -1, 1, 1])
    return op.Add(op.Mul(y, op.Reshape(scale, shape)), op.Reshape(bias, shape))


def _binary_attention_onnx(q, k, v):
    from onnxscript import opset18 as op

    one, zero = op.Constant(value_float=1.0), op.Constant(value_float=0.0)
    qb = op.Where(op.GreaterOrEqual(q, zero), one, op.Neg(one))
    kb = op.Where(op.GreaterOrEqual(k, zero), one, op.Neg(one))
    n, d = int(k.shape[-2]), int(k.shape[-1])
    perm = list(range(len(k.shape)))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    s = op.MatMul(op.Transpose(kb, perm=perm), v)                                  # [..., D, Dv]
    axis = op.Constant(value_ints=[-2])
    vsum = op.ReduceSum(v, axis, keepdims=1)                                       # [..., 1, Dv]
    ksum = op.ReduceSum(kb, axis, keepdims=1)                                      # [..., 1, D]
    num = op.Add(op.Mul(vsum, op.Constant(value_float=float(d))), op.MatMul(qb, s))
    den = op.Add(op.ReduceSum(op.Mul(qb, ksum), op.Constant(value_ints=[-1]), keepdims=1),
                 op.Constant(value_float=float(n * d)))
    out = op.Div(num, op.Max(den, one))
    return op.Where(op.Greater(den, zero), out, zero)


register_onnx_translation(torch.ops.fxpress.shift_linear.default)(_shift_linear_onnx)
register_onnx_translation(torch.ops.fxpress.shift_conv2d.default)(_shift_conv2d_onnx)
register_onnx_translation(torch.ops.fxpress.binary_attention.default)(_binary_attention_onnx)
