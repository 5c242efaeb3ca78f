"""Target dispatch: turn the final FX graph into something that runs (TVM VM, ORT session, eager)."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx

from fxpress.errors import LoweringError
from fxpress.passes.instruments import ErrorMeter, Instrument, Stats, Timer, observe
from fxpress.passes.measure import output_error
from fxpress.passes.record import Stage, run_graph
from fxpress.passes.trace import LOSSLESS_RTOL

from .divergence import locate_divergence

TARGETS = ("llvm", "cuda", "onnx", "torch")


@dataclass
class TVMBuild:
    relax: "object"  # fxpress.lowering.RelaxModule
    built: "object"  # fxpress.codegen.BuiltModule
    target: str


def build_tvm(gm: fx.GraphModule, example_inputs: tuple, target: str, tune: int = 0,
              tune_options: dict | None = None, dynamic_batch: bool = False) -> TVMBuild:
    from fxpress.codegen import build
    from fxpress.lowering import to_relax

    relax_mod = to_relax(gm, example_inputs, dynamic_batch=dynamic_batch, check_indices=target != "cuda")
    # num_input lets the build lift weight-only work (transposes, BN scales) out of every call
    relax_mod.mod["main"] = relax_mod.mod["main"].with_attr("num_input", relax_mod.num_inputs)
    if tune:
        from fxpress.codegen import tune as tune_module

        built = tune_module(relax_mod.mod, target, trials=tune, **(tune_options or {}))
    else:
        built = build(relax_mod.mod, target)
    # the build's own weights: to_relax's params may be views of the model's tensors
    relax_mod.params = built.transform_params(relax_mod.params)
    if built.param_transform is not None:
        relax_mod.param_names = [f"transformed_{i}" for i in range(len(relax_mod.params))]
    return TVMBuild(relax=relax_mod, built=built, target=target)


def lower(gm: fx.GraphModule, example_inputs: tuple, target: str, reference: list[torch.Tensor],
          tune: int = 0, tune_options: dict | None = None, tolerance: float | None = None,
          dynamic_batch: bool | None = None, instruments: Sequence[Instrument] = ()):
    """Returns (executor or None, build products or None, StageRecord for the lowering stage).

    Lowering claims to be lossless: the lowered model's outputs must match the FX graph it lowers
    within fp32 noise (LOSSLESS_RTOL) on the example inputs, and, with ``tolerance``, eager PyTorch
    within the tolerance. Otherwise LoweringError names the first node whose value diverges and
    what to try; a report never says "ok" beside a wrong number.

    ``dynamic_batch``: capture dim 0 of the inputs as a symbolic batch so one compile serves any batch
    size. None (the default) means yes on onnx (unless passes put fxpress ops in the graph: ONNX
    Runtime fuses their int8 translations only with static shapes) and no on llvm/cuda: TVM's default CPU schedules are
    far slower on symbolic shapes (a depthwise CNN ran ~15x slower), so TVM targets ask for it with
    ``options={"lower": {"dynamic_batch": True}}``. The result is checked at a second batch size too; where the graph
    fixes the batch (or the check fails) the example's batch is compiled and the note says why.
    ``record.extra["dynamic_batch"]`` says which was built. ``instruments``: extra observers of the stage.
    """
    stage = Stage(f"lower:{target}", "lowering", example_inputs, reference, graph=gm)
    instruments = [Timer(), Stats(), ErrorMeter(), LoweringCheck(target, tolerance), *instruments]
    record, (executor, lowered) = observe(
        stage, instruments, lambda s: _lower_stage(s, target, tune, tune_options, dynamic_batch))
    if target == "torch":
        executor = None  # CompiledModel runs the graph directly on tensors
    return executor, lowered, record


def _lower_stage(stage: Stage, target: str, tune: int, tune_options: dict | None, dynamic_batch: bool | None):
    """The lowering stage's body: build for ``target`` (one symbolic batch where asked and possible);
    (executor or None, build products or None)."""
    gm, example_inputs = stage.graph, stage.example_inputs
    if dynamic_batch is None:
        from fxpress.lowering.to_onnx import has_fxpress_ops

        dynamic_batch = target == "onnx" and not has_fxpress_ops(gm)
    batch_note = ""
    built = None
    if dynamic_batch and tune:  # MetaSchedule tunes for one shape
        batch_note = f"batch fixed at {batch_size(example_inputs)} (tuned for that shape)"
    elif dynamic_batch and target in ("llvm", "cuda", "onnx") and batch_size(example_inputs) is not None:
        try:
            built = _lower_once(gm, example_inputs, target, tune, tune_options, dynamic=True)
            _check_other_batch(gm, example_inputs, built[0])
        except Exception as e:  # noqa: BLE001 - the graph fixes the batch, or a kernel needs static shapes
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            batch_note = (f"batch fixed at {batch_size(example_inputs)} (one symbolic batch did not lower: "
                          f"{type(e).__name__}: {reason[:200]}); calls with another batch size are refused")
            built = None
    if built is None:
        built = _lower_once(gm, example_inputs, target, tune, tune_options, dynamic=False)
        dynamic = False
    else:
        dynamic = True
    executor, lowered, ir, extra, note = built
    extra["dynamic_batch"] = dynamic
    if batch_note:
        note = f"{note}; {batch_note}" if note else batch_note
    elif dynamic:
        note = (f"{note}; " if note else "") + "batch is dynamic: one compile serves any batch size"
    if target == "torch":
        executor = _TorchExecutor(gm)
    stage.ir, stage.extra, stage.note = ir, extra, note
    if executor is not None:
        stage.run_outputs = lambda: _run_executor(executor, example_inputs)
    else:
        stage.checked = False
        stage.status = "unchecked"
        stage.note = (note + "; " if note else "") + "outputs not compared with eager (not run here)"
    return executor, lowered


class LoweringCheck(Instrument):
    """Lowering claims to be lossless: the lowered outputs must match the FX graph's within fp32 noise
    (or, for a quantized graph, within the passes' own error: ties may round the other way), and with a
    tolerance eager PyTorch's within it. Otherwise LoweringError names the first diverging node."""

    def __init__(self, target: str, tolerance: float | None):
        self.target, self.tolerance = target, tolerance

    def after(self, stage: Stage) -> None:
        if not stage.checked:
            return
        gm, example_inputs, target = stage.graph, stage.example_inputs, self.target
        graph_outs = stage.graph_outputs(gm)
        _, lowering_error = output_error(stage.outputs(), graph_outs)
        stage.extra["lowering_rel_error"] = lowering_error
        allowed = _allowed_lowering_drift(gm, graph_outs, stage.reference)
        error = stage.measured["max_rel_error"]
        if lowering_error > LOSSLESS_RTOL and lowering_error <= allowed:
            # Rounding ties the other way gives a model as good as the graph, not a worse one: the lowered
            # outputs must stay within the quantization's own scale of eager (twice the graph's error: which
            # ties flip decides which of the two lands closer; a broken lowering is off by far more).
            graph_error = output_error(graph_outs, stage.reference)[1]
            if error > max(LOSSLESS_RTOL, 2 * graph_error):
                allowed = LOSSLESS_RTOL
            else:
                stage.note = ((stage.note + "; ") if stage.note else "") + (
                    f"differs from the FX graph by {lowering_error:.3g}: quantized values rounded the other way "
                    f"at ties (its error against eager, {error:.3g}, is within twice the FX graph's own, "
                    f"{graph_error:.3g})")
        if lowering_error > allowed:
            where = locate_divergence(gm, example_inputs, target, lambda g: _lower_for_probe(g, example_inputs, target))
            raise LoweringError(
                f"lowering to {target!r} changed the numbers: its outputs differ from the FX graph's by relative "
                f"error {lowering_error:.3g} on the example inputs (fp32 noise is {LOSSLESS_RTOL:g}), so fxpress "
                f"refuses to return it.\n{where}"
                f"What to do: compile with another target (target='onnx' or 'torch'), try passes='none' to "
                "lower the traced graph as is, or replace the op named above in the model.")
        if self.tolerance is not None and error > self.tolerance:
            raise LoweringError(
                f"the lowered model's error against eager PyTorch is {error:.3g}, above "
                f"tolerance={self.tolerance:g} (the lowering itself adds {lowering_error:.3g}; the rest comes from the "
                "passes). What to do: raise tolerance, or drop lossy passes (passes='none' or ['fuse']).")


def _lower_once(gm: fx.GraphModule, example_inputs: tuple, target: str, tune: int, tune_options, dynamic: bool):
    """(executor or None, build products or None, IR text, extra, note) for one lowering."""
    lowered = None
    ir = None
    extra: dict = {}
    note = ""
    executor = None
    if target in ("llvm", "cuda"):
        lowered = build_tvm(gm, example_inputs, target, tune, tune_options, dynamic_batch=dynamic)
        from fxpress.codegen import gpu_available
        from fxpress.runtime.backends import TVMExecutor

        ir = lowered.relax.ir_text
        extra["ir_after"] = dict(getattr(lowered.built, "ir_after", {}) or {})
        if target == "cuda" and not gpu_available():
            note = "CUDA code built; not executed (no GPU on this machine)"
        else:
            executor = TVMExecutor.from_built(lowered.built.executable, lowered.relax.params,
                                              "cuda" if target == "cuda" else "cpu")
    elif target == "onnx":
        from fxpress.lowering import to_onnx
        from fxpress.runtime.backends import ORTExecutor

        # The session is built from bytes: nothing stays behind in a temp dir.
        with tempfile.TemporaryDirectory(prefix="fxpress-onnx-") as tmp:
            model = to_onnx(gm, example_inputs, os.path.join(tmp, "model.onnx"), dynamic_batch=dynamic)
            with open(model.path, "rb") as f:
                data = f.read()
            ir = _onnx_text(model.path)
        executor = ORTExecutor(data)
    return executor, lowered, ir, extra, note


def batch_size(example_inputs: tuple) -> int | None:
    """The shared size of dim 0 of every input, or None when the inputs have none in common."""
    sizes = {int(x.shape[0]) for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0}
    if len(sizes) != 1 or any(isinstance(x, torch.Tensor) and x.dim() == 0 for x in example_inputs):
        return None
    return sizes.pop()


def rebatch(example_inputs: tuple, size: int) -> tuple:
    """The example inputs cycled along dim 0 to ``size`` rows (index inputs keep their valid values)."""
    b = batch_size(example_inputs)
    rows = [i % b for i in range(size)]
    return tuple(x[rows].clone() for x in example_inputs)


def _quantizes(gm: fx.GraphModule) -> bool:
    """Whether the graph rounds values to an integer grid (fxpress's quantize ops): backends may round a
    value that sits on a rounding boundary (within fp32 noise of it) the other way, one grid step."""
    def op_name(n) -> str:  # "qlinear" for torch.ops.fxpress.qlinear.default
        schema = getattr(n.target, "_schema", None)
        return schema.name.split("::")[-1] if schema is not None else ""

    return any(n.op == "call_function" and str(getattr(n.target, "namespace", "")) == "fxpress"
               and (op_name(n).startswith("q") or "quant" in op_name(n)) for n in gm.graph.nodes)


def _allowed_lowering_drift(gm: fx.GraphModule, graph_outs, reference) -> float:
    """How far a lowering may differ from its FX graph: fp32 noise; for a quantized graph, three times the
    error the passes already added against eager. A tie rounded the other way moves a value one grid step,
    so the graph and the lowering each land within the quantization's error of eager, possibly on opposite
    sides: with the lowering held to twice the graph's error against eager (LoweringCheck), the two can be
    that error plus twice it apart (BERT-style int8 on an Intel Xeon: graph 1.4e-3 and lowering 2.0e-3 from
    eager, 3.3e-3 apart; one-ulp differences in torch's and TVM's fp32 GELU/softmax flipped u8 codes)."""
    if not _quantizes(gm):
        return LOSSLESS_RTOL
    _, pass_error = output_error(graph_outs, reference)
    return max(LOSSLESS_RTOL, 3 * pass_error)


def _check_other_batch(gm: fx.GraphModule, example_inputs: tuple, executor) -> None:
    """A dynamic-batch build must also match the graph at another batch size (the example's is checked
    later); raises when it does not, so the caller builds for the example's batch instead."""
    if executor is None:
        return
    other = rebatch(example_inputs, batch_size(example_inputs) + 1)
    _, err = output_error(_run_executor(executor, other), run_graph(gm, other))
    if err > LOSSLESS_RTOL:
        raise LoweringError(f"with a symbolic batch the lowered model is off by {err:.3g} at batch {other[0].shape[0]}")


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
            model = to_onnx(gm, example_inputs, os.path.join(tmp, "model.onnx"), dynamic_batch=False)
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


_TENSOR_DATA = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def _onnx_text(path: str) -> str:
    """The ONNX graph as text, each initializer by type and shape only: the printer writes every value of
    every weight, a text ~3x the model's bytes that the report would keep (issue #19)."""
    import onnx

    try:
        graph = onnx.load(path, load_external_data=False).graph
        for t in graph.initializer:
            for name in _TENSOR_DATA:
                t.ClearField(name)
        return onnx.printer.to_text(graph)
    except Exception:  # noqa: BLE001 - text form is informative only
        return ""
