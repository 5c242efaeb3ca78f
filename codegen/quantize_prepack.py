"""The Relax rewrite that puts int8 GEMMs and convolutions on their fast kernels (a build front stage).

``PrepackQuantizedWeights`` (``build.front_stages``, before lifting) rewrites each ``call_tir`` of a
generic ``qlinear`` / ``qconv2d`` kernel (``quantize_kernels.py``; u8 activations, groups == 1) on
llvm targets with AVX2 into one of:

* the BLAS's exact int8 GEMM with its im2col and epilogue (``quantize_blas.py``), where that is routable;
* param-only pack + bias adjust (lifted to compile time) and the packed GEMM (``quantize_packed.py``)
  or the direct conv kernel (``quantize_conv.py``);

then folds a ReLU that only follows a direct conv into its epilogue (``quantize_conv.fold_relu_into_conv``).
``FXPRESS_INT8_PREPACK=0`` turns it all off, ``FXPRESS_INT8_FOLD_RELU=0`` the ReLU folding.
"""
from __future__ import annotations

import json
import os

import tvm
from tvm import relax, tirx

from .quantize_blas import BlasEmitter, int8_blas_routable
from .quantize_conv import conv_packed_shape, fold_relu_into_conv, pack_conv_weights_func, qconv2d_direct_func
from .quantize_kernels import ARGS_ATTR
from .quantize_packed import (VNNI, Layout, as_kernel, bias_adjust_func, layout_for, pack_weights_func, packed_shape,
                              qlinear_packed_func)

PREPACK_ENV = "FXPRESS_INT8_PREPACK"


def prepack_enabled() -> bool:
    return os.environ.get(PREPACK_ENV, "1") not in ("", "0")


def relu_folding_enabled() -> bool:
    """``FXPRESS_INT8_FOLD_RELU=0``: keep the ReLU after an int8 conv as its own kernel."""
    return os.environ.get("FXPRESS_INT8_FOLD_RELU", "1") not in ("", "0")


def _packed_kernels(args: dict, layout: Layout):
    """(pack, packed shape, bias adjust, GEMM, weight shape) for a generic kernel's construction args;
    None: not handled. Convolutions take the direct kernel (``quantize_conv.py``)."""
    kind = args["kind"]
    if args.get("x_dtype", "uint8") != "uint8" and layout.group == VNNI.group:
        return None
    if kind == "qlinear":
        w_shape = [args["C"], args["N"], args["K"]]
        gemm = qlinear_packed_func(args["M"], args["K"], args["C"], args["N"], args["x_scale"], args["x_zp"], layout,
                                   args["x_dtype"])
    elif kind == "qconv2d" and args["groups"] == 1:
        w_shape = args["w_shape"]
        gemm = qconv2d_direct_func(args["x_shape"], w_shape, args["x_scale"], args["x_zp"], args["stride"],
                                   args["padding"], args["dilation"], layout, args["x_dtype"])
        return (pack_conv_weights_func(w_shape, layout), conv_packed_shape(w_shape, layout),
                bias_adjust_func(w_shape, args["x_zp"]), gemm, w_shape)
    else:
        return None
    return (pack_weights_func(w_shape, layout), packed_shape(w_shape, layout), bias_adjust_func(w_shape, args["x_zp"]),
            gemm, w_shape)


@relax.expr_functor.mutator
class _Prepacker(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, layout: Layout):
        super().__init__(mod)
        self.mod_, self.layout = mod, layout
        self.replaced: set[str] = set()
        self._call_tir = tvm.ir.Op.get("relax.call_tir")
        self.blas = BlasEmitter(self.builder_, self._add) if int8_blas_routable(layout) else None

    def _add(self, func: tirx.PrimFunc, name: str):
        return self.builder_.add_func(as_kernel(func), name)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if (call.op != self._call_tir or not isinstance(call.args[0], relax.GlobalVar)
                or not isinstance(call.args[1], relax.Tuple) or len(call.args) != 2):
            return call
        gv = call.args[0]
        func = self.mod_[gv] if gv in self.mod_.get_global_vars() else None
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None or ARGS_ATTR not in func.attrs:
            return call
        args = json.loads(str(func.attrs[ARGS_ATTR]))
        if self.blas and args["kind"] == "qlinear" and args["C"] == 1 and args.get("x_dtype", "uint8") == "uint8":
            self.replaced.add(gv.name_hint)
            return self.blas.qlinear(call.args[1].fields, args)
        if self.blas and args["kind"] == "qconv2d" and self.blas.routes_conv(args):
            self.replaced.add(gv.name_hint)
            return self.blas.qconv(call.args[1].fields, args)
        made = _packed_kernels(args, self.layout)
        if made is None:
            return call
        pack, wp_shape, adjust, gemm, w_shape = made
        x, w, ws, bq = call.args[1].fields
        bb = self.builder_
        wp = bb.emit(relax.call_tir(self._add(pack, "fxpress_qpack"), [w], relax.TensorType(wp_shape, "int8")))
        badj = bb.emit(relax.call_tir(self._add(adjust, "fxpress_qbias_adj"), [w, bq],
                                      relax.TensorType(list(w_shape[:2]), "int32")))
        self.replaced.add(gv.name_hint)
        return relax.call_tir(self._add(gemm, gv.name_hint + "_packed"), [x, wp, ws, badj], call.ty)


@tvm.transform.module_pass(opt_level=0, name="FxpressPrepackQuantizedWeights")
class PrepackQuantizedWeights:
    """Generic qlinear / qconv2d calls → their fast kernels (see the module doc).

    Reads the target from the enclosing ``with target:`` (build() sets it); no target, a non-llvm or a
    non-AVX2 target, or ``FXPRESS_INT8_PREPACK=0``: the module is returned unchanged."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        layout = layout_for(tvm.target.Target.current(allow_none=True)) if prepack_enabled() else None
        if layout is None:
            return mod
        rewriter = _Prepacker(mod, layout)
        entries = []
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
                entries.append(gv.name_hint)
        if not rewriter.replaced:
            return mod
        mod = rewriter.builder_.get()
        if relu_folding_enabled():
            mod = fold_relu_into_conv(mod)
        # the generic kernels it replaced are now unused
        return relax.transform.DeadCodeElimination(entry_functions=entries)(mod)
