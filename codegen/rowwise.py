"""Hand-written row-wise kernels: softmax and LayerNorm over the last axis, every pass over a row vectorized.

Why: TVM's softmax (``topi.nn.fast_softmax``, scheduled by dlight's Reduction rule) sums each row's
exponentials in a serial chain of scalar adds and goes through three row-sized intermediates; on the
BERT-style encoder (12 x 128 x 128 attention scores per layer) it took ~120 µs per layer, one
sixth of the model's non-GEMM time. This kernel reads the row once for its maximum, once to write
the exponentials and sum them (``lanes`` partial sums in a vector), and scales it once in place.

Semantics are torch's, exactly where it matters:
- a row with a NaN, a +Inf, or only -Inf entries comes out all NaN (torch: exp(Inf - Inf), 0/0);
- exp of anything below -88.38 (masked scores, -Inf) is exactly 0, not the clamped tiny value
  ``topi.fast_exp`` returns;
- elsewhere exp is the Cephes polynomial ``topi.fast_exp`` uses (a few ulp; the result is scaled by
  1 / sum, so it differs from torch's ``e / sum`` by rounding only).

Intermediates go through local buffers indexed by lane, never ``let`` bindings: TVM 0.27's VectorizeLoop
keeps a let-bound variable scalar-typed after vectorizing its value (winograd_transforms.py).
"""
from __future__ import annotations

import functools

import tvm
from tvm import tirx

from .kernel_families import KERNEL_ATTR, OP_PATTERN_OPAQUE

MIN_WIDTH = 4  # rows whose length has no divisor this wide (up to the lane count) keep TVM's softmax
PARALLEL_MIN = 16384  # elements below which the rows run on one core (cpu_schedules.PARALLEL_MIN)
# topi.fast_exp's range reduction and Cephes polynomial (TVM's src/topi elemwise fast_exp)
_EXP_LOW = -88.3762626647949
_LOG2E, _LN2 = 1.44269504088896341, 0.6931471805599453
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def vector_width(n: int, lanes: int) -> int | None:
    """The vector width for rows of ``n``: ``lanes`` if it divides n, else the largest divisor below it
    (at least MIN_WIDTH), else None (the row is left to TVM's softmax)."""
    for width in range(min(lanes, n), MIN_WIDTH - 1, -1):
        if n % width == 0:
            return width
    return None


@functools.lru_cache(maxsize=32)
def softmax_rows(rows: int, n: int, width: int, cores: int) -> tirx.PrimFunc:
    """x[rows, n] → y[rows, n], softmax of each row (module docstring), one share of rows per core."""
    chunks = n // width
    c = [f"T.float32({v!r})" for v in _POLY]
    poly = (f"(((((({c[0]} * r[lane] + {c[1]}) * r[lane] + {c[2]}) * r[lane] + {c[3]}) * r[lane] + {c[4]})"
            f" * r[lane] + {c[5]}) * r[lane] * r[lane] + r[lane] + T.float32(1))")
    head, share = _row_shares(rows, n, cores)
    lines = [
        f'    m = T.alloc_buffer(({width},), "float32", scope="local")',
        f'    bad = T.alloc_buffer(({width},), "float32", scope="local")',
        f'    acc = T.alloc_buffer(({width},), "float32", scope="local")',
        f'    d = T.alloc_buffer(({width},), "float32", scope="local")',
        f'    k2 = T.alloc_buffer(({width},), "float32", scope="local")',
        f'    r = T.alloc_buffer(({width},), "float32", scope="local")',
        f'    e = T.alloc_buffer(({width},), "float32", scope="local")',
        '    red = T.alloc_buffer((2,), "float32", scope="local")',
        f"    for row in range(part * {share}, T.min({rows}, part * {share} + {share})):",
        f"        for lane in T.vectorized({width}):",
        '            m[lane] = T.float32("-inf")',
        "            bad[lane] = T.float32(0)",
        f"        for k in range({chunks}):",
        f"            for lane in T.vectorized({width}):",
        f"                e[lane] = x[row, k * {width} + lane]",
        "                m[lane] = T.max(m[lane], e[lane])",
        "                bad[lane] = T.max(bad[lane], T.Select(T.isnan(e[lane]), T.float32(1), T.float32(0)))",
        "        red[0] = m[0]",
        "        red[1] = bad[0]",
        f"        for lane in range(1, {width}):",
        "            red[0] = T.max(red[0], m[lane])",
        "            red[1] = T.max(red[1], bad[lane])",
        # NaN anywhere, a +Inf, or only -Inf (the max is -Inf): torch's row is all NaN
        '        if red[1] > T.float32(0) or red[0] == T.float32("inf") or red[0] == T.float32("-inf"):',
        f"            for k in range({n}):",
        '                y[row, k] = T.float32("nan")',
        "        else:",
        f"            for lane in T.vectorized({width}):",
        "                acc[lane] = T.float32(0)",
        f"            for k in range({chunks}):",
        f"                for lane in T.vectorized({width}):",
        f"                    d[lane] = x[row, k * {width} + lane] - red[0]",
        f"                    k2[lane] = T.floor(T.max(d[lane], T.float32({_EXP_LOW!r})) * T.float32({_LOG2E!r}) + T.float32(0.5))",
        f"                    r[lane] = T.max(d[lane], T.float32({_EXP_LOW!r})) - k2[lane] * T.float32({_LN2!r})",
        '                    e[lane] = T.reinterpret("float32", T.shift_left(T.Cast("int32", k2[lane]) + 127, 23)) * '
        + poly,
        f"                    e[lane] = T.Select(d[lane] < T.float32({_EXP_LOW!r}), T.float32(0), e[lane])",
        f"                    y[row, k * {width} + lane] = e[lane]",
        "                    acc[lane] = acc[lane] + e[lane]",
        "            red[1] = acc[0]",
        f"            for lane in range(1, {width}):",
        "                red[1] = red[1] + acc[lane]",
        "            red[1] = T.float32(1) / red[1]",
        f"            for k in range({chunks}):",
        f"                for lane in T.vectorized({width}):",
        f"                    y[row, k * {width} + lane] = y[row, k * {width} + lane] * red[1]",
    ]
    return _parse(f'def main(x: T.Buffer(({rows}, {n}), "float32"), y: T.Buffer(({rows}, {n}), "float32")):',
                  head + lines)


@functools.lru_cache(maxsize=32)
def layer_norm_rows(rows: int, n: int, width: int, cores: int, eps: float) -> tirx.PrimFunc:
    """(x[rows, n], gamma[n], beta[n]) → y[rows, n]: LayerNorm of each row, torch's two-pass form
    (mean, then the biased variance of x - mean), partial sums in vectors. NaN/Inf propagate by
    IEEE arithmetic alone (no max/min here), as in torch."""
    chunks = n // width
    head, share = _row_shares(rows, n, cores)
    lines = [
        f'    acc = T.alloc_buffer(({width},), "float32", scope="local")',
        f'    d = T.alloc_buffer(({width},), "float32", scope="local")',
        '    red = T.alloc_buffer((2,), "float32", scope="local")',
        f"    for row in range(part * {share}, T.min({rows}, part * {share} + {share})):",
        f"        for lane in T.vectorized({width}):",
        "            acc[lane] = T.float32(0)",
        f"        for k in range({chunks}):",
        f"            for lane in T.vectorized({width}):",
        f"                acc[lane] = acc[lane] + x[row, k * {width} + lane]",
        "        red[0] = acc[0]",
        f"        for lane in range(1, {width}):",
        "            red[0] = red[0] + acc[lane]",
        f"        red[0] = red[0] * T.float32({1.0 / n!r})",
        f"        for lane in T.vectorized({width}):",
        "            acc[lane] = T.float32(0)",
        f"        for k in range({chunks}):",
        f"            for lane in T.vectorized({width}):",
        f"                d[lane] = x[row, k * {width} + lane] - red[0]",
        "                acc[lane] = acc[lane] + d[lane] * d[lane]",
        "        red[1] = acc[0]",
        f"        for lane in range(1, {width}):",
        "            red[1] = red[1] + acc[lane]",
        f"        red[1] = T.float32(1) / T.sqrt(red[1] * T.float32({1.0 / n!r}) + T.float32({float(eps)!r}))",
        f"        for k in range({chunks}):",
        f"            for lane in T.vectorized({width}):",
        f"                y[row, k * {width} + lane] = (x[row, k * {width} + lane] - red[0]) * red[1] "
        f"* g[k * {width} + lane] + b[k * {width} + lane]",
    ]
    return _parse(f'def main(x: T.Buffer(({rows}, {n}), "float32"), g: T.Buffer(({n},), "float32"), '
                  f'b: T.Buffer(({n},), "float32"), y: T.Buffer(({rows}, {n}), "float32")):', head + lines)


def _row_shares(rows: int, n: int, cores: int) -> tuple[list[str], int]:
    """The loop over shares of rows (one per core, or one share for a small tensor) and the share size.
    Buffers allocated inside a parallel loop are heap allocations (TVM's workspace): once per share,
    not once per row (per row: 230 µs for 1536 softmax rows of 128, 105 µs on one core)."""
    parts = max(1, min(cores, rows)) if rows * n >= PARALLEL_MIN else 1
    head = [f"for part in T.parallel({parts}):" if parts > 1 else "for part in range(1):"]
    return head, -(-rows // parts)


def _parse(signature: str, lines: list[str]) -> tirx.PrimFunc:
    source = ("# from tvm.script import tirx as T\n@T.prim_func(s_tir=True)\n" + signature + "\n"
              '    T.func_attr({"tirx.noalias": True})\n    with T.sblock("root"):\n'
              + "".join(" " * 8 + line + "\n" for line in lines))
    func = tvm.script.from_source(source)
    if isinstance(func, tvm.IRModule):
        func = func["main"]
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return func.with_attrs({"op_pattern": OP_PATTERN_OPAQUE, "tirx.is_scheduled": True, KERNEL_ATTR: 1})
