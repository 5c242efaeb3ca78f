"""compile_auto: baseline -> estimates -> costs -> search -> the chosen configuration, compiled."""
from __future__ import annotations

import copy
import math
import numbers
import sys
import time
import warnings
from typing import Any, Callable

import torch

from fxpress.errors import InputError
from fxpress.passes import PassContext, StageRecord, copy_graph_module, get_pass, trace
from fxpress.passes.trace import clone_inputs

from .candidates import FP32, TECHNIQUES, Candidate, Layer, build_passes, find_layers
from .latency_table import LatencyTable, layer_inputs
from .report import AutoReport
from .search import Costs, Tried, search
from .sensitivity import estimate_all

OBJECTIVES = ("latency", "size")
# options={"auto": {...}}: the search's own knobs.
AUTO_OPTIONS = {
    "time_s": "wall-clock bound of the search (estimates + evaluations), default 180",
    "max_evaluations": "evaluate() calls the search may make besides the baseline and the final check, default 12",
    "techniques": f"subset of {list(TECHNIQUES)} (default all)",
    "calibration_batches": "calibration batches used for the estimates, default 4",
    "max_layer_error": "candidates whose single-layer squared relative output error exceeds this are not tried, default 0.02 (a relative L2 error of ~14 %)",
    "latency_cache": "path of the latency table's JSON cache (default $FXPRESS_CACHE_DIR or ~/.cache/fxpress)",
    "progress": "print progress lines to stderr (default True)",
}
_DEFAULTS = {"time_s": 180.0, "max_evaluations": 12, "techniques": TECHNIQUES, "calibration_batches": 4,
             "max_layer_error": 0.02, "latency_cache": None, "progress": True}


def check_auto_arguments(passes, evaluate, max_drop, objective) -> None:
    """Clear errors for the auto arguments, before any slow work."""
    if passes != "auto":
        if evaluate is not None or max_drop is not None:
            raise InputError("evaluate= and max_drop= are used only with passes='auto' (the per-layer search); "
                             f"got passes={passes!r}")
        return
    if evaluate is None or not callable(evaluate):
        raise InputError("passes='auto' needs evaluate=fn: the metric to keep, fn(model_or_compiled) -> float, "
                         f"higher is better (got {evaluate!r})")
    if max_drop is None:
        raise InputError("passes='auto' needs max_drop=: the largest drop of evaluate()'s metric you accept, "
                         "in its units (e.g. 0.01 for one point of accuracy in [0, 1])")
    if isinstance(max_drop, bool) or not isinstance(max_drop, numbers.Real) or not math.isfinite(max_drop) \
            or max_drop < 0:
        raise InputError(f"max_drop must be a finite number >= 0 (metric units), got {max_drop!r}")
    if objective not in OBJECTIVES:
        raise InputError(f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}")


def _auto_options(options: dict | None) -> tuple[dict[str, Any], dict]:
    options = dict(options or {})
    given = dict(options.pop("auto", {}) or {})
    unknown = set(given) - set(_DEFAULTS)
    if unknown:
        raise InputError(f"unknown option(s) {sorted(unknown)} for 'auto'; it takes: "
                         + "; ".join(f"{k}: {v}" for k, v in AUTO_OPTIONS.items()))
    opts = {**_DEFAULTS, **given}
    techniques = opts["techniques"]
    techniques = (techniques,) if isinstance(techniques, str) else tuple(techniques)
    bad = [t for t in techniques if t not in TECHNIQUES]
    if bad or not techniques:
        raise InputError(f"options['auto']['techniques'] must be a non-empty subset of {list(TECHNIQUES)}, got {bad or techniques}")
    opts["techniques"] = techniques
    for k in ("time_s", "max_layer_error"):
        if isinstance(opts[k], bool) or not isinstance(opts[k], numbers.Real) or not opts[k] > 0:
            raise InputError(f"options['auto'][{k!r}] must be a positive number, got {opts[k]!r}")
    for k in ("max_evaluations", "calibration_batches"):
        if isinstance(opts[k], bool) or not isinstance(opts[k], int) or opts[k] < 1:
            raise InputError(f"options['auto'][{k!r}] must be an int >= 1, got {opts[k]!r}")
    return opts, options


class _Evaluator:
    """Calls the user's evaluate, checks what it returns, counts the calls."""

    def __init__(self, fn: Callable):
        self.fn, self.calls = fn, 0

    def __call__(self, subject, what: str) -> float:
        self.calls += 1
        try:
            value = self.fn(subject)
        except Exception as e:  # noqa: BLE001 - say which call failed, keep the user's traceback
            raise InputError(f"evaluate raised {type(e).__name__} on {what}: {e}") from e
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InputError(f"evaluate must return a number (higher is better), got {type(value).__name__} "
                             f"{value!r} on {what}")
        value = float(value)
        if not math.isfinite(value):
            raise InputError(f"evaluate returned {value} on {what}; it must return a finite number")
        return value


def compile_auto(model, example_inputs: tuple, **kwargs):
    """The body of ``fxpress.compile(passes="auto", ...)``; arguments already checked by compile()."""
    with warnings.catch_warnings():
        # deep copies of traced graphs repeat torch's pytree deprecation notice once per copy
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return _compile_auto(model, example_inputs, **kwargs)


def _compile_auto(model, example_inputs: tuple, *, evaluate: Callable, max_drop: float, objective: str,
                  target: str, tune: int, calibration: list[tuple] | None, tolerance: float | None,
                  options: dict | None):
    from fxpress.api import compile as fx_compile

    opts, pass_options = _auto_options(options)
    foreign = set(pass_options) - {"lower", "tune"}
    if foreign:
        raise InputError(f"passes='auto' chooses each pass's options itself; options for {sorted(foreign)} "
                         "are not taken (use options={'auto': {...}}; 'lower' and 'tune' go to the final compile)")
    say = (lambda msg: print(f"[fxpress auto] {msg}", file=sys.stderr, flush=True)) if opts["progress"] else (lambda m: None)
    t_start = time.monotonic()
    deadline = t_start + float(opts["time_s"])
    seconds: dict[str, float] = {}
    evaluator = _Evaluator(evaluate)
    model = copy.deepcopy(model).eval()

    with torch.no_grad():
        baseline = evaluator(model, "the original (eager) model")
    say(f"baseline metric {baseline:.6g}; budget: drop <= {max_drop:g}")

    # ---- the fused graph every estimate and every configuration starts from
    t0 = time.monotonic()
    x = clone_inputs(example_inputs)
    with torch.no_grad():
        reference = [t.detach() for t in torch.utils._pytree.tree_flatten(model(*clone_inputs(x)))[0]]
    traced = trace(copy.deepcopy(model), x, reference)  # the graph shares modules with what it traced
    ctx = PassContext(example_inputs=x, calibration=calibration, options={}, target="torch",
                      reference_outputs=reference)
    fused, _ = get_pass("fuse")(copy_graph_module(traced.gm), ctx)  # fuse folds BN into conv weights in place
    layers = find_layers(fused, opts["techniques"])
    if not layers:
        raise InputError("passes='auto' found no Linear / Conv layer to choose for in this model "
                         "(nothing to compress); use passes='default'")
    batches = [x] + ctx.calibration_batches(opts["calibration_batches"], fused) if calibration else [x]
    say(f"{len(layers)} layers, {sum(len(L.candidates) - 1 for L in layers)} candidates; "
        f"estimates on {len(batches)} batch(es)")
    est = estimate_all(fused, layers, ctx, batches, progress=say)
    seconds["estimates"] = time.monotonic() - t0

    # ---- per-layer costs of the objective
    t0 = time.monotonic()
    base_size = est[layers[0].key][FP32.name].size_bytes
    sizes = {k: {c: e.size_bytes for c, e in row.items()} for k, row in est.items()}
    errors = {k: {c: e.error for c, e in row.items()} for k, row in est.items()}
    latency = None
    if objective == "latency":
        table = LatencyTable(target, opts["latency_cache"], progress=say)
        inputs = layer_inputs(fused, layers, batches)
        latency = {}
        for i, L in enumerate(layers):
            if L.key not in inputs or not inputs[L.key][1]:
                latency[L.key] = {c.name: (0.0 if c == FP32 else math.inf) for c in L.candidates}
                continue
            mod, seen = inputs[L.key]
            latency[L.key] = table.measure(L, mod, seen[0], seen[1:5] or seen[:1])
            say(f"latency {i + 1}/{len(layers)}: {L.label}: " + ", ".join(
                f"{n} {s * 1e6:.0f}us" for n, s in latency[L.key].items()))
        say(f"latency table: {table.measured} compiles, the rest from {table.cache_path}")
        cost = latency
    else:
        cost = {k: {c: float(s) for c, s in row.items()} for k, row in sizes.items()}
    costs = Costs(layers, errors, cost, sizes, base_size, latency, float(opts["max_layer_error"]),
                  min_gain=0.05 if objective == "latency" else 0.0)
    seconds["costs"] = time.monotonic() - t0

    # ---- search, judged by evaluate on the eager-FX compile of each configuration
    t0 = time.monotonic()

    def compile_config(config: dict[str, Candidate], on_target: str):
        final = on_target == target
        return fx_compile(model, example_inputs, passes=build_passes(layers, config), target=on_target,
                          tune=tune if final else 0, calibration=calibration, tolerance=None,
                          options=pass_options if final else None)

    def judge(config: dict[str, Candidate], phase: str) -> Tried:
        metric = evaluator(compile_config(config, "torch"), f"configuration {_describe(config, layers)}")
        drop = baseline - metric
        t = Tried(config, metric, drop, drop <= max_drop, costs.total_error(config), costs.total_cost(config),
                  costs.size(config), costs.latency_s(config), phase)
        say(f"evaluate #{evaluator.calls - 1}: {_describe(config, layers)}: metric {metric:.6g} (drop {drop:.4g}) "
            f"{'ok' if t.accepted else 'over budget'} [{time.monotonic() - t_start:.0f}s]")
        return t

    outcome = search(costs, judge, int(opts["max_evaluations"]), deadline, say)
    seconds["search"] = time.monotonic() - t0

    # ---- the chosen configuration on the real target, checked once more with evaluate
    t0 = time.monotonic()
    accepted = sorted([t for t in outcome.tried if t.accepted], key=lambda t: -_gain_key(costs, t.config))
    fallbacks = [t.config for t in accepted] + [{L.key: FP32 for L in layers}]
    notes = [f"search stopped early: {outcome.stopped}"] if outcome.stopped else []
    cm = final = None
    for config in fallbacks:
        cm = compile_config(config, target)
        final = evaluator(cm, f"the compiled ({target}) configuration {_describe(config, layers)}")
        if baseline - final <= max_drop or all(c == FP32 for c in config.values()):
            break
        notes.append(f"{_describe(config, layers)} met the budget in torch but dropped {baseline - final:.4g} "
                     f"on {target}; took the next configuration")
    chosen_config = config
    seconds["final"] = time.monotonic() - t0
    search_metric = next((t.metric for t in outcome.tried if t.config == chosen_config), final)

    report = AutoReport(
        objective=objective, max_drop=float(max_drop), baseline=baseline,
        chosen={L.label: chosen_config[L.key].name for L in layers}, search_metric=search_metric,
        final_metric=final, evaluate_calls=evaluator.calls, tried=outcome.tried, layers=layers,
        estimates={L.label: {c: {"error": e.error, "size_bytes": e.size_bytes,
                                 "latency_s": (latency[L.key].get(c) if latency else None), "note": e.note}
                             for c, e in est[L.key].items()} for L in layers},
        seconds=seconds, notes=notes + [f"greedy path of {outcome.path_length} moves"])
    cm.auto = report
    last = cm.report.records[-1]  # the row shows the final model's numbers, like the lowering row above it
    cm.report.records.append(StageRecord(
        name="auto", kind="search", status="applied", params=last.params, param_bytes=last.param_bytes,
        macs=last.macs, multiplies=last.multiplies, nodes=last.nodes, max_abs_error=last.max_abs_error,
        max_rel_error=last.max_rel_error, note=report.summary(), seconds=sum(seconds.values()),
        extra={"auto": report.to_dict()}))
    say(report.summary())
    return cm


def _gain_key(costs: Costs, config: dict[str, Candidate]) -> float:
    return sum(costs.gain(k, c) for k, c in config.items() if c != FP32)


def _describe(config: dict[str, Candidate], layers: list[Layer]) -> str:
    parts = [f"{L.label}={config[L.key].name}" for L in layers if config.get(L.key, FP32) != FP32]
    return " ".join(parts) or "all fp32"
