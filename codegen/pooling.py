"""NCHW max pool for llvm targets, separable: the window's rows first, then its columns.

Semantics are torch's: a window holding a NaN gives NaN, wherever it sits (``nan_extremum`` keeps a NaN
from either side), and padding is -inf, so a window of -inf values gives -inf. TOPI's pool padded with
the lowest finite float and kept a NaN only when it was the window's last value.

Why separable: max over a KH x KW window is max over KW of (max over KH of a column). The vertical step
reads whole input rows with unit stride (vector loads); only the horizontal step reads with the
stride, from one output row's worth of column maxima held in a local buffer. The single-stage
reduction read every tap with the stride and a padding test per lane, and stored to the output after
each tap (ResNet-18's 3x3/2 pool on 64x112x112, 2 threads: 0.29 ms).
"""
from __future__ import annotations

from tvm import s_tir, te, tirx

from .cpu_schedules import PARALLEL_MIN
from .kernel_families import KERNEL_ATTR, OP_PATTERN_OPAQUE


def nan_extremum(a, b, largest: bool = True):
    """max (min) of two values that keeps NaN from either side, as torch does (a NaN ``b`` wins because
    ``a > NaN`` is false); the combiner of relax_prep's max/min reductions too."""
    return tirx.Select(tirx.isnan(a) | ((a > b) if largest else (a < b)), a, b)


def _fold(values):
    out = values[0]
    for v in values[1:]:
        out = nan_extremum(out, v)
    return out


def pool_geometry(shape, kernel, strides, dilation, padding) -> tuple[int, int]:
    """(OH, OW) of a floor-mode pool; ``padding`` is (top, left, bottom, right)."""
    _, _, h, w = shape
    (kh, kw), (sh, sw), (dh, dw), (top, left, bottom, right) = kernel, strides, dilation, padding
    return ((h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (w + left + right - dw * (kw - 1) - 1) // sw + 1)


def max_pool2d_func(shape, dtype: str, kernel, strides, dilation, padding, lanes: int) -> tirx.PrimFunc:
    """The scheduled kernel: parallel over (batch, channel), per output row the column maxima of the
    window's KH input rows (a local row, vectorized), then the KW-wide maxima along it."""
    n, c, h, w = (int(d) for d in shape)
    (kh, kw), (sh, sw), (dh, dw), (top, left, bottom, right) = kernel, strides, dilation, padding
    oh, ow = pool_geometry(shape, kernel, strides, dilation, padding)
    wp = w + left + right
    minus_inf = tirx.const(float("-inf"), dtype)
    x = te.placeholder((n, c, h, w), dtype, name="x")

    def tap(i, j, y, z):  # the -inf padded input, read in place
        inside = tirx.all(y >= top, y < h + top, z >= left, z < w + left)
        return tirx.if_then_else(inside, x[i, j, tirx.min(tirx.max(y - top, 0), h - 1),
                                           tirx.min(tirx.max(z - left, 0), w - 1)], minus_inf)

    cols = te.compute((n, c, oh, wp), lambda i, j, y, z: _fold(
        [tap(i, j, y * sh + r * dh, z) for r in range(kh)]), name="pool_cols")
    out = te.compute((n, c, oh, ow), lambda i, j, y, z: _fold(
        [cols[i, j, y, z * sw + s * dw] for s in range(kw)]), name="pool_max")
    sch = s_tir.Schedule(te.create_prim_func([x, out]))
    block, col_block = sch.get_sblock("pool_max"), sch.get_sblock("pool_cols")
    b, ch, y, z = sch.get_loops(block)
    plane = sch.fuse(b, ch)
    if n * c * oh * ow >= PARALLEL_MIN:
        sch.parallel(plane)
    sch.compute_at(col_block, y)
    sch.set_scope(col_block, 0, "local")
    _vectorize_row(sch, sch.get_loops(col_block)[-1], wp, lanes)
    _vectorize_row(sch, z, ow, lanes)
    func = sch.mod["main"].without_attr("global_symbol")  # te names every function "main"
    return func.with_attrs({"tirx.is_scheduled": True, KERNEL_ATTR: 1, "op_pattern": OP_PATTERN_OPAQUE})


def _vectorize_row(sch: s_tir.Schedule, loop, extent: int, lanes: int) -> None:
    """Vectorize a row loop: by ``lanes`` where they divide it, whole where it is short, else by the
    widest power of two (>= 4) that divides it."""
    if extent % lanes == 0 and extent > lanes:
        sch.vectorize(sch.split(loop, factors=[None, lanes])[1])
    elif extent <= 4 * lanes:
        sch.vectorize(loop)
    else:
        width = next((v for v in (lanes // 2, lanes // 4) if v >= 4 and extent % v == 0), None)
        if width is not None:
            sch.vectorize(sch.split(loop, factors=[None, width])[1])
