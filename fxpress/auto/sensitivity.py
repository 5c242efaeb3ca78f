"""Cheap per-(layer, candidate) estimates on calibration data, on the fused graph in eager torch.

For each candidate the technique's pass rewrites that one layer alone; the estimate is the output's
squared relative L2 error against the fused (fp32) graph, averaged over the calibration batches. Squared
errors of independent layers roughly add, which is what lets the search rank whole configurations from
single-layer numbers. The stored bytes of the rewritten graph give the size cost of the same candidate.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import fx

from fxpress.errors import PassError
from fxpress.passes import PassContext, copy_graph_module, count_params, flatten_outputs

from .candidates import FP32, Candidate, Layer, build_passes


@dataclass
class Estimate:
    error: float      # squared relative L2 output error, mean over calibration batches (inf: the pass failed)
    size_bytes: int   # the whole model's stored bytes with this one layer changed
    note: str = ""


def apply_config(fused: fx.GraphModule, layers: list[Layer], config: dict[str, Candidate],
                 ctx: PassContext) -> fx.GraphModule:
    """The fused graph with ``config``'s techniques applied (fuse itself is not rerun)."""
    gm = copy_graph_module(fused)
    for p in build_passes(layers, config)[1:]:
        gm, _ = p(gm, ctx)
    return gm


def output_sq_error(gm: fx.GraphModule, batches: list[tuple], reference: list[list[torch.Tensor]]) -> float:
    total = 0.0
    with torch.no_grad():
        for b, ref in zip(batches, reference):
            outs = flatten_outputs(gm(*b))
            num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outs, ref))
            den = sum(float(r.double().pow(2).sum()) for r in ref)
            total += num / max(den, 1e-30)
    err = total / max(len(batches), 1)
    return err if math.isfinite(err) else math.inf


def estimate_all(fused: fx.GraphModule, layers: list[Layer], ctx: PassContext, batches: list[tuple],
                 progress=None) -> dict[str, dict[str, Estimate]]:
    """layer key -> candidate name -> Estimate (fp32 included: error 0, the fused model's bytes)."""
    with torch.no_grad():
        reference = [[t.detach() for t in flatten_outputs(fused(*b))] for b in batches]
    base_bytes = count_params(fused)[1]
    table: dict[str, dict[str, Estimate]] = {}
    t0 = time.perf_counter()
    for i, L in enumerate(layers):
        row = {FP32.name: Estimate(0.0, base_bytes)}
        for c in L.candidates:
            if c == FP32:
                continue
            try:
                gm = apply_config(fused, layers, {L.key: c}, ctx)
                row[c.name] = Estimate(output_sq_error(gm, batches, reference), count_params(gm)[1])
                if row[c.name].size_bytes == base_bytes and _unchanged(gm, fused):
                    row[c.name] = Estimate(math.inf, base_bytes, "the pass left this layer alone")
            except PassError as e:  # a technique that cannot take this layer is simply not a candidate
                row[c.name] = Estimate(math.inf, base_bytes, str(e).splitlines()[0][:200])
        table[L.key] = row
        if progress:
            progress(f"sensitivity {i + 1}/{len(layers)}: {L.describe()}: " + ", ".join(
                f"{n} {e.error:.2g}" for n, e in row.items() if n != FP32.name)
                + f" ({time.perf_counter() - t0:.0f}s)")
    return table


def _unchanged(gm: fx.GraphModule, fused: fx.GraphModule) -> bool:
    return [n.target for n in gm.graph.nodes] == [n.target for n in fused.graph.nodes]
