"""CompiledModel: what ``fxpress.compile`` returns. Call it, inspect it, export it."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from torch import fx

from fxpress.errors import ArtifactError, InputError, TargetUnavailableError
from fxpress.runtime.loader import check_inputs

from .outputs import output_builder
from .report import Report


def tensor_spec(name: str, t: torch.Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}


def index_ranges(gm: fx.GraphModule) -> dict[int, tuple[int, int]]:
    """Integer inputs used directly as embedding indices → their valid range [0, rows - 1].

    TVM lowers an embedding to an unchecked gather: an index out of range reads out of bounds (a
    segfault, not an error), so the range is checked before any data reaches native code.
    """
    return {i: (0, rows - 1) for i, (rows, _) in _index_tables(gm).items()}


def _index_tables(gm: fx.GraphModule) -> dict[int, tuple[int, torch.Tensor | None]]:
    """Input position → (rows of the smallest embedding table it indexes directly, that table's weight)."""
    import torch.nn.functional as F

    found: dict[int, tuple[int, torch.Tensor | None]] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, ph in enumerate(placeholders):
        for u in ph.users:
            n, weight = None, None
            if u.op == "call_module" and isinstance(gm.get_submodule(u.target), torch.nn.Embedding) \
                    and u.args and u.args[0] is ph:
                emb = gm.get_submodule(u.target)
                n, weight = emb.num_embeddings, emb.weight
            elif u.op == "call_function" and u.target in (F.embedding, torch.ops.aten.embedding.default):
                idx, w = (u.args[0], u.args[1]) if u.target is F.embedding else (u.args[1], u.args[0])
                meta = w.meta.get("tensor_meta") if isinstance(w, fx.Node) else None
                if idx is ph and meta is not None:
                    n = int(meta.shape[0])
                    if w.op == "get_attr":
                        obj = gm
                        for part in str(w.target).split("."):
                            obj = getattr(obj, part, None)
                        weight = obj if isinstance(obj, torch.Tensor) else None
            if n is not None and (i not in found or n < found[i][0]):
                found[i] = (n, weight)
    return found


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            x = x.cpu()
        return x.detach().numpy()
    return np.asarray(x)


class CompiledModel:
    def __init__(self, *, gm: fx.GraphModule, report: Report, graphs: dict[str, fx.GraphModule], target: str,
                 example_inputs: tuple, reference: list[torch.Tensor], out_spec, executor, lowered=None,
                 passes: list[str] | None = None, trace_method: str = ""):
        self.gm = gm
        self.report = report
        self._graphs = graphs
        self.target = target
        self.example_inputs = example_inputs
        self.input_specs = [tensor_spec(f"input_{i}", t) for i, t in enumerate(example_inputs)]
        tables = _index_tables(graphs.get("trace", gm))
        for i, (rows, _) in tables.items():
            self.input_specs[i]["range"] = [0, rows - 1]  # checked at call time and by the runtime
        # the tables themselves, for export to link each range to its parameter (final graph's weights)
        final = _index_tables(gm)
        self.index_tables = {i: final[i][1].detach().cpu().numpy() for i in tables
                             if i in final and final[i][1] is not None and final[i][0] == tables[i][0]}
        self.output_specs = [tensor_spec(f"output_{i}", t) for i, t in enumerate(reference)]
        self._out_spec = out_spec
        self._executor = executor  # None: compiled for a device this machine lacks
        self._lowered = lowered  # target-specific build products, reused by export
        self.passes = passes or []
        self.trace_method = trace_method

    # ------------------------------------------------------------------ running
    def __call__(self, *inputs):
        arrays = self._exact_arrays(inputs)
        if arrays is not None:
            return self._run(arrays)
        for i, x in enumerate(inputs):
            if isinstance(x, torch.Tensor) and x.device.type != "cpu":
                name = self.input_specs[i]["name"] if i < len(self.input_specs) else f"input_{i}"
                raise InputError(
                    f"input {i} ('{name}') is on device {x.device}; this compiled model (target="
                    f"{self.target!r}) takes CPU tensors or numpy arrays and moves them to its own device. "
                    "Pass x.cpu().")
        if self.target == "torch":
            check_inputs(inputs, self.input_specs, convert=lambda x: x if isinstance(x, torch.Tensor) else torch.as_tensor(x))
            with torch.no_grad():
                return self.gm(*inputs)
        return self._run(check_inputs(inputs, self.input_specs, convert=_to_numpy))

    def _exact_arrays(self, inputs) -> list | None:
        """The fast path of a call (a few µs less per call, which is most of a small model's overhead):
        CPU tensors of exactly the compiled shapes and dtypes, no index range to check, as numpy views.
        None sends the call through check_inputs, which also writes the error messages."""
        if self.target == "torch" or self._executor is None:
            return None
        signature = self.__dict__.get("_signature")
        if signature is None:
            # dynamic_dims (set after __init__) only widen what check_inputs accepts; "range" is set in
            # __init__: an exact-shape match is always a valid call
            signature = self._signature = (
                False if any("range" in s for s in self.input_specs) else
                [(torch.Size(s["shape"]), getattr(torch, s["dtype"], None)) for s in self.input_specs])
        if signature is False or len(inputs) != len(signature):
            return None
        arrays = []
        for x, (shape, dtype) in zip(inputs, signature):
            if type(x) is not torch.Tensor or x.dtype is not dtype or x.shape != shape \
                    or x.device.type != "cpu" or x.requires_grad:
                return None
            arrays.append(x.numpy())
        return arrays

    def _run(self, arrays: list):
        if self._executor is None:
            raise TargetUnavailableError(
                f"this model was compiled for target={self.target!r}, which this machine cannot run "
                "(no CUDA GPU). Export it with cm.export(dir) and load it on a GPU machine, or compile with target='llvm'.")
        # executors hand back arrays the caller owns (zero-copy views on CPU TVM); copy only read-only ones
        outs = [torch.from_numpy(o if isinstance(o, np.ndarray) and o.flags.writeable else np.array(o))
                for o in self._executor.run(arrays)]
        build = self.__dict__.get("_build_outputs")
        if build is None:
            build = self._build_outputs = output_builder(self._out_spec)
        return build(outs)

    # ------------------------------------------------------------------ inspecting
    def graph(self, stage: str = "final") -> fx.GraphModule:
        """The fx.GraphModule after the named stage ('trace', a pass name, or 'final')."""
        if stage == "final":
            return self.gm
        if stage not in self._graphs:
            raise KeyError(f"no graph for stage {stage!r}; stages with graphs: {list(self._graphs)}")
        return self._graphs[stage]

    @property
    def stages(self) -> list[str]:
        return self.report.names()

    def html_report(self, path):
        """Write a self-contained HTML report (stages, diffs, graphs, IR) to ``path``; returns the path."""
        from .html_report import write_html_report
        return write_html_report(self, path)

    def __repr__(self) -> str:
        return f"CompiledModel(target={self.target!r}, passes={self.passes}, stages={self.stages})"

    # ------------------------------------------------------------------ exporting
    def export(self, path: str, backends: tuple[str, ...] = ("onnx", "tvm")) -> str:
        """Write model.onnx, tvm/ (library + params) and manifest.json into ``path``, atomically.

        The directory appears complete or not at all: everything is written to a sibling temp dir
        and renamed into place; a previous artifact at ``path`` survives a failed export.
        """
        from .export import write_artifact

        return write_artifact(self, path, backends)
