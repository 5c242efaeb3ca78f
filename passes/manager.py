"""Runs a pipeline of passes, snapshots every stage, and enforces the tolerance guard.

After each pass the manager re-runs shape propagation, measures the graph's outputs against the
original model's on the example inputs, and records a StageRecord. With a tolerance, a pass whose
output error (relative, see ``output_error``) exceeds it is rolled back: the graph before it is
kept and the report says so. The guard measures error against the *original* model, so the
errors of several lossy passes cannot add up past the tolerance.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import fx

from fxpress.errors import PassError

from .base import Pass, PassContext, PassResult
from .graph import flatten_outputs
from .measure import output_error
from .stats import count_params, graph_costs, graph_table, op_histogram
from .trace import LOSSLESS_RTOL, annotate_shapes, clone_inputs, copy_graph_module


@dataclass
class StageRecord:
    """Snapshot of the model after one stage (trace, a pass, a lowering)."""

    name: str
    kind: str  # "trace" | "pass" | "lowering"
    status: str  # "applied" | "unchanged" | "rolled back" | "failed" | "ok"
    params: int = 0
    param_bytes: int = 0
    macs: int = 0
    multiplies: int = 0
    nodes: int = 0
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    seconds: float = 0.0
    note: str = ""
    code: str = ""
    table: list[dict[str, Any]] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    result: PassResult | None = None
    ir: str | None = None  # lowering stages: the Relax IR / ONNX graph text
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The scalar fields (what the report table and JSON show)."""
        return {k: getattr(self, k) for k in (
            "name", "kind", "status", "params", "param_bytes", "macs", "multiplies", "nodes",
            "max_abs_error", "max_rel_error", "seconds", "note")}

    def to_dict(self) -> dict[str, Any]:
        d = self.summary()
        d.update(code=self.code, table=self.table, ops=self.ops, ir=self.ir, extra=self.extra,
                 result=self.result.to_dict() if self.result else None)
        return d


def run_graph(gm: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():  # on copies: a graph may update an input in place (``x.add_(1)`` in forward)
        return [t.detach() for t in flatten_outputs(gm(*clone_inputs(inputs)))]


def snapshot(name: str, kind: str, gm: fx.GraphModule, reference: list[torch.Tensor],
             inputs: tuple, status: str = "ok", seconds: float = 0.0, note: str = "",
             result: PassResult | None = None) -> StageRecord:
    params, pbytes = count_params(gm)
    macs, mults = graph_costs(gm)
    max_abs, max_rel = output_error(run_graph(gm, inputs), reference)
    return StageRecord(
        name=name, kind=kind, status=status, params=params, param_bytes=pbytes, macs=macs,
        multiplies=mults, nodes=len(gm.graph.nodes), max_abs_error=max_abs, max_rel_error=max_rel,
        seconds=seconds, note=note, code=gm.code, table=graph_table(gm), ops=op_histogram(gm),
        result=result)


@dataclass
class PipelineOutcome:
    gm: fx.GraphModule
    records: list[StageRecord]
    graphs: dict[str, fx.GraphModule]  # stage name → graph after that stage


class PassManager:
    def __init__(self, passes: Sequence[Pass], tolerance: float | None = None):
        self.passes = list(passes)
        self.tolerance = tolerance

    def run(self, gm: fx.GraphModule, ctx: PassContext, reference: list[torch.Tensor],
            trace_record: StageRecord | None = None) -> PipelineOutcome:
        records = [trace_record] if trace_record else []
        graphs: dict[str, fx.GraphModule] = {"trace": gm}
        current = gm
        for p in self.passes:
            record, new = self._run_one(p, current, ctx, reference)
            records.append(record)
            if record.status == "applied" or record.status == "unchanged":
                current = new
            graphs[p.name] = current
        return PipelineOutcome(current, records, graphs)

    def _run_one(self, p: Pass, gm: fx.GraphModule, ctx: PassContext,
                 reference: list[torch.Tensor]) -> tuple[StageRecord, fx.GraphModule]:
        work = copy_graph_module(gm)  # the pass may edit its copy; `gm` stays as it was
        t0 = time.perf_counter()
        try:
            new, result = p.run(work, ctx)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, PassError):
                raise
            raise PassError(f"pass {p.name!r} failed: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - t0
        if not isinstance(new, fx.GraphModule) or not isinstance(result, PassResult):
            raise PassError(f"pass {p.name!r} must return (fx.GraphModule, PassResult), got "
                            f"({type(new).__name__}, {type(result).__name__})")
        try:
            annotate_shapes(new, ctx.example_inputs)
        except Exception as e:  # noqa: BLE001
            raise PassError(f"pass {p.name!r} produced a graph that does not run on the example inputs: "
                            f"{type(e).__name__}: {e}") from e
        status = "applied" if result.changed else "unchanged"
        record = snapshot(p.name, "pass", new, reference, ctx.example_inputs, status, seconds, result=result,
                          note=result.headline())
        if not getattr(p, "lossy", False) and result.changed:
            # A lossless pass (fuse) must compute what the graph before it did.
            _, drift = output_error(run_graph(new, ctx.example_inputs), run_graph(gm, ctx.example_inputs))
            if drift > LOSSLESS_RTOL:
                record.status = "rolled back"
                record.note = (f"{p.name} should not change the numbers but changed them by relative error "
                               f"{drift:.3g} (> {LOSSLESS_RTOL:g}); kept the graph from before it. Please report "
                               f"this; passes without {p.name!r} avoid it")
                record.extra["attempted"] = {"max_rel_error": record.max_rel_error, "drift": drift}
                kept = snapshot(p.name, "pass", gm, reference, ctx.example_inputs)
                for k in ("params", "param_bytes", "macs", "multiplies", "nodes", "max_abs_error",
                          "max_rel_error", "code", "table", "ops"):
                    setattr(record, k, getattr(kept, k))
                return record, gm
        if self.tolerance is not None and record.max_rel_error > self.tolerance:
            record.status = "rolled back"
            record.note = (f"error {record.max_rel_error:.3g} > tolerance {self.tolerance:g}; "
                           "kept the graph from before this pass")
            # Report the numbers of the graph actually kept, with this pass's attempt in `extra`.
            kept = snapshot(p.name, "pass", gm, reference, ctx.example_inputs)
            record.extra["attempted"] = {"max_rel_error": record.max_rel_error,
                                         "params": record.params, "macs": record.macs}
            for k in ("params", "param_bytes", "macs", "multiplies", "nodes", "max_abs_error",
                      "max_rel_error", "code", "table", "ops"):
                setattr(record, k, getattr(kept, k))
            return record, gm
        return record, new
