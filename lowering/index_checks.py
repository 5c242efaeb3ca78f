"""Bounds checks for index operands on TVM targets.

TVM lowers ``embedding``, ``index_select``, ``gather`` and advanced indexing (``t[ids]``, ``take``) to
unchecked loads: an index past the end reads heap memory (garbage, or SIGSEGV for a large one)
where eager PyTorch raises. Before each such op, ``guard_indices`` routes the index tensor through
``fxpress::check_index``, which lowers to one small compiled loop over the indices: it asserts each
lies in the op's range (the VM call then fails with a message naming the op and the range, turned
into an InputError by the runtime) and maps negative indices to ``i + n`` where torch accepts them
(advanced indexing, ``take``), which TVM's gathers would not. Cost: one read and one write per
index, no Python at call time; the check stays inside the compiled library, so an exported
artifact checks too.
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

MARKER = "fxpress index check:"  # the runtime recognises the VM error by this prefix


@torch.library.custom_op("fxpress::check_index", mutates_args=())
def check_index(idx: torch.Tensor, lo: int, hi: int, what: str) -> torch.Tensor:
    """``idx`` with negative entries mapped to ``idx + hi`` (when ``lo < 0``); raises if any is outside [lo, hi)."""
    if idx.numel() and (int(idx.min()) < lo or int(idx.max()) >= hi):
        raise IndexError(f"{MARKER} {what}")
    return torch.where(idx < 0, idx + hi, idx) if lo < 0 else idx.clone()


@check_index.register_fake
def _(idx, lo, hi, what):
    return torch.empty_like(idx)


def _static(v) -> int | None:
    try:
        return int(v)
    except Exception:  # noqa: BLE001 - a symbolic size: no static range
        return None


def _index_operands(node: fx.Node):
    """(argument position, list index or None, valid size, lowest valid index) per index operand."""
    t, a = node.target, node.args
    val = lambda n: n.meta.get("val") if isinstance(n, fx.Node) else None  # noqa: E731
    if t is aten.embedding.default and val(a[0]) is not None:
        yield 1, None, _static(val(a[0]).shape[0]), 0
    elif t in (aten.index_select.default, aten.gather.default) and val(a[0]) is not None:
        x = val(a[0])
        dim = a[1] % max(x.dim(), 1)
        yield 2, None, _static(x.shape[dim]) if x.dim() else 1, 0
    elif t is aten.take.default and val(a[0]) is not None:
        n = _static(val(a[0]).numel())
        yield 1, None, n, -n if n is not None else 0
    elif t is aten.index.Tensor and val(a[0]) is not None:
        x = val(a[0])
        for k, idx in enumerate(a[1]):
            v = val(idx)
            if v is not None and not v.dtype.is_floating_point and v.dtype != torch.bool and k < x.dim():
                n = _static(x.shape[k])
                yield 1, k, n, -n if n is not None else 0


def guard_indices(gm: fx.GraphModule, describe=lambda node: f"node '{node.name}'") -> int:
    """Insert a check before every index operand of ``gm`` (an exported program's graph); returns how many."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        for pos, k, n, lo in list(_index_operands(node)):
            idx = node.args[pos] if k is None else node.args[pos][k]
            if n is None or not isinstance(idx, fx.Node):
                continue
            op = str(node.target).replace("aten.", "").split(".")[0]
            what = (f"an index given to {op} ({describe(node)}) is outside its valid range [{lo}, {n - 1}]. Check the "
                    "ids fed to the model (eager PyTorch raises IndexError here too)")
            with graph.inserting_before(node):
                chk = graph.call_function(torch.ops.fxpress.check_index.default, (idx, lo, n, what))
            chk.meta["val"] = idx.meta.get("val")
            if k is None:
                node.update_arg(pos, chk)
            else:
                lst = list(node.args[pos])
                lst[k] = chk
                node.update_arg(pos, lst)
            count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


def _check_func(dtype: str, lo: int, hi: int, message: str):
    """One loop over n indices (n symbolic, so a dynamic batch is covered too)."""
    import tvm
    from tvm.script import tirx as T

    neg = f"T.Select(idx[vi] < T.{dtype}(0), idx[vi] + T.{dtype}({hi}), idx[vi])" if lo < 0 else "idx[vi]"
    src = f'''
@T.prim_func(private=True, s_tir=True)
def check_index(var_idx: T.handle, var_out: T.handle):
    n = T.int64()
    idx = T.match_buffer(var_idx, (n,), "{dtype}")
    out = T.match_buffer(var_out, (n,), "{dtype}")
    for i in range(n):
        with T.sblock("check"):
            vi = T.axis.spatial(n, i)
            T.reads(idx[vi])
            T.writes(out[vi])
            assert idx[vi] >= T.{dtype}({lo}) and idx[vi] < T.{dtype}({hi}), {message!r}
            out[vi] = {neg}
'''
    # Marked scheduled: a vectorized loop would make the assert's condition a vector, which LLVM rejects.
    return tvm.script.from_source(src, extra_vars={"T": T}).with_attr("tirx.is_scheduled", True)


def _check_index_relax(node, importer):
    from tvm import relax, tirx

    x = importer.env[node.args[0]]
    _, lo, hi, what = node.args
    ty = x.ty
    if not isinstance(ty.shape, relax.ShapeExpr):
        from fxpress.errors import LoweringError

        raise LoweringError(f"index bounds check needs a known index shape ({what.split(';')[0]}); "
                            "compile with target='onnx'")
    dims = list(ty.shape.values)
    n = tirx.IntImm("int64", 1)
    for d in dims:
        n = n * d
    if all(isinstance(d, tirx.IntImm) for d in dims):
        n = tirx.IntImm("int64", int(n.value) if isinstance(n, tirx.IntImm) else _prod(dims))
        if int(n.value) == 0:
            return x
    dtype = str(ty.dtype)
    bb = importer.block_builder
    flat = bb.emit(relax.op.reshape(x, relax.ShapeExpr([n])))
    gv = bb.add_func(_check_func(dtype, int(lo), int(hi), f"{MARKER} {what}"), "fxpress_check_index")
    out = bb.emit(relax.call_tir(gv, [flat], relax.TensorType([n], dtype)))
    return bb.emit(relax.op.reshape(out, relax.ShapeExpr(dims)))


def _prod(dims) -> int:
    p = 1
    for d in dims:
        p *= int(d.value)
    return p


INDEX_CONVERTERS = {"check_index.default": _check_index_relax}
