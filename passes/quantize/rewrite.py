"""The quantized graph: a site replaced by ``fxpress.quantize`` of its inputs and its integer op, on a
new GraphModule that shares the original's modules (the sensitivity search builds one per layer)."""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..graph import eliminate_dead_code, unique_name
from .observers import mutated_sources
from .sites import Site

OPS = torch.ops.fxpress


def _param(gm: fx.GraphModule, base: str, t: torch.Tensor) -> str:
    name = unique_name(gm, base)
    gm.register_parameter(name, nn.Parameter(t.detach().clone(), requires_grad=False))
    return name


def fresh(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph that shares its modules and parameters (cheap:
    the sensitivity search builds one per layer; nothing shared is modified)."""
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # keeps a torch.export graph's pytree in/out spec
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    g = fx.GraphModule(gm, graph, type(gm).__name__)
    for a, b in zip(gm.graph.nodes, g.graph.nodes):
        b.meta.update({k: v for k, v in a.meta.items() if k not in b.meta})
    return g


def apply(gm: fx.GraphModule, sites: list[Site], opts: dict) -> fx.GraphModule:
    """``gm`` with ``sites`` replaced by their quantized form (a new module; ``gm`` is not modified)."""
    g = fresh(gm)
    nodes = {n.name: n for n in g.graph.nodes}
    order = {n.name: i for i, n in enumerate(g.graph.nodes)}
    qnodes: dict[str, fx.Node] = {}
    last_placeholder = [n for n in g.graph.nodes if n.op == "placeholder"][-1]

    mutated = mutated_sources(g, {a["src"] for s in sites for a in s.plan.get("act", ())})

    def quantized(a: dict, site: Site) -> fx.Node:
        src = nodes[a["src"]]  # (a quantized layer's output is its replacement node by now)
        if a["src"] not in qnodes:
            anchor = last_placeholder if src.op == "placeholder" else src
            if src.op == "get_attr":
                anchor = src
            # a tensor written in place later (h.add_(1.0)) is quantized where it is read, not where it is made
            where = g.graph.inserting_before(nodes[site.name]) if a["src"] in mutated else g.graph.inserting_after(anchor)
            with where:
                q = g.graph.call_function(OPS.quantize.default, (src, a["scale"], a["zp"], 0, 255))
            q.meta["fxpress_quantize_site"] = site.name
            qnodes[a["src"]] = q
        return qnodes[a["src"]]

    for s in sorted(sites, key=lambda s: order[s.name]):
        node = nodes[s.name]
        p = s.plan
        base = s.label.replace(".", "_")
        with g.graph.inserting_before(node):
            if s.kind == "matmul":
                aq, bq = (quantized(a, s) for a in p["act"])
                a, b = p["act"]
                new = g.graph.call_function(OPS.qmatmul.default, (aq, a["scale"], a["zp"], bq, b["scale"], b["zp"]))
            else:
                w = g.graph.get_attr(_param(g, f"{base}_qweight", _weight_param(s)))
                ws = g.graph.get_attr(_param(g, f"{base}_wscale", p["w_scale"]))
                x = nodes[s.inputs[0]]
                conv = [s.conv["stride"], s.conv["padding"], s.conv["dilation"], s.conv["groups"]] if s.kind == "conv2d" else []
                if opts["mode"] == "static":
                    a = p["act"][0]
                    xq = quantized(a, s)
                    if s.conv1d:
                        xq = g.graph.call_function(torch.unsqueeze, (xq, 2))
                    bq = g.graph.get_attr(_param(g, f"{base}_qbias", p["bias_q"]))
                    if s.kind == "linear":
                        new = g.graph.call_function(OPS.qlinear.default, (xq, a["scale"], a["zp"], w, ws, bq, p["w_max"]))
                    else:
                        new = g.graph.call_function(OPS.qconv2d.default, (xq, a["scale"], a["zp"], w, ws, bq, *conv))
                else:
                    b = g.graph.get_attr(_param(g, f"{base}_bias", p["bias"]))
                    if s.conv1d:
                        x = g.graph.call_function(torch.unsqueeze, (x, 2))
                    if opts["mode"] == "dynamic":
                        new = g.graph.call_function(OPS.qlinear_dynamic.default, (x, w, ws, b, p["w_max"]))
                    else:
                        op = OPS.wlinear.default if s.kind == "linear" else OPS.wconv2d.default
                        new = g.graph.call_function(op, (x, w, ws, b, *conv))
                for extra in (w, ws):
                    extra.meta["fxpress_quantize_site"] = s.name
                if s.conv1d:
                    new.meta["fxpress_quantize_site"] = s.name
                    new = g.graph.call_function(torch.squeeze, (new, 2))
        new.meta["fxpress_quantize_site"] = s.name
        for k in ("tensor_meta", "stack_trace"):
            if k in node.meta:
                new.meta[k] = node.meta[k]
        node.replace_all_uses_with(new)
        g.graph.erase_node(node)
        nodes[s.name] = new  # later layers that read this one's output
    eliminate_dead_code(g)  # keeps in-place writes (fx's own DCE drops h.add_(1.0))
    g.delete_all_unused_submodules()
    g.recompile()
    return g


def _weight_param(s: Site) -> torch.Tensor:
    return s.plan["w"]
