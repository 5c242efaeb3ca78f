"""A layer in low-rank form: its factors at a rank, trial runs of the model with some layers swapped
(rank search), and the graph rewrite to the ``fxpress::lowrank_*`` ops."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

from ..base import PassResult
from ..graph import add_frozen_params, flatten_outputs
from ..layer_scan import LayerScan
from ..stats import node_cost, shape_of
from . import ops  # noqa: F401 - registers fxpress::lowrank_* and their costs
from .layers import Layer
from .ranks import State

_LINEAR_OP = torch.ops.fxpress.lowrank_linear.default
_CONV_OP = torch.ops.fxpress.lowrank_conv2d.default


def lowrank_apply(layer: Layer, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor):
    """The op the rewritten graph will run, on this layer's own factors (used for trial runs)."""
    if layer.kind == "linear":
        return torch.ops.fxpress.lowrank_linear(x, A, B, bias)
    c = layer.conv
    if layer.conv1d:
        x = x.unsqueeze(2)
    y = torch.ops.fxpress.lowrank_conv2d(x, A, B, bias, list(c["stride"]), list(c["padding"]), list(c["dilation"]))
    return y.squeeze(2) if layer.conv1d else y


def rewrite(gm: fx.GraphModule, L: Layer, rank: int, scan: LayerScan, result: PassResult,
            as_linears: bool = False) -> None:
    """Replace every call of ``L`` by the low-rank op at ``rank``, with a report row. ``as_linears`` (Linear
    layers): two ``F.linear`` calls, ``x -> [r, d] -> [out, r] + bias``, instead of the op, so a later pass
    that takes Linear layers (quantize) takes each factor."""
    A, B, bias = factors(L, rank)
    c = L.conv
    if as_linears and L.kind == "linear":
        names = add_frozen_params(gm, L.key, {"lr_in": A.T, "lr_out": B.T, "lr_bias": bias})

        def call(g: fx.Graph, x: fx.Node, w_in: fx.Node, w_out: fx.Node, b: fx.Node) -> fx.Node:
            return g.call_function(F.linear, (g.call_function(F.linear, (x, w_in)), w_out, b))
    else:
        names = add_frozen_params(gm, L.key, {"lr_U": A, "lr_V": B, "lr_bias": bias})

        def call(g: fx.Graph, x: fx.Node, u: fx.Node, v: fx.Node, b: fx.Node) -> fx.Node:
            if L.kind == "linear":
                return g.call_function(_LINEAR_OP, (x, u, v, b))
            return g.call_function(_CONV_OP, (x, u, v, b, list(c["stride"]), list(c["padding"]), list(c["dilation"])))

    macs_before = sum(node_cost(node, gm)[0] for node in L.nodes)
    macs_after = sum((math.prod(shape_of(node) or (0,)) // L.out) * rank * (L.d + L.out) for node in L.nodes)
    produced = scan.replace_calls(gm, L.nodes, names, call)
    err = L.fact.rel_error(rank)
    shape = [L.out, L.d] if L.kind == "linear" else [L.out, L.d // math.prod(L.conv["kernel"]), *L.conv["kernel"]]
    row = dict(layer=L.key, op=L.kind, weight_shape=shape, rank=rank, full_rank=L.fact.full_rank,
               params_before=L.weight_params + L.bias_params,
               params_after=rank * (L.out + L.d) + L.out,
               macs_before=macs_before, macs_after=macs_after,
               output_error=round(err, 6), energy=round(L.fact.energy(rank), 6), method=L.fact.method)
    result.layers.append(row)
    result.rewrite("low_rank", L.nodes, produced, layer=L.key, rank=rank, error=round(err, 5))


def factors(L: Layer, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's (U, V, bias) for this layer at ``rank``, in the layer's dtype."""
    left, right = L.fact.factors(rank)  # left [out, r], right [r, d]: W_r = left @ right
    dt = L.module.weight.dtype
    b = L.module.bias
    bias = b.detach().clone() if b is not None else torch.zeros(L.out, dtype=dt)
    if L.kind == "linear":
        return right.T.to(dt), left.T.to(dt), bias.to(dt)  # y = (x @ Rᵀ) @ Lᵀ
    kh, kw = L.conv["kernel"]
    U = right.reshape(rank, L.d // (kh * kw), kh, kw).to(dt)
    return U, left.to(dt), bias.to(dt)


class Trial:
    """Runs gm with some layers swapped for their low-rank op (forward hooks; gm is not edited)."""

    def __init__(self, gm: fx.GraphModule, layers: list[Layer]):
        self.gm = gm
        self.layers = {L.key: L for L in layers}
        self._cache: dict[tuple[str, int], tuple] = {}

    def _get(self, L: Layer, r: int):
        k = (L.key, r)
        if k not in self._cache:
            self._cache[k] = factors(L, r)
        return self._cache[k]

    def outputs(self, state: State, inputs: tuple) -> list[torch.Tensor]:
        # Shadow each truncated module's forward with the op (an instance attribute wins over the
        # class method), so the dense layer is not computed as well; deleted again afterwards.
        swapped = []
        try:
            for key, r in state.items():
                if r is None:
                    continue
                L = self.layers[key]
                A, B, bias = self._get(L, r)
                L.module.forward = lambda x, L=L, A=A, B=B, bias=bias: lowrank_apply(L, x, A, B, bias)
                swapped.append(L.module)
            with torch.no_grad():
                return [t.detach() for t in flatten_outputs(self.gm(*inputs))]
        finally:
            for mod in swapped:
                del mod.forward
