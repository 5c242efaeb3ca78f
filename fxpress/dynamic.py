"""Compiling models with data-dependent control flow: ``split_branches`` end to end.

``fxpress.compile`` hands a model here when ``passes`` names ``split_branches`` (or when
``passes="default"`` and the whole model cannot be traced). The model is split into branch-free
regions plus a host program (``fxpress.passes.split_branches``); every region then goes through the
remaining passes with the ordinary PassManager and is lowered with ``fxpress.lower.lower``, exactly
like a whole model; the result is a ``DynamicCompiledModel`` that runs the host program
(``fxpress.runtime.host_program``) over the compiled regions.

With ``options={"split_branches": {"lowering": "native"}}`` the program is instead emitted as one graph
whose branches are ``torch.cond`` (→ ``relax.If`` in TVM, ``If`` in ONNX): the alternative lowering
the benchmark compares against.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Iterable

import numpy as np
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from fxpress.errors import InputError, TargetUnavailableError, TraceError
from fxpress.passes import PassContext, PassManager, PassResult, StageRecord, snapshot, trace
from fxpress.passes.manager import output_error
from fxpress.passes.split_branches import SplitProgram, eager_decisions, split_model
from fxpress.passes.split_branches_ast import analyze
from fxpress.passes.split_branches_ir import render
from fxpress.passes.stats import count_params
from fxpress.runtime.host_program import HOST_FILE, HostInterpreter, Trace, combine_samples
from fxpress.runtime.loader import check_inputs

from .compiled import CompiledModel, _to_numpy, tensor_spec
from .lower import _TorchExecutor, lower
from .report import Report

OPTION_KEYS = {"per_sample", "max_loop_iters", "on_exceed", "lowering"}


def _split_options(pass_list, options: dict | None) -> dict[str, Any]:
    opts = dict((options or {}).get("split_branches", {}))
    for p in pass_list:
        if p.name == "split_branches":
            opts.update(p.options)
    unknown = set(opts) - OPTION_KEYS
    if unknown:
        raise InputError(f"unknown split_branches option(s) {sorted(unknown)}; known: {sorted(OPTION_KEYS)}")
    if opts.get("lowering", "split") not in ("split", "native"):
        raise InputError(f"split_branches lowering must be 'split' or 'native', got {opts['lowering']!r}")
    return opts


def maybe_compile_dynamic(model: nn.Module, example_inputs: tuple, pass_list, **kwargs):
    """The compile() hook for ``passes=[..., "split_branches", ...]``: a DynamicCompiledModel, or None
    when the forward has no data-dependent control flow (then the ordinary path compiles it whole and
    the split_branches pass leaves the traced graph unchanged)."""
    opts = _split_options(pass_list, kwargs.get("options"))
    # Per-sample programs run on batch-1 slices: that is the shape their static loops see.
    shapes = [x[:1] for x in example_inputs] if opts.get("per_sample") else example_inputs
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
    return compile_dynamic(model, example_inputs, pass_list, analysis=analysis, **kwargs)


def compile_dynamic(model: nn.Module, example_inputs: tuple, pass_list, *, target: str = "llvm", tune: int = 0,
                    calibration: Iterable | None = None, tolerance: float | None = None,
                    options: dict[str, dict[str, Any]] | None = None, analysis=None,
                    reason: str | None = None) -> "DynamicCompiledModel":
    t_start = time.perf_counter()
    model = model.eval()
    opts = _split_options(pass_list, options)
    per_sample = bool(opts.get("per_sample", False))
    batch = "per_sample" if per_sample else "uniform"
    remaining = [p for p in pass_list if p.name != "split_branches"]
    if per_sample:
        sizes = {int(x.shape[0]) if x.dim() else -1 for x in example_inputs}
        if len(sizes) != 1 or -1 in sizes:
            raise InputError("per_sample splitting needs every example input to have the same batch size on dim 0, "
                             f"got shapes {[tuple(x.shape) for x in example_inputs]}")
        examples = tuple(x[:1] for x in example_inputs)
    else:
        examples = tuple(example_inputs)

    reference, out_spec = _eager_reference(model, example_inputs, per_sample)
    _, sample_spec = pytree.tree_flatten(_run_eager(model, examples))
    split = split_model(model, examples, opts, out_spec=sample_spec, batch=batch, analysis=analysis)
    split_seconds = time.perf_counter() - t_start

    # Split-stage check: the host program over the traced (not yet optimised) regions vs eager.
    traced = {}
    for name, r in split.regions.items():
        t0 = time.perf_counter()
        try:
            tr = trace(r.module, r.example_inputs)
        except TraceError as e:
            raise TraceError(
                f"split_branches: region {name} ({r.source}) still has control flow that depends on data, in code "
                "split_branches does not read (it splits forward, submodule forwards and self methods; not plain "
                f"functions, comprehensions or lambdas):\n{e}") from e
        traced[name] = (tr, time.perf_counter() - t0)
    host_json = split.host.to_json()
    torch_interp = HostInterpreter(host_json, {n: _TorchExecutor(t.gm) for n, (t, _) in traced.items()})
    split_record = _split_record(model, split, traced, torch_interp, example_inputs, reference, split_seconds, reason)

    if opts.get("lowering") == "native":
        return _compile_native(model, example_inputs, split, traced, remaining, target=target, tune=tune,
                               tolerance=tolerance, options=options, reference=reference, out_spec=out_spec,
                               split_record=split_record, per_sample=per_sample)

    calib = _region_calibration(torch_interp, calibration, per_sample, split)
    records = [split_record]
    regions: dict[str, CompiledModel] = {}
    executors: dict[str, Any] = {}
    for name, r in split.regions.items():
        tr, trace_seconds = traced[name]
        trace_record = snapshot("trace", "trace", tr.gm, r.reference, r.example_inputs, seconds=trace_seconds,
                                note=f"region {name} ({r.source}), traced with {tr.method}")
        ctx = PassContext(example_inputs=r.example_inputs, calibration=calib.get(name), options=dict(options or {}),
                          target=target, tolerance=tolerance, reference_outputs=r.reference)
        outcome = PassManager(remaining, tolerance=tolerance).run(tr.gm, ctx, r.reference, trace_record)
        executor, lowered, lower_record = lower(outcome.gm, r.example_inputs, target, r.reference, tune=tune,
                                                tune_options=ctx.options_for("tune"))
        cm = CompiledModel(gm=outcome.gm, report=Report(outcome.records + [lower_record]), graphs=outcome.graphs,
                           target=target, example_inputs=r.example_inputs, reference=r.reference,
                           out_spec=pytree.tree_flatten(tuple(r.reference))[1], executor=executor, lowered=lowered,
                           passes=[p.name for p in remaining], trace_method=tr.method)
        regions[name] = cm
        executors[name] = _TorchExecutor(outcome.gm) if target == "torch" else executor
        records += [dataclasses.replace(rec, name=f"{name}:{rec.name}") for rec in cm.report]
    runnable = all(e is not None for e in executors.values())
    interp = HostInterpreter(host_json, executors) if runnable else None
    dcm = DynamicCompiledModel(split=split, regions=regions, report=Report(records), target=target,
                               example_inputs=tuple(example_inputs), reference=reference, out_spec=out_spec,
                               interpreter=interp, passes=["split_branches"] + [p.name for p in remaining])
    records.append(dcm._host_record(time.perf_counter() - t_start))
    dcm.report = Report(records)
    return dcm


# ----------------------------------------------------------------------------- helpers

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
            leaves = _combine_samples(outs)
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


def _combine_samples(outs: list) -> list[torch.Tensor]:
    """Per-sample eager outputs → batch leaves, as the host program combines them (combine_samples)."""
    flat = [pytree.tree_flatten(o)[0] for o in outs]
    return [torch.from_numpy(combine_samples([f[k].detach().numpy() for f in flat])) for k in range(len(flat[0]))]


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
    from fxpress.passes.stats import graph_costs

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


# ----------------------------------------------------------------------------- the compiled model

class DynamicCompiledModel:
    """What ``fxpress.compile`` returns for a split dynamic model. Same surface as CompiledModel:
    ``cm(*inputs)``, ``cm.report``, ``cm.graph(name)``, ``cm.export(dir)``; plus ``cm.regions`` (one
    CompiledModel per region), ``cm.host_program`` and ``cm.run_with_trace(*inputs)``."""

    def __init__(self, *, split: SplitProgram, regions: dict[str, CompiledModel], report: Report, target: str,
                 example_inputs: tuple, reference: list[torch.Tensor], out_spec, interpreter: HostInterpreter | None,
                 passes: list[str], native: CompiledModel | None = None):
        self.split = split
        self.regions = regions
        self.report = report
        self.target = target
        self.example_inputs = example_inputs
        self.input_specs = [tensor_spec(f"input_{i}", t) for i, t in enumerate(example_inputs)]
        self.output_specs = [tensor_spec(f"output_{i}", t) for i, t in enumerate(reference)]
        self._reference = reference
        self._out_spec = out_spec
        self._interp = interpreter
        self.passes = passes
        self.native = native  # the torch.cond lowering, when compiled with lowering="native"
        self.trace_method = "split_branches (torch.cond graph)" if native is not None else "split_branches"
        self.last_trace: Trace | None = None

    @property
    def batch(self) -> str:
        return self.split.host.batch

    @property
    def host_program(self):
        return self.split.host

    def host_text(self) -> str:
        return render(self.split.host)

    # ------------------------------------------------------------------ running
    def _arrays(self, inputs) -> list[np.ndarray]:
        if self.batch != "per_sample":
            return check_inputs(inputs, self.input_specs, convert=_to_numpy)
        if len(inputs) != len(self.input_specs):
            raise InputError(f"the model takes {len(self.input_specs)} input(s), got {len(inputs)}")
        arrays = []
        for i, (x, spec) in enumerate(zip(inputs, self.input_specs)):
            a = _to_numpy(x)
            if a.ndim < 1 or list(a.shape[1:]) != list(spec["shape"][1:]) or str(a.dtype) != spec["dtype"]:
                raise InputError(f"input {i}: expected shape (N, {', '.join(map(str, spec['shape'][1:]))}) dtype "
                                 f"{spec['dtype']} (any batch N: the program runs per sample), got shape "
                                 f"{tuple(a.shape)} dtype {a.dtype}")
            arrays.append(a)
        if len({a.shape[0] for a in arrays}) > 1:
            raise InputError("per-sample models need the same batch size on every input")
        return arrays

    def run_with_trace(self, *inputs):
        """(outputs, Trace): the outputs and the decisions the host program took (None with lowering='native',
        whose decisions happen inside one graph)."""
        if self.native is not None:
            return self.native(*inputs), None
        trace = Trace()
        out = self._run(inputs, trace)
        self.last_trace = trace
        return out, trace

    def __call__(self, *inputs):
        if self.native is not None:
            return self.native(*inputs)
        return self._run(inputs, None)

    def _run(self, inputs, trace: Trace | None):
        arrays = self._arrays(inputs)
        if self._interp is None:
            raise TargetUnavailableError(
                f"this model was compiled for target={self.target!r}, which this machine cannot run (no CUDA GPU). "
                "Export it with cm.export(dir) and load it on a GPU machine, or compile with target='llvm'.")
        outs = self._interp.run(arrays, trace)
        return pytree.tree_unflatten([torch.from_numpy(np.array(o)) for o in outs], self._out_spec)

    def _host_record(self, seconds: float) -> StageRecord:
        record = StageRecord(name=f"host:{self.target}", kind="lowering", status="ok", seconds=seconds,
                             params=sum(r.report[-1].params for r in self.regions.values()),
                             macs=sum(r.report[-1].macs for r in self.regions.values()),
                             multiplies=sum(r.report[-1].multiplies for r in self.regions.values()),
                             nodes=sum(r.report[-1].nodes for r in self.regions.values()),
                             note="host program over the compiled regions vs eager, on the example inputs",
                             code=self.host_text())
        if self._interp is None:
            record.max_abs_error = record.max_rel_error = None
            return record
        outs = self._interp.run(self._arrays(self.example_inputs))
        record.max_abs_error, record.max_rel_error = output_error(
            [torch.from_numpy(np.asarray(o)) for o in outs], self._reference)
        return record

    # ------------------------------------------------------------------ inspecting
    def graph(self, stage: str = "final") -> fx.GraphModule:
        """A region's graph: ``"r0"`` (final), ``"r0:fuse"`` (after a pass), ``"r0:trace"``. With the native
        lowering, ``"final"`` is the single torch.cond graph."""
        if self.native is not None and stage == "final":
            return self.native.gm
        region, _, sub = stage.partition(":")
        if region in self.regions:
            return self.regions[region].graph(sub or "final")
        raise KeyError(f"no graph {stage!r}: a split model has one graph per region; ask for a region "
                       f"({', '.join(self.regions)}) or '<region>:<stage>' with a stage of "
                       f"{['trace'] + [p for p in self.passes if p != 'split_branches']}")

    @property
    def stages(self) -> list[str]:
        return self.report.names()

    @property
    def _graphs(self) -> dict[str, fx.GraphModule]:
        """Every region's graph per stage, keyed like the report ("r0:trace", "r0:fuse", ...)."""
        if self.native is not None:
            return {"native": self.native.gm}
        return {f"{r}:{stage}": gm for r, cm in self.regions.items() for stage, gm in cm._graphs.items()}

    def html_report(self, path):
        """Write a self-contained HTML report (stages, region graphs, IR) to ``path``; returns the path."""
        from .html_report import write_html_report

        return write_html_report(self, path)

    def eager_trace(self, model: nn.Module, *inputs):
        """(eager outputs, decision markers of eager PyTorch), comparable with ``run_with_trace``'s markers;
        per sample in per-sample mode."""
        if self.batch == "per_sample":
            outs, markers = [], []
            for i in range(int(inputs[0].shape[0])):
                o, m = eager_decisions(model, tuple(x[i:i + 1] for x in inputs), self.split)
                outs.append(o)
                markers += m
            return pytree.tree_unflatten(_combine_samples(outs), self._out_spec), markers
        return eager_decisions(model, inputs, self.split)

    def __repr__(self) -> str:
        kind = "native torch.cond" if self.native is not None else f"{len(self.regions)} regions"
        return f"DynamicCompiledModel(target={self.target!r}, {kind}, batch={self.batch!r}, passes={self.passes})"

    # ------------------------------------------------------------------ exporting
    def export(self, path: str, backends: tuple[str, ...] = ("onnx", "tvm")) -> str:
        """Write every region (regions/<name>/model.onnx, regions/<name>/tvm/), host_program.json and
        manifest.json (sha256 of every file) into ``path``, atomically. ``fxpress.runtime.load(path)``
        runs it without torch. With the native lowering this is an ordinary single-graph artifact."""
        if self.native is not None:
            return self.native.export(path, backends)
        return write_dynamic_artifact(self, path, backends)


def write_dynamic_artifact(dcm: DynamicCompiledModel, path: str, backends=("onnx", "tvm")) -> str:
    from .export import _write_onnx, _write_tvm, check_backends, write_artifact_dir

    backends = check_backends(backends)

    def write_files(tmp: str) -> dict[str, Any]:
        regions_entry: dict[str, Any] = {}
        for name, cm in dcm.regions.items():
            rel = f"regions/{name}"
            rdir = os.path.join(tmp, "regions", name)
            os.makedirs(rdir)
            entries: dict[str, Any] = {}
            if "onnx" in backends:
                e = _write_onnx(cm, rdir)
                e["file"] = f"{rel}/{e['file']}"
                entries["onnx"] = e
            if "tvm" in backends:
                e = _write_tvm(cm, os.path.join(rdir, "tvm"))
                e["library"] = f"{rel}/{e['library']}"
                if e.get("params"):
                    e["params"] = f"{rel}/{e['params']}"
                entries["tvm"] = e
            regions_entry[name] = {"dir": rel, "source": dcm.split.regions[name].source, "backends": entries}
        with open(os.path.join(tmp, HOST_FILE), "w") as f:
            json.dump(dcm.split.host.to_json(), f, indent=1)
            f.write("\n")
        return {"backends": {b: {"host_program": HOST_FILE} for b in backends},
                "host_program": {"file": HOST_FILE, "batch": dcm.batch, "regions": regions_entry}}

    # A split artifact with no backend would have nothing to run its regions with.
    return write_artifact_dir(dcm, path, backends, write_files, require_backend=True)


# ----------------------------------------------------------------------------- native lowering

def _compile_native(model, example_inputs, split, traced, remaining, *, target, tune, tolerance, options, reference,
                    out_spec, split_record, per_sample) -> DynamicCompiledModel:
    from fxpress.passes.split_branches_native import native_module

    if per_sample:
        raise InputError("lowering='native' compiles one graph for the whole batch; it cannot decide per sample. "
                         "Use the default lowering='split' with per_sample=True.")
    t0 = time.perf_counter()
    graphs = {}
    records = [split_record]
    for name, r in split.regions.items():
        tr, _ = traced[name]
        ctx = PassContext(example_inputs=r.example_inputs, options=dict(options or {}), target=target,
                          tolerance=tolerance, reference_outputs=r.reference)
        outcome = PassManager(remaining, tolerance=tolerance).run(tr.gm, ctx, r.reference)
        graphs[name] = outcome.gm
        records += [dataclasses.replace(rec, name=f"{name}:{rec.name}") for rec in outcome.records]
    gm = native_module(split, graphs, tuple(example_inputs))
    record = snapshot("native", "pass", gm, reference, tuple(example_inputs), seconds=time.perf_counter() - t0,
                      note="one graph: branches as torch.cond, loops unrolled to their bound")
    records.append(record)
    executor, lowered, lower_record = lower(gm, tuple(example_inputs), target, reference, tune=tune)
    records.append(lower_record)
    cm = CompiledModel(gm=gm, report=Report(records), graphs={"native": gm}, target=target,
                       example_inputs=tuple(example_inputs), reference=reference, out_spec=out_spec,
                       executor=executor, lowered=lowered, passes=["split_branches"] + [p.name for p in remaining],
                       trace_method="torch.cond")
    return DynamicCompiledModel(split=split, regions={}, report=Report(records), target=target,
                                example_inputs=tuple(example_inputs), reference=reference, out_spec=out_spec,
                                interpreter=None, passes=cm.passes, native=cm)
