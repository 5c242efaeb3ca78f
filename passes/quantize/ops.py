"""fxpress ops for int8 (and int4/int2) quantization. Every op here defines its numbers exactly.

Precision changes only at these ops, so the report's graph table (dtype column) shows where it does.

Activations (per tensor, asymmetric, uint8 by default)::

    fxpress::quantize(x, scale, zero_point, qmin, qmax) -> q      q = clamp(round_half_even(x / scale) + zp)
    fxpress::dequantize(q, scale, zero_point)            -> x      x = (q - zp) * scale

``q`` is uint8 when ``qmin >= 0`` else int8. ``x / scale`` is one float32 division, as ONNX
QuantizeLinear / ORT's MLAS do it, so every backend produces the same integers.

Integer layers (static: the activation scale was calibrated; ``xq`` comes from ``fxpress::quantize``)::

    fxpress::qlinear(xq, x_scale, x_zp, w, w_scale, bias_q, w_max=127)               -> y float32 [..., N]
    fxpress::qconv2d(xq, x_scale, x_zp, w, w_scale, bias_q, stride, padding, dilation, groups) -> y NCHW
    fxpress::qmatmul(aq, a_scale, a_zp, bq, b_scale, b_zp)                            -> y float32 (act x act)

``w`` is int8 ``[C, N, K]`` (linear) or ``[C, O, I/groups, kh, kw]`` (conv): ``C`` weight *clusters*
(1 for plain quantization, 3 for SplitQuant), each with its own per-output-channel scale
``w_scale[C, N]`` and int32 bias ``bias_q[C, N]`` (in units of ``x_scale * w_scale``). The result is

    acc_c = sum_k (xq - x_zp) * w[c]          exact, int32 (computed in float64 here: also exact)
    y     = sum_c float32(acc_c + bias_q[c]) * float32(x_scale * w_scale[c])   (float32, c in order)

which is, bit for bit, what ONNX Runtime's QGemm computes for C = 1 (checked in the tests), and
what the TIR kernels compute. Padding of ``qconv2d`` is with the zero point (real 0).

Dynamic and weight-only variants take float activations::

    fxpress::qlinear_dynamic(x, w, w_scale, bias)   activation scale/zero point from x at run time, as
                                                    ONNX DynamicQuantizeLinear defines them (uint8)
    fxpress::wlinear(x, w, w_scale, bias)           weight-only: y = x @ (sum_c w[c] * w_scale[c])^T + bias
    fxpress::wconv2d(x, w, w_scale, bias, stride, padding, dilation, groups)

Weights of any bit width (8, 4, 2) are stored as int8 codes. ``w_max`` (linear ops) is an upper bound
of ``|w|``: it does not change the result; exporters use it to pick a kernel (ONNX: int8 weights
when ``w_max <= 64``, which ORT's u8×s8 kernel computes without int16 saturation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

from ..stats import numel, register_cost, shape_of

__all__ = [
    "quantize", "dequantize", "qlinear", "qconv2d", "qmatmul", "qlinear_dynamic", "wlinear", "wconv2d",
    "f32", "qparams_asym", "dynamic_qparams", "qdtype", "qmax_for_bits", "QUANT_OPS", "INT_OPS",
]


def f32(v: float) -> float:
    """``v`` rounded to float32 (all scales are float32 numbers, on every backend)."""
    return float(torch.tensor(float(v), dtype=torch.float32))


def qdtype(qmin: int) -> torch.dtype:
    return torch.uint8 if qmin >= 0 else torch.int8


def qmax_for_bits(bits: int) -> int:
    """Symmetric signed range ``[-qmax, qmax]`` of a ``bits``-bit weight (8 → 127, 4 → 7, 2 → 1)."""
    if bits < 2 or bits > 8:
        raise ValueError(f"weight bits must be in 2..8, got {bits}")
    return (1 << (bits - 1)) - 1


def qparams_asym(lo: float, hi: float, qmin: int = 0, qmax: int = 255) -> tuple[float, int]:
    """(scale, zero_point) mapping [lo, hi] (widened to hold 0) onto [qmin, qmax]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"non-finite activation range [{lo}, {hi}]")
    scale = f32((hi - lo) / (qmax - qmin)) if hi > lo else 1.0
    if scale <= 0 or not math.isfinite(scale):
        scale = 1.0
    zp = int(round(qmin - lo / scale))
    return scale, max(qmin, min(qmax, zp))


# ----------------------------------------------------------------------------- activations

@torch.library.custom_op("fxpress::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    q = torch.round(x.float() / torch.tensor(scale, dtype=torch.float32)) + zero_point
    return q.clamp_(qmin, qmax).to(qdtype(qmin))


@quantize.register_fake
def _quantize_fake(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x, dtype=qdtype(qmin))


@torch.library.custom_op("fxpress::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (q.to(torch.float32) - zero_point) * torch.tensor(scale, dtype=torch.float32)


@dequantize.register_fake
def _dequantize_fake(q, scale, zero_point):
    return torch.empty_like(q, dtype=torch.float32)


# ----------------------------------------------------------------------------- integer layers

def _epilogue(accs: list[torch.Tensor], x_scale: float, w_scale: torch.Tensor, bias_q: torch.Tensor,
              channel_dim: int) -> torch.Tensor:
    """sum_c float32(acc_c + bias_q[c]) * float32(x_scale * w_scale[c]); accs are exact float64 integers."""
    y = None
    xs = torch.tensor(x_scale, dtype=torch.float32)
    for c, acc in enumerate(accs):
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        total = acc + bias_q[c].to(torch.float64).reshape(shape)
        # int32 semantics: the sum fits int32 (the pass checks the bound), float64 holds it exactly.
        term = total.to(torch.float32) * (w_scale[c].to(torch.float32) * xs).reshape(shape)
        y = term if y is None else y + term
    return y


def _exact_dtype(reduce_len: int) -> torch.dtype:
    """float32 when every partial sum of int8 × uint8 products stays below 2^24 (so float32 is exact), else float64."""
    return torch.float32 if reduce_len * 255 * 128 < (1 << 24) else torch.float64


@torch.library.custom_op("fxpress::qlinear", mutates_args=())
def qlinear(xq: torch.Tensor, x_scale: float, x_zp: int, w: torch.Tensor, w_scale: torch.Tensor,
            bias_q: torch.Tensor, w_max: int = 127) -> torch.Tensor:
    dt = _exact_dtype(w.shape[2])
    x = xq.to(dt) - x_zp
    accs = [torch.matmul(x, w[c].to(dt).t()).double() for c in range(w.shape[0])]
    return _epilogue(accs, x_scale, w_scale, bias_q, -1)


@qlinear.register_fake
def _qlinear_fake(xq, x_scale, x_zp, w, w_scale, bias_q, w_max=127):
    torch._check(xq.shape[-1] == w.shape[2], lambda: f"qlinear: x has {xq.shape[-1]} features, w expects {w.shape[2]}")
    return xq.new_empty((*xq.shape[:-1], w.shape[1]), dtype=torch.float32)


@torch.library.custom_op("fxpress::qconv2d", mutates_args=())
def qconv2d(xq: torch.Tensor, x_scale: float, x_zp: int, w: torch.Tensor, w_scale: torch.Tensor,
            bias_q: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
            groups: int) -> torch.Tensor:
    dt = _exact_dtype(math.prod(w.shape[2:]))
    x = xq.to(dt) - x_zp  # zero padding of (x - zp) == padding x with its zero point
    accs = [F.conv2d(x, w[c].to(dt), None, stride, padding, dilation, groups).double() for c in range(w.shape[0])]
    return _epilogue(accs, x_scale, w_scale, bias_q, 1)


def conv_out_hw(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow


@qconv2d.register_fake
def _qconv2d_fake(xq, x_scale, x_zp, w, w_scale, bias_q, stride, padding, dilation, groups):
    oh, ow = conv_out_hw(xq.shape[2], xq.shape[3], w.shape[3], w.shape[4], stride, padding, dilation)
    return xq.new_empty((xq.shape[0], w.shape[1], oh, ow), dtype=torch.float32)


@torch.library.custom_op("fxpress::qmatmul", mutates_args=())
def qmatmul(aq: torch.Tensor, a_scale: float, a_zp: int, bq: torch.Tensor, b_scale: float,
            b_zp: int) -> torch.Tensor:
    dt = torch.float32 if aq.shape[-1] * 255 * 255 < (1 << 24) else torch.float64
    acc = torch.matmul(aq.to(dt) - a_zp, bq.to(dt) - b_zp).double()
    return acc.to(torch.float32) * (torch.tensor(a_scale, dtype=torch.float32) * torch.tensor(b_scale, dtype=torch.float32))


@qmatmul.register_fake
def _qmatmul_fake(aq, a_scale, a_zp, bq, b_scale, b_zp):
    batch = torch.broadcast_shapes(aq.shape[:-2], bq.shape[:-2])
    return aq.new_empty((*batch, aq.shape[-2], bq.shape[-1]), dtype=torch.float32)


# ----------------------------------------------------------------------------- dynamic / weight-only

def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear's (scale, zero point) for ``x``: uint8, range widened to hold 0."""
    lo = torch.clamp(x.min(), max=0.0).float()
    hi = torch.clamp(x.max(), min=0.0).float()
    scale = (hi - lo) / torch.tensor(255.0)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round((0.0 - lo) / scale), 0, 255)
    return scale, zp


@torch.library.custom_op("fxpress::qlinear_dynamic", mutates_args=())
def qlinear_dynamic(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor,
                    w_max: int = 127) -> torch.Tensor:
    scale, zp = dynamic_qparams(x)
    xq = torch.clamp(torch.round(x.float() / scale) + zp, 0, 255)
    xi = xq.to(torch.float64) - zp.to(torch.float64)
    y = None
    for c in range(w.shape[0]):
        acc = torch.matmul(xi, w[c].to(torch.float64).t()).to(torch.float32)
        term = acc * (scale * w_scale[c].float())
        y = term if y is None else y + term
    return y + bias


@qlinear_dynamic.register_fake
def _qlinear_dynamic_fake(x, w, w_scale, bias, w_max=127):
    return x.new_empty((*x.shape[:-1], w.shape[1]), dtype=torch.float32)


def _dequant_weight(w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    shape = [w.shape[0], w.shape[1]] + [1] * (w.dim() - 2)
    return (w.to(torch.float32) * w_scale.to(torch.float32).reshape(shape)).sum(0)


@torch.library.custom_op("fxpress::wlinear", mutates_args=())
def wlinear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.linear(x, _dequant_weight(w, w_scale), bias)


@wlinear.register_fake
def _wlinear_fake(x, w, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w.shape[1]))


@torch.library.custom_op("fxpress::wconv2d", mutates_args=())
def wconv2d(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, stride: list[int],
            padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    return F.conv2d(x, _dequant_weight(w, w_scale), bias, stride, padding, dilation, groups)


@wconv2d.register_fake
def _wconv2d_fake(x, w, w_scale, bias, stride, padding, dilation, groups):
    oh, ow = conv_out_hw(x.shape[2], x.shape[3], w.shape[3], w.shape[4], stride, padding, dilation)
    return x.new_empty((x.shape[0], w.shape[1], oh, ow))


# ----------------------------------------------------------------------------- costs

def _wshape(node: fx.Node) -> tuple[int, ...] | None:
    return shape_of(node.args[3] if node.target in (_QL, _QC) else node.args[1])


def _linear_cost(node: fx.Node, gm) -> tuple[int, int]:
    w = _wshape(node)
    m = numel(node) * w[0] * w[2] if w else 0
    return m, m


def _conv_cost(node: fx.Node, gm) -> tuple[int, int]:
    w = _wshape(node)
    m = numel(node) * w[0] * math.prod(w[2:]) if w else 0
    return m, m


def _qmatmul_cost(node: fx.Node, gm) -> tuple[int, int]:
    a = shape_of(node.args[0])
    m = numel(node) * a[-1] if a else 0
    return m, m


def _elementwise_cost(node: fx.Node, gm) -> tuple[int, int]:
    return 0, numel(node)


_QL = torch.ops.fxpress.qlinear.default
_QC = torch.ops.fxpress.qconv2d.default
for _op in (torch.ops.fxpress.qlinear, torch.ops.fxpress.qlinear_dynamic, torch.ops.fxpress.wlinear):
    register_cost(_op)(_linear_cost)
    register_cost(_op.default)(_linear_cost)
for _op in (torch.ops.fxpress.qconv2d, torch.ops.fxpress.wconv2d):
    register_cost(_op)(_conv_cost)
    register_cost(_op.default)(_conv_cost)
for _op in (torch.ops.fxpress.qmatmul,):
    register_cost(_op)(_qmatmul_cost)
    register_cost(_op.default)(_qmatmul_cost)
for _op in (torch.ops.fxpress.quantize, torch.ops.fxpress.dequantize):
    register_cost(_op)(_elementwise_cost)
    register_cost(_op.default)(_elementwise_cost)

QUANT_OPS = (torch.ops.fxpress.quantize.default, torch.ops.fxpress.dequantize.default)
INT_OPS = (torch.ops.fxpress.qlinear.default, torch.ops.fxpress.qconv2d.default, torch.ops.fxpress.qmatmul.default,
           torch.ops.fxpress.qlinear_dynamic.default)
