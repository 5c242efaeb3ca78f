"""What the quantize pass can quantize: Linear / Conv1d / Conv2d layers (any spelling, see weight_ops)
and activation x activation matmuls, as ``Site``s, each with the plan the pass makes for it."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ..base import PassResult
from ..layer_scan import LayerScan
from ..weight_ops import CONV_T, EMBEDDING, LINEAR, WeightOp, as_conv2d

_MATMUL_FNS = {torch.matmul, operator.matmul, torch.bmm, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}


@dataclass
class Site:
    """One layer the pass may quantize."""

    name: str                     # node name in the graph
    label: str                    # module path or node name, for the report
    kind: str                     # "linear" | "conv2d" | "matmul"
    inputs: list[str]             # names of the activation nodes it reads (1, or 2 for matmul)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    conv: dict[str, Any] = field(default_factory=dict)  # stride, padding, dilation, groups
    conv1d: bool = False          # a Conv1d run as a 1 x k Conv2d (input unsqueezed at dim 2, output squeezed)
    plan: dict[str, Any] = field(default_factory=dict)  # quantized tensors and report numbers
    sample: list[torch.Tensor] | None = None             # inputs of one calibration batch


def find_sites(gm: fx.GraphModule, scan: LayerScan, opts: dict, result: PassResult) -> list[Site]:
    """The layers and matmuls the options let the pass quantize; the others become skips of ``result``."""
    by_node = scan.by_node
    sites: list[Site] = []
    for n in gm.graph.nodes:
        site = site_of_weight_op(by_node[n]) if n in by_node else matmul_site(gm, n)
        if site is None:
            continue
        if isinstance(site, str):
            result.skip(n, site)
            continue
        if site.name in opts["skip"] or site.label in opts["skip"]:
            result.skip(n, "listed in the 'skip' option: kept in fp32")
            continue
        if site.kind == "matmul" and (opts["mode"] != "static" or not opts["matmul"]):
            result.skip(n, "activation x activation matmul: quantized only in static mode (matmul=True)")
            continue
        if site.kind == "conv2d" and (opts["mode"] == "dynamic" or not opts["conv"]):
            result.skip(n, "conv: dynamic mode quantizes Linear only (as ONNX Runtime's quantize_dynamic)"
                        if opts["mode"] == "dynamic" else "conv quantization turned off (conv=False)")
            continue
        dt = [_dtype(gm, i) for i in site.inputs]
        if any(d is not None and d != torch.float32 for d in dt):
            result.skip(n, f"input dtype {dt} is not float32")
            continue
        sites.append(site)
    return sites


def _dtype(gm: fx.GraphModule, name: str) -> torch.dtype | None:
    n = next((m for m in gm.graph.nodes if m.name == name), None)
    tm = n.meta.get("tensor_meta") if n is not None else None
    return getattr(tm, "dtype", None)


def site_of_weight_op(w: WeightOp) -> Site | str | None:
    """A Site for a Linear / Conv1d / Conv2d (any spelling, see weight_ops), or why it is left alone."""
    if w.kind == EMBEDDING:
        return "embedding: kept in fp32 (quantize converts Linear / Conv / MatMul)"
    if w.x is None:
        return "layer without a graph input"
    if w.kind == LINEAR:
        return Site(w.node.name, w.label, "linear", [w.x.name], w.weight, w.bias)
    if w.kind == CONV_T:
        return f"{w.describe()}: transposed convolution is not quantized (Conv1d/Conv2d, Linear and MatMul are)"
    geo = as_conv2d(w)
    if geo is None:
        return (f"{w.describe()}: conv{w.conv.dims}d is not quantized (Conv1d/Conv2d are)" if w.conv.dims == 3
                else f"{w.describe()}: asymmetric 'same' padding")
    weight, g = geo
    return Site(w.node.name, w.label, "conv2d", [w.x.name], weight, w.bias,
                conv={"stride": g["stride"], "padding": g["padding"], "dilation": g["dilation"], "groups": g["groups"]},
                conv1d=w.conv.dims == 1)


def matmul_site(gm: fx.GraphModule, n: fx.Node) -> Site | str | None:
    """Activation x activation matmuls (attention) for static quantization."""
    if n.op == "call_method":
        if n.target == "matmul" and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args):
            return Site(n.name, n.name, "matmul", [n.args[0].name, n.args[1].name])
        return None
    if n.op == "call_function" and n.target in _MATMUL_FNS:
        if len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args) and not n.kwargs:
            ranks = [len(getattr(a.meta.get("tensor_meta"), "shape", ())) for a in n.args]
            if min(ranks) < 2:
                return "matmul with a 1-D operand is not quantized"
            return Site(n.name, n.name, "matmul", [n.args[0].name, n.args[1].name])
    return None
