"""Lift functional / ATen layers into modules, so every pass sees one layer form (see weight_ops.py).

Every functional / ATen Linear and convolution found by ``find_weight_ops`` becomes a ``call_module`` of a
real ``nn.Linear`` / ``nn.Conv{1,2,3}d`` / ``nn.ConvTranspose{1,2,3}d`` that holds the same Parameter when its
layout fits; eval-mode ATen batch norms become ``nn.BatchNorm*d``. Exact: each module runs the same kernel
on the same tensors. ``Pass`` runs it before every pass (base.py).
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .graph import unique_name
from .weight_ops import (_BN_FNS, _LAYOUT_FNS, _LAYOUT_METHODS, CONV, CONV_T, LINEAR, Scan, WeightOp, _Consts,
                         _param_name, find_weight_ops)

aten = torch.ops.aten


def lift_to_modules(gm: fx.GraphModule, scan: Scan | None = None) -> list[str]:
    """Rewrite functional / ATen Linears, convolutions and eval batch norms as ``call_module`` of real
    modules. Call sites that share a weight share the module. Returns the new module names.

    Exact: each module computes its op with the same kernel on the same values.
    """
    scan = scan or find_weight_ops(gm)
    made: dict[str, str] = {}
    replaced: dict[fx.Node, fx.Node] = {}  # a lifted layer feeding the next one
    for w in scan.ops:
        if w.module is not None or w.kind not in (LINEAR, CONV, CONV_T):
            continue
        if w.kind == CONV and w.conv.padding == "same" and w.conv.symmetric_padding(tuple(w.weight.shape[2:])) is None:
            continue  # nn.Conv with an asymmetric 'same' pads the same way; keep the functional call
        name = made.get(w.key)
        if name is None:
            name = unique_name(gm, (w.label.split("[")[0] if "[" in w.label else w.label) or "layer")
            gm.add_submodule(name, _module_for(w))
            made[w.key] = name
        with gm.graph.inserting_before(w.node):
            new = gm.graph.call_module(name, (replaced.get(w.x, w.x),))
        new.meta.update({k: v for k, v in w.node.meta.items() if k in ("tensor_meta", "stack_trace", "val")})
        w.node.replace_all_uses_with(new)
        gm.graph.erase_node(w.node)
        replaced[w.node] = new
    made_bn = _lift_batch_norms(gm)
    shared = _share_identical_layout_nodes(gm) if made else 0
    if made or made_bn or shared:
        drop_dead_weight_nodes(gm)
        gm.recompile()
    return list(made.values()) + made_bn


def _share_identical_layout_nodes(gm: fx.GraphModule) -> int:
    """One node for identical reshapes of one tensor: torch.export gives Q, K and V each their own
    ``view(h, [16, 64])``, which hides that they read the same input (fuse merges parallel Linears)."""
    seen: dict[tuple, fx.Node] = {}
    merged = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in _LAYOUT_FNS or n.target is operator.getitem:
            continue
        key = (n.target, repr(n.args), repr(sorted(n.kwargs.items())), tuple(id(a) for a in n.all_input_nodes))
        first = seen.setdefault(key, n)
        if first is not n:
            n.replace_all_uses_with(first)
            gm.graph.erase_node(n)
            merged += 1
    return merged


def _param(t: torch.Tensor | None, value: torch.Tensor) -> nn.Parameter:
    """The stored tensor itself when it is a Parameter with the right layout, else a copy."""
    if isinstance(t, nn.Parameter) and t.shape == value.shape:
        return t
    return nn.Parameter(value.detach().contiguous().clone(), requires_grad=False)


def _module_for(w: WeightOp) -> nn.Module:
    dev, dt = w.weight.device, w.weight.dtype
    if w.kind == LINEAR:
        m = nn.Linear(w.weight.shape[1], w.weight.shape[0], bias=w.bias is not None, device="meta")
    else:
        g = w.conv
        k = tuple(w.weight.shape[2:])
        if w.kind == CONV:
            cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[g.dims]
            m = cls(w.weight.shape[1] * g.groups, w.weight.shape[0], k, g.stride, g.padding, g.dilation, g.groups,
                    bias=w.bias is not None, device="meta")
        else:
            cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[g.dims]
            m = cls(w.weight.shape[0], w.weight.shape[1] * g.groups, k, g.stride, g.padding, g.output_padding, g.groups,
                    bias=w.bias is not None, dilation=g.dilation, device="meta")
    m.weight = _param(w.weight_param, w.weight.to(dev, dt))
    if w.bias is not None:
        m.bias = _param(w.bias_param, w.bias.reshape(-1).to(dev))
    return m.eval()


def _lift_batch_norms(gm: fx.GraphModule) -> list[str]:
    """aten eval batch norm (``_native_batch_norm_legit_no_training`` / ``native_batch_norm(training=False)``)
    whose only used output is the normalized tensor → ``nn.BatchNorm{1,2,3}d`` (fuse / quantize fold it)."""
    c = _Consts(gm)
    made = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in _BN_FNS:
            continue
        a = list(n.args)
        if n.target is aten.batch_norm.default:
            if len(a) < 8 or a[5]:
                continue
            x, w, b, rm, rv, eps, out = a[0], a[1], a[2], a[3], a[4], a[7], n
        else:
            if n.target is aten.native_batch_norm.default:
                if len(a) < 8 or a[5]:
                    continue
                x, w, b, rm, rv, eps = a[0], a[1], a[2], a[3], a[4], a[7]
            else:
                x, w, b, rm, rv, eps = a[0], a[1], a[2], a[3], a[4], a[6]
            users = list(n.users)
            if not all(u.target is operator.getitem for u in users):
                continue
            firsts = [u for u in users if u.args[1] == 0]
            if len(firsts) != 1 or any(len(u.users) for u in users if u.args[1] != 0):
                continue
            out = firsts[0]
        ts = [c.tensor(v) if v is not None else None for v in (w, b, rm, rv)]
        shape = getattr(x.meta.get("tensor_meta"), "shape", None) if isinstance(x, fx.Node) else None
        if ts[2] is None or ts[3] is None or shape is None or len(shape) not in (2, 3, 4, 5) or \
                (w is not None and ts[0] is None) or (b is not None and ts[1] is None):
            continue
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
        bn = cls(ts[2].numel(), eps=float(eps), affine=ts[0] is not None or ts[1] is not None)
        with torch.no_grad():
            bn.running_mean.copy_(ts[2])
            bn.running_var.copy_(ts[3])
            if bn.affine:
                bn.weight = _param(c.stored(w), ts[0] if ts[0] is not None else torch.ones_like(ts[2]))
                bn.bias = _param(c.stored(b), ts[1] if ts[1] is not None else torch.zeros_like(ts[2]))
        name = unique_name(gm, (_param_name(w) or _param_name(rm) or "batch_norm"))
        gm.add_submodule(name, bn.eval())
        with gm.graph.inserting_before(n):
            new = gm.graph.call_module(name, (x,))
        new.meta.update({k: v for k, v in out.meta.items() if k in ("tensor_meta", "stack_trace", "val")})
        out.replace_all_uses_with(new)
        if out is not n:
            for u in list(n.users):
                gm.graph.erase_node(u)
        gm.graph.erase_node(n)
        made.append(name)
    return made


def drop_dead_weight_nodes(gm: fx.GraphModule) -> None:
    """Remove get_attr / layout-only nodes nobody reads (left behind when a layer was replaced)."""
    changed = True
    while changed:
        changed = False
        for n in reversed(list(gm.graph.nodes)):
            if n.users or n.op == "output" or n.op == "placeholder":
                continue
            if n.op == "get_attr" or (n.op == "call_function" and n.target in _LAYOUT_FNS) or \
                    (n.op == "call_method" and n.target in _LAYOUT_METHODS):
                gm.graph.erase_node(n)
                changed = True
