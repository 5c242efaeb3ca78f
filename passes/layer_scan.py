"""The Linear / Conv layers of a graph as the lossy passes (low_rank, shift_add, quantize) see them.

Every such pass starts the same way: find the weight ops (weight_ops.find_weight_ops), report the near
misses, tell the stem and head layers from the body, and ends by reporting coverage ("rewrote k of the
n layers"). ``LayerScan`` is that prologue and epilogue, once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import fx

from .base import PassResult
from .weight_ops import CONV, CONV_T, LINEAR, WeightOp, find_weight_ops, replace_weight_op, stems_and_heads


@dataclass
class LayerScan:
    ops: list[WeightOp]                 # every weight op in graph order, embeddings included
    layers: list[WeightOp]              # the Linear / Conv / ConvTranspose ones
    by_node: dict[fx.Node, WeightOp]
    stems: set[str]                     # node names of the stem layers (see weight_ops.stems_and_heads)
    heads: set[str]
    nothing: str | None                 # what the graph calls, when it has no layer at all

    @classmethod
    def of(cls, gm: fx.GraphModule, result: PassResult) -> LayerScan:
        """Scan ``gm``; the near misses (layer look-alikes that are not layers) become skips of ``result``."""
        scan = find_weight_ops(gm)
        for name, reason in scan.near_misses:
            result.skip(name, reason)
        layers = [w for w in scan.ops if w.kind in (LINEAR, CONV, CONV_T)]
        stems, heads = stems_and_heads(gm, scan.ops)
        return cls(scan.ops, layers, {w.node: w for w in scan.ops}, stems, heads,
                   None if layers else scan.nothing_found())

    @property
    def body(self) -> list[WeightOp]:
        """The layers that are neither stem nor head."""
        return [w for w in self.layers if w.node.name not in self.stems | self.heads]

    def count(self, result: PassResult, done: set[str]) -> None:
        """Record coverage in ``result``: ``done`` holds the node names of the layers the pass rewrote."""
        body = self.body
        result.count_layers(len(self.layers), len(done), len(body), sum(1 for w in body if w.node.name in done),
                            nothing=self.nothing, layer_nodes=[w.node.name for w in self.layers])

    def replace_calls(self, gm: fx.GraphModule, nodes: list[fx.Node], params: list[str],
                      call: Callable[..., fx.Node]) -> list[fx.Node]:
        """Replace each layer call in ``nodes`` by ``call(graph, x, *get_attr nodes of params)`` (x: the layer's
        input, see weight_ops.replace_weight_op); returns the new nodes."""
        def build(g: fx.Graph, x: fx.Node) -> fx.Node:
            return call(g, x, *(g.get_attr(p) for p in params))

        return [replace_weight_op(gm, self.by_node[n], build) for n in nodes]
