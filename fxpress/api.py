"""``fxpress.compile``: trace → passes → lowering → a CompiledModel, with a report of every stage."""
from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from fxpress.errors import InputError, TraceError
from fxpress.passes import (PassContext, PassManager, Pass, resolve_passes, run_graph, snapshot, trace)

from .compiled import CompiledModel
from .lower import TARGETS, lower
from .report import Report


def _as_input_tuple(example_inputs, what: str = "example_inputs") -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise InputError(f"{what} must be a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{what}[{i}] must be a torch.Tensor, got {type(x).__name__}; "
                             "fxpress compiles tensor inputs only (bake other arguments into the module)")
        if x.device.type != "cpu":
            raise InputError(f"{what}[{i}] is on {x.device}; pass CPU tensors (fxpress places the compiled model itself)")
        if x.numel() == 0:  # TVM's schedules fail on empty tensors with a page of IR
            raise InputError(f"{what}[{i}] has shape {tuple(x.shape)}, no elements; pass at least one sample "
                             "(e.g. batch 1): a compiled model takes the shapes of its example inputs")
    return tuple(example_inputs)


def _check_calibration(calibration: Iterable | None, example: tuple[torch.Tensor, ...]) -> list[tuple] | None:
    if calibration is None:
        return None
    batches = []
    for b, batch in enumerate(calibration):
        batch = _as_input_tuple(batch, f"calibration[{b}]")
        if len(batch) != len(example):
            raise InputError(f"calibration[{b}] has {len(batch)} input(s); the model takes {len(example)}")
        for i, (x, e) in enumerate(zip(batch, example)):
            if x.dtype != e.dtype or tuple(x.shape[1:]) != tuple(e.shape[1:]):
                raise InputError(
                    f"calibration[{b}][{i}] has shape {tuple(x.shape)} dtype {x.dtype}; expected [N, "
                    f"{', '.join(map(str, e.shape[1:]))}] dtype {e.dtype} (like example_inputs[{i}], any batch size)")
        batches.append(batch)
    if not batches:
        raise InputError("calibration is empty; pass at least one input tuple or None")
    return batches


def compile(  # noqa: A001 - the public name the contract fixes
    model: nn.Module,
    example_inputs,
    passes: str | Sequence[str | Pass] | None = "default",
    target: str = "llvm",
    tune: int = 0,
    calibration: Iterable | None = None,
    tolerance: float | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> CompiledModel:
    """Compile ``model`` for ``target``; see docs/DESIGN.md for the stages.

    passes:      "default" | "none" | list of pass names or Pass objects (run in the given order)
    target:      "llvm" (CPU via TVM) | "cuda" (GPU via TVM) | "onnx" (ONNX Runtime) | "torch" (eager FX)
    tune:        MetaSchedule trials for TVM targets; 0 uses default schedules
    calibration: iterable of input tuples for passes that use data (quantize, activation-aware low rank)
    tolerance:   max relative output error allowed per pass; a pass that exceeds it is rolled back
    options:     per-pass options, e.g. {"low_rank": {"method": "svd", "energy": 0.99}}
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}; wrap functions in an nn.Module")
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if tolerance is not None and not tolerance > 0:
        raise InputError(f"tolerance must be a positive number (relative output error), got {tolerance!r}")
    if not isinstance(tune, int) or tune < 0:
        raise InputError(f"tune must be a non-negative number of MetaSchedule trials, got {tune!r}")
    example_inputs = _as_input_tuple(example_inputs)
    calib = _check_calibration(calibration, example_inputs)
    pass_list = resolve_passes(passes)  # unknown names fail before any slow work
    model = model.eval()
    dynamic = dict(target=target, tune=tune, calibration=calib, tolerance=tolerance, options=options)
    if any(p.name == "split_branches" for p in pass_list):  # data-dependent control flow: fxpress/dynamic.py
        from .dynamic import maybe_compile_dynamic

        split = maybe_compile_dynamic(model, example_inputs, pass_list, **dynamic)
        if split is not None:
            return split

    with torch.no_grad():
        original_out = model(*example_inputs)
    leaves, out_spec = torch.utils._pytree.tree_flatten(original_out)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise InputError("the model's output must be a tensor or a (nested) tuple/list/dict of tensors")
    reference = [t.detach() for t in leaves]

    t0 = time.perf_counter()
    try:
        traced = trace(model, example_inputs)
    except TraceError as e:
        if passes != "default":
            raise
        from .dynamic import compile_dynamic

        return compile_dynamic(model, example_inputs, pass_list, reason=f"whole-model tracing failed: {e}", **dynamic)
    trace_record = snapshot("trace", "trace", traced.gm, reference, example_inputs,
                            seconds=time.perf_counter() - t0,
                            note=f"traced with {traced.method}" + (f" ({traced.fallback_reason})" if traced.fallback_reason else ""))

    ctx = PassContext(example_inputs=example_inputs, calibration=calib, options=dict(options or {}),
                      target=target, tolerance=tolerance, reference_outputs=reference)
    outcome = PassManager(pass_list, tolerance=tolerance).run(traced.gm, ctx, reference, trace_record)

    executor, lowered, lower_record = lower(outcome.gm, example_inputs, target, reference, tune=tune,
                                            tune_options=ctx.options_for("tune"))
    records = outcome.records + [lower_record]
    return CompiledModel(gm=outcome.gm, report=Report(records), graphs=outcome.graphs, target=target,
                         example_inputs=example_inputs, reference=reference, out_spec=out_spec,
                         executor=executor, lowered=lowered, passes=[p.name for p in pass_list],
                         trace_method=traced.method)
