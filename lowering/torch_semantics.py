"""Make TVM's Relax import follow torch's semantics where TVM 0.27's importer does not.

Found by probing (issue #17) and fixed here, on the exported program before import and with
converters that replace the importer's:

- **Type promotion.** The importer computes a binary op in its left operand's dtype and turns a
  Python scalar into a constant of that dtype: int64 ``x / 3`` became integer division, ``x * 1.5``
  multiplied by 1, ``x // 3`` failed on an int32 constant, and ``cat``/``where`` of mixed dtypes failed.
  ``promote_dtypes`` casts every operand to the dtype torch computes in (``torch.result_type``; the
  output dtype for arithmetic, ``cat`` and ``where``), so the importer only ever sees one dtype.
- **Reductions that widen** (``(x > 0).cumsum(1)``: bool in, int64 out) get their input cast first.
- **NaN and Inf.** ``relu``/``clamp``/``hardtanh``/``maximum``/``minimum`` lower to ``max``/``min``,
  which LLVM compiles to compare-and-select: a NaN compares false and comes out as the bound (NaN
  through ReLU became 0). The converters here return NaN where the input is NaN, like eager.
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

# Arithmetic: operands are cast to the output dtype (torch computes in it).
_ARITH = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.div.Tensor_mode,
    aten.floor_divide.default, aten.remainder.Tensor, aten.remainder.Scalar, aten.fmod.Tensor,
    aten.fmod.Scalar, aten.maximum.default, aten.minimum.default, aten.add.Scalar, aten.sub.Scalar,
    aten.mul.Scalar, aten.div.Scalar, aten.pow.Tensor_Tensor, aten.pow.Tensor_Scalar,
}
# Comparisons: the output is bool; operands are cast to their common dtype.
_COMPARE = {
    getattr(getattr(aten, op), kind) for op in ("eq", "ne", "lt", "le", "gt", "ge") for kind in ("Tensor", "Scalar")
}
# Ops whose output dtype may be wider than their input's (bool/int32 -> int64).
_WIDEN = {aten.cumsum.default, aten.cumprod.default, aten.sum.default, aten.sum.dim_IntList,
          aten.prod.default, aten.prod.dim_int}


def _val(a):
    return a.meta.get("val") if isinstance(a, fx.Node) else None


def _cast(graph: fx.Graph, before: fx.Node, x: fx.Node, dtype: torch.dtype) -> fx.Node:
    with graph.inserting_before(before):
        c = graph.call_function(aten._to_copy.default, (x,), {"dtype": dtype})
    v = _val(x)
    if v is not None:
        try:
            with v.fake_mode:
                c.meta["val"] = v.to(dtype)
        except Exception:  # noqa: BLE001 - metadata only; the importer does not need it for casts
            pass
    return c


def _scalar_for(value, dtype: torch.dtype):
    if isinstance(value, bool):
        return value
    if dtype.is_floating_point:
        return float(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _scalar_tensor(graph: fx.Graph, before: fx.Node, value, dtype: torch.dtype) -> fx.Node:
    with graph.inserting_before(before):
        return graph.call_function(aten.scalar_tensor.default, (_scalar_for(value, dtype),), {"dtype": dtype})


def _operands_to(graph: fx.Graph, node: fx.Node, positions, dtype: torch.dtype, scalars_as_tensors: bool) -> bool:
    changed = False
    args = list(node.args)
    for i in positions:
        if i >= len(args):
            continue
        a = args[i]
        v = _val(a)
        if v is not None and isinstance(v, torch.Tensor) and v.dtype != dtype:
            args[i] = _cast(graph, node, a, dtype)
            changed = True
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            if scalars_as_tensors:
                args[i] = _scalar_tensor(graph, node, a, dtype)
                changed = True
            elif _scalar_for(a, dtype) is not a:
                args[i] = _scalar_for(a, dtype)
                changed = True
    node.args = tuple(args)
    return changed


def promote_dtypes(gm: fx.GraphModule) -> bool:
    """Rewrite ``gm`` (an exported program's graph) in place; True when anything changed."""
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        out = _val(node)
        t = node.target
        if t in _ARITH and isinstance(out, torch.Tensor):
            # The importer makes int scalars int32 constants in div's rounding modes: pass a tensor.
            as_tensor = t in (aten.div.Tensor_mode, aten.floor_divide.default) and not out.dtype.is_floating_point
            changed |= _operands_to(graph, node, (0, 1), out.dtype, as_tensor)
        elif t in _COMPARE:
            a, b = node.args[0], node.args[1]
            va, vb = _val(a), _val(b)
            if isinstance(va, torch.Tensor):
                common = torch.result_type(va, vb if isinstance(vb, torch.Tensor) else b)
                changed |= _operands_to(graph, node, (0, 1), common, False)
        elif t is aten.where.self and isinstance(out, torch.Tensor):
            changed |= _operands_to(graph, node, (1, 2), out.dtype, False)
        elif t is aten.cat.default and isinstance(out, torch.Tensor):
            parts = list(node.args[0])
            new = [(_cast(graph, node, p, out.dtype) if isinstance(_val(p), torch.Tensor) and _val(p).dtype != out.dtype
                    else p) for p in parts]
            if any(a is not b for a, b in zip(new, parts)):
                node.args = (new, *node.args[1:])
                changed = True
        elif t in _WIDEN and isinstance(out, torch.Tensor):
            changed |= _operands_to(graph, node, (0,), out.dtype, False)
    if changed:
        graph.lint()
        gm.recompile()
    return changed


# ------------------------------------------------------------------ NaN-propagating converters


def _is_float(x) -> bool:
    return str(x.ty.dtype.dtype if hasattr(x.ty.dtype, "dtype") else x.ty.dtype).startswith(("float", "bfloat"))


def _keep_nan(importer, x, y):
    """``where(isnan(x), x, y)``: y computed by a max/min that drops NaN."""
    from tvm import relax

    bb = importer.block_builder
    return bb.emit(relax.op.where(relax.op.isnan(x), x, y))


def _relu(node, importer):
    from tvm import relax

    x = importer.env[node.args[0]]
    y = importer.block_builder.emit(relax.op.nn.relu(x))
    return _keep_nan(importer, x, y) if _is_float(x) else y


def _clip(node, importer, lo, hi):
    from tvm import relax

    x = importer.env[node.args[0]]
    lo = float("-inf") if lo is None else lo
    hi = float("inf") if hi is None else hi
    y = importer.block_builder.emit(relax.op.clip(x, lo, hi))
    return _keep_nan(importer, x, y) if _is_float(x) else y


def _hardtanh(node, importer):
    args = node.args
    lo = args[1] if len(args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = args[2] if len(args) > 2 else node.kwargs.get("max_val", 1.0)
    return _clip(node, importer, lo, hi)


def _relu6(node, importer):
    return _clip(node, importer, 0.0, 6.0)


def _clamp(node, importer):
    args = node.args
    lo = args[1] if len(args) > 1 else node.kwargs.get("min")
    hi = args[2] if len(args) > 2 else node.kwargs.get("max")
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):  # tensor bounds: the importer's own path
        return importer._clamp(node)
    return _clip(node, importer, lo, hi)


def _clamp_min(node, importer):
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    if isinstance(lo, fx.Node):
        return importer._clamp_min(node)
    return _clip(node, importer, lo, None)


def _clamp_max(node, importer):
    hi = node.args[1] if len(node.args) > 1 else node.kwargs.get("max")
    if isinstance(hi, fx.Node):
        return importer._clamp_max(node)
    return _clip(node, importer, None, hi)


def _minmax(op_name):
    def convert(node, importer):
        from tvm import relax

        y = importer._binary_op(getattr(relax.op, op_name), getattr(torch, op_name))(node)
        a, b = importer.env[node.args[0]], importer.env.get(node.args[1]) if isinstance(node.args[1], fx.Node) else None
        if not _is_float(a):
            return y
        bb = importer.block_builder
        y = bb.emit(relax.op.where(relax.op.isnan(a), a, y))
        if b is not None:
            y = bb.emit(relax.op.where(relax.op.isnan(b), b, y))
        return y

    return convert


NAN_CONVERTERS = {
    "relu.default": _relu,
    "relu_.default": _relu,
    "hardtanh.default": _hardtanh,
    "hardtanh_.default": _hardtanh,
    "relu6.default": _relu6,
    "relu6_.default": _relu6,
    "clamp.default": _clamp,
    "clamp_min.default": _clamp_min,
    "clamp_max.default": _clamp_max,
    "maximum.default": _minmax("maximum"),
    "minimum.default": _minmax("minimum"),
}


# ------------------------------------------------------------------ views for re-export


def views_as_reshapes(gm: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``gm`` with every ``view`` written as ``reshape`` (``gm`` itself when it has none).

    Lowering exports the FX graph again, with fake tensors, whose strides follow the meta kernels rather
    than the CPU kernels that ran at trace time. After SDPA attention (HF BERT's default) the fake output
    is laid out differently, and a ``view`` that was legal on the real tensor fails: "Cannot view a tensor
    with shape [3, 32, 384] and strides (384, 1152, 1)". On any tensor where ``view`` is legal, ``reshape``
    returns the same view, so the rewrite changes no result.
    """
    if not isinstance(gm, fx.GraphModule):
        return gm
    views = [n for n in gm.graph.nodes
             if (n.op == "call_method" and n.target == "view" and not _is_dtype_view(n))
             or (n.op == "call_function" and n.target in (aten.view.default, torch.Tensor.view) and not _is_dtype_view(n))]
    if not views:
        return gm
    from fxpress.passes.trace import copy_graph_module

    new = copy_graph_module(gm)
    names = {n.name for n in views}
    for n in new.graph.nodes:
        if n.name not in names:
            continue
        if n.op == "call_method":
            n.target = "reshape"
        else:
            n.target = aten.reshape.default if n.target is aten.view.default else torch.reshape
            if n.target is torch.reshape and len(n.args) > 2:  # Tensor.view(x, a, b) -> reshape(x, (a, b))
                n.args = (n.args[0], tuple(n.args[1:]))
    new.recompile()
    return new


def _is_dtype_view(n: fx.Node) -> bool:
    """``x.view(torch.float16)`` reinterprets bytes: not a reshape."""
    return any(isinstance(a, torch.dtype) for a in list(n.args[1:]) + list(n.kwargs.values()))
