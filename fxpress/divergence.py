"""Find the first node of an FX graph whose lowered value diverges from the graph's own.

Used when a lowering fails its lossless check: the graph is rewritten to return every intermediate
float tensor as an extra output, lowered once more the same way, and the values are compared in
graph order. One extra compile, paid only on failure. Observing an intermediate can change how the
backend fuses it, so the answer is a strong hint, not a proof: the message says so when every
observed value matches.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from fxpress.passes.manager import output_error, run_graph
from fxpress.passes.trace import LOSSLESS_RTOL, copy_graph_module, node_source

MAX_PROBES = 400  # outputs of the probe graph: bounds the extra compile on a large model


def _probe_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    nodes = []
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        meta = n.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "dtype") or not meta.dtype.is_floating_point:
            continue
        if not n.users or 0 in tuple(meta.shape):  # dead (batch-norm's saved stats in eval) or empty
            continue
        nodes.append(n)
    if len(nodes) > MAX_PROBES:  # keep the earliest: the first divergence is what is wanted
        nodes = nodes[:MAX_PROBES]
    return nodes


def locate_divergence(gm: fx.GraphModule, example_inputs: tuple, target: str,
                      lower_and_run: Callable[[fx.GraphModule], list[torch.Tensor]]) -> str:
    """A message line naming the first diverging node (with its source line), or why none was found."""
    try:
        probe = copy_graph_module(gm)
        names = [n.name for n in _probe_nodes(probe)]
        if not names:
            return "  (no intermediate float values to compare)\n"
        by_name = {n.name: n for n in probe.graph.nodes}
        out = next(n for n in probe.graph.nodes if n.op == "output")
        probe.graph.erase_node(out)
        probe.graph.output(tuple(by_name[k] for k in names))
        probe.graph.lint()
        probe.recompile()
        expected = run_graph(probe, example_inputs)
        got = lower_and_run(probe)
    except Exception as e:  # noqa: BLE001 - diagnosis is best effort; the caller raises anyway
        return f"  (could not locate the diverging node: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})\n"
    for name, y, r in zip(names, got, expected):
        try:
            _, rel = output_error([y], [r])
        except Exception:  # noqa: BLE001 - a shape mismatch is a divergence too
            rel = float("inf")
        if rel > LOSSLESS_RTOL:
            orig = next((n for n in gm.graph.nodes if n.name == name), None)
            src = node_source(orig) if orig is not None else None
            what = orig.target if orig is not None else "?"
            what = getattr(what, "__name__", what)
            return (f"  first diverging node: '{name}' ({orig.op if orig is not None else '?'} {what}), relative "
                    f"error {rel:.3g}\n  source: {src or '(unknown)'}\n")
    return (f"  every intermediate value matches when returned as an output on {target!r}: the divergence "
            "appears only in the fused build (a backend fusion or schedule bug)\n")
