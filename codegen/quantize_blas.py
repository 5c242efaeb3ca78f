"""Int8 qlinear / qconv2d through the BLAS's exact u8 × s8 → s32 GEMM (the shim's ``fxpress_gemm_u8s8``).

Where the GEMM shim bound MKL's ``cblas_gemm_s8u8s32`` and a probe found it exact (AMX or VNNI inside
MKL; without VNNI it may sum pairs in saturating int16), and the target has VNNI
(``int8_blas_routable``):

* a **qlinear** becomes that GEMM's int32 product plus the packed kernel's epilogue as an ordinary
  elementwise op (the activation or residual after it fuses in);
* a **qconv2d** (groups 1) becomes: the u8 input transposed to NHWC and padded with its zero point
  (``q_nhwc``), a pixel-major im2col reading contiguous channel runs (``q_im2col``: row = output pixel,
  column = (kh, kw, c), the weight permuted to match at compile time), the same GEMM, and an epilogue
  writing NCHW. Which convs take it: ``route_int8_conv``.

Both keep the packed kernels' numbers bit for bit: the same int32 sums (exact, associative), the same
``bias_adj`` (``quantize_packed.bias_adjust_func``) and the same epilogue expression.

Intel Xeon with AMX (Sapphire-Rapids-class), 2026-12-08, ResNet-18 int8, 2 threads: every conv through
here 6.0 ms against 9.5 ms with the direct VNNI kernels (the stem only); MKL's AMX GEMM runs the
convs' products at 900-1400 GOP/s per core, the direct kernel at ~350. Without AMX (VNNI alone) MKL
was not measured faster than the direct kernel, so there only the narrow-input convs (the stem) come
here. ``FXPRESS_INT8_BLAS=0`` keeps the packed kernels everywhere; ``FXPRESS_INT8_CONV_BLAS=0`` / ``all``
no conv / every conv.
"""
from __future__ import annotations

import os

import tvm
from tvm import relax, s_tir, te, tirx

from .quantize_kernels import _conv_out
from .quantize_packed import AVX_VNNI, VNNI, Layout, _epilogue, bias_adjust_func

INT8_BLAS_ENV = "FXPRESS_INT8_BLAS"
INT8_CONV_BLAS_ENV = "FXPRESS_INT8_CONV_BLAS"
NARROW_INPUT_CHANNELS = 16  # below this the direct kernel's 4-channel groups are mostly padding


def int8_blas_routable(layout: Layout | None) -> bool:
    """Whether int8 GEMMs go to the shim's int8 GEMM (MKL's cblas_gemm_s8u8s32, found exact in this
    process): on VNNI targets only (MKL without VNNI may saturate; the probe would catch it anyway), and
    unless ``FXPRESS_INT8_BLAS=0``. Intel Xeon with AMX, 2026-12-07, one core: 1000-1300 GOP/s on BERT's
    projections against ~350 for the packed VNNI kernel here."""
    from . import blas

    if layout not in (VNNI, AVX_VNNI) or os.environ.get(INT8_BLAS_ENV, "1") in ("", "0"):
        return False
    return blas.available() and blas.bound_int8_symbol() != "none"


def int8_conv_blas_mode() -> str:
    """``FXPRESS_INT8_CONV_BLAS``: "0" keeps every int8 conv on the direct kernel, "all" routes every
    one, else the rule (``route_int8_conv``)."""
    value = os.environ.get(INT8_CONV_BLAS_ENV, "1")
    return value if value in ("0", "all") else "rule"


def route_int8_conv(args: dict, mode: str, matrix_engine: bool) -> bool:
    """Which int8 convs take im2col + the BLAS's int8 GEMM instead of the direct VNNI kernel: under the
    rule, every one where the BLAS has a matrix engine (``matrix_engine``: AMX), else those with few
    input channels."""
    if mode == "0" or args["groups"] != 1 or args.get("x_dtype", "uint8") != "uint8" or args["w_shape"][0] != 1:
        return False
    return mode == "all" or matrix_engine or args["x_shape"][1] < NARROW_INPUT_CHANNELS


def int8_gemm_func(M: int, N: int, K: int, parts: int) -> tirx.PrimFunc:
    """acc[M, N] (int32) = xq[M, K] (uint8) · w[N, K]ᵀ (int8): ``parts`` shim calls in a parallel loop."""
    from . import blas

    x = te.placeholder((M, K), "uint8", name="xq")
    w = te.placeholder((N, K), "int8", name="w")
    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731

    def body(ins, outs):
        part = tirx.Var("part", "int64")
        call = tirx.call_extern("int32", blas.INT8_SYMBOL, part, i64(parts), i64(M), i64(N), i64(K),
                                ins[0].access_ptr("r"), ins[1].access_ptr("r"), outs[0].access_ptr("w"))
        kind = tirx.ForKind.PARALLEL if parts > 1 else tirx.ForKind.SERIAL
        return tirx.For(part, i64(0), i64(parts), kind, tirx.Evaluate(call))

    acc = te.extern([(M, N)], [x, w], body, dtype="int32", name="q_blas_gemm")
    func = te.create_prim_func([x, w, acc])
    return func.with_attr("tirx.is_scheduled", True)


def _te_int8_epilogue(acc, ws, badj, x_scale: float):
    """The packed kernel's epilogue on the BLAS's int32 product (the same expression, so the same bits);
    an ordinary elementwise op, so the activation or residual after it fuses in."""
    return te.compute(acc.shape, lambda m, n: _epilogue(lambda c: acc[m, n], ws, badj, 1, x_scale)(n),
                      name="q_out")


def _te_int8_conv_epilogue(acc, ws, badj, x_scale: float, B: int, OH: int, OW: int):
    """NCHW output from the pixel-major int32 product, through the same epilogue expression."""
    O = int(acc.shape[1])
    return te.compute((B, O, OH, OW), lambda b, o, i, j: _epilogue(
        lambda c: acc[(b * OH + i) * OW + j, o], ws, badj, 1, x_scale)(o), name="q_out")


# ----------------------------------------------------------------------------- the conv's im2col

def int8_im2col_func(x_shape, w_shape, stride, padding, dilation, x_zp: int) -> tirx.PrimFunc:
    """cols[b·OH·OW + p, (kh, kw, c)] (uint8) from the NCHW u8 input, in two stages: ``q_nhwc``, the
    input transposed to NHWC and padded with the zero point (what bias_adj's correction assumes), so
    that ``q_im2col`` copies contiguous runs of C channels per tap."""
    B, Cin, H, W = x_shape
    _, _, _, KH, KW = w_shape
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    OH, OW = _conv_out(H, W, KH, KW, stride, padding, dilation)
    x = te.placeholder(tuple(x_shape), "uint8", name="xq")
    xp = te.compute((B, H + 2 * ph, W + 2 * pw, Cin), lambda b, h, w, c: tirx.if_then_else(
        tirx.all(h >= ph, h < H + ph, w >= pw, w < W + pw), x[b, c, h - ph, w - pw], tirx.const(x_zp, "uint8")),
        name="q_nhwc")
    cols = te.compute((B * OH * OW, KH * KW * Cin), lambda r, k: xp[
        r // (OH * OW), (r % (OH * OW)) // OW * sh + (k // (KW * Cin)) * dh,
        (r % OW) * sw + (k // Cin) % KW * dw, k % Cin], name="q_im2col")
    sch = s_tir.Schedule(te.create_prim_func([x, cols]))
    _schedule_nhwc(sch, Cin)
    _schedule_im2col(sch, B, OH, OW, KH, KW, Cin, contiguous_taps=dw == 1)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _schedule_nhwc(sch: s_tir.Schedule, C: int) -> None:
    """Parallel over (b, h); the channel loop innermost, vectorized where it is wide enough."""
    block = sch.get_sblock("q_nhwc")
    b, h, _, c = sch.get_loops(block)
    sch.parallel(sch.fuse(b, h))
    if C >= 16:
        _, vec = sch.split(c, factors=[None, 16])
        sch.vectorize(vec)


def _schedule_im2col(sch: s_tir.Schedule, B: int, OH: int, OW: int, KH: int, KW: int, C: int,
                     contiguous_taps: bool) -> None:
    """Parallel over output rows; each tap's C channels one contiguous vectorized copy, or with few
    channels (the stem's 3) each kernel row's KW·C bytes, which lie together when the dilation is 1."""
    block = sch.get_sblock("q_im2col")
    r, k = sch.get_loops(block)
    row, _ = sch.split(r, factors=[B * OH, OW])
    sch.parallel(row)
    if C >= 16:
        _, c = sch.split(k, factors=[KH * KW, C])
        _, vec = sch.split(c, factors=[None, 16])
        sch.vectorize(vec)
    elif contiguous_taps:
        _, run = sch.split(k, factors=[KH, KW * C])
        sch.unroll(run)


# ----------------------------------------------------------------------------- Relax emission

def has_matrix_engine() -> bool:
    """Whether this host's CPU has an int8 matrix engine (AMX-INT8) for the BLAS to use (Linux's flags)."""
    from fxpress.runtime.cpu import host_flags

    return "amx_int8" in (host_flags() or ())


class BlasEmitter:
    """Emits the BLAS form of a generic qlinear / qconv2d call into a Relax block builder."""

    def __init__(self, builder: relax.BlockBuilder, add_kernel):
        from .targets import pool_workers

        self.bb, self.add_kernel = builder, add_kernel
        self.parts = pool_workers(tvm.target.Target.current(allow_none=True))
        self.conv_mode = int8_conv_blas_mode()
        self.matrix_engine = has_matrix_engine()

    def routes_conv(self, args: dict) -> bool:
        return route_int8_conv(args, self.conv_mode, self.matrix_engine)

    def _product(self, x, w, w_shape, w2d, bq, x_zp: int, M: int, N: int, K: int):
        """bias_adj from the weight as stored (its sum does not depend on the order; lifted to compile
        time) and the int32 product x[M, K] · w2d[N, K]ᵀ."""
        badj = self.bb.emit(relax.call_tir(self.add_kernel(bias_adjust_func(w_shape, x_zp), "fxpress_qbias_adj"),
                                           [w, bq], relax.TensorType([1, N], "int32")))
        gemm = self.add_kernel(int8_gemm_func(M, N, K, self.parts), "fxpress_qgemm_blas")
        acc = self.bb.emit(relax.call_tir(gemm, [x, w2d], relax.TensorType([M, N], "int32")))
        return badj, acc

    def qlinear(self, fields, args: dict) -> relax.Expr:
        """qlinear (one weight cluster) → the int32 product and the elementwise epilogue."""
        x, w, ws, bq = fields
        M, K, N = args["M"], args["K"], args["N"]
        w2d = self.bb.emit(relax.op.reshape(w, [N, K]))  # a weight's reshape: lifted to compile time
        badj, acc = self._product(x, w, [1, N, K], w2d, bq, args["x_zp"], M, N, K)
        return self.bb.call_te(_te_int8_epilogue, acc, ws, badj, args["x_scale"],
                               primfunc_name_hint="fxpress_qlinear_out")

    def qconv(self, fields, args: dict) -> relax.Expr:
        """qconv2d (groups 1, one cluster) → NHWC im2col, the int32 product (pixels × channels), the
        epilogue writing NCHW (a following ReLU or residual add fuses into it)."""
        x, w, ws, bq = fields
        x_shape, w_shape = args["x_shape"], args["w_shape"]
        B, _, H, W = x_shape
        _, O, Cin, KH, KW = w_shape
        OH, OW = _conv_out(H, W, KH, KW, args["stride"], args["padding"], args["dilation"])
        M, K = B * OH * OW, Cin * KH * KW
        # [1, O, C, KH, KW] → [O, (KH, KW, C)], im2col's column order: param-only, lifted to compile time
        w2d = self.bb.emit(relax.op.reshape(relax.op.permute_dims(w, [0, 1, 3, 4, 2]), [O, K]))
        im2col = int8_im2col_func(x_shape, w_shape, args["stride"], args["padding"], args["dilation"], args["x_zp"])
        cols = self.bb.emit(relax.call_tir(self.add_kernel(im2col, "fxpress_qim2col"), [x],
                                           relax.TensorType([M, K], "uint8")))
        badj, acc = self._product(cols, w, w_shape, w2d, bq, args["x_zp"], M, O, K)
        return self.bb.call_te(_te_int8_conv_epilogue, acc, ws, badj, args["x_scale"], B, OH, OW,
                               primfunc_name_hint="fxpress_qconv_out")
