"""Linear algebra fuse steps.

- ``merge_linear_chains``: Linear(in→mid) → Linear(mid→out) with nothing between becomes one
  Linear(in→out) (W = W2·W1, b = W2·b1 + b2) when in·out < mid·(in + out), i.e. when it saves MACs.
  A chain through a narrow ``mid`` (a low-rank bottleneck) is kept and the reason recorded.
- ``fold_scalar_scales``: ``c * f(layer(x))`` where f only reshapes / transposes / matmuls is
  ``f(layer'(x))`` with the layer's weight and bias scaled by c (attention's 1/sqrt(d) into Q).
- ``merge_parallel_linears``: Linears reading the same tensor (Q, K, V) become one Linear whose
  output is split; members followed by the same activation keep it, applied once before the split.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx, nn

from .common import (FuseState, activation_signature, add_module, copy_meta, is_activation, is_affine_layer,
                            is_module, is_shape_op, module_of, node_order, own_module, path_for, set_param)
from ..stats import shape_of


def _linear(gm: fx.GraphModule, node) -> nn.Linear | None:
    return module_of(gm, node) if is_module(gm, node, nn.Linear) else None


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    # on "meta": set_param replaces both tensors, so a random init of real ones would be wasted memory
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=like.weight.dtype, device="meta")
    set_param(lin, "weight", weight, like.weight)
    if bias is not None:
        set_param(lin, "bias", bias, like.weight)
    return lin


# ----------------------------------------------------------------------------- chains

def merge_linear_chains(state: FuseState) -> bool:
    gm, changed = state.gm, False
    for second in list(gm.graph.nodes):
        l2 = _linear(gm, second)
        if l2 is None or second.op != "call_module" or not second.args:
            continue
        first = second.args[0]
        l1 = _linear(gm, first)
        if l1 is None or len(first.users) != 1 or l1.weight.dtype != l2.weight.dtype:
            continue
        n_in, mid, n_out = l1.in_features, l1.out_features, l2.out_features
        macs_now, macs_merged = mid * (n_in + n_out), n_in * n_out
        if macs_merged >= macs_now:
            state.why_not(second, f"Linear chain '{first.name}' -> '{second.name}' kept: one merged Linear costs "
                                  f"{n_in}x{n_out} = {macs_merged} MACs per row vs {macs_now} now "
                                  f"(a bottleneck of width {mid})")
            continue
        w1, w2 = l1.weight.detach().double(), l2.weight.detach().double()
        weight = w2 @ w1
        bias = None
        if l1.bias is not None or l2.bias is not None:
            bias = torch.zeros(n_out, dtype=torch.float64)
            if l1.bias is not None:
                bias = bias + w2 @ l1.bias.detach().double()
            if l2.bias is not None:
                bias = bias + l2.bias.detach().double()
        path = add_module(gm, path_for([first.target, second.target]), _new_linear(weight, bias, l1))
        with gm.graph.inserting_before(second):
            new = gm.graph.call_module(path, first.args, first.kwargs)
        copy_meta(second, new)
        second.replace_all_uses_with(new)
        gm.graph.erase_node(second)
        gm.graph.erase_node(first)
        state.result.rewrite("merge_linear_chain", [first, second], [new], shape=[n_in, mid, n_out],
                             macs_per_row=[macs_now, macs_merged])
        changed = True
    return changed


# ----------------------------------------------------------------------------- scalar scales

_SCALE_TARGETS = {operator.mul: "mul", torch.mul: "mul", "mul": "mul",
                  operator.truediv: "div", torch.div: "div", "div": "div"}
_MATMULS = {torch.matmul, operator.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm"}


def _scalar_operand(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(tensor operand, factor) when node multiplies / divides one tensor by a Python number."""
    kind = _SCALE_TARGETS.get(node.target) if node.op in ("call_function", "call_method") else None
    if kind is None or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if isinstance(a, fx.Node) and num(b):
        if kind == "div":
            return (a, 1.0 / b) if b != 0 else None
        return a, float(b)
    if kind == "mul" and isinstance(b, fx.Node) and num(a):
        return b, float(a)
    return None


def _scalable_layer(gm: fx.GraphModule, start: fx.Node, consumer: fx.Node) -> fx.Node | None:
    """The Conv/Linear whose output reaches ``consumer`` only through ops linear in it, single-use all the way."""
    node, user = start, consumer
    while True:
        if not isinstance(node, fx.Node) or len(node.users) != 1 or user not in node.users:
            return None
        if is_affine_layer(gm, node):
            return node
        if node.args and is_shape_op(gm, node):
            node, user = node.args[0], node
            continue
        if node.op in ("call_function", "call_method") and node.target in _MATMULS and len(node.args) == 2:
            for arg in node.args:
                found = _scalable_layer(gm, arg, node)
                if found is not None:
                    return found
        return None


def fold_scalar_scales(state: FuseState) -> bool:
    gm, changed = state.gm, False
    for node in list(gm.graph.nodes):
        operand = _scalar_operand(node)
        if operand is None:
            continue
        src, factor = operand
        if shape_of(node) is None or shape_of(node) != shape_of(src):
            continue
        layer_node = _scalable_layer(gm, src, node)
        if layer_node is None:
            continue
        layer = own_module(gm, layer_node, "scaled")
        set_param(layer, "weight", layer.weight.detach().double() * factor, layer.weight)
        if layer.bias is not None:
            set_param(layer, "bias", layer.bias.detach().double() * factor, layer.bias)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        state.result.rewrite("fold_scale", [node, layer_node], [layer_node], factor=factor)
        changed = True
    return changed


# ----------------------------------------------------------------------------- parallel

def _sole_activation(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    if len(node.users) != 1:
        return None
    (user,) = node.users
    return user if is_activation(gm, user) and user.args[0] is node else None


def merge_parallel_linears(state: FuseState) -> bool:
    gm, changed = state.gm, False
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        lin = _linear(gm, node)
        if lin is None or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        act = _sole_activation(gm, node)
        act_sig = activation_signature(gm, act) if act is not None else None
        groups[(node.args[0], lin.in_features, lin.weight.dtype, lin.weight.device, act_sig)].append(node)
    order = node_order(gm)
    for (src, *_rest, act_sig), members in groups.items():
        if len(members) < 2:
            continue
        members.sort(key=order.__getitem__)
        mods = [_linear(gm, m) for m in members]
        sizes = [m.out_features for m in mods]
        weight = torch.cat([m.weight.detach() for m in mods])  # exact in any dtype: no float64 detour
        bias = None
        if any(m.bias is not None for m in mods):
            bias = torch.cat([m.bias.detach() if m.bias is not None else
                              m.weight.new_zeros(m.out_features) for m in mods])
        path = add_module(gm, path_for([m.target for m in members]), _new_linear(weight, bias, mods[0]))
        acts = [_sole_activation(gm, m) for m in members] if act_sig is not None else []
        with gm.graph.inserting_before(members[0]):
            merged = gm.graph.call_module(path, (src,))
            copy_meta(members[0], merged)
            out = merged
            if acts:
                a0 = acts[0]
                out = gm.graph.create_node(a0.op, a0.target, (merged,) + tuple(a0.args[1:]), dict(a0.kwargs))
            split = gm.graph.call_function(torch.split, (out, sizes), {"dim": -1})
            parts = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(len(members))]
        for m, a, part in zip(members, acts or [None] * len(members), parts):
            (a or m).replace_all_uses_with(part)
            if a is not None:
                gm.graph.erase_node(a)
            gm.graph.erase_node(m)
        consumed = members + acts
        produced = [merged] + ([out] if acts else []) + [split] + parts
        state.result.rewrite("merge_parallel_linear", consumed, produced, out_features=sizes)
        changed = True
    return changed
