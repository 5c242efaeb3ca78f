"""The ``fuse`` pass: rewrite the graph so fewer, larger ops remain, computing the same function.

Steps (each can be turned off with ``options={"fuse": {"<step>": False}}``), run in this order
until none changes the graph:

=================  =====================================================================
cleanup            drop eval-mode dropout, nn.Identity, contiguous, no-op reshapes/casts,
                   x+0 / x*1 (cleanup.py)
fold_constants     evaluate subgraphs that read only parameters/buffers once (cleanup.py)
bn                 fold eval-mode BatchNorm into the Conv/ConvTranspose/Linear before it, or
                   exactly into the Conv/Linear layers after it (bn.py); ``bn_before``
                   turns off the second form only
scale              fold ``c * (layer output through reshapes/matmuls)`` into the layer (linear.py)
linear_chains      Linear → Linear with nothing between → one Linear when it saves MACs
parallel_linears   Linears on the same input (Q, K, V) → one Linear + split
activations        move an activation up to its Conv/Linear across reshapes/transposes, and give
                   a rank > 2 Linear followed by an activation a 2-D input (act.py)
=================  =====================================================================

Then each Conv/Linear directly followed by its activation is tagged as a fused region
(``node.meta["fuse_region"]``, rows in ``PassResult.layers``) so lowering hands TVM's FuseOps the
conv2d/matmul → bias add → activation chain intact. ``PassResult.metrics`` holds BN count, op count
(nodes other than placeholders/outputs/get_attr, as ``stats.op_histogram`` counts them; ``compute_ops``
leaves out getitem on tuples, which picks a split's part and runs no kernel) and MACs before/after. See docs/passes/fusion.md.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from torch import fx

from fxpress.errors import PassError

from ..base import Pass, PassContext, PassResult, register_pass
from .act import flatten_linear_regions, hoist_activations, mark_regions
from .bn import fold_batchnorm
from .cleanup import fold_constants, remove_noops
from .common import FuseState, bn_count, eliminate_dead_code, finalize, is_tuple_getitem
from .linear import fold_scalar_scales, merge_linear_chains, merge_parallel_linears
from ..stats import count_params, graph_costs, op_histogram
from ..trace import annotate_shapes

STEPS = [
    ("cleanup", remove_noops),
    ("fold_constants", fold_constants),
    ("bn", fold_batchnorm),
    ("scale", fold_scalar_scales),
    ("linear_chains", merge_linear_chains),
    ("parallel_linears", merge_parallel_linears),
    ("activations", hoist_activations),
]
STEP_NAMES = [name for name, _ in STEPS]
# Options that are not step switches.
OTHER_OPTIONS = {"bn_before", "max_rounds", "fold_max_growth"}


def measure(gm: fx.GraphModule) -> dict[str, Any]:
    """BN count, op count, op histogram, MACs and parameter count of a shape-annotated graph."""
    hist = op_histogram(gm)
    macs, _ = graph_costs(gm)
    ops = sum(hist.values())
    # getitem on a tuple (e.g. the parts of a split) picks an output: no kernel of its own.
    projections = sum(1 for n in gm.graph.nodes if is_tuple_getitem(n))
    return {"bn": bn_count(gm), "ops": ops, "compute_ops": ops - projections, "hist": hist, "macs": macs,
            "params": count_params(gm)[0]}


@register_pass("fuse", default=True)
class FusePass(Pass):
    """Lossless graph fusion: BN folding, linear merging, cleanup, conv/linear + activation regions."""

    lossy = False

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassResult]:
        options = {**ctx.options_for(self.name), **self.options}
        unknown = set(options) - set(STEP_NAMES) - OTHER_OPTIONS
        if unknown:
            raise PassError(f"pass 'fuse': unknown option(s) {sorted(unknown)}; known: "
                            f"{sorted(STEP_NAMES + sorted(OTHER_OPTIONS))}")
        if any("tensor_meta" not in n.meta for n in gm.graph.nodes if n.op == "placeholder"):
            annotate_shapes(gm, ctx.example_inputs)
        before = measure(gm)
        state = FuseState(gm, PassResult(), options)
        known = set(gm.graph.nodes)  # nodes whose shapes are known
        rounds = int(options.get("max_rounds", 8))
        for _ in range(rounds):
            changed = False
            for name, step in STEPS:
                if state.enabled(name) and step(state):
                    changed = True
                    known = _refresh(gm, ctx, name, known)
            if not changed:
                break
        regions = []
        if state.enabled("activations"):
            if flatten_linear_regions(state):
                _refresh(gm, ctx, "activations", known)
            regions = mark_regions(state)
        finalize(gm)
        after = measure(gm)

        result = state.result
        present = {n.name for n in gm.graph.nodes}
        for name, reason in state.reasons.items():
            if name in present:
                result.skip(name, reason)
        result.layers.extend(regions)
        delta = {k: after["hist"].get(k, 0) - before["hist"].get(k, 0)
                 for k in sorted(set(before["hist"]) | set(after["hist"]))}
        result.metrics.update(
            bn_before=before["bn"], bn_after=after["bn"],
            ops_before=before["ops"], ops_after=after["ops"],
            compute_ops_before=before["compute_ops"], compute_ops_after=after["compute_ops"],
            macs_before=before["macs"], macs_after=after["macs"],
            params_before=before["params"], params_after=after["params"],
            fused_regions=len(regions),
            rewrites=dict(Counter(r.kind for r in result.rewrites)),
            op_delta={k: v for k, v in delta.items() if v},
        )
        result.notes.append(
            f"BatchNorm {before['bn']} -> {after['bn']}, ops {before['ops']} -> {after['ops']} "
            f"(compute {before['compute_ops']} -> {after['compute_ops']}), MACs {before['macs']:,} -> "
            f"{after['macs']:,}, {len(regions)} conv/linear+activation regions")
        return gm, result


def _refresh(gm: fx.GraphModule, ctx: PassContext, step: str, known: set[fx.Node]) -> set[fx.Node]:
    """Drop dead nodes; re-run shape propagation if the step added nodes (the later steps read their shapes).

    Steps that only remove nodes or edit weights keep every shape, so they cost no forward run.
    """
    eliminate_dead_code(gm)
    nodes = set(gm.graph.nodes)
    if nodes <= known:
        return known
    try:
        annotate_shapes(gm, ctx.example_inputs)
    except Exception as e:  # noqa: BLE001
        raise PassError(f"pass 'fuse', step {step!r} produced a graph that does not run: {type(e).__name__}: {e}") \
            from e
    return nodes
