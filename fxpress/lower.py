"""Target dispatch: turn the final FX graph into something that runs (TVM VM, ORT session, eager)."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import fx

from fxpress.errors import LoweringError
from fxpress.passes.manager import StageRecord, output_error, run_graph
from fxpress.passes.stats import count_params, graph_costs
from fxpress.passes.trace import LOSSLESS_RTOL

from .divergence import locate_divergence

TARGETS = ("llvm", "cuda", "onnx", "torch")


@dataclass
class TVMBuild:
    relax: "object"  # fxpress.lowering.RelaxModule
    built: "object"  # fxpress.codegen.BuiltModule
    target: str


def build_tvm(gm: fx.GraphModule, example_inputs: tuple, target: str, tune: int = 0,
              tune_options: dict | None = None) -> TVMBuild:
    from fxpress.codegen import build
    from fxpress.lowering import to_relax

    relax_mod = to_relax(gm, example_inputs)
    # num_input lets the build lift weight-only work (transposes, BN scales) out of every call
    relax_mod.mod["main"] = relax_mod.mod["main"].with_attr("num_input", relax_mod.num_inputs)
    if tune:
        from fxpress.codegen import tune as tune_module

        built = tune_module(relax_mod.mod, target, trials=tune, **(tune_options or {}))
    else:
        built = build(relax_mod.mod, target)
    if built.param_transform is not None:
        relax_mod.params = built.transform_params(relax_mod.params)
        relax_mod.param_names = [f"transformed_{i}" for i in range(len(relax_mod.params))]
    return TVMBuild(relax=relax_mod, built=built, target=target)


def lower(gm: fx.GraphModule, example_inputs: tuple, target: str, reference: list[torch.Tensor],
          tune: int = 0, tune_options: dict | None = None, tolerance: float | None = None):
    """Returns (executor or None, build products or None, StageRecord for the lowering stage).

    Lowering claims to be lossless: the lowered model's outputs must match the FX graph it lowers
    within fp32 noise (LOSSLESS_RTOL) on the example inputs, and, with ``tolerance``, eager PyTorch
    within the tolerance. Otherwise LoweringError names the first node whose value diverges and
    what to try; a report never says "ok" beside a wrong number.
    """
    t0 = time.perf_counter()
    lowered = None
    ir = None
    extra: dict = {}
    note = ""
    if target in ("llvm", "cuda"):
        lowered = build_tvm(gm, example_inputs, target, tune, tune_options)
        from fxpress.codegen import gpu_available
        from fxpress.runtime.backends import TVMExecutor

        ir = lowered.relax.ir_text
        extra["ir_after"] = dict(getattr(lowered.built, "ir_after", {}) or {})
        if target == "cuda" and not gpu_available():
            executor = None
            note = "CUDA code built; not executed (no GPU on this machine)"
        else:
            executor = TVMExecutor.from_built(lowered.built.executable, lowered.relax.params,
                                              "cuda" if target == "cuda" else "cpu")
    elif target == "onnx":
        from fxpress.lowering import to_onnx
        from fxpress.runtime.backends import ORTExecutor

        # The session is built from bytes: nothing stays behind in a temp dir.
        with tempfile.TemporaryDirectory(prefix="fxpress-onnx-") as tmp:
            model = to_onnx(gm, example_inputs, os.path.join(tmp, "model.onnx"))
            with open(model.path, "rb") as f:
                data = f.read()
            ir = _onnx_text(model.path)
        executor = ORTExecutor(data)
        lowered = None
    else:  # torch: the FX graph itself runs
        executor = None
    seconds = time.perf_counter() - t0
    params, param_bytes = count_params(gm)  # the same count as the trace and pass records
    macs, mults = graph_costs(gm)
    record = StageRecord(name=f"lower:{target}", kind="lowering", status="ok", params=params,
                         param_bytes=param_bytes,
                         macs=macs, multiplies=mults, nodes=len(gm.graph.nodes), seconds=seconds, note=note,
                         ir=ir, extra=extra)
    if target == "torch":
        executor = _TorchExecutor(gm)
    if executor is not None:
        outs = _run_executor(executor, example_inputs)
        record.max_abs_error, record.max_rel_error = output_error(outs, reference)
        graph_outs = run_graph(gm, example_inputs)
        _, lowering_error = output_error(outs, graph_outs)
        record.extra["lowering_rel_error"] = lowering_error
        if lowering_error > LOSSLESS_RTOL:
            where = locate_divergence(gm, example_inputs, target, lambda g: _lower_for_probe(g, example_inputs, target))
            raise LoweringError(
                f"lowering to {target!r} changed the numbers: its outputs differ from the FX graph's by relative "
                f"error {lowering_error:.3g} on the example inputs (fp32 noise is {LOSSLESS_RTOL:g}), so fxpress "
                f"refuses to return it.\n{where}"
                f"What to do: compile with another target (target='onnx' or 'torch'), try passes='none' to "
                "lower the traced graph as is, or replace the op named above in the model.")
        if tolerance is not None and record.max_rel_error > tolerance:
            raise LoweringError(
                f"the lowered model's error against eager PyTorch is {record.max_rel_error:.3g}, above "
                f"tolerance={tolerance:g} (the lowering itself adds {lowering_error:.3g}; the rest comes from the "
                "passes). What to do: raise tolerance, or drop lossy passes (passes='none' or ['fuse']).")
    else:
        record.max_abs_error = record.max_rel_error = None
        record.status = "unchecked"
        record.note = (note + "; " if note else "") + "outputs not compared with eager (not run here)"
    if target == "torch":
        executor = None  # CompiledModel runs the graph directly on tensors
    return executor, lowered, record


def _run_executor(executor, example_inputs: tuple) -> list[torch.Tensor]:
    import numpy as np

    outs = executor.run([x.detach().cpu().numpy().copy() for x in example_inputs])
    return [torch.from_numpy(np.array(o)) for o in outs]


def _lower_for_probe(gm: fx.GraphModule, example_inputs: tuple, target: str):
    """Lower ``gm`` the way ``lower`` does (no tuning) and return its outputs on the example inputs."""
    if target in ("llvm", "cuda"):
        from fxpress.runtime.backends import TVMExecutor

        built = build_tvm(gm, example_inputs, target)
        executor = TVMExecutor.from_built(built.built.executable, built.relax.params,
                                          "cuda" if target == "cuda" else "cpu")
    elif target == "onnx":
        from fxpress.lowering import to_onnx
        from fxpress.runtime.backends import ORTExecutor

        with tempfile.TemporaryDirectory(prefix="fxpress-onnx-") as tmp:
            model = to_onnx(gm, example_inputs, os.path.join(tmp, "model.onnx"))
            with open(model.path, "rb") as f:
                executor = ORTExecutor(f.read())
    else:
        executor = _TorchExecutor(gm)
    return _run_executor(executor, example_inputs)


class _TorchExecutor:
    def __init__(self, gm):
        self.gm = gm

    def run(self, inputs):
        from fxpress.passes.graph import flatten_outputs

        with torch.no_grad():
            return [t.numpy() for t in flatten_outputs(self.gm(*[torch.from_numpy(x) for x in inputs]))]


def _onnx_text(path: str) -> str:
    import onnx

    try:
        return onnx.printer.to_text(onnx.load(path, load_external_data=False).graph)
    except Exception:  # noqa: BLE001 - text form is informative only
        return ""
