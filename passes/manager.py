"""Runs a pipeline of passes, each observed by the instruments (passes/instruments.py).

Each of fxpress's own passes gets a copy of the graph before it that shares that graph's weights
(``copy_graph_module`` with ``share_weights``, see ``shares_weights``): the graph before it stays as it
was, and keeping every stage's graph costs about one copy of the weights in all, not one per stage. The instruments time the pass, guard the
shared weights, roll back a pass that breaks the tolerance (error measured against the *original*
model, so several lossy passes cannot add up past it) or a lossless pass that changed the numbers,
and measure the graph that goes on into the stage's StageRecord.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx

from fxpress.errors import PassError

from .base import FunctionPass, Pass, PassContext, PassResult
from .instruments import MEASURES, Instrument, observe, pass_instruments
from .measure import output_error
from .record import Stage, StageRecord, run_graph
from .trace import annotate_shapes, copy_graph_module

__all__ = ["PassManager", "PipelineOutcome", "StageRecord", "output_error", "run_graph", "shares_weights", "snapshot"]


def snapshot(name: str, kind: str, gm: fx.GraphModule, reference: list[torch.Tensor],
             inputs: tuple, status: str = "ok", seconds: float = 0.0, note: str = "",
             result: PassResult | None = None) -> StageRecord:
    """The record of a graph made elsewhere (the trace): measured by the same instruments as a pass."""
    stage = Stage(name, kind, inputs, reference, graph=gm, status=status, seconds=seconds, note=note,
                  result=result)
    return observe(stage, MEASURES, lambda s: None)[0]


@dataclass
class PipelineOutcome:
    gm: fx.GraphModule
    records: list[StageRecord]
    graphs: dict[str, fx.GraphModule]  # stage name → graph after that stage


class PassManager:
    """``instruments``: extra observers, called after the built-in ones on every pass."""

    def __init__(self, passes: Sequence[Pass], tolerance: float | None = None,
                 instruments: Sequence[Instrument] = ()):
        self.passes = list(passes)
        self.tolerance = tolerance
        self.instruments = list(instruments)

    def run(self, gm: fx.GraphModule, ctx: PassContext, reference: list[torch.Tensor],
            trace_record: StageRecord | None = None) -> PipelineOutcome:
        records = [trace_record] if trace_record else []
        graphs: dict[str, fx.GraphModule] = {"trace": gm}
        instruments = pass_instruments(self.tolerance, graphs, self.instruments)
        cache: dict = {}  # graph outputs, shared by the stages: each graph runs once on the example inputs
        current = gm
        for p in self.passes:
            stage = Stage(p.name, "pass", ctx.example_inputs, reference, before=current,
                          lossy=getattr(p, "lossy", False), cache=cache)
            record, _ = observe(stage, instruments, lambda s, p=p: _run_pass(p, s, ctx))
            records.append(record)
            current = stage.final
        return PipelineOutcome(current, records, graphs)


def shares_weights(p: Pass) -> bool:
    """Whether ``p`` gets a copy that shares the weights of the graph before it (else a deep copy).

    fxpress's own passes replace every tensor they change (WeightGuard checks it on every run), so they
    share. Other passes (yours, a FunctionPass) get a deep copy, as the pass contract always promised
    ("edit your copy freely"), unless they declare ``shares_weights = True``.
    """
    declared = getattr(p, "shares_weights", None)
    if declared is not None:
        return bool(declared)
    return type(p).__module__.startswith("fxpress.passes.") and not isinstance(p, FunctionPass)


def _run_pass(p: Pass, stage: Stage, ctx: PassContext) -> None:
    """The stage's body: run ``p`` on a weight-sharing copy of ``stage.before``; check what it returns."""
    work = copy_graph_module(stage.before, share_weights=shares_weights(p))  # the pass edits its copy
    try:
        new, result = p.run(work, ctx)
    except Exception as e:  # noqa: BLE001
        if isinstance(e, PassError):
            raise
        raise PassError(f"pass {p.name!r} failed: {type(e).__name__}: {e}") from e
    if not isinstance(new, fx.GraphModule) or not isinstance(result, PassResult):
        raise PassError(f"pass {p.name!r} must return (fx.GraphModule, PassResult), got "
                        f"({type(new).__name__}, {type(result).__name__})")
    try:
        annotate_shapes(new, ctx.example_inputs)
    except Exception as e:  # noqa: BLE001
        raise PassError(f"pass {p.name!r} produced a graph that does not run on the example inputs: "
                        f"{type(e).__name__}: {e}") from e
    stage.graph, stage.result = new, result
    stage.status = "applied" if result.changed else "unchanged"
    stage.note = result.headline()
