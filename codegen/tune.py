"""MetaSchedule tuning of a Relax module's kernels, with a persistent database.

``tune(mod, target, trials)`` returns the same ``BuiltModule`` as ``build()``: it finds the
module's tuning tasks (the fused PrimFuncs ``build()`` will schedule, plus fxpress's own
hand-written kernels), tunes those the database does not already hold ``trials`` measurements
for, then runs ``build()`` with the database in scope, so every kernel with a record gets its
tuned schedule and the rest get the default schedules (schedule.py). A second compile of the
same model on the same target finds every task done and only builds.

What is tuned (``ops=``): ``"contractions"`` (default: conv, matmul, batch matmul and fxpress
kernels; they are nearly all of the run time), ``"reductions"`` (also softmax, norms, pooling)
or ``"all"``. ``trials`` is per task: total trials = trials x tasks.

Cost control, measured here (docs/tuning.md): the stock MetaSchedule builder imports
``tvm.s_tir.tensor_intrin`` in every build worker (~33 s; the worker pool is re-created for
every batch, so every batch hits the 30 s timeout) and ``TuneContext`` imports it once in the
main process. fp32 and int8 kernels on the ``llvm`` and ``cuda`` rule sets used here use no
tensor intrinsics, so the builder is ``fast_build`` (no import) and the import in the tuning
context is skipped while contexts are made.

Distributed tuning: pass ``runner=``/``builder=`` (MetaSchedule ``Runner``/``Builder``), e.g.
``fxpress.codegen.rpc.rpc_runner(tracker)`` to measure on every RPC server registered with a
tracker.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import relax, tirx

from .build import BuiltModule, _mark_kernels, build, front_stages
from .kernel_families import KERNEL_ATTR
from .schedule import is_contraction
from .targets import resolve_target, target_kind
from .tuning_db import TuningDatabase, apply_database

log = logging.getLogger("fxpress.codegen.tuning")

OPS = ("contractions", "reductions", "all")


@dataclass
class Task:
    name: str
    mod: tvm.IRModule  # normalized: {"main": PrimFunc}, as MetaSchedule keys it
    weight: int = 1  # calls per model run
    kind: str = "fused"  # "fused" (found after fusion) or "kernel" (fxpress hand-written kernel)
    trials_before: int = 0


@dataclass
class TuningSummary:
    """What tune() did; attached to the returned BuiltModule as ``.tuning``."""

    tasks: list[str]
    tuned: list[str]  # tuned in this call
    reused: list[str]  # already in the database
    trials: int  # measured in this call
    seconds: float  # tuning time (not counting the final build)
    database: str
    best_ms: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- tasks

def _front_half(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The module build() hands to its scheduling stage (same passes, same order as build.py)."""
    with target:
        mod = _mark_kernels(mod)
        for _name, passes in front_stages({}):
            for p in passes:
                mod = p(mod)
    return mod


def _has_reduction(func: tirx.PrimFunc) -> bool:
    found = False

    def visit(node):
        nonlocal found
        if isinstance(node, tvm.s_tir.SBlock) and any(
                iv.iter_type == tirx.IterVar.CommReduce for iv in node.iter_vars):
            found = True

    import tvm_ffi

    tvm_ffi.structural_walk(func.body, (tvm.s_tir.SBlock, visit))
    return found


def _call_counts(mod: tvm.IRModule) -> dict[str, int]:
    counts: dict[str, int] = {}

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            name = e.args[0].name_hint
            counts[name] = counts.get(name, 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts


def _normalize(func: tirx.PrimFunc) -> tvm.IRModule:
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


def extract_tasks(mod: tvm.IRModule, target: str | tvm.target.Target,
                  ops: str = "contractions") -> list[Task]:
    """The distinct kernels of ``mod`` worth tuning, keyed exactly as build() will look them up."""
    if ops not in OPS:
        raise ValueError(f"ops={ops!r}: expected one of {OPS}")
    target = resolve_target(target)
    tasks: list[Task] = []

    def add(name, func, weight, kind):
        if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
            return
        if kind == "fused" and ops != "all":
            if not _has_reduction(func) or (ops == "contractions" and not is_contraction(func)):
                return
        norm = _normalize(func)
        for t in tasks:
            if tvm_ffi.structural_equal(t.mod, norm):
                t.weight += weight
                return
        tasks.append(Task(name=name, mod=norm, weight=weight, kind=kind))

    # fxpress's hand-written kernels, as the input module has them (tune() applies their records
    # before build() marks them; they are never fused, so they are the same functions there).
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            add(gv.name_hint, func, 1, "kernel")
    fused = _front_half(mod, target)
    counts = _call_counts(fused)
    for gv, func in fused.functions_items():
        if isinstance(func, tirx.PrimFunc) and not (func.attrs and func.attrs.get(KERNEL_ATTR, 0)):
            add(gv.name_hint, func, counts.get(gv.name_hint, 1), "fused")
    return tasks


# ----------------------------------------------------------------------------- build/run plumbing

def fast_build(mod: tvm.IRModule, target: tvm.target.Target, _params=None):
    """MetaSchedule builder function without the ~33 s ``tvm.s_tir.tensor_intrin`` import."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    if target.kind.name == "cuda":
        from . import cuda

        cuda.install_compiler()
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


@contextlib.contextmanager
def _no_tensor_intrin_import():
    """Let TuneContext skip ``import tvm.s_tir.tensor_intrin`` (see module docstring)."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    stub = types.ModuleType(name)
    stub.__doc__ = "fxpress placeholder while tuning contexts are created"
    sys.modules[name] = stub
    try:
        yield
    finally:
        if sys.modules.get(name) is stub:
            del sys.modules[name]


_BUILT: dict[str, object] = {}  # in-process builder → in-process runner hand-off


def in_process_builder(export: bool = False):
    """A MetaSchedule Builder that compiles in this process (``fast_build``, no worker pool).

    MetaSchedule's LocalBuilder starts a fresh pool of worker processes for every batch; each
    imports TVM. Measured here under load: 13-26 s of pool start-up per batch against 0.14 s to
    compile one candidate in-process. ``export=True`` writes each module to a tar (what RPC
    runners upload); otherwise the module is handed to ``in_process_runner`` in memory.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export

    @derived_object
    class _InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for inp in build_inputs:
                try:
                    rt_mod = fast_build(inp.mod, inp.target)
                    if export:
                        results.append(BuilderResult(default_export(rt_mod), None))
                    else:
                        token = f"fxpress-inprocess:{id(rt_mod)}:{len(_BUILT)}:{time.perf_counter_ns()}"
                        _BUILT[token] = rt_mod
                        results.append(BuilderResult(token, None))
                except Exception as err:  # noqa: BLE001 - a failed candidate is a result, not a crash
                    results.append(BuilderResult(None, f"fxpress in-process build: {err}"))
            return results

    return _InProcessBuilder()


def in_process_runner(number: int = 3, repeat: int = 3, min_repeat_ms: int = 10):
    """A MetaSchedule Runner that times ``in_process_builder`` modules in this process.

    Reports the minimum over ``repeat`` rounds (each ``number`` calls, at least
    ``min_repeat_ms``): on a shared machine the minimum is the least disturbed measurement.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    @derived_object
    class _Done(PyRunnerFuture):
        def __init__(self, result):
            super().__init__()
            self._result = result

        def done(self):
            return True

        def result(self):
            return self._result

    @derived_object
    class _InProcessRunner(PyRunner):
        def run(self, runner_inputs):
            futures = []
            fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure", True)
            for inp in runner_inputs:
                rt_mod = _BUILT.pop(str(inp.artifact_path), None)
                try:
                    if rt_mod is None:
                        raise RuntimeError(f"no in-process module for {inp.artifact_path}")
                    kind = str(inp.device_type)
                    dev = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0) if kind in ("llvm", "cpu") else tvm.device(kind, 0)
                    args = alloc_argument_common(fill, dev, [a.as_json() for a in inp.args_info], 1)[0]
                    evaluator = rt_mod.time_evaluator(rt_mod.entry_name, dev, number=number,
                                                      repeat=repeat, min_repeat_ms=min_repeat_ms)
                    dev.sync()
                    costs = [float(c) for c in evaluator(*args).results]
                    futures.append(_Done(RunnerResult([min(costs)], None)))
                except Exception as err:  # noqa: BLE001 - a failing candidate is a result
                    futures.append(_Done(RunnerResult(None, f"fxpress in-process run: {err}")))
            return futures

    return _InProcessRunner()


def local_builder(max_workers: int | None = None, timeout_sec: float = 60.0):
    """MetaSchedule's LocalBuilder (worker processes, timeout per build) with ``fast_build``."""
    from tvm.s_tir.meta_schedule.builder import LocalBuilder

    return LocalBuilder(f_build=fast_build, max_workers=max_workers or os.cpu_count() or 1,
                        timeout_sec=timeout_sec)


def _space(target: tvm.target.Target):
    from tvm.s_tir import meta_schedule as ms

    kind = target_kind(target)  # "llvm" or "cuda": rule sets without tensor intrinsics
    return ms.space_generator.PostOrderApply(sch_rules=ms.ScheduleRule.create(kind),
                                             postprocs=ms.Postproc.create(kind),
                                             mutator_probs=ms.Mutator.create(kind))


def _cost_model(num_cores: int, total_trials: int):
    """XGBoost when the per-task budget is big enough for it to learn anything, else random.

    MetaSchedule's XGB model predicts at random until it has 100 measurements anyway, yet
    retrains after every batch; measured here it cost ~20 s per batch on 2 loaded cores.
    """
    from tvm.s_tir import meta_schedule as ms

    if total_trials < 64:
        return ms.CostModel.create("random")
    try:
        import xgboost  # noqa: F401
    except ImportError:
        log.warning("xgboost is not installed: tuning with a random cost model (slower to converge)")
        return ms.CostModel.create("random")
    return ms.CostModel.create("xgb", num_tuning_cores=num_cores)


def _strategy(per_iter: int):
    """Evolutionary search sized to the batch: the stock population of 512 candidates took
    ~60 s of search per batch on 2 loaded cores, longer than measuring the batch."""
    from tvm.s_tir import meta_schedule as ms

    population = int(min(512, max(64, 4 * per_iter)))
    return ms.search_strategy.EvolutionarySearch(population_size=population,
                                                 init_min_unmeasured=min(50, population // 2),
                                                 genetic_num_iters=3 if population < 512 else 4)


def _progress_callback(bar, tasks: list[Task], measured: list[int], best: dict[str, float]):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            measured[task_id] += len(runner_results)
            task = tasks[task_id]
            for res in runner_results:
                secs = [float(s) for s in (res.run_secs or [])]
                if res.error_msg is None and secs:
                    ms_ = 1e3 * sum(secs) / len(secs)
                    if ms_ < best.get(task.name, float("inf")):
                        best[task.name] = ms_
            if bar is not None:
                bar.update(len(runner_results))
                shown = best.get(task.name)
                bar.set_postfix_str(f"{task.name[:28]} best {shown:.3f} ms" if shown else task.name[:28])

    return _Progress()


def time_function(func: tirx.PrimFunc, target: tvm.target.Target, number: int = 3, repeat: int = 3,
                  min_repeat_ms: int = 10) -> float:
    """Seconds per call of one PrimFunc on random inputs (min over rounds, like the runner)."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    rt_mod = fast_build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    dev = tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)
    fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure", True)
    args = alloc_argument_common(fill, dev, [a.as_json() for a in ArgInfo.from_prim_func(func)], 1)[0]
    evaluator = rt_mod.time_evaluator(rt_mod.entry_name, dev, number=number, repeat=repeat,
                                      min_repeat_ms=min_repeat_ms)
    return min(float(c) for c in evaluator(*args).results)


def default_schedule(task: Task, target: tvm.target.Target) -> tirx.PrimFunc:
    """What build() would run for this task without tuning records."""
    from .build import apply_kernel_schedules
    from .schedule import schedule_cpu, schedule_gpu

    mod = tvm.IRModule({"main": task.mod["main"]})
    mod = apply_kernel_schedules(mod, target)
    mod = (schedule_gpu if target_kind(target) == "cuda" else schedule_cpu)(mod, target)
    return mod["main"]


def _time_default(task: Task, target: tvm.target.Target) -> float | None:
    try:
        return time_function(default_schedule(task, target), target)
    except Exception as err:  # noqa: BLE001 - no baseline: the tuned record is used as it is
        log.warning("tuning: could not time the default schedule of %s (%s)", task.name,
                    str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None


# ----------------------------------------------------------------------------- tune

def tune(mod: tvm.IRModule, target: str | tvm.target.Target, trials: int, *,
         database_dir: str | os.PathLike | None = None, runner=None, builder=None,
         progress: bool = True, ops: str = "contractions", trials_per_iter: int | None = None,
         seed: int | None = 0, **build_options) -> BuiltModule:
    """Tune ``mod``'s kernels for ``target`` (``trials`` measurements per task), then build it.

    ``database_dir``: the tuning database root (default ``$FXPRESS_CACHE_DIR/tuning`` or
    ``~/.cache/fxpress/tuning``); records shipped in fxpress/codegen/records are read too.
    ``runner``/``builder``: MetaSchedule runner/builder (default: local, this machine's cores;
    see rpc.py for a tracker of RPC servers). ``progress``: a tqdm bar on stderr.
    ``trials=0`` tunes nothing and builds with whatever the database already holds.
    Returns build()'s BuiltModule, with ``.tuning`` (a TuningSummary) attached.
    """
    if trials < 0:
        raise ValueError(f"trials must be >= 0, got {trials}")
    start = time.perf_counter()
    target = resolve_target(target)
    if trials and runner is None and target_kind(target) == "cuda" and not _device_exists(target):
        from ..errors import TargetUnavailableError

        raise TargetUnavailableError(
            "tuning for cuda measures every candidate on a GPU and this machine has none: tune on a "
            "GPU machine, pass runner=fxpress.codegen.rpc.rpc_runner(...) for a tracker with GPU "
            "servers, or compile with tune=0 (dlight default schedules, plus any records already "
            "in the tuning database)")
    db = TuningDatabase(target, database_dir)
    tasks = extract_tasks(mod, target, ops=ops)
    entries = db.entries()
    from tvm.s_tir.meta_schedule.database import Workload

    from .tuning_db import workload_key

    todo: list[Task] = []
    reused: list[str] = []
    keys = {}
    for task in tasks:
        wl_json = Workload(task.mod).as_json()
        keys[task.name] = (workload_key(wl_json), wl_json)
        entry = entries.get(keys[task.name][0])
        task.trials_before = int(entry.get("trials", 0)) if entry else 0
        if trials and (not entry or not entry.get("records") or task.trials_before < trials):
            todo.append(task)
        elif entry and entry.get("records"):
            reused.append(task.name)
    measured = [0] * len(todo)
    best: dict[str, float] = {}
    ms_db = db.ms_database()
    if todo:
        _run_tuning(todo, target, trials, ms_db, runner, builder, progress, trials_per_iter,
                    seed, measured, best)
        can_time = target_kind(target) == "llvm" or _device_exists(target)
        for task, n in zip(todo, measured):
            key, wl_json = keys[task.name]
            default_secs = _time_default(task, target) if can_time and runner is None else None
            db.commit(wl_json, [], trials=n, name=task.name, default_secs=default_secs)
        ms_db = db.ms_database()  # reload: records written by other processes meanwhile too
    seconds = time.perf_counter() - start
    with ms_db:
        tuned_input = apply_database(mod, target)  # fxpress kernels, before build() marks them
        built = build(tuned_input, target, **build_options)
    built.tuning = TuningSummary(tasks=[t.name for t in tasks], tuned=[t.name for t in todo],
                                 reused=reused, trials=sum(measured), seconds=seconds,
                                 database=db.dir, best_ms=best)
    return built


def _device_exists(target) -> bool:
    try:
        return bool((tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)).exist)
    except Exception:  # noqa: BLE001
        return False


def _run_tuning(tasks, target, trials, database, runner, builder, progress, trials_per_iter,
                seed, measured, best) -> None:
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.utils import fork_seed

    cores = os.cpu_count() or 1
    in_process = builder is None and runner is None
    if builder is None:
        builder = in_process_builder(export=runner is not None)
    if runner is None:
        runner = in_process_runner()
    per_iter = trials_per_iter or max(1, min(trials, 32))
    with tempfile.TemporaryDirectory(prefix="fxpress-tune-") as work_dir:
        # MetaSchedule's own get_loggers_from_work_dir rewrites the global logging config (and
        # fails under pytest's log capture); plain child loggers of ours, WARNING and up.
        loggers = [logging.getLogger(f"fxpress.codegen.tuning.task{i}") for i in range(len(tasks))]
        with _no_tensor_intrin_import():
            contexts = [ms.TuneContext(mod=t.mod, target=target, space_generator=_space(target),
                                       search_strategy=_strategy(per_iter), task_name=t.name,
                                       logger=lg, rand_state=rs, num_threads=cores).clone()
                        for t, lg, rs in zip(tasks, loggers, fork_seed(seed, n=len(tasks)))]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=trials * len(tasks), desc=f"tuning {len(tasks)} kernels", unit="trial",
                       file=sys.stderr, leave=True)
        callbacks = [ms.measure_callback.AddToDatabase()]
        if not in_process:  # artifacts on disk (tar files for RPC): delete them once measured
            callbacks.append(ms.measure_callback.RemoveBuildArtifact())
        callbacks += [ms.measure_callback.UpdateCostModel(), _progress_callback(bar, tasks, measured, best)]
        try:
            ms.tune_tasks(tasks=contexts, task_weights=[float(t.weight) for t in tasks],
                               work_dir=work_dir, max_trials_global=trials * len(tasks),
                               max_trials_per_task=trials, num_trials_per_iter=per_iter,
                               builder=builder, runner=runner,
                               database=database, cost_model=_cost_model(cores, trials),
                               measure_callbacks=callbacks, task_scheduler="gradient")
        finally:
            if bar is not None:
                bar.close()
