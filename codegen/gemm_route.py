"""Relax pass: fp32 ``matmul`` (dense and batched) → one ``call_tir`` of the GEMM shim (codegen/blas.py).

What is routed: ``relax.matmul(a, b)``, both float32 with static shapes of rank >= 2, when the batch
dimensions are equal, or one side has none (a weight shared by the batch), and the product has at
least ``MIN_FLOPS`` (below that TVM's own kernel is as quick as a library call). A ``permute_dims``
that only swaps the last two axes of an activation is folded into the call as a transpose flag
(attention's ``K.T`` is never materialised; the permutation becomes dead and is dropped). A
weight's transpose (a Linear's ``W.T``, with ``main`` carrying ``num_input``) is left alone: it is
lifted to compile time, and OpenBLAS runs the untransposed product ~15 % faster.

The call is an opaque ``te.extern`` kernel (FuseOps never fuses it); the bias, activation and
residual after it fuse among themselves into one elementwise kernel.

Runs only for an llvm target in scope, and only when the shim is available (a C compiler was
found); otherwise the module is returned unchanged. ``FXPRESS_BLAS=0`` turns it off.
"""
from __future__ import annotations

import math

import tvm
from tvm import relax, te, tirx

from . import blas
from .targets import pool_workers
from .relax_prep import weight_params

MIN_FLOPS = 1 << 18  # 2*M*N*K*batch; ~0.3 µs of FMA peak, well above the call's overhead
KERNEL_NAME = "blas_sgemm"


def _static_shape(expr) -> list[int] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.dtype != "float32" or ty.shape is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if dims is None or not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return [int(d) for d in dims]


def _te_sgemm(a, b, *, batch, m, n, k, sa, ta, sb, tb, out_shape, parts):
    """``parts`` calls of the shim in a parallel loop (TVM's thread pool); each computes its share."""
    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731

    def body(ins, outs):
        part = tirx.Var("part", "int64")
        call = tirx.call_extern("int32", blas.SYMBOL, part, i64(parts), i64(batch), i64(m), i64(n), i64(k),
                                ins[0].access_ptr("r"), i64(sa), tirx.const(ta, "int32"),
                                ins[1].access_ptr("r"), i64(sb), tirx.const(tb, "int32"),
                                outs[0].access_ptr("w"), i64(m * n))
        kind = tirx.ForKind.PARALLEL if parts > 1 else tirx.ForKind.SERIAL
        return tirx.For(part, i64(0), i64(parts), kind, tirx.Evaluate(call))

    return te.extern([out_shape], [a, b], body, dtype="float32", name=KERNEL_NAME)


@relax.expr_functor.mutator
class _Router(relax.PyExprMutator):
    def __init__(self, mod, parts: int):
        super().__init__(mod)
        self.routed = 0
        self.parts = parts
        self.weights: set = set()  # the function's weight parameters (after num_input)

    def _transposed(self, var):
        """(source, True) when ``var`` is ``permute_dims`` of the last two axes of an fp32 tensor."""
        if not isinstance(var, relax.Var):
            return var, False
        bound = self.lookup_binding(var)
        if not (isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op)
                and bound.op.name == "relax.permute_dims"):
            return var, False
        src = bound.args[0]
        if any(src.same_as(w) for w in self.weights):
            # a weight's transpose is lifted to compile time (relax_prep.lift_param_transforms) and
            # OpenBLAS multiplies by an untransposed operand ~15 % faster (measured, docs/tuning.md)
            return var, False
        shape = _static_shape(src)
        if shape is None or len(shape) < 2:
            return var, False
        rank = len(shape)
        axes = bound.attrs.axes
        axes = list(range(rank))[::-1] if axes is None else [int(x) for x in axes]
        if axes != list(range(rank - 2)) + [rank - 1, rank - 2]:
            return var, False
        return src, True

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
            return call
        if call.attrs.out_dtype is not None and str(call.attrs.out_dtype) not in ("", "void", "float32"):
            return call
        a, b = call.args
        if _static_shape(a) is None or _static_shape(b) is None:
            return call
        a_src, ta = self._transposed(a)
        b_src, tb = self._transposed(b)
        sa_shape, sb_shape = _static_shape(a_src), _static_shape(b_src)
        if len(sa_shape) < 2 or len(sb_shape) < 2:
            return call
        m, k = (sa_shape[-1], sa_shape[-2]) if ta else (sa_shape[-2], sa_shape[-1])
        k2, n = (sb_shape[-1], sb_shape[-2]) if tb else (sb_shape[-2], sb_shape[-1])
        if k != k2:
            return call
        ba, bb = sa_shape[:-2], sb_shape[:-2]
        if not bb and not ta:  # a shared right operand: fold a's batch into its rows
            batch, m, sa, sb, lead = 1, m * math.prod(ba), 0, 0, ba
            out_shape = [*ba, sa_shape[-2], n]
        elif not bb or not ba or ba == bb:
            lead = ba or bb
            batch = math.prod(lead)
            sa = m * k if ba else 0
            sb = k * n if bb else 0
            out_shape = [*lead, m, n]
        else:
            return call  # broadcasting batch dims: TVM's kernel
        if 2 * batch * m * n * k < MIN_FLOPS:
            return call
        self.routed += 1
        return self.builder_.call_te(_te_sgemm, a_src, b_src, batch=batch, m=m, n=n, k=k, sa=sa, ta=int(ta),
                                     sb=sb, tb=int(tb), out_shape=out_shape, parts=self.parts,
                                     primfunc_name_hint=KERNEL_NAME)


@tvm.transform.module_pass(opt_level=0, name="FxpressRouteGemmToBlas")
class RouteGemmToBlas:
    """fp32 matmuls → the GEMM shim (see the module docstring); identity off llvm or without the shim."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=True)
        if target is None or target.kind.name != "llvm" or not blas.available():
            return mod
        router = _Router(mod, pool_workers(target))
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                router.weights = weight_params(func) or set()
                router.builder_.update_func(gv, router.visit_expr(func))
        if not router.routed:
            return mod
        out = router.builder_.get()
        # permute_dims folded into the calls are now dead
        return relax.transform.DeadCodeElimination()(out)
