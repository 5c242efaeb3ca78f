"""Lowering of the quantize family's ops to TVM Relax and to ONNX.

Relax: every op becomes one TIR kernel (``codegen/quantize_kernels.py``) behind ``R.call_tir``:
integer accumulation in int32 (u8 × s8 products), a float32 epilogue — never dequantize-then-fp32.
The generic kernels are tagged ``fxpress.schedule = "quantize"``; ``quantize_kernels.apply_default_schedules``
swaps in the AVX2 (vpmaddwd-tensorized) kernels on llvm. ``wlinear`` / ``wconv2d`` (weight-only)
lower to Relax ops: dequantize the int8 weight, then the float matmul / conv2d.

ONNX (checked with ORT's optimized-model dump in tests/test_quantize_lowering.py):

* ``quantize`` → QuantizeLinear (uint8), ``dequantize`` → DequantizeLinear.
* ``qlinear`` → the QDQ pattern ``DQ(x) · DQ(w, per channel) + DQ(int32 bias, x_scale·w_scale)``, which
  ORT fuses into one **QGemm** (int8 GEMM, float output). Weights are exported as uint8 with zero
  point 128 unless the op's ``w_max`` says they fit in 7 bits (int4/int2): ORT's AVX2 u8×s8 kernel sums
  product pairs in int16 (``vpmaddubsw``) and saturates for full-range int8 weights; the u8×u8 kernel
  does not, so the result is exact and equals the FX reference bit for bit.
* ``qconv2d`` → ``ConvInteger`` (uint8 × uint8, padding with the zero point) + int32 bias add + Cast +
  per-channel Mul (ORT has no QDQ Conv fusion with a float output; QLinearConv needs a requantized output).
* ``qmatmul`` → ``DQ(a) · DQ(b)``, fused by ORT into MatMulIntegerToFloat (u8 × u8).
* ``qlinear_dynamic`` → DynamicQuantizeLinear + MatMulInteger + Cast + Mul + Add (ORT: DynamicQuantizeMatMul).
* ``wlinear`` / ``wconv2d`` → DequantizeLinear (per channel) + MatMul/Conv.
SplitQuant's clusters are one GEMM over ``C·N`` output columns, split and summed after it.
"""
from __future__ import annotations

import numpy as np
import torch

import fxpress.passes.quantize.ops  # noqa: F401 - the ops must exist before torch.ops.fxpress.* is read
from fxpress.errors import LoweringError

from .registry import register_onnx_translation, register_relax_converter

OPS = torch.ops.fxpress
_Q, _DQ = OPS.quantize.default, OPS.dequantize.default
_QL, _QC, _QM = OPS.qlinear.default, OPS.qconv2d.default, OPS.qmatmul.default
_QLD, _WL, _WC = OPS.qlinear_dynamic.default, OPS.wlinear.default, OPS.wconv2d.default


# ============================================================================ Relax

def _shape(expr, what: str, node) -> list[int]:
    from tvm import relax, tirx

    ty = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    shape = getattr(ty, "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or not all(isinstance(d, tirx.IntImm) for d in shape.values):
        raise LoweringError(f"{node.target} (node '{node.name}'): {what} needs a static shape for the int8 kernel; "
                            "export with static input shapes or compile with target='onnx'")
    return [int(d.value) for d in shape.values]


def _dtype(expr) -> str:
    ty = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    return str(ty.dtype)


def _call(importer, func, name: str, args, shape, dtype: str):
    from tvm import relax

    bb = importer.block_builder
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")  # te.create_prim_func names every kernel "main"
    gv = bb.add_func(func, name)
    return bb.emit(relax.call_tir(gv, list(args), relax.TensorType(shape, dtype)))


def _kernels():
    from fxpress.codegen import quantize_kernels

    return quantize_kernels


@register_relax_converter(_Q)
def _quantize_relax(node, importer):
    x = importer.env[node.args[0]]
    scale, zp, qmin, qmax = node.args[1:5]
    shape = _shape(x, "input", node)
    f = _kernels().quantize_func(shape, float(scale), int(zp), int(qmin), int(qmax), _dtype(x))
    return _call(importer, f, "fxpress_quantize", [x], shape, "uint8" if qmin >= 0 else "int8")


@register_relax_converter(_DQ)
def _dequantize_relax(node, importer):
    q = importer.env[node.args[0]]
    shape = _shape(q, "input", node)
    f = _kernels().dequantize_func(shape, float(node.args[1]), int(node.args[2]), _dtype(q))
    return _call(importer, f, "fxpress_dequantize", [q], shape, "float32")


@register_relax_converter(_QL)
def _qlinear_relax(node, importer):
    from tvm import relax

    bb = importer.block_builder
    xq, w, ws, bq = (importer.env[node.args[i]] for i in (0, 3, 4, 5))
    x_scale, x_zp = float(node.args[1]), int(node.args[2])
    xs = _shape(xq, "input", node)
    C, N, K = _shape(w, "weight", node)
    M = int(np.prod(xs[:-1])) if len(xs) > 1 else 1
    x2 = bb.emit(relax.op.reshape(xq, [M, K])) if len(xs) != 2 else xq
    f = _kernels().qlinear_func(M, K, C, N, x_scale, x_zp, _dtype(xq))
    y = _call(importer, f, "fxpress_qlinear", [x2, w, ws, bq], [M, N], "float32")
    return bb.emit(relax.op.reshape(y, [*xs[:-1], N])) if len(xs) != 2 else y


@register_relax_converter(_QC)
def _qconv2d_relax(node, importer):
    xq, w, ws, bq = (importer.env[node.args[i]] for i in (0, 3, 4, 5))
    x_scale, x_zp = float(node.args[1]), int(node.args[2])
    stride, padding, dilation, groups = (list(node.args[6]), list(node.args[7]), list(node.args[8]), int(node.args[9]))
    xs, wsh = _shape(xq, "input", node), _shape(w, "weight", node)
    k = _kernels()
    f = k.qconv2d_func(xs, wsh, x_scale, x_zp, stride, padding, dilation, groups, _dtype(xq))
    oh, ow = k._conv_out(xs[2], xs[3], wsh[3], wsh[4], stride, padding, dilation)
    return _call(importer, f, "fxpress_qconv2d", [xq, w, ws, bq], [xs[0], wsh[1], oh, ow], "float32")


@register_relax_converter(_QM)
def _qmatmul_relax(node, importer):
    from tvm import relax

    bb = importer.block_builder
    a, b = importer.env[node.args[0]], importer.env[node.args[3]]
    a_scale, a_zp, b_scale, b_zp = float(node.args[1]), int(node.args[2]), float(node.args[4]), int(node.args[5])
    ash, bsh = _shape(a, "first input", node), _shape(b, "second input", node)
    batch = list(np.broadcast_shapes(tuple(ash[:-2]), tuple(bsh[:-2])))
    M, K, N = ash[-2], ash[-1], bsh[-1]
    G = int(np.prod(batch)) if batch else 1
    a3 = bb.emit(relax.op.reshape(relax.op.broadcast_to(a, [*batch, M, K]) if ash[:-2] != batch else a, [G, M, K]))
    b3 = bb.emit(relax.op.reshape(relax.op.broadcast_to(b, [*batch, K, N]) if bsh[:-2] != batch else b, [G, K, N]))
    f = _kernels().qmatmul_func(G, M, K, N, a_scale, a_zp, b_scale, b_zp, _dtype(a), _dtype(b))
    y = _call(importer, f, "fxpress_qmatmul", [a3, b3], [G, M, N], "float32")
    return bb.emit(relax.op.reshape(y, [*batch, M, N]))


@register_relax_converter(_QLD)
def _qlinear_dynamic_relax(node, importer):
    from tvm import relax

    bb = importer.block_builder
    x, w, ws, bias = (importer.env[a] for a in node.args[:4])
    xs = _shape(x, "input", node)
    C, N, K = _shape(w, "weight", node)
    M = int(np.prod(xs[:-1])) if len(xs) > 1 else 1
    x2 = bb.emit(relax.op.reshape(x, [M, K])) if len(xs) != 2 else x
    f = _kernels().qlinear_dynamic_func(M, K, C, N)
    y = _call(importer, f, "fxpress_qlinear_dynamic", [x2, w, ws, bias], [M, N], "float32")
    return bb.emit(relax.op.reshape(y, [*xs[:-1], N])) if len(xs) != 2 else y


def _dequant_weight_relax(bb, w, ws, wshape):
    from tvm import relax

    C, N = wshape[:2]
    wf = bb.emit(relax.op.astype(w, "float32"))
    sc = bb.emit(relax.op.reshape(ws, [C, N] + [1] * (len(wshape) - 2)))
    prod = bb.emit(relax.op.multiply(wf, sc))
    return bb.emit(relax.op.sum(prod, axis=[0])) if C > 1 else bb.emit(relax.op.reshape(prod, wshape[1:]))


@register_relax_converter(_WL)
def _wlinear_relax(node, importer):
    from tvm import relax

    bb = importer.block_builder
    x, w, ws, bias = (importer.env[a] for a in node.args[:4])
    wd = _dequant_weight_relax(bb, w, ws, _shape(w, "weight", node))
    y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(wd, [1, 0])))
    return bb.emit(relax.op.add(y, bias))


@register_relax_converter(_WC)
def _wconv2d_relax(node, importer):
    from tvm import relax

    bb = importer.block_builder
    x, w, ws, bias = (importer.env[a] for a in node.args[:4])
    stride, padding, dilation, groups = (list(node.args[4]), list(node.args[5]), list(node.args[6]), int(node.args[7]))
    wsh = _shape(w, "weight", node)
    wd = _dequant_weight_relax(bb, w, ws, wsh)
    y = bb.emit(relax.op.nn.conv2d(x, wd, strides=stride, padding=padding, dilation=dilation, groups=groups))
    return bb.emit(relax.op.add(y, relax.op.reshape(bias, [1, wsh[1], 1, 1])))


# ============================================================================ ONNX

def _onnx():
    import onnx
    from onnxscript import opset18 as op

    return onnx, op


def _const(arr: np.ndarray):
    onnx, op = _onnx()
    return op.Constant(value=onnx.numpy_helper.from_array(np.ascontiguousarray(arr)))


def _zp(value: int, qmin: int):
    return _const(np.array(value, dtype=np.uint8 if qmin >= 0 else np.int8))


def _static_shape(t, what: str) -> list[int]:
    shape = getattr(t, "shape", None)
    dims = []
    for d in shape or ():
        v = d if isinstance(d, int) else getattr(d, "value", None)
        if not isinstance(v, int):
            raise LoweringError(f"ONNX export of a quantized op needs a static {what} shape, got {shape}")
        dims.append(v)
    return dims


def _weight_for_ort(w2d, fits7: bool, n_cols: int, axis: int):
    """(weights, zero point) for DequantizeLinear / MatMulInteger: the int8 codes as they are when ORT's
    u8×s8 kernel is exact for them (``fits7``), else uint8 codes + 128 with zero point 128."""
    onnx, op = _onnx()
    if fits7:
        return w2d, _const(np.zeros(n_cols, np.int8))  # ORT's QDQ fusion wants an explicit zero point
    wu8 = op.Cast(op.Add(op.Cast(w2d, to=onnx.TensorProto.INT16), _const(np.array(128, np.int16))),
                  to=onnx.TensorProto.UINT8)
    return wu8, _const(np.full(n_cols, 128, np.uint8))


def _sum_clusters(y, C: int, axis: int):
    _, op = _onnx()
    if C == 1:
        return y
    parts = op.Split(y, axis=axis, num_outputs=C)
    total = parts[0]
    for i in range(1, C):
        total = op.Add(total, parts[i])
    return total


@register_onnx_translation(_Q)
def _quantize_onnx(x, scale: float, zero_point: int, qmin: int, qmax: int):
    _, op = _onnx()
    q = op.QuantizeLinear(x, _const(np.array(scale, np.float32)), _zp(zero_point, qmin))
    full = (0, 255) if qmin >= 0 else (-128, 127)
    if (qmin, qmax) != full:
        dt = np.uint8 if qmin >= 0 else np.int8
        q = op.Clip(q, _const(np.array(qmin, dt)), _const(np.array(qmax, dt)))
    return q


@register_onnx_translation(_DQ)
def _dequantize_onnx(q, scale: float, zero_point: int):
    _, op = _onnx()
    signed = getattr(q, "dtype", None) is not None and "INT8" in str(q.dtype) and "UINT8" not in str(q.dtype)
    return op.DequantizeLinear(q, _const(np.array(scale, np.float32)), _zp(zero_point, -1 if signed else 0))


@register_onnx_translation(_QL)
def _qlinear_onnx(xq, x_scale: float, x_zp: int, w, w_scale, bias_q, w_max: int = 127):
    _, op = _onnx()
    C, N, K = _static_shape(w, "weight")
    fits7 = w_max <= 64
    w_t = op.Transpose(op.Reshape(w, _const(np.array([C * N, K], np.int64))), perm=[1, 0])  # [K, C*N]
    wq, wzp = _weight_for_ort(w_t, fits7, C * N, 1)
    ws = op.Reshape(w_scale, _const(np.array([C * N], np.int64)))
    xs = _const(np.array(x_scale, np.float32))
    xd = op.DequantizeLinear(xq, xs, _zp(x_zp, 0))
    wd = op.DequantizeLinear(wq, ws, wzp, axis=1)
    bd = op.DequantizeLinear(op.Reshape(bias_q, _const(np.array([C * N], np.int64))), op.Mul(ws, xs), axis=0)
    y = op.Add(op.MatMul(xd, wd), bd)
    return _sum_clusters(y, C, -1)


@register_onnx_translation(_QC)
def _qconv2d_onnx(xq, x_scale: float, x_zp: int, w, w_scale, bias_q, stride, padding, dilation, groups: int):
    onnx, op = _onnx()
    C, O, Ig, KH, KW = _static_shape(w, "weight")
    w4 = op.Reshape(w, _const(np.array([C * O, Ig, KH, KW], np.int64)))
    wu8 = op.Cast(op.Add(op.Cast(w4, to=onnx.TensorProto.INT16), _const(np.array(128, np.int16))),
                  to=onnx.TensorProto.UINT8)
    acc = op.ConvInteger(xq, wu8, _zp(x_zp, 0), _const(np.array(128, np.uint8)), strides=list(stride),
                         pads=[padding[0], padding[1], padding[0], padding[1]], dilations=list(dilation), group=groups)
    shape = _const(np.array([C * O, 1, 1], np.int64))
    acc = op.Add(acc, op.Reshape(bias_q, shape))
    mult = op.Reshape(op.Mul(w_scale, _const(np.array(x_scale, np.float32))), shape)
    y = op.Mul(op.Cast(acc, to=onnx.TensorProto.FLOAT), mult)
    return _sum_clusters(y, C, 1)


@register_onnx_translation(_QM)
def _qmatmul_onnx(aq, a_scale: float, a_zp: int, bq, b_scale: float, b_zp: int):
    _, op = _onnx()
    ad = op.DequantizeLinear(aq, _const(np.array(a_scale, np.float32)), _zp(a_zp, 0))
    bd = op.DequantizeLinear(bq, _const(np.array(b_scale, np.float32)), _zp(b_zp, 0))
    return op.MatMul(ad, bd)


@register_onnx_translation(_QLD)
def _qlinear_dynamic_onnx(x, w, w_scale, bias, w_max: int = 127):
    onnx, op = _onnx()
    C, N, K = _static_shape(w, "weight")
    w_t = op.Transpose(op.Reshape(w, _const(np.array([C * N, K], np.int64))), perm=[1, 0])
    wq, wzp = _weight_for_ort(w_t, w_max <= 64, C * N, 1)
    xq, xs, xzp = op.DynamicQuantizeLinear(x)
    acc = op.MatMulInteger(xq, wq, xzp, wzp)
    ws = op.Reshape(w_scale, _const(np.array([C * N], np.int64)))
    y = op.Mul(op.Cast(acc, to=onnx.TensorProto.FLOAT), op.Mul(xs, ws))
    return op.Add(_sum_clusters(y, C, -1), bias)


def _dequant_weight_onnx(w, w_scale, wshape: list[int]):
    _, op = _onnx()
    C, N = wshape[:2]
    per = _const(np.array(wshape[1:], np.int64))
    ws_parts = [w] if C == 1 else list(op.Split(w, axis=0, num_outputs=C))
    sc_parts = [w_scale] if C == 1 else list(op.Split(w_scale, axis=0, num_outputs=C))
    total = None
    for wc, sc in zip(ws_parts, sc_parts):
        d = op.DequantizeLinear(op.Reshape(wc, per), op.Reshape(sc, _const(np.array([N], np.int64))), axis=0)
        total = d if total is None else op.Add(total, d)
    return total


@register_onnx_translation(_WL)
def _wlinear_onnx(x, w, w_scale, bias):
    _, op = _onnx()
    wd = _dequant_weight_onnx(w, w_scale, _static_shape(w, "weight"))
    return op.Add(op.MatMul(x, op.Transpose(wd, perm=[1, 0])), bias)


@register_onnx_translation(_WC)
def _wconv2d_onnx(x, w, w_scale, bias, stride, padding, dilation, groups: int):
    _, op = _onnx()
    wd = _dequant_weight_onnx(w, w_scale, _static_shape(w, "weight"))
    return op.Conv(x, wd, bias, strides=list(stride), pads=[padding[0], padding[1], padding[0], padding[1]],
                   dilations=list(dilation), group=groups)
