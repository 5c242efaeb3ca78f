"""Graph utilities shared by passes: networkx views and small FX helpers."""
from __future__ import annotations

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """Data-flow DiGraph: one vertex per node name, edge producer → user.

    Vertices carry ``op``, ``target`` and ``node`` (the fx.Node) for analyses.
    """
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name, op=n.op, target=str(n.target), node=n)
    for n in gm.graph.nodes:
        for u in n.users:
            g.add_edge(n.name, u.name)
    return g


def dominators(gm: fx.GraphModule) -> dict[str, str]:
    """Immediate dominators from the (single) graph entry; several inputs get a virtual root."""
    g = to_networkx(gm)
    root = "__entry__"
    g.add_node(root)
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            g.add_edge(root, n.name)
    idom = nx.immediate_dominators(g, root)
    idom.pop(root, None)
    return idom


def reachable(gm: fx.GraphModule, src: str) -> set[str]:
    return nx.descendants(to_networkx(gm), src)


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_module(gm: fx.GraphModule, node: fx.Node, types: type | tuple[type, ...]) -> bool:
    m = module_of(gm, node)
    return m is not None and isinstance(m, types)


def unique_name(gm: nn.Module, base: str) -> str:
    """A fresh attribute name on gm (dots are not allowed in names added at the root)."""
    base = base.replace(".", "_")
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def add_frozen_params(gm: nn.Module, base: str, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Register a copy of each tensor as a parameter without grad named ``<base>_<suffix>`` (made unique, at
    the root); returns the names, in order, for ``get_attr`` nodes."""
    names = []
    for suffix, t in tensors.items():
        name = unique_name(gm, f"{base}_{suffix}")
        gm.register_parameter(name, nn.Parameter(t.detach().clone().contiguous(), requires_grad=False))
        names.append(name)
    return names


_INPLACE_FLAG_FUNCTIONS = {F.relu, F.relu6, F.elu, F.hardtanh, F.leaky_relu, F.silu, F.hardswish, F.mish, F.selu,
                           F.celu, F.rrelu, F.threshold}


def is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` writes into one of its inputs (x.relu_(), F.relu(x, inplace=True), aten.add_ …)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_module":
        return getattr(module_of(gm, node), "inplace", False) is True
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._schema.is_mutable
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("__"):
            return True
        # F.relu(x, True), F.leaky_relu(x, 0.1, True) …: the last positional flag is ``inplace``.
        return node.target in _INPLACE_FLAG_FUNCTIONS and len(node.args) > 1 and node.args[-1] is True
    return False


def has_inplace(gm: fx.GraphModule) -> bool:
    return any(is_inplace(gm, n) for n in gm.graph.nodes)


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Graph DCE that keeps in-place writes: fx treats every call_method as pure, so a bare
    ``h.relu_()`` whose result is unused would otherwise be deleted."""
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or is_inplace(gm, n))


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop dead code (keeping in-place writes), unused submodules and parameters, lint, recompile.

    The pass base class runs it on every pass's output; passes may call it too (it is idempotent)."""
    eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    drop_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def drop_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete parameters / buffers that no node reads any more (a replaced layer's old weight), so the
    report's parameter count is the graph's. Returns how many went."""
    used_attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    used_mods = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}

    def used(path: str) -> bool:
        if path in used_attrs or any(a.startswith(path + ".") for a in used_attrs):
            return True
        parts = path.split(".")
        return any(".".join(parts[:i]) in used_mods for i in range(1, len(parts)))

    gone = 0
    for path, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if used(path):
            continue
        owner_path, _, leaf = path.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if leaf in owner._parameters:
            del owner._parameters[leaf]
        elif leaf in owner._buffers:
            del owner._buffers[leaf]
        else:
            continue
        gone += 1
    return gone


def flatten_outputs(out) -> list[torch.Tensor]:
    """Tensors of a (possibly nested) model output, in pytree order."""
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64 (1 when both are zero)."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b) / (na * nb)
