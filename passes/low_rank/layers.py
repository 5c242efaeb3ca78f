"""The layers the low_rank pass can factor: which ones (and why not the others), their weight as a
matrix, and the coverage numbers of the report."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..base import PassResult
from ..layer_scan import LayerScan
from ..stats import shape_of
from ..weight_ops import CONV, CONV_T, EMBEDDING, LINEAR, WeightOp, as_conv2d
from .factor import Factorization, LayerStats


@dataclass
class Layer:
    """One eligible module (all call sites of it share the factors)."""

    key: str  # module path in gm
    module: nn.Module
    nodes: list[fx.Node]
    kind: str  # "linear" | "conv2d"
    out: int
    d: int
    conv: dict[str, Any] = field(default_factory=dict)  # stride, padding, dilation, kernel
    conv1d: bool = False  # a Conv1d handled as a 1 x k Conv2d (input unsqueezed at dim 2, output squeezed)
    stats: LayerStats | None = None
    fact: Factorization | None = None
    candidates: list[int] = field(default_factory=list)

    @property
    def weight_params(self) -> int:
        return self.out * self.d

    @property
    def bias_params(self) -> int:
        b = getattr(self.module, "bias", None)
        return b.numel() if b is not None else 0


def find_layers(scan: LayerScan, opt: dict, result: PassResult) -> list[Layer]:
    """The eligible layers, one per module (its call sites share the factors); the rest become skips."""
    by_key: dict[str, Layer] = {}
    rejected: set[str] = set()
    for w in scan.ops:
        if w.kind == EMBEDDING:
            result.skip(w.node, f"{w.label}: embedding (a lookup table, not factored)")
            continue
        key = w.key
        if key in rejected:
            continue
        if key in by_key:
            by_key[key].nodes.append(w.node)
            continue
        reason = reject_reason(w, opt)
        if reason:
            rejected.add(key)
            result.skip(w.node, f"{w.label}: {reason}")
            continue
        if w.kind == LINEAR:
            L = Layer(key, w.module, [w.node], "linear", w.weight.shape[0], w.weight.shape[1])
        else:
            weight, g = as_conv2d(w)
            kh, kw = g["kernel"]
            L = Layer(key, w.module, [w.node], "conv2d", weight.shape[0], weight.shape[1] * kh * kw,
                      conv=dict(stride=tuple(g["stride"]), padding=tuple(g["padding"]),
                                dilation=tuple(g["dilation"]), kernel=(kh, kw)), conv1d=w.conv.dims == 1)
        by_key[key] = L
    return list(by_key.values())


def count(scan: LayerScan, result: PassResult, ranks: dict) -> None:
    """Coverage and the weight parameters of the layers before / after, body (not stem / head) apart."""
    done = {c for r in result.rewrites for c in r.consumed}
    scan.count(result, done)
    body = scan.body
    result.metrics["layer_weight_params"] = sum(w.weight_params for w in scan.layers)  # every Linear/Conv found
    result.metrics["body_weight_params_before"] = sum(w.weight_params for w in body)
    after = 0
    for w in body:
        r = ranks.get(w.key)
        if r is None or w.node.name not in done:
            after += w.weight_params
        else:
            out = w.weight.shape[0]
            after += r * (out + w.weight_params // out)
    result.metrics["body_weight_params_after"] = after


def reject_reason(w: WeightOp, opt: dict) -> str | None:
    if w.module is None:
        return f"{w.form} could not be lifted to a module"
    if any(fnmatch.fnmatchcase(w.label, p) or fnmatch.fnmatchcase(w.key, p) for p in opt["exclude"]):
        return "excluded by the 'exclude' option"
    wt = w.weight
    if not wt.is_floating_point() or wt.dtype not in (torch.float32, torch.float64):
        return f"weight dtype {wt.dtype} (only float32/float64 layers are factored)"
    if w.kind == CONV_T:
        return f"{w.describe()}: transposed convolutions are not factored"
    if w.kind == CONV:
        if w.conv.dims == 3:
            return f"{w.describe()}: 3-D convolutions are not factored"
        if w.conv.groups != 1:
            return f"grouped/depthwise conv (groups={w.conv.groups}) has no useful low-rank form"
        if as_conv2d(w) is None:
            return f"padding={w.conv.padding!r} is not symmetric"
    if wt.numel() < opt["min_layer_size"]:
        return f"{wt.numel()} weight values < min_layer_size {opt['min_layer_size']}"
    return None


def weight_matrix(L: Layer) -> torch.Tensor:
    return L.module.weight.detach().reshape(L.out, L.d)


def layer_rows(L: Layer) -> int:
    """How many rows (tokens, or output pixels of a conv) the layer's weight is applied to, all calls."""
    return max(1, sum(math.prod(shape_of(n) or (0,)) // L.out for n in L.nodes))
