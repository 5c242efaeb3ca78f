"""fxpress ops for shift/add layers: weights stored as packed power-of-two codes.

Code format (one uint8 per weight per term, low ``1 + exp_bits`` bits used; default 5 bits)::

    bit 4      sign s (1 = negative)
    bits 0..3  exponent e in [0, 14]; e == 15 (ZERO_EXP) encodes the weight 0
    weight     = (-1)^s * 2^-e * scale[out_channel]          (terms = 1)
    weight     = sum over terms t of (-1)^s_t * 2^-e_t * scale (terms = 2: two powers of two)

``scale`` is one float32 per output channel (least-squares fit to the trained weights), so the only
multiplies left in a shift layer are one per *output* element, not one per MAC.

Ops (all hold the packed codes, never a float weight matrix):

``fxpress::shift_linear(x, codes, scale, bias, frac_bits) -> y``
    ``x: [..., K]``, ``codes: uint8 [T, K, N]`` (GEMM order, output channel last), ``scale, bias: [N]``.
``fxpress::shift_conv2d(x, codes, scale, bias, stride, padding, dilation, groups, frac_bits) -> y``
    ``x: [B, C, H, W]`` (NCHW), ``codes: uint8 [T, C/groups, KH, KW, OC]`` (output channel last).

``frac_bits`` picks the arithmetic, and the reference implementation here defines it exactly:

* ``frac_bits < 0`` — float path: each term is ``ldexp(x, -e)`` with the sign applied (an exponent add on
  the float's bits, exact), summed in float32; ``y = acc * scale + bias``.
* ``frac_bits = F >= 0`` — integer path: ``xq = clamp(floor(x * 2^F + 0.5), -L, L)`` as int32 (``L`` from
  ``int_clamp_limit`` so the int32 sum cannot overflow), each term is the rounding arithmetic shift
  ``(xq + (2^e >> 1)) >> e`` negated when the sign bit is set, summed exactly in int32;
  ``y = float(acc) * (scale * 2^-F) + bias``. The TIR kernels reproduce the accumulator bit for bit.

``fxpress::binary_attention(q, k, v) -> out``
    Additive attention with sign-binarized queries and keys (ShiftAddViT / EcoFormer style linear
    attention): ``a_ij = #matching signs of q_i and k_j`` (``= (D + sgn(q_i)·sgn(k_j)) / 2``, an
    integer in [0, D]); ``out_i = sum_j a_ij v_j / sum_j a_ij``. By associativity this is
    ``(D·sum_j v_j + sgn(q_i)·(sum_j sgn(k_j) ⊗ v_j)) / (N·D + sgn(q_i)·sum_j sgn(k_j))`` — only
    additions and subtractions over V, plus one division per output. ``q, k: [..., N, D]``,
    ``v: [..., N, Dv]``; ``sgn(0) = +1``. It replaces ``softmax(q @ k^T * c) @ v`` and so changes
    the function: it is opt-in and its accuracy cost is reported.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

# The code format lives in a torch-free leaf module the TIR kernels read too; re-exported here.
from fxpress.shift_codes import EXP_BITS, SIGN_BIT, ZERO_EXP, frac_bits_for, int_clamp_limit  # noqa: F401

from ..stats import arg_shape, numel, register_cost

__all__ = [
    "EXP_BITS", "ZERO_EXP", "pack_codes", "unpack_codes", "encode_pow2", "encode_with_scale", "decode_pow2",
    "int_clamp_limit",
    "frac_bits_for", "linear_codes", "conv_codes", "linear_weight", "conv_weight", "pack_bitstream",
    "unpack_bitstream", "shift_linear", "shift_conv2d", "binary_attention",
]


# ----------------------------------------------------------------------------- code packing

def pack_codes(sign: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """sign in {0, 1}, exp in [0, 15] (15 = zero) → uint8 codes ``sign << 4 | exp``."""
    if exp.numel() and (int(exp.min()) < 0 or int(exp.max()) > ZERO_EXP):
        raise ValueError(f"exponent out of range [0, {ZERO_EXP}]")
    sign = torch.where(exp == ZERO_EXP, torch.zeros_like(sign), sign)  # one code for zero
    return ((sign.to(torch.int32) << EXP_BITS) | exp.to(torch.int32)).to(torch.uint8)


def unpack_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes → (sign in {0,1}, exp in [0,15]) as int32."""
    c = codes.to(torch.int32)
    return (c >> EXP_BITS) & 1, c & ZERO_EXP


def _code_values() -> torch.Tensor:
    """float32 value of each of the 32 five-bit codes, without the scale: ±2^-e, or 0 for e == 15."""
    c = torch.arange(2 * SIGN_BIT, dtype=torch.int32)
    exp, sign = c & ZERO_EXP, (c >> EXP_BITS) & 1
    mag = torch.ldexp(torch.ones(c.shape, dtype=torch.float32), -exp.to(torch.float32))
    val = torch.where(sign == 1, -mag, mag)
    return torch.where(exp == ZERO_EXP, torch.zeros_like(val), val)


CODE_VALUES = _code_values()


def _pow2_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 value of each code, without the scale: ±2^-e, or 0 (a 32-entry table lookup)."""
    return CODE_VALUES.index_select(0, codes.reshape(-1).to(torch.int64)).reshape(codes.shape)


def _round_pow2(r: torch.Tensor, max_exp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest (in linear distance) value of the form ±2^-e, e in [0, max_exp], or 0.

    Returns (sign, exp) with exp == ZERO_EXP where 0 is nearest.
    """
    a = r.abs().double()
    mant, ex = torch.frexp(a)                                   # a = mant * 2^ex, mant in [0.5, 1)
    p = (ex - 1).double()                                       # 2^p <= a < 2^(p+1), exactly
    p = torch.where(mant > 0.75, p + 1, p)                      # nearer of 2^p and 2^(p+1) (a > 1.5 * 2^p)
    e = (-p).clamp(0, max_exp)                                  # saturate above 1, below 2^-max_exp
    # Below the smallest power, 0 is nearer when a < 2^-max_exp / 2.
    zero = a < 0.5 * 2.0 ** (-max_exp)
    e = torch.where(zero, torch.full_like(e, ZERO_EXP), e).to(torch.int32)
    sign = (r < 0).to(torch.int32)
    return sign, e


def encode_pow2(weight: torch.Tensor, terms: int = 1, exp_bits: int = EXP_BITS,
                refit_iters: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``weight`` ([out, ...]) to sums of ``terms`` signed powers of two per output channel.

    Returns ``(codes uint8 [terms, out, prod(rest)], scale float32 [out])`` in *channel-major* order;
    ``linear_codes`` / ``conv_codes`` put them in the kernels' layout. ``exp_bits`` (<= 4) narrows the
    exponent range to [0, 2^exp_bits - 2]. The per-channel scale starts at max|w| and is refitted by
    least squares (codes re-chosen after each refit; the best error is kept).
    """
    if terms not in (1, 2):
        raise ValueError(f"terms must be 1 or 2, got {terms}")
    if not 1 <= exp_bits <= EXP_BITS:
        raise ValueError(f"exp_bits must be in [1, {EXP_BITS}], got {exp_bits}")
    w = weight.detach().reshape(weight.shape[0], -1).double()
    scale = w.abs().amax(dim=1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    best = None
    for it in range(refit_iters + 1):
        codes = encode_with_scale(w, scale, terms, exp_bits)
        q = _pow2_values(codes).double().sum(0)
        err = float(((q * scale[:, None] - w) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, codes, scale.clone())
        if it == refit_iters:
            break
        qq = (q * q).sum(1)
        fit = (q * w).sum(1) / qq.clamp_min(1e-300)
        scale = torch.where((qq > 0) & (fit > 0), fit, scale)
    _, codes, scale = best
    return codes, scale.float()


def encode_with_scale(weight: torch.Tensor, scale: torch.Tensor, terms: int = 1,
                      exp_bits: int = EXP_BITS) -> torch.Tensor:
    """Codes [terms, out, K] for a given per-channel scale: greedy nearest power of two per term.

    ``decode_pow2(encode_with_scale(decode_pow2(c, s), s), s) == decode_pow2(c, s)`` exactly.
    """
    max_exp = (1 << exp_bits) - 2
    r = weight.reshape(weight.shape[0], -1).double() / scale.double()[:, None]
    out = []
    for _ in range(terms):
        sign, e = _round_pow2(r, max_exp)
        c = pack_codes(sign, e)
        out.append(c)
        r = r - _pow2_values(c).double()
    return torch.stack(out)


def decode_pow2(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Channel-major codes [T, out, K] and scale [out] → float32 weight [out, K] (tests, sensitivity)."""
    return _pow2_values(codes).sum(0) * scale[:, None]


# Kernel layouts: output channel last, so CPU kernels vectorize over output channels.

def linear_codes(codes: torch.Tensor) -> torch.Tensor:
    """[T, N, K] (channel-major) → [T, K, N] (shift_linear's layout)."""
    return codes.transpose(1, 2).contiguous()


def conv_codes(codes: torch.Tensor, weight_shape) -> torch.Tensor:
    """[T, OC, ICg*KH*KW] → [T, ICg, KH, KW, OC] (shift_conv2d's layout)."""
    oc, icg, kh, kw = weight_shape
    return codes.reshape(codes.shape[0], oc, icg, kh, kw).permute(0, 2, 3, 4, 1).contiguous()


def linear_weight(codes: torch.Tensor) -> torch.Tensor:
    """shift_linear codes [T, K, N] → unscaled float weight [K, N] (sum of the terms)."""
    return _pow2_values(codes).sum(0)


def conv_weight(codes: torch.Tensor) -> torch.Tensor:
    """shift_conv2d codes [T, ICg, KH, KW, OC] → unscaled float weight [OC, ICg, KH, KW]."""
    return _pow2_values(codes).sum(0).permute(3, 0, 1, 2).contiguous()


def pack_bitstream(codes: torch.Tensor, bits: int = 1 + EXP_BITS) -> torch.Tensor:
    """Dense ``bits``-per-code bitstream (uint8) for storage: 8 five-bit codes in 5 bytes.

    The kernels read one code per byte; this is the at-rest size the report quotes as
    ``packed_bytes``. ``unpack_bitstream`` inverts it exactly.
    """
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and int(flat.max()) >= (1 << bits):
        raise ValueError(f"codes do not fit in {bits} bits")
    n = flat.numel()
    bitpos = torch.arange(bits, dtype=torch.int64)
    stream = ((flat[:, None] >> bitpos) & 1).reshape(-1)             # little-endian bits
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.int64)).sum(1).to(torch.uint8), n


def unpack_bitstream(stream: torch.Tensor, count: int, bits: int = 1 + EXP_BITS) -> torch.Tensor:
    s = stream.to(torch.int64)
    bitsarr = ((s[:, None] >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: count * bits]
    vals = (bitsarr.reshape(count, bits) << torch.arange(bits, dtype=torch.int64)).sum(1)
    return vals.to(torch.uint8)


# ----------------------------------------------------------------------------- integer path helpers

def _quantize_int(x: torch.Tensor, frac_bits: int, limit: int) -> torch.Tensor:
    v = torch.floor(x.float() * float(2.0**frac_bits) + 0.5)
    return v.clamp(-float(limit), float(limit)).to(torch.int32)


def _shift_terms(xq: torch.Tensor, exp: int) -> torch.Tensor:
    """Rounding arithmetic shift of int32 ``xq`` by ``exp`` (same as the kernels)."""
    return torch.bitwise_right_shift(xq + ((1 << exp) >> 1), exp)


# ----------------------------------------------------------------------------- shift_linear

@torch.library.custom_op("fxpress::shift_linear", mutates_args=())
def shift_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 frac_bits: int) -> torch.Tensor:
    """Reference implementation (see the module docstring for the exact arithmetic)."""
    T, K, N = codes.shape
    x2 = x.reshape(-1, K)
    if frac_bits < 0:
        acc = x2.float() @ linear_weight(codes)             # ±2^-e products are exact in float32
        y = acc * scale + bias
    else:
        xq = _quantize_int(x2, frac_bits, int_clamp_limit(T, K))
        sign, exp = unpack_codes(codes)
        acc = torch.zeros(x2.shape[0], N, dtype=torch.int64)
        for e in torch.unique(exp).tolist():
            if e == ZERO_EXP:
                continue
            sel = torch.where(exp == e, 1 - 2 * sign, torch.zeros_like(sign)).sum(0).to(torch.int64)  # [K, N]
            acc += _shift_terms(xq, e).to(torch.int64) @ sel
        y = acc.to(torch.int32).float() * (scale * float(2.0**-frac_bits)) + bias
    return y.reshape(*x.shape[:-1], N).to(x.dtype)


@shift_linear.register_fake
def _shift_linear_fake(x, codes, scale, bias, frac_bits):
    torch._check(x.shape[-1] == codes.shape[1],
                 lambda: f"shift_linear: x has {x.shape[-1]} features, codes expect {codes.shape[1]}")
    return x.new_empty((*x.shape[:-1], codes.shape[2]))


# ----------------------------------------------------------------------------- shift_conv2d

def conv_out_hw(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow


@torch.library.custom_op("fxpress::shift_conv2d", mutates_args=())
def shift_conv2d(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 stride: list[int], padding: list[int], dilation: list[int], groups: int,
                 frac_bits: int) -> torch.Tensor:
    """Reference implementation (see the module docstring for the exact arithmetic)."""
    T, icg, kh, kw, oc = codes.shape
    if frac_bits < 0:
        acc = F.conv2d(x.float(), conv_weight(codes), None, stride, padding, dilation, groups)
        y = acc * scale[:, None, None] + bias[:, None, None]
    else:
        xq = _quantize_int(x, frac_bits, int_clamp_limit(T, icg * kh * kw))
        sign, exp = unpack_codes(codes)
        acc = None
        for e in torch.unique(exp).tolist():
            if e == ZERO_EXP:
                continue
            sel = torch.where(exp == e, 1 - 2 * sign, torch.zeros_like(sign)).sum(0)  # [ICg, KH, KW, OC]
            wsel = sel.permute(3, 0, 1, 2).double()
            # Integers below 2^53 add exactly in float64, so this equals the int32 accumulation.
            part = F.conv2d(_shift_terms(xq, e).double(), wsel, None, stride, padding, dilation, groups)
            acc = part if acc is None else acc + part
        if acc is None:
            h, w = conv_out_hw(x.shape[2], x.shape[3], kh, kw, stride, padding, dilation)
            acc = torch.zeros(x.shape[0], oc, h, w, dtype=torch.float64)
        y = (acc.to(torch.int64).to(torch.int32).float() * (scale * float(2.0**-frac_bits))[:, None, None]
             + bias[:, None, None])
    return y.to(x.dtype)


@shift_conv2d.register_fake
def _shift_conv2d_fake(x, codes, scale, bias, stride, padding, dilation, groups, frac_bits):
    _, icg, kh, kw, oc = codes.shape
    torch._check(x.shape[1] == icg * groups,
                 lambda: f"shift_conv2d: x has {x.shape[1]} channels, codes expect {icg * groups}")
    oh, ow = conv_out_hw(x.shape[2], x.shape[3], kh, kw, stride, padding, dilation)
    return x.new_empty((x.shape[0], oc, oh, ow))


# ----------------------------------------------------------------------------- binary_attention

def _sgn(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, torch.ones_like(t), -torch.ones_like(t))


@torch.library.custom_op("fxpress::binary_attention", mutates_args=())
def binary_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference implementation (see the module docstring)."""
    n, d = k.shape[-2], k.shape[-1]
    qb, kb = _sgn(q.float()), _sgn(k.float())
    s = kb.transpose(-2, -1) @ v.float()                        # [..., D, Dv]: sums of ±v
    vsum = v.float().sum(-2, keepdim=True)                      # [..., 1, Dv]
    ksum = kb.sum(-2, keepdim=True)                             # [..., 1, D]
    num = d * vsum + qb @ s                                     # [..., N, Dv]
    den = n * d + (qb * ksum).sum(-1, keepdim=True)             # [..., N, 1]
    out = torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))
    return out.to(v.dtype)


@binary_attention.register_fake
def _binary_attention_fake(q, k, v):
    return v.new_empty((*q.shape[:-1], v.shape[-1]))


# ----------------------------------------------------------------------------- costs

@register_cost(torch.ops.fxpress.shift_linear.default)
def _shift_linear_cost(node: fx.Node, gm: fx.GraphModule) -> tuple[int, int]:
    """MACs = shift-adds (out × K × terms); multiplies = one per output (the channel scale)."""
    c = arg_shape(node, gm, 1)
    out = numel(node)
    if not c or not out:
        return 0, 0
    return out * c[1] * c[0], out


@register_cost(torch.ops.fxpress.shift_conv2d.default)
def _shift_conv2d_cost(node: fx.Node, gm: fx.GraphModule) -> tuple[int, int]:
    c = arg_shape(node, gm, 1)
    out = numel(node)
    if not c or not out:
        return 0, 0
    return out * c[1] * c[2] * c[3] * c[0], out


@register_cost(torch.ops.fxpress.binary_attention.default)
def _binary_attention_cost(node: fx.Node, gm: fx.GraphModule) -> tuple[int, int]:
    """Additions only, except one division per output element (counted as a multiply)."""
    q, k, v = (arg_shape(node, gm, i) for i in range(3))
    if not q or not v:
        return 0, 0
    batch = math.prod(q[:-2])
    n, d, dv = k[-2], k[-1], v[-1]
    adds = batch * (n * d * dv + q[-2] * d * dv)
    return adds, numel(node)
