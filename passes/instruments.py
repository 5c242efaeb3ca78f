"""Instruments: observers the pipeline calls before and after every stage (trace, passes, lowering).

Measurement lives here, not in the stages or the manager (as TVM's ``PassContext(instruments=[...])``
keeps timing and dumps out of its passes). ``observe`` runs one stage between the hooks:

    for i in instruments: i.before(stage)
    body(stage)                           # the stage itself: run a pass, build a target ...
    for i in instruments: i.after(stage)  # in list order: time, guards, then measures
    return stage.record()

Guards run before the measures, so a rolled-back stage is measured on the graph actually kept and
no field is copied afterwards.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import fx

from fxpress.errors import PassError

from .measure import output_error
from .record import Stage, StageRecord
from .stats import count_params, graph_costs, graph_table, op_histogram
from .trace import LOSSLESS_RTOL

T = TypeVar("T")


class Instrument:
    """An observer of stages. Hooks may read the stage and write what they observe into it."""

    def before(self, stage: Stage) -> None:
        pass

    def after(self, stage: Stage) -> None:
        pass


def observe(stage: Stage, instruments: Sequence[Instrument], body: Callable[[Stage], T]) -> tuple[StageRecord, T]:
    """Run ``body(stage)`` between the instruments' hooks; (the stage's record, what body returned)."""
    for i in instruments:
        i.before(stage)
    value = body(stage)
    for i in instruments:
        i.after(stage)
    return stage.record(), value


class Timer(Instrument):
    """Seconds the stage's body took (measurement afterwards not included)."""

    def before(self, stage: Stage) -> None:
        self._t0 = time.perf_counter()

    def after(self, stage: Stage) -> None:
        stage.seconds = time.perf_counter() - self._t0


class Stats(Instrument):
    """Parameters, bytes, MACs, multiplies and node count of the graph that goes on; for graph stages
    also its code, per-node table and op histogram (a lowering's record leaves those to its IR)."""

    def after(self, stage: Stage) -> None:
        gm = stage.final
        params, pbytes = count_params(gm)
        macs, mults = graph_costs(gm)
        stage.measured.update(params=params, param_bytes=pbytes, macs=macs, multiplies=mults,
                              nodes=len(gm.graph.nodes))
        if stage.kind != "lowering":
            stage.measured.update(code=gm.code, table=graph_table(gm), ops=op_histogram(gm))


class ErrorMeter(Instrument):
    """Max abs and relative error of the stage's outputs against the original model's (None: not run)."""

    def after(self, stage: Stage) -> None:
        if not stage.checked:
            stage.measured.update(max_abs_error=None, max_rel_error=None)
            return
        max_abs, max_rel = output_error(stage.outputs(), stage.reference)
        stage.measured.update(max_abs_error=max_abs, max_rel_error=max_rel)


class LosslessGuard(Instrument):
    """A lossless pass (fuse) that changed the graph must compute what the graph before it did, within
    fp32 noise; otherwise the graph before it is kept and the note asks for a report."""

    def after(self, stage: Stage) -> None:
        if stage.kind != "pass" or stage.lossy or stage.rolled_back or not (stage.result and stage.result.changed):
            return
        _, drift = output_error(stage.graph_outputs(stage.graph), stage.graph_outputs(stage.before))
        if drift > LOSSLESS_RTOL:
            _, rel = output_error(stage.graph_outputs(stage.graph), stage.reference)
            stage.roll_back(
                f"{stage.name} should not change the numbers but changed them by relative error {drift:.3g} "
                f"(> {LOSSLESS_RTOL:g}); kept the graph from before it. Please report this; passes without "
                f"{stage.name!r} avoid it",
                {"max_rel_error": rel, "drift": drift})


class ToleranceGuard(Instrument):
    """With a tolerance, a pass whose output error against the *original* model exceeds it is rolled
    back (so the errors of several lossy passes cannot add up past the tolerance)."""

    def __init__(self, tolerance: float | None):
        self.tolerance = tolerance

    def after(self, stage: Stage) -> None:
        if self.tolerance is None or stage.kind != "pass" or stage.rolled_back:
            return
        _, rel = output_error(stage.graph_outputs(stage.graph), stage.reference)
        if rel > self.tolerance:
            stage.roll_back(f"error {rel:.3g} > tolerance {self.tolerance:g}; kept the graph from before this pass",
                            {"max_rel_error": rel, "params": count_params(stage.graph)[0],
                             "macs": graph_costs(stage.graph)[0]})


class GraphKeeper(Instrument):
    """Keeps the graph after every stage by name (``CompiledModel.graphs``). The graphs share the
    tensors a pass did not replace (see WeightGuard), so keeping them all costs little memory."""

    def __init__(self, graphs: dict[str, fx.GraphModule] | None = None):
        self.graphs: dict[str, fx.GraphModule] = graphs if graphs is not None else {}

    def after(self, stage: Stage) -> None:
        if stage.final is not None:
            self.graphs[stage.name] = stage.final


class WeightGuard(Instrument):
    """A pass gets a copy of the graph that shares its weights with the graph before it (and with every
    earlier snapshot). Passes replace a tensor they change (a new nn.Parameter); one that wrote into a
    shared tensor in place would silently change the earlier graphs (and the caller's model, whose
    parameters compile() shares too), so this guard compares the tensors'
    version counters (bumped by every in-place write) before and after the pass and stops the compile."""

    def before(self, stage: Stage) -> None:
        self._versions = _tensor_versions(stage.before) if stage.before is not None else {}

    def after(self, stage: Stage) -> None:
        changed = [name for name, (t, v) in self._versions.items() if t._version != v]
        self._versions = {}
        if changed:
            raise PassError(
                f"pass {stage.name!r} wrote into weight(s) {', '.join(changed[:5])} of its input graph in place. "
                "A pass's copy shares unchanged weights with the graphs before it (and with the model given to "
                "compile(), which now holds the changed values too), so it must replace a tensor it changes "
                "(setattr(module, 'weight', nn.Parameter(new))) instead of editing it (.copy_, .mul_ ...). "
                "What to do: fix the pass, or leave it out of passes=[...]")


def _tensor_versions(gm: torch.nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    out: dict[str, tuple[torch.Tensor, int]] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if t is not None:
            out.setdefault(name, (t, t._version))
    return out


def pass_instruments(tolerance: float | None, graphs: dict[str, Any] | None = None,
                     extra: Sequence[Instrument] = ()) -> list[Instrument]:
    """What the pass manager observes on every pass, in the order the hooks must run."""
    return [Timer(), WeightGuard(), LosslessGuard(), ToleranceGuard(tolerance), Stats(), ErrorMeter(),
            GraphKeeper(graphs), *extra]


# Measuring a graph that is already made (the trace) or a lowering: no timer (the caller times it), no guard.
MEASURES: tuple[Instrument, ...] = (Stats(), ErrorMeter())
