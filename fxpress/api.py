"""``fxpress.compile``: check the arguments, pick the front end, trace, then the one compile path
(fxpress/pipeline.py: passes → lowering → a CompiledModel), with a report of every stage."""
from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from fxpress.errors import InputError, TraceError, UnknownPassError
from fxpress.frontends import FRONT_ENDS
from fxpress.passes import Pass, resolve_passes, snapshot, trace
from fxpress.passes.trace import clone_inputs, copy_module

from .compiled import CompiledModel
from .lower import TARGETS
from .pipeline import CompileSettings, compile_graph


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


def _pick_front_ends(passes):
    """(front-end names in ``passes``, the rest of ``passes`` for resolve_passes). A front end
    (fxpress.frontends) is named like a pass but runs ahead of tracing, wherever it is listed."""
    if passes is None or passes in ("none", "default", "auto") or not isinstance(passes, (str, list, tuple)):
        return [], passes
    items = [s.strip() for s in passes.split(",") if s.strip()] if isinstance(passes, str) else list(passes)
    named = [p for p in items if isinstance(p, str) and p in FRONT_ENDS]
    dup = sorted({n for n in named if named.count(n) > 1})
    if dup:
        raise UnknownPassError(f"pass(es) {dup} listed more than once; each pass runs once per pipeline")
    return named, [p for p in items if not (isinstance(p, str) and p in FRONT_ENDS)]


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

    passes:      "default" | "none" | list of pass names or Pass objects (run in the given order);
                 "split_branches" in the list selects that front end (data-dependent control flow, runs
                 ahead of every pass: docs/passes/split_branches.md)
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
    front_ends, pass_names = _pick_front_ends(passes)
    try:
        pass_list = resolve_passes(pass_names)  # unknown names fail before any slow work
    except UnknownPassError as e:
        if not str(e).startswith("unknown pass"):
            raise
        raise UnknownPassError(f"{e} Front ends, also named in passes=: {', '.join(FRONT_ENDS)}.") from None
    # compile() is pure for the caller: it works on a copy of the model (buffers a forward updates,
    # train/eval mode) and of the example inputs (a forward may update them in place).
    came_training = model.training
    model = _private_copy(model).eval()
    example_inputs = clone_inputs(example_inputs)
    settings = CompileSettings(target=target, tune=tune, tolerance=tolerance, options=dict(options or {}))
    split_seconds = None
    if "split_branches" in front_ends:  # data-dependent control flow: fxpress/dynamic.py
        from .dynamic import maybe_compile_dynamic

        t0 = time.perf_counter()
        split = maybe_compile_dynamic(model, example_inputs, pass_list, settings, calibration=calib)
        if split is not None:
            return split
        split_seconds = time.perf_counter() - t0

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

        return compile_dynamic(model, example_inputs, pass_list, settings, calibration=calib,
                               reason=f"whole-model tracing failed: {e}")
    note = f"traced with {traced.method}" + (f" ({traced.fallback_reason})" if traced.fallback_reason else "")
    if came_training:
        note += ("; the model came in training mode: compiled in eval mode (dropout off, BatchNorm on running "
                 "statistics); your model's mode is unchanged")
    stages = [snapshot("trace", "trace", traced.gm, reference, example_inputs,
                       seconds=time.perf_counter() - t0, note=note)]
    if split_seconds is not None:
        from .dynamic import unsplit_record

        stages.append(unsplit_record(stages[0], split_seconds))
    return compile_graph(traced.gm, example_inputs, reference, out_spec, pass_list, settings, stages=stages,
                         trace_method=traced.method, calibration=calib, front_ends=front_ends)
