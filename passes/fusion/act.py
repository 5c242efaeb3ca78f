"""Conv/Linear + activation regions.

TVM's FuseOps fuses an elementwise epilogue into conv2d / matmul only when it follows the layer
directly (bias add, then the activation). This step makes sure the FX graph hands it that shape:

- ``hoist_activations``: an elementwise activation separated from its layer only by ops that move
  elements around (reshape, view, flatten, transpose, permute …, each with one user) is moved up to
  sit right after the layer: act(reshape(layer(x))) == reshape(act(layer(x))).
- ``flatten_linear_regions``: a Linear on a rank > 2 tensor followed by an activation is given a 2-D
  input (``flatten(0, -2)`` before, ``unflatten(0, …)`` after the activation). torch.export
  decomposes a rank > 2 linear into view → addmm → view, and that trailing view would otherwise sit
  between the matmul and its activation, where FuseOps cannot fuse across it.
- ``mark_regions``: every layer → activation pair left adjacent is tagged
  ``node.meta["fuse_region"]`` and listed in the pass result's ``layers``.
"""
from __future__ import annotations

from torch import fx, nn

from .common import (FuseState, copy_meta, is_activation, is_affine_layer, is_module,
                            is_shape_op, kind_of)
from ..stats import shape_of


def hoist_activations(state: FuseState) -> bool:
    gm, changed = state.gm, False
    for act in list(gm.graph.nodes):
        if not is_activation(gm, act):
            continue
        chain: list[fx.Node] = []
        node = act.args[0]
        while isinstance(node, fx.Node) and node.args and is_shape_op(gm, node) and len(node.users) == 1:
            chain.append(node)
            node = node.args[0]
        if not chain or not is_affine_layer(gm, node) or len(node.users) != 1:
            continue
        layer, first = node, chain[-1]  # chain runs backwards: chain[-1] reads the layer
        with gm.graph.inserting_after(layer):
            new_act = gm.graph.create_node(act.op, act.target, (layer,) + tuple(act.args[1:]), dict(act.kwargs),
                                           name=act.name + "_hoisted")
        copy_meta(act, new_act)
        first.replace_input_with(layer, new_act)
        act.replace_all_uses_with(chain[0])
        gm.graph.erase_node(act)
        state.result.rewrite("hoist_activation", [layer, *reversed(chain), act], [layer, new_act, *reversed(chain)],
                             activation=kind_of(gm, new_act))
        changed = True
    return changed


def flatten_linear_regions(state: FuseState) -> bool:
    gm, changed = state.gm, False
    for lin in list(gm.graph.nodes):
        if not is_module(gm, lin, nn.Linear) or len(lin.users) != 1 or len(lin.args) != 1:
            continue
        (act,) = lin.users
        x, shape = lin.args[0], shape_of(lin)
        if not is_activation(gm, act) or act.args[0] is not lin or shape is None or len(shape) <= 2:
            continue
        with gm.graph.inserting_before(lin):
            flat = gm.graph.call_method("flatten", (x, 0, -2))
        lin.args = (flat,)
        users = list(act.users)
        with gm.graph.inserting_after(act):
            # -1 keeps the batch dimension free; the others are fixed by the layer's input anyway.
            out = gm.graph.call_method("unflatten", (act, 0, (-1, *shape[1:-1])))
        for u in users:
            u.replace_input_with(act, out)
        state.result.rewrite("flatten_linear_region", [lin, act], [flat, lin, act, out],
                             activation=kind_of(gm, act))
        changed = True
    return changed


def mark_regions(state: FuseState) -> list[dict]:
    """Tag and list layer → activation pairs; note layers whose activation cannot join them."""
    gm, regions = state.gm, []
    for node in gm.graph.nodes:
        if not is_affine_layer(gm, node):
            continue
        acts = [u for u in node.users if is_activation(gm, u) and u.args[0] is node]
        if not acts:
            if node.name not in state.reasons:  # an earlier step's reason (e.g. BN) is the more specific one
                readers = ", ".join(sorted(f"{u.name} ({kind_of(gm, u)})" for u in node.users)) or "nothing"
                state.why_not(node, f"no BatchNorm or known activation follows: the output is read by {readers}")
            continue
        if len(node.users) > 1:
            others = sorted(u.name for u in node.users if u is not acts[0])
            state.why_not(node, f"'{node.name}' -> '{acts[0].name}' is not a fusable region: the layer output is "
                                f"also read by {', '.join(others)}")
            continue
        act = acts[0]
        label = f"{kind_of(gm, node)}+{kind_of(gm, act)}"
        node.meta["fuse_region"] = act.meta["fuse_region"] = f"{node.name}+{act.name}"
        regions.append({"layer": node.name, "activation": act.name, "region": label})
    return regions
