"""The shift/add weight code format: bit layout and the integer path's clamp limit.

One uint8 per weight per term: ``sign << EXP_BITS | e``, the weight being ``(-1)^sign * 2^-e * scale``;
``e == ZERO_EXP`` encodes 0. The pass's reference ops (passes/shift_add/ops.py), the ONNX lowering
and the TIR kernels (codegen/shift_add_kernels.py) must agree on these numbers bit for bit, so they
all read them here. Plain numbers and ``math`` only, like errors.py: the torch-free codegen imports it.
"""
from __future__ import annotations

import math

EXP_BITS = 4                      # exponent field width of the default 5-bit code
ZERO_EXP = (1 << EXP_BITS) - 1    # 15: exponent value reserved for the weight 0
MAX_EXP = ZERO_EXP - 1            # 14: smallest non-zero magnitude is 2^-14 * scale
SIGN_BIT = 1 << EXP_BITS          # 16
INT_LIMIT_CAP = 1 << 24           # |xq| <= 2^24: exact in float32, so clamping in float is exact


def int_clamp_limit(terms: int, reduce_len: int) -> int:
    """Largest |xq| such that the int32 accumulator of ``terms * reduce_len`` shifted terms cannot overflow.

    Each rounded shift ``(xq + 2^(e-1)) >> e`` has magnitude <= |xq| + 1, so
    ``terms * reduce_len * (L + 1) <= 2^31 - 1``; capped at 2^24 so L is exact in float32.
    """
    return max(1, min(INT_LIMIT_CAP, (2**31 - 1) // max(1, terms * reduce_len) - 1))


def frac_bits_for(amax: float, terms: int, reduce_len: int, headroom: float = 4.0) -> int:
    """Fraction bits F for the integer path: ``amax * headroom`` (calibration max × margin) maps to <= L."""
    lim = int_clamp_limit(terms, reduce_len)
    amax = max(float(amax), 1e-12) * headroom
    return int(max(0, min(30, math.floor(math.log2(lim / amax)))))
