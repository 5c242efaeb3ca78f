"""``fxpress.compile``: trace → passes → lowering → a CompiledModel, with a report of every stage."""
from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from fxpress.errors import InputError, TraceError
from fxpress.passes import (PassContext, PassManager, Pass, resolve_passes, run_graph, snapshot, trace)
from fxpress.passes.trace import clone_inputs, copy_module

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


def _private_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that shares its parameters' storage (compile never writes into them: passes
    replace what they change, and WeightGuard stops one that writes in place) but copies its buffers and
    modules; the model itself when it cannot be copied (then its buffers and mode are still the caller's:
    the traced graph shares them)."""
    try:
        return copy_module(model, share_parameters=True)
    except Exception:  # noqa: BLE001 - un-copyable attributes (locks, handles): fall back to sharing
        return model


def _dynamic_batch_option(opts: dict) -> bool | None:
    """``options={"lower": {"dynamic_batch": bool}}``; None leaves the target's default (fxpress.lower)."""
    unknown = set(opts) - {"dynamic_batch"}
    if unknown:
        raise InputError(f"unknown option(s) {sorted(unknown)} for 'lower'; it takes 'dynamic_batch' (True/False)")
    value = opts.get("dynamic_batch")
    if value is not None and not isinstance(value, bool):
        raise InputError(f"options['lower']['dynamic_batch'] must be True or False, got {value!r}")
    return value


def compile(  # noqa: A001 - the public name the contract fixes
    model: nn.Module,
    example_inputs,
    passes: str | Sequence[str | Pass] | None = "default",
    target: str = "llvm",
    tune: int = 0,
    calibration: Iterable | None = None,
    tolerance: float | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    evaluate=None,
    max_drop: float | None = None,
    objective: str = "latency",
) -> CompiledModel:
    """Compile ``model`` for ``target``; see docs/DESIGN.md for the stages.

    passes:      "default" | "none" | list of pass names or Pass objects (run in the given order)
    target:      "llvm" (CPU via TVM) | "cuda" (GPU via TVM) | "onnx" (ONNX Runtime) | "torch" (eager FX)
    tune:        MetaSchedule trials for TVM targets; 0 uses default schedules
    calibration: iterable of input tuples for passes that use data (quantize, activation-aware low rank)
    tolerance:   max relative output error allowed per pass; a pass that exceeds it is rolled back
    options:     per-pass options, e.g. {"low_rank": {"method": "svd", "energy": 0.99}}; "lower":
                 {"dynamic_batch": True} compiles one symbolic batch on llvm/cuda (onnx does by default)
    evaluate, max_drop, objective: passes="auto" only, the per-layer search (fxpress/auto, docs/auto.md)
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
    from .auto.driver import check_auto_arguments, compile_auto
    check_auto_arguments(passes, evaluate, max_drop, objective)
    if passes == "auto":
        return compile_auto(model, example_inputs, evaluate=evaluate, max_drop=max_drop, objective=objective,
                            target=target, tune=tune, calibration=calib, tolerance=tolerance, options=options)
    pass_list = resolve_passes(passes)  # unknown names fail before any slow work
    # compile() is pure for the caller: it works on a copy of the model (buffers a forward updates,
    # train/eval mode) and of the example inputs (a forward may update them in place).
    came_training = model.training
    model = _private_copy(model).eval()
    example_inputs = clone_inputs(example_inputs)
    dynamic = dict(target=target, tune=tune, calibration=calib, tolerance=tolerance, options=options)
    if any(p.name == "split_branches" for p in pass_list):  # data-dependent control flow: fxpress/dynamic.py
        from .dynamic import maybe_compile_dynamic

        split = maybe_compile_dynamic(model, example_inputs, pass_list, **dynamic)
        if split is not None:
            return split

    with torch.no_grad():
        original_out = model(*clone_inputs(example_inputs))
    leaves, out_spec = torch.utils._pytree.tree_flatten(original_out)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        odd = sorted({type(t).__name__ for t in leaves if not isinstance(t, torch.Tensor)})
        raise InputError("the model's output must be a tensor or a (nested) tuple/list/dict of tensors; it also "
                         f"returns {', '.join(odd) or 'nothing'}. What to do: wrap the model so forward returns "
                         "tensors only (for transformers models, config.use_cache=False drops the KV cache)")
    reference = [t.detach() for t in leaves]

    t0 = time.perf_counter()
    try:
        traced = trace(model, example_inputs, reference)
    except TraceError as e:
        if passes != "default":
            raise
        from .dynamic import compile_dynamic

        return compile_dynamic(model, example_inputs, pass_list, reason=f"whole-model tracing failed: {e}", **dynamic)
    note = f"traced with {traced.method}" + (f" ({traced.fallback_reason})" if traced.fallback_reason else "")
    if came_training:
        note += ("; the model came in training mode: compiled in eval mode (dropout off, BatchNorm on running "
                 "statistics); your model's mode is unchanged")
    trace_record = snapshot("trace", "trace", traced.gm, reference, example_inputs,
                            seconds=time.perf_counter() - t0, note=note)

    ctx = PassContext(example_inputs=example_inputs, calibration=calib, options=dict(options or {}),
                      target=target, tolerance=tolerance, reference_outputs=reference)
    outcome = PassManager(pass_list, tolerance=tolerance).run(traced.gm, ctx, reference, trace_record)

    executor, lowered, lower_record = lower(outcome.gm, example_inputs, target, reference, tune=tune,
                                            tune_options=ctx.options_for("tune"), tolerance=tolerance,
                                            dynamic_batch=_dynamic_batch_option(ctx.options_for("lower")))
    records = outcome.records + [lower_record]
    cm = CompiledModel(gm=outcome.gm, report=Report(records), graphs=outcome.graphs, target=target,
                         example_inputs=example_inputs, reference=reference, out_spec=out_spec,
                         executor=executor, lowered=lowered, passes=[p.name for p in pass_list],
                         trace_method=traced.method)
    if lower_record.extra.get("dynamic_batch"):
        for spec in cm.input_specs:  # recorded in the manifest; check_inputs accepts any size there
            spec["dynamic_dims"] = [0]
    return cm
