"""The one compile path: a traced graph → the FX passes → lowering → a CompiledModel.

``fxpress.compile`` runs it on the whole traced model; the ``split_branches`` front end
(fxpress/dynamic.py) runs it once per region. What differs between them comes before (tracing,
splitting) and after (the host program), never in here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import fx

from fxpress.errors import InputError
from fxpress.passes import Pass, PassContext, PassManager, PipelineOutcome, StageRecord

from .compiled import CompiledModel
from .lower import lower
from .report import Report


@dataclass(frozen=True)
class CompileSettings:
    """The compile() arguments every graph of one compile shares."""

    target: str
    tune: int = 0
    tolerance: float | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def options_for(self, section: str) -> dict[str, Any]:
        return dict(self.options.get(section) or {})


def dynamic_batch_option(opts: dict) -> bool | None:
    """``options={"lower": {"dynamic_batch": bool}}``; None leaves the target's default (fxpress.lower)."""
    unknown = set(opts) - {"dynamic_batch"}
    if unknown:
        raise InputError(f"unknown option(s) {sorted(unknown)} for 'lower'; it takes 'dynamic_batch' (True/False)")
    value = opts.get("dynamic_batch")
    if value is not None and not isinstance(value, bool):
        raise InputError(f"options['lower']['dynamic_batch'] must be True or False, got {value!r}")
    return value


def run_passes(gm: fx.GraphModule, example_inputs: tuple, reference: list[torch.Tensor], passes: Sequence[Pass],
               settings: CompileSettings, calibration: Iterable | None = None) -> PipelineOutcome:
    """The FX passes, in order, under the tolerance guard (passes.PassManager)."""
    ctx = PassContext(example_inputs=example_inputs, calibration=calibration, options=dict(settings.options),
                      target=settings.target, tolerance=settings.tolerance, reference_outputs=reference)
    return PassManager(passes, tolerance=settings.tolerance).run(gm, ctx, reference)


def lower_to_model(gm: fx.GraphModule, example_inputs: tuple, reference: list[torch.Tensor], out_spec,
                   settings: CompileSettings, *, records: list[StageRecord], graphs: dict[str, fx.GraphModule],
                   passes: list[str], trace_method: str) -> CompiledModel:
    """Lower ``gm`` for the target and wrap it; ``records`` (the stages so far) head its report."""
    executor, lowered, lower_record = lower(gm, example_inputs, settings.target, reference, tune=settings.tune,
                                            tune_options=settings.options_for("tune"), tolerance=settings.tolerance,
                                            dynamic_batch=dynamic_batch_option(settings.options_for("lower")))
    cm = CompiledModel(gm=gm, report=Report(list(records) + [lower_record]), graphs=graphs, target=settings.target,
                       example_inputs=example_inputs, reference=reference, out_spec=out_spec, executor=executor,
                       lowered=lowered, passes=passes, trace_method=trace_method)
    if lower_record.extra.get("dynamic_batch"):
        for spec in cm.input_specs:  # recorded in the manifest; check_inputs accepts any size there
            spec["dynamic_dims"] = [0]
    return cm


def compile_graph(gm: fx.GraphModule, example_inputs: tuple, reference: list[torch.Tensor], out_spec,
                  passes: Sequence[Pass], settings: CompileSettings, *, stages: list[StageRecord],
                  trace_method: str, calibration: Iterable | None = None,
                  front_ends: Sequence[str] = ()) -> CompiledModel:
    """passes → lowering → CompiledModel for one traced graph.

    ``stages``: the records of the stages that produced ``gm`` (the trace, and a front end that left it
    as it was); each names ``gm`` in ``cm.graph(...)``. ``front_ends``: front-end names listed in
    ``cm.passes`` ahead of the passes, as the user wrote them in ``passes=``.
    """
    outcome = run_passes(gm, example_inputs, reference, passes, settings, calibration)
    graphs = {**{s.name: gm for s in stages}, **outcome.graphs}
    return lower_to_model(outcome.gm, example_inputs, reference, out_spec, settings,
                          records=list(stages) + outcome.records, graphs=graphs,
                          passes=[*front_ends, *(p.name for p in passes)], trace_method=trace_method)
