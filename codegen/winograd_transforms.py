"""Winograd F(m x m, 3x3) transforms as hand-written TIR, m = 4 or 2 (used by winograd_route.py).

A 3x3 stride-1 convolution computes each m x m output tile from an a x a input tile (a = m + 2).
In the Winograd domain that is a*a independent products over the input channels, so the conv becomes

    V[a*a, C, Q] = input transform of the a x a tiles  (Bᵀ d B; Q = tiles of all images)
    U[a*a, O, C] = weight transform                    (G g Gᵀ; weights only, lifted to compile time)
    M[a*a, O, Q] = U x V                               (a*a GEMMs, routed to the BLAS shim)
    Y[N, O, OH, OW] = output transform of M            (Aᵀ m A, cropped)

F(4x4, 3x3): 36 multiply-adds per tile and channel pair instead of 144 (4x fewer); F(2x2, 3x3): 16
instead of 36 (2.25x). The matrices are Lavin & Gray's (points 0, ±1, ±2, ∞ for m = 4; 0, ±1, ∞ for
m = 2).

The kernels are generated as TVMScript text with one expression per transformed value, only the
non-zero coefficients written out (TVM's simplifier does not drop ``x * 0.0``: with NaN/Inf inputs it
is not zero). Intermediates go through small local buffers, not let-bindings: TVM 0.27's
VectorizeLoop keeps a scalar type on a let-bound variable whose value it vectorized, and the
result is wrong. Tiles are numbered row-major per image; one tile row is one vector.

Input transform, per (image, channel): the plane is copied once into a zero-padded scratch plane
split by column phase (``xs[k, r, t] = padded x[r, m*t + k]``), so that every value a tile row needs
is a contiguous vector load; then each tile row is transformed in registers and written as a*a
contiguous vectors. Output transform, per (image, output channel): each tile row is transformed in
registers into a small local buffer, then copied out row by row with the crop (OH and OW need not be
multiples of m).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction as Fr

import tvm
from tvm import tirx

from .kernel_families import KERNEL_ATTR, OP_PATTERN_OPAQUE



@dataclass(frozen=True)
class Variant:
    m: int        # output tile
    bt: tuple     # a x a
    g: tuple      # a x 3
    at: tuple     # m x a
    back: tuple   # 3 x a, a left inverse of g: the 3x3 kernel is back . U . backᵀ (exact, small integers)

    @property
    def alpha(self) -> int:
        return self.m + 2


F4 = Variant(4,
             bt=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                 (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
             g=((Fr(1, 4), 0, 0), (Fr(-1, 6), Fr(-1, 6), Fr(-1, 6)), (Fr(-1, 6), Fr(1, 6), Fr(-1, 6)),
                (Fr(1, 24), Fr(1, 12), Fr(1, 6)), (Fr(1, 24), Fr(-1, 12), Fr(1, 6)), (0, 0, 1)),
             at=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
             back=((4, 0, 0, 0, 0, 0), (-4, -6, 0, 0, 0, -1), (0, 0, 0, 0, 0, 1)))
F2 = Variant(2,
             bt=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
             g=((1, 0, 0), (Fr(1, 2), Fr(1, 2), Fr(1, 2)), (Fr(1, 2), Fr(-1, 2), Fr(1, 2)), (0, 0, 1)),
             at=((1, 1, 1, 0), (0, 1, -1, -1)),
             back=((1, 0, 0, 0), (-1, 2, 0, -1), (0, 0, 0, 1)))
VARIANTS = {4: F4, 2: F2}


def tiles(out_h: int, out_w: int, m: int) -> tuple[int, int]:
    """Tile rows and columns covering an ``out_h x out_w`` output map."""
    return -(-out_h // m), -(-out_w // m)


def tile_count(out_h: int, out_w: int, m: int) -> int:
    """Tiles per image: the Q extent per image of V and M."""
    th, tw = tiles(out_h, out_w, m)
    return th * tw


def weight_coefficients(m: int) -> list[list[float]]:
    """The a*a x 9 matrix taking a 3x3 kernel (row-major) to its Winograd-domain values, ``G g Gᵀ``."""
    g, a = VARIANTS[m].g, VARIANTS[m].alpha
    return [[float(g[p][i] * g[q][j]) for i in range(3) for j in range(3)] for p in range(a) for q in range(a)]


def _combination(coeffs, names: list[str]) -> str:
    """``sum(c * name)`` over the non-zero coefficients, as TVMScript float32 arithmetic."""
    terms = []
    for c, name in zip(coeffs, names):
        if c == 0:
            continue
        if c == 1:
            terms.append(name)
        elif c == -1:
            terms.append(f"-{name}")
        else:
            terms.append(f"T.float32({float(c)!r}) * {name}")
    return " + ".join(terms) if terms else "T.float32(0)"


def _parse(signature: str, body: str, name: str) -> tirx.PrimFunc:
    """A scheduled, opaque PrimFunc from a signature line and a body (indented 8), under a root block
    (Relax's analyses, e.g. HasReshapePattern, expect one)."""
    source = ("# from tvm.script import tirx as T\n@T.prim_func(s_tir=True)\n" + signature + "\n"
              '    T.func_attr({"tirx.noalias": True})\n    with T.sblock("root"):\n' + body)
    func = tvm.script.from_source(source)
    if isinstance(func, tvm.IRModule):
        func = func["main"]
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")  # the module names it (winograd_input, ..._1, ...)
    return func.with_attrs({"op_pattern": OP_PATTERN_OPAQUE, "tirx.is_scheduled": True, KERNEL_ATTR: 1})


def _phase_copies(m: int, pad_left: int, pad_top: int, cols: int) -> list[str]:
    """One input row into the phase-split scratch (``xs[k, r, t] = padded x[r, m*t + k]``): per phase k,
    one vectorized copy over the scratch columns t whose source column lies in the row (a static range,
    so no per-element test and no division); the rest stays zero padding."""
    out = []
    for k in range(m):
        lo = max(0, -(-(pad_left - k) // m))  # first t with m*t + k - pad_left >= 0
        hi = (cols - 1 + pad_left - k) // m   # last t with m*t + k - pad_left < cols
        if hi >= lo:
            out += [f"        for t in T.vectorized({hi - lo + 1}):",
                    f"            xs[{k}, r + {pad_top}, t + {lo}] = x[ni, ci, r, {m} * (t + {lo}) + {k - pad_left}]"]
    return out


def _lines(lines: list[str], indent: int) -> str:
    return "".join(" " * indent + line + "\n" for line in lines)


# Generating and parsing a kernel takes ~0.2 s; a network repeats the same geometry (ResNet-18: 10 convs,
# 3 geometries), and PrimFuncs are immutable.
@functools.lru_cache(maxsize=64)
def input_transform(n: int, c: int, h: int, w: int, pad_top: int, pad_left: int,
                    out_h: int, out_w: int, m: int = 4, *, cores: int = 1) -> tirx.PrimFunc:
    """x[n, c, h, w] → V[a*a, c, n * tile_count] (see the module docstring)."""
    var = VARIANTS[m]
    a = var.alpha
    th, tw = tiles(out_h, out_w, m)
    q = th * tw
    hp, reach = th * m + 2, (a - 1) // m  # scratch rows; extra tile columns a tile row reads
    # rows and columns of x that land in the scratch plane (it may crop the bottom/right padding)
    rows, cols = min(h, hp - pad_top), min(w, tw * m + 2 - pad_left)
    inner = [f"d[{i * a + j}, lane] = xs[{j % m}, ti * {m} + {i}, lane + {j // m}]"
             for i in range(a) for j in range(a)]
    inner += [f"t[{i * a + b}, lane] = " + _combination(var.bt[b], [f"d[{i * a + j}, lane]" for j in range(a)])
              for i in range(a) for b in range(a)]
    inner += [f"v[{p * a + b}, ci, ni * {q} + ti * {tw} + lane] = "
              + _combination(var.bt[p], [f"t[{i * a + b}, lane]" for i in range(a)])
              for p in range(a) for b in range(a)]
    body = _lines([
        f"for plane in T.parallel({n * c}):",
        f'    xs = T.alloc_buffer(({m}, {hp}, {tw + reach}), "float32")',
        f'    d = T.alloc_buffer(({a * a}, {tw}), "float32", scope="local")',
        f'    t = T.alloc_buffer(({a * a}, {tw}), "float32", scope="local")',
        f"    ni = plane // {c}",
        f"    ci = plane % {c}",
        f"    for k, r in T.grid({m}, {hp}):",
        f"        for s in T.vectorized({tw + reach}):",
        "            xs[k, r, s] = T.float32(0)",
        f"    for r in range({rows}):",
        *_phase_copies(m, pad_left, pad_top, cols),
        f"    for ti in range({th}):",
        f"        for lane in T.vectorized({tw}):",
    ], 8) + _lines(inner, 20)
    signature = (f'def main(x: T.Buffer(({n}, {c}, {h}, {w}), "float32"), '
                 f'v: T.Buffer(({a * a}, {c}, {n * q}), "float32")):')
    return _parse(signature, _per_share(body, n * c, cores), "winograd_input")


@functools.lru_cache(maxsize=64)
def output_transform(n: int, o: int, out_h: int, out_w: int, c: int, h: int, w: int, pad_top: int,
                     pad_left: int, m: int = 4, bias: bool = False, residual: bool = False,
                     relu: bool = False, *, cores: int = 1) -> tirx.PrimFunc:
    """(M[a*a, o, n * tile_count], x[n, c, h, w], U[a*a, o, c][, bias[1, o, 1, 1]][, res[n, o, out_h,
    out_w]]) → y[n, o, out_h, out_w].

    An output that comes out NaN or Inf is recomputed directly from x and the kernel (recovered from U,
    for an output channel that has one): in the Winograd domain one NaN or Inf input spreads to
    its whole tile and its neighbours' (Inf - Inf), where the direct conv, and torch, give NaN/Inf only
    in the windows that hold it. Finite outputs never take that path.

    The epilogue (``bias``, ``residual``, ``relu``: y = relu(conv + bias + res)) runs on each output
    plane right after it is written, while it is in cache; ReLU keeps NaN (as torch's does)."""
    var = VARIANTS[m]
    a = var.alpha
    th, tw = tiles(out_h, out_w, m)
    q = th * tw
    inner = [f"s[{p * m + j}, lane] = "
             + _combination(var.at[j], [f"mm[{p * a + b}, oi, ni * {q} + ti * {tw} + lane]" for b in range(a)])
             for p in range(a) for j in range(m)]
    inner += [f"out[{i * m + j}, lane] = " + _combination(var.at[i], [f"s[{p * m + j}, lane]" for p in range(a)])
              for i in range(m) for j in range(m)]
    kernel = [f"g[ci * 9 + {i * 3 + j}] = " + _combination(
        [var.back[i][p] * var.back[j][b] for p in range(a) for b in range(a)],
        [f"u[{p * a + b}, oi, ci]" for p in range(a) for b in range(a)]) for i in range(3) for j in range(3)]
    # flag a lane when any of its tile's outputs is non-finite (their sum is; overflow only flags more)
    total = " + ".join(f"out[{k}, lane]" for k in range(m * m))
    inner.append(f"bad[lane] = T.max(bad[lane], T.Select(T.isfinite({total}), T.float32(0), T.float32(1)))")
    body = _lines([
        f"for plane in T.parallel({n * o}):",
        f'    s = T.alloc_buffer(({a * m}, {tw}), "float32", scope="local")',
        f'    out = T.alloc_buffer(({m * m}, {tw}), "float32", scope="local")',
        f'    bad = T.alloc_buffer(({tw},), "float32", scope="local")',
        f"    ni = plane // {o}",
        f"    oi = plane % {o}",
        f"    for lane in T.vectorized({tw}):",
        "        bad[lane] = T.float32(0)",
        f"    for ti in range({th}):",
        f"        for lane in T.vectorized({tw}):",
    ], 8) + _lines(inner, 20) + _lines([
        f"        for i in range(T.min({m}, {out_h} - ti * {m})):",
        f"            for col in range({out_w}):",
        f"                y[ni, oi, ti * {m} + i, col] = out[i * {m} + col % {m}, col // {m}]",
        f"    for lane in range(1, {tw}):",
        "        bad[0] = T.max(bad[0], bad[lane])",
        "    if bad[0] > T.float32(0):",
        f'        g = T.alloc_buffer(({c * 9},), "float32")  # the recovered kernel: only on this rare path',
        '        acc = T.alloc_buffer((1,), "float32", scope="local")',
        f"        for ci in range({c}):",
    ], 8) + _lines(kernel, 20) + _lines([
        f"        for r, col in T.grid({out_h}, {out_w}):",
        "            if not T.isfinite(y[ni, oi, r, col]):",
        "                acc[0] = T.float32(0)",
        f"                for ci, ki, kj in T.grid({c}, 3, 3):",
        f"                    if 0 <= r + ki - {pad_top} and r + ki - {pad_top} < {h} "
        f"and 0 <= col + kj - {pad_left} and col + kj - {pad_left} < {w}:",
        f"                        acc[0] = acc[0] + x[ni, ci, r + ki - {pad_top}, col + kj - {pad_left}] "
        "* g[ci * 9 + ki * 3 + kj]",
        "                y[ni, oi, r, col] = acc[0]",
    ], 8) + _epilogue(out_h, out_w, bias, residual, relu)
    extra = ((f'b: T.Buffer((1, {o}, 1, 1), "float32"), ' if bias else "")
             + (f'res: T.Buffer(({n}, {o}, {out_h}, {out_w}), "float32"), ' if residual else ""))
    signature = (f'def main(mm: T.Buffer(({a * a}, {o}, {n * q}), "float32"), '
                 f'x: T.Buffer(({n}, {c}, {h}, {w}), "float32"), u: T.Buffer(({a * a}, {o}, {c}), "float32"), '
                 f'{extra}y: T.Buffer(({n}, {o}, {out_h}, {out_w}), "float32")):')
    return _parse(signature, _per_share(body, n * o, cores), "winograd_output")


def _per_share(body: str, planes: int, cores: int) -> str:
    """``for plane in T.parallel(planes)`` → one share of planes per core, the plane loop's buffers
    allocated once per share: a buffer allocated inside a parallel loop is a workspace (heap)
    allocation on every iteration (rowwise.py measured it)."""
    lines = body.split("\n")
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("for plane in T.parallel("))
    base = len(lines[at]) - len(lines[at].lstrip())
    inner = lines[at + 1:]
    hoisted = [line for line in inner
               if len(line) - len(line.lstrip()) == base + 4 and "T.alloc_buffer(" in line]
    rest = [line for line in inner if line not in hoisted]
    parts = max(1, min(cores, planes))
    share = -(-planes // parts)
    return "\n".join(lines[:at] + [" " * base + (f"for part in T.parallel({parts}):" if parts > 1
                                                 else "for part in range(1):")]
                     + hoisted
                     + [" " * (base + 4) + f"for plane in range(part * {share}, T.min({planes}, part * {share} + {share})):"]
                     + ["    " + line if line.strip() else line for line in rest])


def _epilogue(out_h: int, out_w: int, bias: bool, residual: bool, relu: bool) -> str:
    """The per-plane epilogue loop of output_transform (empty when there is none)."""
    if not (bias or residual or relu):
        return ""
    value = "y[ni, oi, r, col]" + (" + b[0, oi, 0, 0]" if bias else "") + (" + res[ni, oi, r, col]" if residual else "")
    # ReLU as a select, not max: max(NaN, 0) is 0 in LLVM's maxnum, torch's relu keeps the NaN
    store = "T.Select(e[col] < T.float32(0), T.float32(0), e[col])" if relu else "e[col]"
    # e: a local buffer, not a let (VectorizeLoop mistypes let-bound vectors: module docstring)
    return _lines([
        f'    e = T.alloc_buffer(({out_w},), "float32", scope="local")',
        f"    for r in range({out_h}):",
        f"        for col in T.vectorized({out_w}):",
        f"            e[col] = {value}",
        f"            y[ni, oi, r, col] = {store}",
    ], 8)
