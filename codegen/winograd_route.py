"""Relax pass: fp32 3x3 stride-1 ``nn.conv2d`` → Winograd F(4x4, 3x3) or F(2x2, 3x3), its GEMMs through the BLAS shim.

Why: on ResNet-style models the 3x3 stride-1 convs are most of the FLOPs, and TVM's direct kernel
(and OpenBLAS on im2col) already run them near this CPU's FMA rate; only fewer multiplications are
faster. F(4x4, 3x3) does 36 multiply-adds per 4x4 output tile and channel pair instead of 144,
F(2x2, 3x3) 16 instead of 36. Measured per conv (one thread, docs/tuning.md "Winograd"): 2.2-3x faster
than the direct kernel on 56x56 and 28x28 maps (F(4x4)), 1.6x on 14x14 (F(2x2)).

What is rewritten: ``relax.nn.conv2d`` that conv_route.conv_geometry accepts (NCHW/OIHW, groups 1,
fp32, static shapes), whose kernel is computed from the weights alone (when ``main`` says which params
are weights: ``num_input``), with a 3x3 kernel, stride 1, dilation 1, padding at most 2, an output map at
least ``MIN_MAP`` wide and high, and at least ``MIN_CHANNELS`` input and output channels (``tile_size``
picks F(4x4) on maps of ``F4_MIN_MAP`` and more; a = 6 for F(4x4), 4 for F(2x2)):

    U = weight_transform(w)           [a*a, O, C]   (reads the weight only: lifted to compile time)
    V = winograd_input(x)             [a*a, C, Q]   (winograd_transforms.input_transform)
    M = matmul(U, V)                  [a*a, O, Q]   (RouteGemmToBlas: a*a GEMMs split over the cores)
    y = winograd_output(M, x, U)      [N, O, OH, OW] (x and U only for outputs that come out NaN/Inf)

Bias, batch norm, ReLU and the residual after the conv fuse into one elementwise kernel after it,
as they do after the GEMM route. The transformed weights are 4x (F(2x2): 16/9) the size of the
originals: the artifact and the compiled model's weights grow by that much for the
rewritten convs (relax_prep.lift_param_transforms allows it for this transform only).

Numerics: F(4x4, 3x3) in fp32 differs from the direct conv by ~1e-5 relative to the output's
largest value (its transform constants reach 8 and 1/24); tests/test_winograd.py bounds it.

Runs for an llvm target with the GEMM shim available (as conv_route). ``FXPRESS_WINOGRAD=0`` turns it
off. Must run before RouteConvToGemm and RouteGemmToBlas.
"""
from __future__ import annotations

import os

import numpy as np
import tvm
from tvm import relax, te

from . import blas
from . import winograd_transforms as wt
from .conv_route import conv_geometry
from .relax_prep import GROWTH_ATTR, is_op, rewrite_functions, static_dims, weight_params
from .targets import pool_workers

F4_MIN_MAP = 16    # F(4x4) from here; F(2x2) below (F(4x4)'s GEMMs get too few tiles, its weights 4x)
MIN_MAP = 8        # narrower maps: the GEMM route (conv_route) or the direct kernel
# fewer channels: the transforms cost more than the GEMMs save. 16 → 32 (Intel Xeon, 2026-12-07): the
# digits CNN's 16→32 conv on 8x8 maps at batch 64 took 366 µs as Winograd (transforms 294), 226 direct.
MIN_CHANNELS = 32
MAX_PAD = 2


def enabled() -> bool:
    return os.environ.get("FXPRESS_WINOGRAD", "1") != "0"


def eligible(g: dict) -> bool:
    """Whether a conv of geometry ``g`` (conv_route.conv_geometry) is rewritten (module docstring)."""
    return (g["kh"] == g["kw"] == 3 and g["stride"] == (1, 1) and g["dilation"] == (1, 1)
            and max(g["pad"]) <= MAX_PAD and min(g["oh"], g["ow"]) >= MIN_MAP
            and min(g["c"], g["o"]) >= MIN_CHANNELS)


def tile_size(g: dict) -> int:
    """F(4x4, 3x3) on maps at least ``F4_MIN_MAP`` wide, else F(2x2, 3x3)."""
    return 4 if min(g["oh"], g["ow"]) >= F4_MIN_MAP else 2


def _te_weight_transform(w, coefficients):
    """U[e, o, c] = sum_t coefficients[e, t] * w[o, c, t // 3, t % 3]."""
    t = te.reduce_axis((0, 9), name="t")
    return te.compute((coefficients.shape[0], w.shape[0], w.shape[1]),
                      lambda e, o, c: te.sum(coefficients[e, t] * w[o, c, t // 3, t % 3], axis=t),
                      name="winograd_weight")


@relax.expr_functor.mutator
class _WinogradRewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rewritten = 0
        self.coefficients = {m: relax.const(np.asarray(wt.weight_coefficients(m), dtype="float32"))
                             for m in wt.VARIANTS}
        self.weights: set | None = None  # the function's weight params (after num_input); None: unknown
        self.geometry: dict[str, tuple] = {}  # output kernel name → output_transform's arguments
        self.cores = pool_workers(tvm.target.Target.current())

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self.weights = weight_params(func)
        return super().visit_function_(func)

    def _from_weights(self, expr, depth: int = 0) -> bool:
        """Whether ``expr`` is computed from weights and constants only (so its transform is lifted to
        compile time); a kernel computed from the inputs would be transformed on every call."""
        if isinstance(expr, tvm.ir.expr.Constant) or (isinstance(expr, relax.Var) and expr in self.weights):
            return True
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        if depth > 16 or not isinstance(bound, relax.Call):
            return False
        return all(self._from_weights(a, depth + 1) for a in bound.args if isinstance(a, relax.Expr))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
            return call
        g = conv_geometry(call)
        if g is None or not eligible(g) or (self.weights is not None and not self._from_weights(call.args[1])):
            return call
        self.rewritten += 1
        x, weight = call.args
        n, c, h, w, o, oh, ow = (g[k] for k in ("n", "c", "h", "w", "o", "oh", "ow"))
        top, left = g["pad"][0], g["pad"][1]
        tile = tile_size(g)
        points = wt.VARIANTS[tile].alpha ** 2
        q = n * wt.tile_count(oh, ow, tile)
        bb = self.builder_
        u = bb.emit(bb.call_te(_te_weight_transform, weight, self.coefficients[tile],
                               primfunc_name_hint="winograd_weight", primfunc_attrs={GROWTH_ATTR: 1}))
        into = bb.add_func(wt.input_transform(n, c, h, w, top, left, oh, ow, tile, cores=self.cores), "winograd_input")
        v = bb.emit(relax.call_tir(into, [x], relax.TensorType([points, c, q], "float32")))
        m = bb.emit(relax.op.matmul(u, v))
        geometry = (n, o, oh, ow, c, h, w, top, left, tile)
        out = bb.add_func(wt.output_transform(*geometry, cores=self.cores), "winograd_output")
        self.geometry[out.name_hint] = geometry
        return relax.call_tir(out, [m, x, u], relax.TensorType([n, o, oh, ow], "float32"))


@tvm.transform.module_pass(opt_level=0, name="FxpressWinogradConv")
class WinogradConv:
    """fp32 3x3 stride-1 conv2d → Winograd (module docstring); identity off llvm or without the shim."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=True)
        if target is None or target.kind.name != "llvm" or not enabled() or not blas.available():
            return mod
        rewriter = _WinogradRewriter(mod)
        mod = rewrite_functions(mod, rewriter)
        return fuse_epilogues(mod, rewriter.geometry, rewriter.cores) if rewriter.rewritten else mod


# ---------------------------------------------------------------------------------------------- epilogues
# The conv's bias, the residual and the ReLU after a Winograd conv, folded into its output kernel: applied
# to each output plane while it is in cache, instead of a separate pass over the whole tensor (one kernel
# call and one tensor less). The ReLU is fxpress's NaN-keeping form, relu/isnan/where (torch_semantics).


def fuse_epilogues(mod: tvm.IRModule, geometry: dict[str, tuple], cores: int = 1) -> tvm.IRModule:
    """Every ``winograd_output(m, x, u)`` followed by ``+ bias[1, O, 1, 1]`` [``+ residual``] [ReLU] →
    one ``winograd_output(m, x, u, bias[, residual])`` with that epilogue (output_transform's flags)."""
    fused_funcs: dict[tuple, tvm.ir.GlobalVar] = {}
    bb = relax.BlockBuilder(mod)
    changed = False
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        blocks = _fuse_in_function(func, bb, geometry, fused_funcs, cores)
        if blocks is not None:
            body = relax.SeqExpr(blocks, func.body.body)
            bb.update_func(gv, relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs))
            changed = True
    return relax.transform.DeadCodeElimination()(bb.get()) if changed else mod


def _fuse_in_function(func, bb, geometry, fused_funcs, cores: int) -> list | None:
    bindings = {b.var: b.value for block in func.body.blocks for b in block.bindings
                if isinstance(b, relax.VarBinding)}
    uses: dict = {}
    for value in [*bindings.values(), func.body.body]:
        for v in relax.analysis.free_vars(value):
            uses.setdefault(v, []).append(value)
    replace: dict = {}  # the chain's last var → its new value
    for var, value in bindings.items():
        chain = _epilogue_chain(var, value, bindings, uses, geometry)
        if chain is None:
            continue
        last, kernel, args, flags = chain
        key = (kernel, flags)
        if key not in fused_funcs:
            name = f"{kernel}_epilogue" + "".join(f for f, on in zip(("_bias", "_res", "_relu"), flags) if on)
            fused_funcs[key] = bb.add_func(wt.output_transform(*geometry[kernel], *flags, cores=cores), name)
        replace[last] = relax.call_tir(fused_funcs[key], args, last.ty)
    if not replace:
        return None
    return [type(block)([relax.VarBinding(b.var, replace[b.var]) if b.var in replace else b
                         for b in block.bindings]) for block in func.body.blocks]


def _epilogue_chain(var, value, bindings, uses, geometry):
    """(last var, output kernel name, new call's args, (bias, residual, relu)) when ``var = value`` is
    a Winograd output followed by a bias add (at least), else None."""
    if not (isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_tir"))):
        return None
    kernel = value.args[0].name_hint
    if kernel not in geometry or len(value.args[1].fields) != 3:
        return None
    n, o, oh, ow = geometry[kernel][:4]
    added = _sole_add_user(var, bindings, uses)
    if added is None or not _has_shape(added[1], [1, o, 1, 1]):
        return None
    args, last, residual, relu = [*value.args[1].fields, added[1]], added[0], False, False
    after = _sole_add_user(last, bindings, uses)
    if after is not None and _has_shape(after[1], [n, o, oh, ow]) and not after[1].same_as(last):
        args.append(after[1])
        last, residual = after[0], True
    relu_out = _nan_keeping_relu(last, bindings, uses)
    if relu_out is not None:
        last, relu = relu_out, True
    return last, kernel, args, (True, residual, relu)


def _sole_add_user(var, bindings, uses):
    """(w, other) when ``var``'s one use is ``w = add(var, other)`` (either order), else None."""
    users = uses.get(var, [])
    if len(users) != 1 or not is_op(users[0], "relax.add"):
        return None
    a, b = users[0].args
    other = b if a.same_as(var) else a if b.same_as(var) else None
    w = next((v for v, val in bindings.items() if val.same_as(users[0])), None)
    return None if other is None or w is None else (w, other)


def _nan_keeping_relu(var, bindings, uses):
    """The var of ``where(isnan(var), var, relu(var))`` when that is all ``var`` is used for, else None."""
    users = uses.get(var, [])
    if len(users) != 3:
        return None
    where = next((u for u in users if is_op(u, "relax.where")), None)
    if where is None:
        return None
    cond, keep, relu = where.args
    if not keep.same_as(var) or not (is_op(bindings.get(cond), "relax.isnan") and is_op(bindings.get(relu), "relax.nn.relu")):
        return None
    if not (bindings[cond].args[0].same_as(var) and bindings[relu].args[0].same_as(var)):
        return None
    if len(uses.get(cond, [])) != 1 or len(uses.get(relu, [])) != 1:
        return None
    return next((v for v, val in bindings.items() if val.same_as(where)), None)


def _has_shape(expr, shape: list[int]) -> bool:
    return getattr(expr.ty, "dtype", None) == "float32" and static_dims(expr) == shape
