"""Numbers the report shows for each stage: parameters, MACs, multiplies, and a graph table.

Costs come from the shapes ShapeProp leaves in ``node.meta["tensor_meta"]``. Dense ops count each
MAC as one multiply; fxpress's own ops (shift, low rank, int8 ...) register their cost with
``register_cost`` so a shift layer reports MACs but zero multiplies.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

# target (module class, function or OpOverload packet) → fn(node, gm) -> (macs, multiplies)
_COSTS: dict[Any, Callable[[fx.Node, fx.GraphModule], tuple[int, int]]] = {}


def register_cost(target: Any):
    """Register the cost function of a custom op or module class."""

    def deco(fn):
        _COSTS[target] = fn
        return fn

    return deco


def _meta(node) -> Any:
    return node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None


def shape_of(node) -> tuple[int, ...] | None:
    tm = _meta(node)
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def arg_shape(node: fx.Node, gm: fx.GraphModule, i: int) -> tuple[int, ...] | None:
    """Shape of ``node.args[i]``; for a get_attr without tensor_meta, the shape of the tensor in ``gm``."""
    a = node.args[i]
    s = shape_of(a)
    if s is None and isinstance(a, fx.Node) and a.op == "get_attr":
        t = gm
        for part in str(a.target).split("."):
            t = getattr(t, part)
        s = tuple(t.shape)
    return s


def dtype_of(node) -> torch.dtype | None:
    tm = _meta(node)
    return tm.dtype if tm is not None and hasattr(tm, "dtype") else None


def numel(node) -> int:
    s = shape_of(node)
    return math.prod(s) if s is not None else 0


def _conv_macs(out_numel: int, in_ch: int, groups: int, kernel: tuple[int, ...]) -> int:
    return out_numel * (in_ch // groups) * math.prod(kernel)


def _module_cost(mod: nn.Module, node: fx.Node) -> tuple[int, int]:
    out = numel(node)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        m = _conv_macs(out, mod.in_channels, mod.groups, mod.kernel_size)
        return m, m
    if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        m = numel(node.args[0]) * (mod.out_channels // mod.groups) * math.prod(mod.kernel_size)
        return m, m
    if isinstance(mod, nn.Linear):
        m = out * mod.in_features
        return m, m
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)):
        return 0, out
    return 0, 0


_MATMULS = {torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.ops.aten.mm.default,
            torch.ops.aten.bmm.default, torch.ops.aten.matmul.default}
_MULS = {operator.mul, torch.mul, operator.truediv, torch.div, operator.imul,
         torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor}


def _function_cost(node: fx.Node) -> tuple[int, int]:
    t = node.target
    out = numel(node)
    if t in _MATMULS:
        a = shape_of(node.args[0])
        m = out * a[-1] if a else 0
        return m, m
    if t in (F.linear, torch.ops.aten.linear.default, torch.ops.aten.addmm.default):
        a = shape_of(node.args[0] if t is not torch.ops.aten.addmm.default else node.args[1])
        m = out * a[-1] if a else 0
        return m, m
    if t in (F.conv1d, F.conv2d, F.conv3d, torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default):
        w = shape_of(node.args[1])
        m = out * math.prod(w[1:]) if w else 0
        return m, m
    if t in _MULS:
        # Scalar or tensor elementwise multiply: one multiply per output element.
        return 0, out
    return 0, 0


def node_cost(node: fx.Node, gm: fx.GraphModule) -> tuple[int, int]:
    """(MACs, multiplies) of one node."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        for cls in type(mod).__mro__:
            if cls in _COSTS:
                return _COSTS[cls](node, gm)
        return _module_cost(mod, node)
    if node.op in ("call_function", "call_method"):
        target = node.target
        key = getattr(target, "overloadpacket", target) if node.op == "call_function" else None
        for k in (target, key):
            if k is not None and k in _COSTS:
                return _COSTS[k](node, gm)
        if node.op == "call_method" and node.target in ("mul", "div", "mul_", "div_"):
            return 0, numel(node)
        if node.op == "call_method" and node.target == "matmul":
            a = shape_of(node.args[0])
            m = numel(node) * a[-1] if a else 0
            return m, m
        return _function_cost(node) if node.op == "call_function" else (0, 0)
    return 0, 0


def count_params(gm: nn.Module) -> tuple[int, int]:
    """(number of stored weight values, bytes) over parameters and buffers, each tensor once.

    Packed low-bit weights live in integer buffers, so bytes (not count) is the size measure.
    """
    seen: set[int] = set()
    count = nbytes = 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if t.dtype in (torch.int64,) and t.numel() <= 1:  # e.g. BN's num_batches_tracked
            continue
        count += t.numel()
        nbytes += t.numel() * t.element_size()
    return count, nbytes


def graph_costs(gm: fx.GraphModule) -> tuple[int, int]:
    macs = mults = 0
    for n in gm.graph.nodes:
        m, k = node_cost(n, gm)
        macs += m
        mults += k
    return macs, mults


def _target_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def graph_table(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """One row per node: name, op, target, shape, dtype, MACs."""
    rows = []
    for n in gm.graph.nodes:
        macs, _ = node_cost(n, gm)
        s = shape_of(n)
        d = dtype_of(n)
        rows.append({
            "node": n.name,
            "op": n.op,
            "target": _target_name(n, gm),
            "shape": list(s) if s is not None else None,
            "dtype": str(d).replace("torch.", "") if d is not None else None,
            "macs": macs,
        })
    return rows


def op_histogram(gm: fx.GraphModule) -> dict[str, int]:
    """How many nodes of each kind (module class or function name): fusion reports this."""
    hist: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        key = type(gm.get_submodule(n.target)).__name__ if n.op == "call_module" else _target_name(n, gm)
        hist[key] = hist.get(key, 0) + 1
    return hist
