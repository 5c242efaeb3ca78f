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

from .report import Report


def tensor_spec(name: str, t: torch.Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}


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
        self.output_specs = [tensor_spec(f"output_{i}", t) for i, t in enumerate(reference)]
        self._out_spec = out_spec
        self._executor = executor  # None: compiled for a device this machine lacks
        self._lowered = lowered  # target-specific build products, reused by export
        self.passes = passes or []
        self.trace_method = trace_method

    # ------------------------------------------------------------------ running
    def __call__(self, *inputs):
        if self.target == "torch":
            check_inputs(inputs, self.input_specs, convert=lambda x: x if isinstance(x, torch.Tensor) else torch.as_tensor(x))
            with torch.no_grad():
                return self.gm(*inputs)
        arrays = check_inputs(inputs, self.input_specs, convert=_to_numpy)
        if self._executor is None:
            raise TargetUnavailableError(
                f"this model was compiled for target={self.target!r}, which this machine cannot run "
                "(no CUDA GPU). Export it with cm.export(dir) and load it on a GPU machine, or compile with target='llvm'.")
        outs = [torch.from_numpy(np.array(o)) for o in self._executor.run(arrays)]
        return torch.utils._pytree.tree_unflatten(outs, self._out_spec)

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
