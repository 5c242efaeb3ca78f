"""Compiling models with data-dependent control flow: the ``split_branches`` front end, end to end.

``fxpress.compile`` hands a model here when ``passes`` names ``split_branches`` (or when
``passes="default"`` and the whole model cannot be traced). The front end
(``fxpress.frontends.split_branches``) cuts the model into branch-free regions plus a host program;
every region then takes the one compile path (``fxpress.pipeline.compile_graph``: the remaining passes,
lowering, a CompiledModel) exactly like a whole model; the result is a ``DynamicCompiledModel``
(fxpress/dynamic_model.py) that runs the host program over the compiled regions.

With ``options={"split_branches": {"lowering": "native"}}`` the program is instead emitted as one graph
whose branches are ``torch.cond`` (→ ``relax.If`` in TVM, ``If`` in ONNX): the alternative lowering
the benchmark compares against.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxpress.errors import InputError, TraceError
from fxpress.frontends.split_branches import NAME, SplitProgram, analyze, native_module, split_model, split_options
from fxpress.frontends.split_branches.ir import render
from fxpress.passes import PassResult, StageRecord, output_error, snapshot, trace
from fxpress.passes.stats import count_params, graph_costs
from fxpress.runtime.host_program import HostInterpreter

from .dynamic_model import DynamicCompiledModel, combine_sample_outputs
from .lower import _TorchExecutor
from .pipeline import CompileSettings, compile_graph, lower_to_model, run_passes
from .report import Report

__all__ = ["DynamicCompiledModel", "compile_dynamic", "maybe_compile_dynamic", "unsplit_record"]


def maybe_compile_dynamic(model: nn.Module, example_inputs: tuple, pass_list, settings: CompileSettings,
                          calibration: Iterable | None = None) -> DynamicCompiledModel | None:
    """The compile() hook for ``passes=[..., "split_branches", ...]``: a DynamicCompiledModel, or None
    when the forward has no data-dependent control flow (then the ordinary path compiles it whole and
    the report's ``split_branches`` stage says so: ``unsplit_record``)."""
    opts = split_options(settings.options.get(NAME))
    # Per-sample programs run on batch-1 slices: that is the shape their static loops see.
    shapes = [x[:1] for x in example_inputs] if opts.per_sample else example_inputs
    analysis = analyze(model.eval(), opts, len(example_inputs), shapes)
    if not analysis.has_dynamic:
        try:  # what tracing reports: nothing to split must mean the model traces whole
            trace(model, example_inputs)
        except TraceError as e:
            raise TraceError(
                f"split_branches found no data-dependent control flow it can split in {analysis.root_fn.qualname} "
                "(it reads forward, submodule forwards and self methods), yet the model does not trace:\n"
                f"{e}\nThe control flow is probably in a plain function, a comprehension or a lambda; move it into "
                "forward or a submodule's forward.") from e
        return None
    return compile_dynamic(model, example_inputs, pass_list, settings, calibration=calibration, analysis=analysis)


def unsplit_record(trace_record: StageRecord, seconds: float) -> StageRecord:
    """The ``split_branches`` stage of a model that traced whole: nothing split, the traced graph as it was."""
    result = PassResult()
    result.notes.append("the graph was traced whole, so it has no data-dependent control flow: nothing to split")
    result.metrics["regions"] = 1
    return dataclasses.replace(trace_record, name=NAME, kind="pass", status="unchanged", seconds=seconds, note="",
                               result=result, extra={})


def compile_dynamic(model: nn.Module, example_inputs: tuple, pass_list, settings: CompileSettings, *,
                    calibration: Iterable | None = None, analysis=None,
                    reason: str | None = None) -> DynamicCompiledModel:
    """Split ``model`` (``analysis``: the front end's reading when the caller has it) and compile every
    region; ``reason`` is noted in the report (why a ``passes="default"`` compile came here)."""
    t_start = time.perf_counter()
    model = model.eval()
    opts = split_options(settings.options.get(NAME))
    batch = "per_sample" if opts.per_sample else "uniform"
    if opts.per_sample:
        sizes = {int(x.shape[0]) if x.dim() else -1 for x in example_inputs}
        if len(sizes) != 1 or -1 in sizes:
            raise InputError("per_sample splitting needs every example input to have the same batch size on dim 0, "
                             f"got shapes {[tuple(x.shape) for x in example_inputs]}")
        examples = tuple(x[:1] for x in example_inputs)
    else:
        examples = tuple(example_inputs)

    reference, out_spec = _eager_reference(model, example_inputs, opts.per_sample)
    _, sample_spec = pytree.tree_flatten(_run_eager(model, examples))
    split = split_model(model, examples, opts, out_spec=sample_spec, batch=batch, analysis=analysis)
    split_seconds = time.perf_counter() - t_start

    # Split-stage check: the host program over the traced (not yet optimised) regions vs eager.
    traced = {name: _trace_region(name, r) for name, r in split.regions.items()}
    host_json = split.host.to_json()
    torch_interp = HostInterpreter(host_json, {n: _TorchExecutor(t.gm) for n, (t, _) in traced.items()})
    split_record = _split_record(model, split, traced, torch_interp, example_inputs, reference, split_seconds, reason)
    passes = [NAME] + [p.name for p in pass_list]

    if opts.lowering == "native":
        if opts.per_sample:
            raise InputError("lowering='native' compiles one graph for the whole batch; it cannot decide per "
                             "sample. Use the default lowering='split' with per_sample=True.")
        return _compile_native(split, traced, pass_list, settings, tuple(example_inputs), reference, out_spec,
                               split_record, passes)

    calib = _region_calibration(torch_interp, calibration, opts.per_sample, split)
    records = [split_record]
    regions = {}
    executors = {}
    for name, r in split.regions.items():
        tr, trace_seconds = traced[name]
        trace_record = snapshot("trace", "trace", tr.gm, r.reference, r.example_inputs, seconds=trace_seconds,
                                note=f"region {name} ({r.source}), traced with {tr.method}")
        cm = compile_graph(tr.gm, r.example_inputs, r.reference, pytree.tree_flatten(tuple(r.reference))[1],
                           pass_list, settings, stages=[trace_record], trace_method=tr.method,
                           calibration=calib.get(name))
        regions[name] = cm
        # the host program calls each region's executor on arrays (target torch: the graph itself)
        executors[name] = _TorchExecutor(cm.gm) if settings.target == "torch" else cm._executor  # noqa: SLF001
        records += [dataclasses.replace(rec, name=f"{name}:{rec.name}") for rec in cm.report]
    runnable = all(e is not None for e in executors.values())
    interp = HostInterpreter(host_json, executors) if runnable else None
    dcm = DynamicCompiledModel(split=split, regions=regions, report=Report(records), target=settings.target,
                               example_inputs=tuple(example_inputs), reference=reference, out_spec=out_spec,
                               interpreter=interp, passes=passes)
    records.append(dcm._host_record(time.perf_counter() - t_start))
    dcm.report = Report(records)
    return dcm


def _compile_native(split: SplitProgram, traced, pass_list, settings: CompileSettings, example_inputs: tuple,
                    reference, out_spec, split_record: StageRecord, passes: list[str]) -> DynamicCompiledModel:
    """``lowering="native"``: the passes run per region, then the regions and the host program become one
    torch.cond graph, lowered once."""
    t0 = time.perf_counter()
    graphs = {}
    records = [split_record]
    for name, r in split.regions.items():
        outcome = run_passes(traced[name][0].gm, r.example_inputs, r.reference, pass_list, settings)
        graphs[name] = outcome.gm
        records += [dataclasses.replace(rec, name=f"{name}:{rec.name}") for rec in outcome.records]
    gm = native_module(split, graphs, example_inputs)
    records.append(snapshot("native", "pass", gm, reference, example_inputs, seconds=time.perf_counter() - t0,
                            note="one graph: branches as torch.cond, loops unrolled to their bound"))
    cm = lower_to_model(gm, example_inputs, reference, out_spec, settings, records=records, graphs={"native": gm},
                        passes=passes, trace_method="torch.cond")
    return DynamicCompiledModel(split=split, regions={}, report=cm.report, target=settings.target,
                                example_inputs=example_inputs, reference=reference, out_spec=out_spec,
                                interpreter=None, passes=passes, native=cm)


# ----------------------------------------------------------------------------- helpers

def _trace_region(name: str, r):
    """(Traced, seconds) for one region; a region that still branches on data names where and why."""
    t0 = time.perf_counter()
    try:
        tr = trace(r.module, r.example_inputs)
    except TraceError as e:
        raise TraceError(
            f"split_branches: region {name} ({r.source}) still has control flow that depends on data, in code "
            "split_branches does not read (it splits forward, submodule forwards and self methods; not plain "
            f"functions, comprehensions or lambdas):\n{e}") from e
    return tr, time.perf_counter() - t0


def _run_eager(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def _eager_reference(model, example_inputs, per_sample: bool):
    """Eager outputs on the example inputs (per sample, concatenated, in per-sample mode)."""
    try:
        if per_sample:
            outs = [_run_eager(model, tuple(x[i:i + 1] for x in example_inputs))
                    for i in range(int(example_inputs[0].shape[0]))]
            spec = pytree.tree_flatten(outs[0])[1]
            leaves = combine_sample_outputs(outs)
        else:
            out = _run_eager(model, example_inputs)
            leaves, spec = pytree.tree_flatten(out)
    except RuntimeError as e:
        if "ambiguous" in str(e):
            raise InputError(
                f"the model's forward raised `{e}` on the example inputs: a Python `if` on a tensor with one value "
                "per sample. Compile with options={'split_branches': {'per_sample': True}} to decide per sample, "
                "or reduce the condition over the batch (.all()/.any()).") from e
        raise
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise InputError("the model's output must be a tensor or a (nested) tuple/list/dict of tensors")
    return [t.detach() for t in leaves], spec


def _split_record(model, split: SplitProgram, traced, torch_interp, example_inputs, reference, seconds, reason):
    result = PassResult()
    for site in split.analysis.dynamic_sites:
        where, _, what = site.partition(": ")
        kind = "unroll" if "unrolled" in what else "loop" if what.startswith(("while", "for")) else "branch"
        result.rewrite(kind, [where], ["host program"], what=what)
    for name, r in split.regions.items():
        gm = traced[name][0].gm
        result.layers.append({"region": name, "source": r.source, "inputs": r.sig.inputs, "outputs": r.sig.outputs,
                              "nodes": len(gm.graph.nodes)})
    counts = split.host.summary()
    result.metrics.update(regions=len(split.regions), ifs=counts.get("if", 0),
                          loops=sum(counts.get(k, 0) for k in ("while", "for", "unrolled")),
                          exits=counts.get("return", 0), duplicated_tails=split.duplications,
                          inlined=list(split.analysis.inlined), batch=split.host.batch)
    result.notes += list(split.notes)
    if reason:
        result.notes.append(reason)
    outs = torch_interp.run([x.detach().numpy() for x in example_inputs])
    max_abs, max_rel = output_error([torch.from_numpy(np.asarray(o)) for o in outs], reference)
    params, pbytes = count_params(model)
    macs = mults = nodes = 0
    for tr, _ in traced.values():
        m, k = graph_costs(tr.gm)
        macs, mults, nodes = macs + m, mults + k, nodes + len(tr.gm.graph.nodes)
    note = (f"{len(split.regions)} regions; host program: {counts.get('if', 0)} if, "
            f"{result.metrics['loops']} loops, {counts.get('return', 0)} returns; MACs summed over all regions")
    return StageRecord(name="split_branches", kind="pass", status="applied", params=params, param_bytes=pbytes,
                       macs=macs, multiplies=mults, nodes=nodes, max_abs_error=max_abs, max_rel_error=max_rel,
                       seconds=seconds, note=note, code=render(split.host), result=result,
                       extra={"host_program": split.host.to_json()})


def _region_calibration(torch_interp: HostInterpreter, calibration, per_sample: bool, split) -> dict[str, list]:
    """Run the host program over the traced regions on each calibration batch and keep the inputs each
    region saw (regions a batch never reaches calibrate on their example inputs)."""
    if calibration is None:
        return {}
    seen: dict[str, list] = {}

    class Recorder:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def run(self, inputs):
            seen.setdefault(self.name, []).append(tuple(torch.from_numpy(np.array(x)) for x in inputs))
            return self.inner.run(inputs)

    rec = HostInterpreter(torch_interp.program, {n: Recorder(n, e) for n, e in torch_interp.executors.items()})
    for batch in calibration:
        batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
        rec.run([x.detach().numpy() for x in batch])
    out = {}
    for name, batches in seen.items():
        shapes = [tuple(t.shape) for t in split.regions[name].example_inputs]
        out[name] = [b for b in batches if [tuple(t.shape) for t in b] == shapes] or None
    return out
