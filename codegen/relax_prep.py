"""Relax-level preparation before LegalizeOps: op rewrites (``FastMath``) and lifting weight-only work
out of ``main``.

**FastMath.** LegalizeOps lowers ``nn.gelu``/``erf``/``tanh``/``exp`` to libm calls per element that LLVM
cannot vectorize. On the BERT-style encoder (hidden 384, 64 tokens) the GELU kernels were 28 % of the
run time (1.3 ms for 98k elements). ``topi.fast_erf`` is a rational approximation that vectorizes; its
largest error against float64 erf is 4.2e-7 over [-10, 10] (measured), below fp32 rounding of the GELU
output at any scale the reference tolerances use; tanh → ``fast_tanh``, sigmoid → 1/(1+fast_exp),
``x**2``/``x**3`` → multiplies. On llvm also: softmax and LayerNorm over the last axis → the row kernels
of rowwise.py; a bias add before a Q/K/V split pushed into each section; NCHW max pool →
``pooling.max_pool2d_func`` and fp32 max/min reductions → ``_te_nan_extremum`` (torch's NaN and -inf semantics,
which TOPI's did not keep; CUDA keeps TOPI's, untested there).

**Lifting parameter transforms.** fxpress keeps weights as function inputs (they ship in
params.npz), so work that depends on weights only — the transpose of every Linear weight, the
``gamma / sqrt(var + eps)`` of an unfolded BatchNorm — ran on every call (ResNet-18's fc weight
transpose alone: 0.9 ms of 17 ms). Relax's ``LiftTransformParams`` moves it into a separate
function ``main_transform_params``, which ``BuiltModule.transform_params`` runs once at compile
time; the exported params are its outputs. It only applies when ``main`` carries ``num_input``
(fxpress.lower sets it; a bare ``build()`` of a module without it is unchanged), and it is
skipped when the transformed floating-point weights would be larger than the originals (weight-only
quantized models decode int8 codes to fp32 that way, and the artifact would grow 4×), except by what
kernels marked ``GROWTH_ATTR`` add on purpose (Winograd-domain conv weights, winograd_route.py). Integer params
are not counted: int8 weights packed for the int8 GEMM (``quantize_packed.py``) grow only by the
zero padding of their last tile, and packing them once is the point.
"""
from __future__ import annotations

import math

import tvm
from tvm import relax, te, tirx, topi

from . import pooling, rowwise
from .cpu_schedules import vector_lanes
from .targets import pool_workers

TRANSFORM_FUNC = "main_transform_params"
# PrimFunc attribute of a weight transform whose growth lifting accepts (winograd_route.py)
GROWTH_ATTR = "fxpress.lifted_growth_ok"


def _te_fast_gelu(x):
    erf = topi.fast_erf(x * tirx.const(0.5 ** 0.5, x.dtype))
    return x * (tirx.const(0.5, x.dtype) + erf * tirx.const(0.5, x.dtype))


def _te_fast_softmax(x, axis):
    return topi.nn.fast_softmax(x, axis)


def _te_fast_sigmoid(x):
    one = tirx.const(1.0, x.dtype)
    return one / (one + topi.fast_exp(-x))


def _nan_extremum_reducer(largest: bool):
    """max (min) that keeps NaN, as torch does: a NaN on either side wins; the identity is -inf (+inf)."""
    ident = float("-inf") if largest else float("inf")
    return te.comm_reducer(lambda a, b: pooling.nan_extremum(a, b, largest),
                           lambda dtype: tirx.const(ident, dtype), name="nan_max" if largest else "nan_min")


def _te_nan_extremum(x, axes, keepdims: bool, largest: bool):
    """max / min over ``axes`` with torch's semantics: NaN anywhere in the reduced values gives NaN, and
    the identity is -inf / +inf (TOPI's starts from the lowest / highest finite float and keeps a NaN
    only when it comes last: a full ``torch.max(x)`` lost it)."""
    shape = [int(d) for d in x.shape]
    axes = sorted({a % len(shape) for a in axes})
    reducer = _nan_extremum_reducer(largest)
    rs = {a: te.reduce_axis((0, shape[a]), name=f"r{a}") for a in axes}
    out_shape = [1 if a in rs else d for a, d in enumerate(shape)] if keepdims else \
        [d for a, d in enumerate(shape) if a not in rs]

    def value(*idx):
        it = iter(idx)
        index = []
        for a in range(len(shape)):
            if a in rs:
                if keepdims:
                    next(it)
                index.append(rs[a])
            else:
                index.append(next(it))
        return reducer(x[tuple(index)], axis=[rs[a] for a in axes])

    return te.compute(out_shape, value, name="nan_max" if largest else "nan_min")


# Relax op → (TE replacement, PrimFunc name, attributes passed on)
_FAST = {"relax.nn.gelu": (_te_fast_gelu, "gelu", ()), "relax.erf": (topi.fast_erf, "erf", ()),
         "relax.exp": (topi.fast_exp, "exp", ()), "relax.tanh": (topi.fast_tanh, "tanh", ()),
         "relax.sigmoid": (_te_fast_sigmoid, "sigmoid", ()),
         "relax.nn.softmax": (_te_fast_softmax, "softmax", ("axis",))}
# x ** c for these constant exponents: multiplies (LegalizeOps calls libm's powf per element)
_SMALL_POWERS = (2.0, 3.0)


def _small_power(call: relax.Call) -> float | None:
    """The exponent of ``power(x, c)`` when c is a scalar constant in _SMALL_POWERS, else None."""
    if not is_op(call, "relax.power"):
        return None
    c = call.args[1]
    if not isinstance(c, tvm.ir.expr.Constant) or c.value.numpy().size != 1:
        return None
    value = float(c.value.numpy().reshape(()))
    return value if value in _SMALL_POWERS else None


@relax.expr_functor.mutator
class _FastMathRewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.args or getattr(call.args[0].ty, "dtype", None) != "float32":
            return call
        power = _small_power(call)
        if power is not None and tuple(call.ty.shape) == tuple(call.args[0].ty.shape):
            x = call.args[0]
            square = self.builder_.emit(relax.op.multiply(x, x))
            return square if power == 2.0 else relax.op.multiply(square, x)
        if is_op(call, "relax.split"):
            pushed = self._bias_split(call)
            if pushed is not None:
                return pushed
        if is_op(call, "relax.broadcast_to") and _same_static_shape(call, call.args[0]):
            return call.args[0]  # torch.matmul's expand to the shape it already has: a copy of nothing
        if (is_op(call, "relax.max") or is_op(call, "relax.min")) and static_dims(call.args[0]) is not None \
                and _on_llvm():
            dims = len(static_dims(call.args[0]))
            axes = list(range(dims)) if call.attrs.axis is None else [int(a) for a in call.attrs.axis]
            if dims and axes:
                return self.builder_.call_te(_te_nan_extremum, call.args[0], axes, bool(call.attrs.keepdims),
                                             call.op.name == "relax.max", primfunc_name_hint=call.op.name[6:])
        if is_op(call, "relax.nn.max_pool2d"):
            pool = self._max_pool(call)
            if pool is not None:
                return pool
        if is_op(call, "relax.nn.softmax") or is_op(call, "relax.nn.layer_norm"):
            rows = self._row_kernel(call)
            if rows is not None:
                return rows
        fast = _FAST.get(call.op.name) if isinstance(call.op, tvm.ir.Op) else None
        if fast is None:
            return call
        attrs = [int(getattr(call.attrs, a)) for a in fast[2]]
        return self.builder_.call_te(fast[0], call.args[0], *attrs, primfunc_name_hint=fast[1])

    def _bias_split(self, call: relax.Call) -> relax.Expr | None:
        """``split(reshape?(x + bias), last axis)`` (a fused Q/K/V projection's output cut into Q, K and V)
        → ``(reshape?(x[.., s] + bias[s]) for each section s)``. Each section then fuses with the head
        reshape/transpose after it into one kernel reading the GEMM's output, instead of a bias-and-split
        pass writing three copies and a transpose pass per section reading them again."""
        x = call.args[0]
        shape = static_dims(x)
        if not shape or int(call.attrs.axis) not in (-1, len(shape) - 1):
            return None
        cuts = call.attrs.indices_or_sections
        if isinstance(cuts, tirx.IntImm):
            if shape[-1] % int(cuts):
                return None
            size = shape[-1] // int(cuts)
            bounds = [size * i for i in range(int(cuts) + 1)]
        else:
            bounds = [0, *[int(c) for c in cuts], shape[-1]]
        if any(b >= e for b, e in zip(bounds, bounds[1:])):
            return None
        inner = self.lookup_binding(x) if isinstance(x, relax.Var) else None
        reshaped = is_op(inner, "relax.reshape")
        added = self.lookup_binding(inner.args[0]) if reshaped and isinstance(inner.args[0], relax.Var) else inner
        if not is_op(added, "relax.add"):
            return None
        full = static_dims(added)
        if not full or full[-1] != shape[-1]:
            return None
        sides = [(a, b) for a, b in (added.args, added.args[::-1]) if static_dims(a) == full]
        bias = sides[0][1] if sides else None
        if bias is None or static_dims(bias) != [shape[-1]]:
            return None
        parts = []
        for begin, end in zip(bounds, bounds[1:]):
            piece = relax.op.add(relax.op.strided_slice(sides[0][0], [len(full) - 1], [begin], [end]),
                                 relax.op.strided_slice(bias, [0], [begin], [end]))
            if reshaped:
                piece = relax.op.reshape(self.builder_.emit(piece), [*shape[:-1], end - begin])
            parts.append(self.builder_.emit(piece))
        return relax.Tuple(parts)

    def _max_pool(self, call: relax.Call) -> relax.Expr | None:
        """max_pool2d (NCHW, static shape, floor mode) on llvm → ``pooling.max_pool2d_func`` (torch's NaN
        and -inf semantics, separable and vectorized)."""
        a = call.attrs
        if (not _on_llvm() or a.layout != "NCHW" or a.out_layout != "NCHW"
                or bool(a.ceil_mode) or len(static_dims(call.args[0]) or []) != 4):
            return None
        pad = [int(p) for p in a.padding]
        pad = pad * 2 if len(pad) == 2 else pad
        shape, dtype = static_dims(call.args[0]), call.args[0].ty.dtype
        geometry = [int(k) for k in a.pool_size], [int(k) for k in a.strides], [int(k) for k in a.dilation], pad
        lanes = vector_lanes(tvm.target.Target.current(allow_none=True), tvm.DataType(dtype).bits)
        func = self.builder_.add_func(pooling.max_pool2d_func(shape, dtype, *geometry, lanes), "max_pool2d")
        out_shape = [*shape[:2], *pooling.pool_geometry(shape, *geometry)]
        return relax.call_tir(func, [call.args[0]], relax.TensorType(out_shape, dtype))

    def _row_kernel(self, call: relax.Call) -> relax.Expr | None:
        """Softmax, or LayerNorm with weight and bias, over the last axis of a static-shape fp32 tensor →
        the rowwise kernel on its 2-D view; None where that does not apply."""
        shape = static_dims(call.args[0])
        target = tvm.target.Target.current(allow_none=True)
        if not shape or target is None or target.kind.name != "llvm":
            return None
        n, rows, cores = shape[-1], max(1, math.prod(shape[:-1])), pool_workers(target)
        width = rowwise.vector_width(n, vector_lanes(target))
        if width is None:
            return None
        last = (-1, len(shape) - 1)
        if call.op.name == "relax.nn.softmax":
            if int(call.attrs.axis) not in last:
                return None
            kernel, name, extra = rowwise.softmax_rows(rows, n, width, cores), "softmax_rows", []
        else:
            axes = [int(a) for a in call.attrs.axes]
            if len(axes) != 1 or axes[0] not in last or not (call.attrs.center and call.attrs.scale):
                return None
            if static_dims(call.args[1]) != [n] or static_dims(call.args[2]) != [n]:
                return None
            kernel = rowwise.layer_norm_rows(rows, n, width, cores, float(call.attrs.epsilon))
            name, extra = "layer_norm_rows", list(call.args[1:3])
        func = self.builder_.add_func(kernel, name)
        flat = self.builder_.emit(relax.op.reshape(call.args[0], [rows, n]))
        out = self.builder_.emit(relax.call_tir(func, [flat, *extra], relax.TensorType([rows, n], "float32")))
        return relax.op.reshape(out, shape)


def _on_llvm() -> bool:
    target = tvm.target.Target.current(allow_none=True)
    return target is not None and target.kind.name == "llvm"


def weight_params(func: relax.Function) -> set | None:
    """``func``'s weight parameters (those after ``num_input``); None when it does not say (no ``num_input``)."""
    num_input = func.attrs.get("num_input") if func.attrs is not None else None
    return set(func.params[int(num_input):]) if num_input is not None else None


def rewrite_functions(mod: tvm.IRModule, rewriter) -> tvm.IRModule:
    """Run a ``PyExprMutator`` built on ``mod`` over each of its Relax functions. Returns ``mod`` itself
    when the rewriter counts its rewrites (``rewriter.rewritten``) and made none."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    if getattr(rewriter, "rewritten", None) == 0:
        return mod
    return rewriter.builder_.get()


def is_op(expr, name: str) -> bool:
    """Whether ``expr`` is a call of the Relax operator ``name``."""
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def static_dims(expr) -> list[int] | None:
    """The static shape of a tensor-typed expression, else None."""
    ty = expr.ty
    dims = getattr(getattr(ty, "shape", None), "values", None) if isinstance(ty, relax.TensorType) else None
    if dims is None or not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return [int(d) for d in dims]


def _same_static_shape(a, b) -> bool:
    da, db = static_dims(a), static_dims(b)
    return da is not None and da == db and a.ty.dtype == b.ty.dtype


@tvm.transform.module_pass(opt_level=0, name="FxpressFastMath")
class FastMath:
    """Op rewrites (module docstring): vectorizable GELU/erf/exp/tanh/sigmoid, x**2, x**3, row softmax and
    LayerNorm, the bias before a split, max pool with torch's NaN semantics."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_functions(mod, _FastMathRewriter(mod))


def _static_bytes(ty) -> int | None:
    """Bytes of a tensor (or tuple of tensors) type with static shapes; None if unknown.
    (TVM 0.27 calls struct info ``ty``: relax.TensorType, relax.TupleType.)"""
    if isinstance(ty, relax.TupleType):
        parts = [_static_bytes(f) for f in ty.fields]
        return None if any(p is None for p in parts) else sum(parts)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if dims is None or not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    n = 1
    for d in dims:
        n *= int(d)
    return n * tvm.runtime.DataType(ty.dtype).bits // 8


def _float_param_bytes(func: relax.Function) -> int | None:
    """Bytes of ``func``'s floating-point weight params (after ``num_input``); None if a shape is unknown."""
    sizes = []
    for p in func.params[int(func.attrs["num_input"]):]:
        fields = p.ty.fields if isinstance(p.ty, relax.TupleType) else [p.ty]
        for f in fields:
            dtype = getattr(f, "dtype", "")
            sizes.append(_static_bytes(f) if str(dtype).startswith(("float", "bfloat")) else 0)
    return None if any(s is None for s in sizes) else sum(sizes)


def lift_param_transforms(mod: tvm.IRModule) -> tuple[tvm.IRModule, tvm.IRModule | None]:
    """Split weight-only computation out of ``main``.

    Returns ``(mod without it, transform module)``, the transform module holding
    ``main_transform_params`` (takes the original params as one tuple, returns the new ones), or
    ``(mod, None)`` when there is nothing to lift, ``main`` has no ``num_input``, or the new
    params would take more bytes than the old ones."""
    main = mod["main"]
    if main.attrs is None or "num_input" not in main.attrs:
        return mod, None
    lifted = relax.transform.LiftTransformParams()(mod)
    names = {gv.name_hint for gv in lifted.get_global_vars()}
    if TRANSFORM_FUNC not in names:
        return mod, None
    # Widening to float is what must not be lifted (int8 codes decoded to fp32: 4x the bytes); integer
    # params may grow a little: packed int8 weights are padded to whole tiles (quantize_packed.py).
    before, after = _float_param_bytes(main), _float_param_bytes(lifted["main"])
    if before is None or after is None or after > before + _allowed_growth(lifted) + _slack(before):
        return mod, None
    return _without(lifted, TRANSFORM_FUNC, "main"), _without(lifted, "main", TRANSFORM_FUNC)


def _slack(before: int) -> int:
    """Growth too small to matter: constants folded with a weight (a recurrent net's zero initial state
    through its first step, a split bias) may add a few hundred bytes; refusing the lift for them left
    every weight transpose inside the per-call graph (a 2-layer GRU: 576 bytes on 27 KB, 23 transposes
    per call). Relative, so int8 codes decoded to fp32 (4x, or anything from no float weights) still fail."""
    return before // 20


def _allowed_growth(lifted: tvm.IRModule) -> int:
    """Bytes by which the lifted weights may outgrow the originals: what the weight transforms marked
    ``GROWTH_ATTR`` add (Winograd's 6x6 per 3x3 kernel: the growth buys 4x fewer multiplies)."""
    growth = 0
    for block in lifted[TRANSFORM_FUNC].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not (isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_tir"))):
                continue
            kernel = lifted[call.args[0]]
            if kernel.attrs is None or GROWTH_ATTR not in kernel.attrs:
                continue
            out = _static_bytes(binding.var.ty)
            # constants (the transform's coefficients) are not weights: only the weights it reads count
            ins = [_static_bytes(a.ty) for a in call.args[1].fields if not isinstance(a, tvm.ir.expr.Constant)]
            if out is not None and None not in ins:
                growth += max(0, out - sum(ins))
    return growth


def _without(mod: tvm.IRModule, drop: str, entry: str) -> tvm.IRModule:
    """``mod`` without function ``drop`` and whatever only it called (main's If branches stay)."""
    out = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != drop}, attrs=mod.attrs)
    return relax.transform.DeadCodeElimination(entry_functions=[entry])(out)
