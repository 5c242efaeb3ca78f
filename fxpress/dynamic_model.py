"""DynamicCompiledModel: what ``fxpress.compile`` returns for a model split by ``split_branches``.

Same surface as CompiledModel (call, report, graph, export); it runs the host program
(``fxpress.runtime.host_program``) over the compiled regions, or one torch.cond graph with
``lowering="native"``. Exported as regions/<name>/ + host_program.json, loaded without torch by
``fxpress.runtime.load``.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from fxpress.errors import InputError, TargetUnavailableError
from fxpress.frontends.split_branches import SplitProgram, eager_decisions
from fxpress.frontends.split_branches.ir import render
from fxpress.passes import StageRecord, output_error
from fxpress.runtime.host_program import HOST_FILE, HostInterpreter, Trace, combine_samples
from fxpress.runtime.loader import check_inputs

from .compiled import CompiledModel, _to_numpy, tensor_spec
from .report import Report


def combine_sample_outputs(outs: list) -> list[torch.Tensor]:
    """Per-sample eager outputs → batch leaves, as the host program combines them (combine_samples)."""
    flat = [pytree.tree_flatten(o)[0] for o in outs]
    return [torch.from_numpy(combine_samples([f[k].detach().numpy() for f in flat])) for k in range(len(flat[0]))]


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
            return pytree.tree_unflatten(combine_sample_outputs(outs), self._out_spec), markers
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
