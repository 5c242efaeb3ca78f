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


def _with_importer(fn):
    """TVM 0.27 calls custom converters with (node, importer) in the main graph but with (node) alone inside
    torch.cond branches; there the importer is the caller's ``self`` (_translate_fx_graph)."""
    import functools
    import inspect

    @functools.wraps(fn)
    def convert(node, importer=None):
        if importer is None:
            frame = inspect.currentframe().f_back
            importer = frame.f_locals.get("self") if frame is not None else None
        return fn(node, importer)

    return convert


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


def _max_dim(node, importer):
    """``max(x, dim)`` as torch computes it: a NaN in a row is that row's max, at the NaN's index (TVM's
    topk ranks NaN below every number)."""
    from tvm import relax

    y = importer._max_dim(node)
    x = importer.env[node.args[0]]
    if not _is_float(x):
        return y
    dim = node.args[1]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    bb = importer.block_builder
    nan = bb.emit(relax.op.astype(relax.op.isnan(x), "int32"))
    any_nan = bb.emit(relax.op.greater(relax.op.max(nan, axis=[dim], keepdims=keepdim), relax.const(0, "int32")))
    dtype = str(x.ty.dtype.dtype if hasattr(x.ty.dtype, "dtype") else x.ty.dtype)
    values = bb.emit(relax.op.where(any_nan, relax.const(float("nan"), dtype), y[0]))
    indices = bb.emit(relax.op.where(any_nan, relax.op.argmax(nan, axis=dim, keepdims=keepdim), y[1]))
    return bb.emit(relax.Tuple([values, indices]))


NAN_CONVERTERS = {
    "max.dim": _with_importer(_max_dim),
    "relu.default": _with_importer(_relu),
    "relu_.default": _with_importer(_relu),
    "hardtanh.default": _with_importer(_hardtanh),
    "hardtanh_.default": _with_importer(_hardtanh),
    "relu6.default": _with_importer(_relu6),
    "relu6_.default": _with_importer(_relu6),
    "clamp.default": _with_importer(_clamp),
    "clamp_min.default": _with_importer(_clamp_min),
    "clamp_max.default": _with_importer(_clamp_max),
    "maximum.default": _with_importer(_minmax("maximum")),
    "minimum.default": _with_importer(_minmax("minimum")),
}


# ------------------------------------------------------------------ views for re-export


def views_as_reshapes(gm: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``gm`` with every ``view`` written as ``reshape`` (``gm`` itself when it has none). The copy
    shares ``gm``'s weights: it is only exported, never run on real tensors, and a full copy was the largest
    allocation of a compile (issue #19).

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

    new = copy_graph_module(gm, share_weights=True)
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


# ------------------------------------------------------------------ negative ids for ONNX


def _table_rows(gm: fx.GraphModule, node: fx.Node):
    """(position of the index argument, size of the indexed dimension) where torch refuses negative
    indices but ONNX's Gather/GatherElements would wrap them; None elsewhere."""
    def size(x, dim=0):
        meta = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
        shape = getattr(meta, "shape", None) or getattr(x.meta.get("val"), "shape", None) if isinstance(x, fx.Node) else None
        return int(shape[dim]) if shape is not None and len(shape) > dim else None

    t, a = node.target, node.args
    if node.op == "call_module" and isinstance(gm.get_submodule(t), torch.nn.Embedding):
        return 0, gm.get_submodule(t).num_embeddings
    if node.op != "call_function":
        return None
    if t in (torch.nn.functional.embedding,) and len(a) >= 2:
        return 0, size(a[1])
    if t is aten.embedding.default:
        return 1, size(a[0])
    if t in (torch.index_select, aten.index_select.default, torch.gather, aten.gather.default) and len(a) >= 3:
        dim = a[1] if isinstance(a[1], int) else None
        return (2, size(a[0], dim % max(len(a[0].meta["tensor_meta"].shape), 1))) \
            if dim is not None and isinstance(a[0], fx.Node) and "tensor_meta" in a[0].meta else None
    return None


def negative_ids_out_of_range(gm: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``gm`` in which a negative id given to embedding / index_select / gather becomes the
    first out-of-range one (the table's size). torch raises IndexError for those; ONNX's Gather counts
    -1 as the last row and would return numbers. ONNX Runtime refuses the out-of-range id instead, which
    the runtime turns into an InputError (``gm`` itself when it has no such op)."""
    if not isinstance(gm, fx.GraphModule):
        return gm
    sites = [(n.name, *found) for n in gm.graph.nodes
             if (found := _table_rows(gm, n)) is not None and found[1] is not None]
    if not sites:
        return gm
    from fxpress.passes.trace import copy_graph_module

    new = copy_graph_module(gm, share_weights=True)  # a graph rewrite, only exported: no weight copy
    by_name = {n.name: n for n in new.graph.nodes}
    for name, pos, rows in sites:
        node = by_name[name]
        idx = node.args[pos]
        if not isinstance(idx, fx.Node):
            continue
        with new.graph.inserting_before(node):
            neg = new.graph.call_function(torch.lt, (idx, 0))
            fixed = new.graph.call_function(torch.where, (neg, rows, idx))
        node.update_arg(pos, fixed)
    new.recompile()
    return new


# ------------------------------------------------------------------ NaN-aware max for ONNX


def _nan_max_dim(x, dim: int, keepdim: bool = False):
    """torch.max(x, dim) written with ops ONNX Runtime keeps NaN through (its ReduceMax drops NaN)."""
    nan = torch.isnan(x)
    out = torch.max(torch.where(nan, torch.full_like(x, float("-inf")), x), dim, keepdim)
    any_nan = nan.any(dim, keepdim)
    values = torch.where(any_nan, torch.full_like(out.values, float("nan")), out.values)
    indices = torch.where(any_nan, nan.to(torch.int64).argmax(dim, keepdim), out.indices)
    return torch.return_types.max((values, indices))


def nan_aware_max(gm: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``gm`` whose float ``max(x, dim)`` calls go through ``_nan_max_dim`` (``gm`` when none)."""
    if not isinstance(gm, fx.GraphModule):
        return gm

    def is_max_dim(n):
        args = list(n.args) + list(n.kwargs.values())
        dim_given = len(n.args) > 1 and isinstance(n.args[1], int) or "dim" in n.kwargs
        meta = n.args[0].meta.get("tensor_meta") if n.args and isinstance(n.args[0], fx.Node) else None
        floaty = meta is not None and getattr(meta, "dtype", torch.float32).is_floating_point
        return floaty and dim_given and len(args) <= 3 and (
            (n.op == "call_method" and n.target == "max")
            or (n.op == "call_function" and n.target in (torch.max, aten.max.dim)))

    def args_of(n):
        if not is_max_dim(n):
            return None
        dim = n.args[1] if len(n.args) > 1 else n.kwargs["dim"]
        return n.args[0], dim, n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)

    return _calls_replaced(gm, args_of, _nan_max_dim)


def _clamp_where(x, lo=None, hi=None):
    """clamp as comparisons: keeps NaN and the infinities exactly as torch (the ONNX exporter's Clip
    bounds an open side with float max, so clamp(min=0) turned +inf into 3.4e38)."""
    if lo is not None:
        x = torch.where(x < lo, torch.full_like(x, lo), x)
    if hi is not None:
        x = torch.where(x > hi, torch.full_like(x, hi), x)
    return x


def exact_clamps(gm: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``gm`` whose float clamps with number bounds go through ``_clamp_where`` (``gm`` when none)."""
    if not isinstance(gm, fx.GraphModule):
        return gm
    targets = {torch.clamp, torch.clip, aten.clamp.default, torch.clamp_min, aten.clamp_min.default,
               torch.clamp_max, aten.clamp_max.default}
    methods = {"clamp", "clip", "clamp_min", "clamp_max"}

    def bounds(n):
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
        a, kw = list(n.args[1:]), dict(n.kwargs)
        if "clamp_max" in str(name):
            return None, (a[0] if a else kw.get("max"))
        if "clamp_min" in str(name):
            return (a[0] if a else kw.get("min")), None
        return (a[0] if a else kw.get("min")), (a[1] if len(a) > 1 else kw.get("max"))

    def fits(n):
        if not ((n.op == "call_method" and n.target in methods) or (n.op == "call_function" and n.target in targets)):
            return False
        meta = n.args[0].meta.get("tensor_meta") if isinstance(n.args[0], fx.Node) else None
        lo, hi = bounds(n)
        return (meta is not None and meta.dtype.is_floating_point
                and all(b is None or isinstance(b, (int, float)) for b in (lo, hi)))

    return _calls_replaced(gm, lambda n: (n.args[0], *bounds(n)) if fits(n) else None, _clamp_where)


def _calls_replaced(gm: fx.GraphModule, args_of, fn) -> fx.GraphModule:
    """A copy of ``gm`` in which every node that ``args_of(node)`` gives arguments for calls
    ``fn(*arguments)`` instead (``gm`` itself when there is none)."""
    found = {n.name: a for n in gm.graph.nodes if (a := args_of(n)) is not None}
    if not found:
        return gm
    from fxpress.passes.trace import copy_graph_module

    new = copy_graph_module(gm, share_weights=True)  # a graph rewrite, only exported: no weight copy
    # ``found`` holds the original graph's nodes: point the arguments at the copy's nodes of the same name.
    by_name = {n.name: n for n in new.graph.nodes}
    for n in new.graph.nodes:
        if n.name in found:
            args = fx.node.map_arg(tuple(found[n.name]), lambda a: by_name[a.name])
            n.op, n.target, n.args, n.kwargs = "call_function", fn, args, {}
    new.graph.lint()
    new.recompile()
    return new


# ------------------------------------------------------------------ arange with a negative step


def ascending_aranges(gm: fx.GraphModule) -> bool:
    """Rewrite, in place, ``arange(start, end, step)`` with a negative number step as
    ``start + step * arange(n)``: TVM 0.27 infers the wrong length for a descending arange (6 for
    ``arange(3, -1, -1)``) and the build then fails. True when anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.arange.start_step:
            continue
        start, end, step = (list(node.args) + [1])[:3]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end, step)) or step >= 0:
            continue
        n = max(0, -(-(end - start) // step))
        with gm.graph.inserting_before(node):
            up = gm.graph.call_function(aten.arange.start_step, (0, n, 1), dict(node.kwargs))
            scaled = gm.graph.call_function(aten.mul.Tensor, (up, step))
            new = gm.graph.call_function(aten.add.Tensor, (scaled, start))
        for m in (up, scaled, new):
            m.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def nonnegative_selects(gm: fx.GraphModule) -> bool:
    """Rewrite, in place, ``select(x, dim, i)`` with a negative number ``i`` (``x[:, -1]``) as ``i + size``:
    TVM 0.27 imports it as an unchecked ``take`` that reads before the tensor. True when anything changed."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.select.int:
            continue
        x, dim, i = node.args[:3]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not isinstance(i, int) or i >= 0 or val is None:
            continue
        size = val.shape[dim]
        if isinstance(size, int) or hasattr(size, "__int__"):
            try:
                node.update_arg(2, i + int(size))
                changed = True
            except (TypeError, ValueError):  # a symbolic size: leave it to the importer
                continue
    if changed:
        gm.recompile()
    return changed
