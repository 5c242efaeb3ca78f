"""Side-by-side benchmark: fxpress targets next to eager PyTorch, torch.compile and ONNX Runtime.

``bench_model(model, example_inputs)`` runs every peer in this one process on the same inputs and
returns a ``BenchResult`` (``.table()`` is Markdown, ``.to_dict()`` is JSON-ready). Peers:

- ``eager``: the original module under ``torch.no_grad()``.
- ``torch.compile``: Inductor with ``torch._inductor.config.freezing = True`` (the fastest setting
  on our CPUs); its compile time is the first call. Failures (no C++ compiler, an unsupported op)
  are caught and reported in the row.
- ``onnxruntime``: ONNX Runtime on the torch.onnx (dynamo) export of the ORIGINAL model — what a
  user gets without fxpress.
- ``fxpress:<target>``: ``fxpress.compile(model, passes=..., target=...)``; compile time is the
  whole call (trace, passes with their checks, lowering, build).

Every peer is called the same way: torch tensors in, torch tensors out (so the numpy conversions
of the ONNX Runtime and TVM peers are inside their timings, as a user sees them).

Measured per peer: median latency over ``repeat`` timed calls after a warm-up, p10/p90; peak
memory as the increase of the process's resident set (RSS) over its value at the start of the
phase: on Linux the kernel's peak (VmHWM) is reset through /proc/self/clear_refs before each phase
and read after it, so each phase gets its own peak; elsewhere ``resource.getrusage`` ru_maxrss
deltas are used, which only show a phase that set a new process-wide peak (``memory_method``
says which one a result used). Model size is the weights' bytes (the ONNX file's size for the
ONNX Runtime peer); params and MACs come from fxpress's graph statistics; output error is
relative to eager on the same inputs (max |y − ref| / max |ref|); accuracy when labels are given.

Threads: every peer uses its own default pool (2 threads here). Do not set ``OMP_WAIT_POLICY=ACTIVE``
for a run that times PyTorch and TVM/ONNX Runtime in one process: PyTorch's OpenMP threads then spin
forever after each op and take the cores the later peers need (measured: fxpress's default BERT
25 ms alone, 600 ms after eager had run). Each row records the load average when its timing started.
"""
from __future__ import annotations

import copy
import gc
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

PEERS = ("eager", "torch.compile", "onnxruntime")
VMHWM = "peak RSS above phase start (VmHWM reset via /proc/self/clear_refs)"
MAXRSS = "ru_maxrss delta (process-wide high-water mark; 0 unless the phase set a new peak)"


# ----------------------------------------------------------------------------- memory

def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def memory_method() -> str:
    return VMHWM if _can_reset_hwm() else MAXRSS


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.bytes``: how far RSS rose above its value at entry."""

    def __init__(self):
        self.bytes = 0
        self.method = MAXRSS

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        if _can_reset_hwm():
            self.method = VMHWM
            self._base = (_status_kib("VmRSS") or 0) * 1024
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return self

    def __exit__(self, *exc) -> None:
        if self.method == VMHWM:
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        self.bytes = max(0, peak - self._base)


# ----------------------------------------------------------------------------- results

@dataclass
class PeerResult:
    peer: str  # "eager" | "torch.compile" | "onnxruntime" | "fxpress:<target>"
    passes: str = "-"  # pass set (fxpress peers)
    ok: bool = False
    error: str = ""
    median_ms: float | None = None
    min_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    runs: int = 0
    compile_s: float | None = None
    peak_mem_compile_bytes: int | None = None
    peak_mem_run_bytes: int | None = None
    size_bytes: int | None = None
    params: int | None = None
    macs: int | None = None
    multiplies: int | None = None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    accuracy: float | None = None
    note: str = ""
    load_avg: float | None = None  # 1-minute load average when the timed loop started (noise indicator)
    stages: list[dict[str, Any]] = field(default_factory=list)  # fxpress: report summary per stage
    # (not a field: never serialised) the CompiledModel of an fxpress peer when asked to keep it
    compiled = None

    def short_error(self, n: int = 90) -> str:
        first = (self.error or "").strip().splitlines()[0] if self.error else ""
        return first if len(first) <= n else first[: n - 1] + "…"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    from .report import human_bytes

    return human_bytes(int(n))


def _fmt_num(n: int | float | None) -> str:
    if n is None:
        return "-"
    from .report import human

    return human(n)


@dataclass
class BenchResult:
    model: str
    passes: str
    inputs: list[dict[str, Any]]
    repeat: int
    warmup: int
    peers: list[PeerResult]
    memory_method: str
    threads: dict[str, Any]
    date: str = ""
    notes: list[str] = field(default_factory=list)

    def peer(self, name: str, passes: str | None = None) -> PeerResult:
        for p in self.peers:
            if p.peer == name and (passes is None or p.passes == passes):
                return p
        raise KeyError(f"no peer {name!r}" + (f" with passes {passes!r}" if passes else "") +
                       f"; peers: {[p.peer for p in self.peers]}")

    def table(self, title: bool = True) -> str:
        return markdown_table(self.peers, baseline=self._eager_ms(), title=(
            f"**{self.model}** — inputs {', '.join(_shape_text(i) for i in self.inputs)}, "
            f"median of {self.repeat} runs after {self.warmup} warm-up" if title else None),
            footnote=self.footnote())

    def _eager_ms(self) -> float | None:
        for p in self.peers:
            if p.peer == "eager" and p.ok:
                return p.median_ms
        return None

    def footnote(self) -> str:
        th = ", ".join(f"{k}={v}" for k, v in self.threads.items())
        return (f"Memory: {self.memory_method}; 'run' is the timed loop, 'compile' the setup. Threads: {th}. "
                "Error: max |y - eager| / max |eager| on the same inputs.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peers"] = [_clean(asdict(p)) for p in self.peers]
        return _clean(d)


def _clean(x):
    """JSON-safe: NaN/inf → None, tuples → lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _shape_text(spec: dict[str, Any]) -> str:
    return "x".join(map(str, spec["shape"])) + ("" if spec["dtype"] == "float32" else f":{spec['dtype']}")


MD_COLUMNS = ["peer", "passes", "median ms", "min ms", "vs eager", "compile s", "peak mem run / compile",
              "size", "params", "MACs", "max rel err", "accuracy"]


def markdown_row(p: PeerResult, baseline: float | None) -> list[str]:
    if not p.ok:
        return [p.peer, p.passes, "failed", "-", "-", "-" if p.compile_s is None else f"{p.compile_s:.1f}",
                "-", "-", "-", "-", "-", (p.short_error() or "error").replace("|", "\\|")]
    speed = f"{baseline / p.median_ms:.2f}×" if baseline and p.median_ms else "-"
    mem = f"{_fmt_bytes(p.peak_mem_run_bytes)} / {_fmt_bytes(p.peak_mem_compile_bytes)}"
    acc = "-" if p.accuracy is None else f"{100 * p.accuracy:.2f}%"
    err = "-" if p.max_rel_error is None else f"{p.max_rel_error:.1e}"
    return [p.peer, p.passes, f"{p.median_ms:.3f}", f"{p.min_ms:.3f}", speed,
            "-" if p.compile_s is None else f"{p.compile_s:.1f}", mem, _fmt_bytes(p.size_bytes),
            _fmt_num(p.params), _fmt_num(p.macs), err, acc]


def markdown_table(peers: Sequence[PeerResult], baseline: float | None = None, title: str | None = None,
                   footnote: str | None = None, columns: Sequence[str] = MD_COLUMNS) -> str:
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|")
    for p in peers:
        lines.append("| " + " | ".join(markdown_row(p, baseline)) + " |")
    notes = [f"- {p.peer} ({p.passes}): {p.note}" for p in peers if p.note]
    if notes:
        lines += [""] + notes
    if footnote:
        lines += ["", footnote]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measuring

def _flat(out) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t.detach() for t in leaves if isinstance(t, torch.Tensor)]


def _time_calls(fn: Callable, inputs: tuple, repeat: int, warmup: int) -> tuple[list[float], Any]:
    out = None
    with torch.no_grad():
        for _ in range(warmup):
            out = fn(*inputs)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            out = fn(*inputs)
            times.append((time.perf_counter_ns() - t0) / 1e6)
    return times, out


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _accuracy(fn: Callable, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Top-1 accuracy with fixed-size batches (compiled peers have static shapes): the last batch
    is padded with rows from the start and the padding's predictions are dropped."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            xb = x[i:i + batch]
            n = len(xb)
            if n < batch:
                xb = torch.cat([xb, x[: batch - n]])
            logits = _flat(fn(xb))[0]
            correct += int((logits[:n].argmax(dim=1) == y[i:i + n]).sum())
    return correct / len(y)


def _model_stats(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """params / bytes / MACs / multiplies of the original model, from fxpress's graph statistics."""
    from fxpress.passes.stats import count_params, graph_costs

    params, nbytes = count_params(model)
    stats = {"params": params, "size_bytes": nbytes, "macs": None, "multiplies": None}
    try:
        from fxpress.passes import trace
        from fxpress.passes.trace import annotate_shapes

        gm = trace(model, inputs).gm
        annotate_shapes(gm, inputs)
        stats["macs"], stats["multiplies"] = graph_costs(gm)
    except Exception:  # noqa: BLE001 - MACs are informative; an untraceable model still benches
        pass
    return stats


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {str(e).strip()}"
    return text[:2000]


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _measure(res: PeerResult, setup: Callable[[], tuple[Callable, dict]], inputs: tuple, reference,
             repeat: int, warmup: int, labels, batch: int, keep: bool = False) -> PeerResult:
    """Set a peer up (timed, memory-measured), then time it, check its output and accuracy."""
    from fxpress.passes.measure import output_error  # the one error measure, as the report's

    try:
        with PeakRSS() as mem_c:
            t0 = time.perf_counter()
            fn, info = setup()
            res.compile_s = time.perf_counter() - t0
        res.peak_mem_compile_bytes = mem_c.bytes
        for k, v in info.items():
            setattr(res, k, v)
        if keep:
            res.compiled = fn
        res.load_avg = _load1()
        with PeakRSS() as mem_r:
            times, out = _time_calls(fn, inputs, repeat, warmup)
        res.peak_mem_run_bytes = mem_r.bytes
        res.runs = len(times)
        res.median_ms = statistics.median(times)
        res.min_ms = min(times)
        res.p10_ms, res.p90_ms = _percentile(times, 0.1), _percentile(times, 0.9)
        res.max_abs_error, res.max_rel_error = output_error(_flat(out), reference)
        if labels is not None:
            res.accuracy = _accuracy(fn, labels[0], labels[1], batch)
        res.ok = True
    except Exception as e:  # noqa: BLE001 - a failing peer is a row in the table, not a crash
        res.ok = False
        res.error = _error_text(e)
        if os.environ.get("FXPRESS_BENCH_TRACEBACK"):
            traceback.print_exc()
    finally:
        gc.collect()
    return res


def _setup_eager(model: nn.Module, stats: dict):
    def setup():
        return model, {"size_bytes": stats["size_bytes"], "params": stats["params"], "macs": stats["macs"],
                       "multiplies": stats["multiplies"]}
    return setup


def _setup_torch_compile(model: nn.Module, inputs: tuple, stats: dict):
    def setup():
        import torch._dynamo
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()
        compiled = torch.compile(model)
        with torch.no_grad(), inductor_config.patch(freezing=True):
            compiled(*inputs)  # compiles now, so compile time is measured here
        # Inductor reads its config when it compiles; later calls with the same shapes reuse the
        # frozen graph, so the timed calls need no config context (which would cost per call).
        return compiled, {"size_bytes": stats["size_bytes"], "params": stats["params"], "macs": stats["macs"],
                     "multiplies": stats["multiplies"], "note": "inductor, freezing=True"}
    return setup


def _setup_onnxruntime(model: nn.Module, inputs: tuple, stats: dict):
    def setup():
        import numpy as np

        from fxpress.lowering import to_onnx
        from fxpress.runtime.backends import ORTExecutor

        with tempfile.TemporaryDirectory(prefix="fxpress-bench-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            to_onnx(model, inputs, path)  # torch.onnx.export(dynamo=True) of the original model
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                ex = ORTExecutor(f.read())

        def run(*xs):
            outs = ex.run([x.detach().numpy() for x in xs])
            return tuple(torch.from_numpy(np.asarray(o)) for o in outs)
        return run, {"size_bytes": size, "params": stats["params"], "macs": stats["macs"],
                     "multiplies": stats["multiplies"], "note": "ONNX file size; torch.onnx dynamo export, ORT_ENABLE_ALL"}
    return setup


def _setup_fxpress(model: nn.Module, inputs: tuple, target: str, passes, calibration, tolerance, options, tune):
    def setup():
        import fxpress

        cm = fxpress.compile(copy.deepcopy(model), inputs, passes=passes, target=target, tune=tune,
                             calibration=calibration, tolerance=tolerance, options=options)
        final = cm.report.records[-1]
        statuses = [f"{r.name}:{r.status}" for r in cm.report if r.kind == "pass"]
        rolled = [r.name for r in cm.report if r.kind == "pass" and r.status != "applied"]
        note = ""
        if rolled:
            note = "not applied: " + ", ".join(f"{r.name} ({r.status})" for r in cm.report
                                               if r.kind == "pass" and r.status != "applied")
        if not statuses:
            note = (note + "; " if note else "") + "no passes ran"
        return cm, {"size_bytes": final.param_bytes, "params": final.params, "macs": final.macs,
                    "multiplies": final.multiplies, "note": note, "stages": cm.report.to_list()}
    return setup


def passes_label(passes) -> str:
    if passes is None:
        return "none"
    if isinstance(passes, str):
        return passes
    return "+".join(p if isinstance(p, str) else getattr(p, "name", type(p).__name__) for p in passes)


def thread_info() -> dict[str, Any]:
    return {"torch": torch.get_num_threads(), "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS", "default"),
            "ORT intra-op": "default (physical cores)",
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "default (passive)")}


def _input_specs(inputs: tuple) -> list[dict[str, Any]]:
    return [{"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")} for x in inputs]


def bench_peers(model: nn.Module, example_inputs, peers: Sequence[str] = PEERS, repeat: int = 20,
                warmup: int | None = None, labels=None, stats: dict | None = None,
                reference: list[torch.Tensor] | None = None, keep: bool = False) -> list[PeerResult]:
    """Time the non-fxpress peers (any of "eager", "torch.compile", "onnxruntime").

    keep: leave each peer's callable on ``result.compiled`` (to time them again, interleaved)."""
    inputs = _inputs(example_inputs)
    model = model.eval()
    warmup = _warmup(repeat, warmup)
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peer(s) {sorted(unknown)}; choose from {PEERS}")
    if reference is None:
        with torch.no_grad():
            reference = _flat(model(*inputs))
    stats = stats or _model_stats(model, inputs)
    batch = inputs[0].shape[0] if inputs[0].dim() else 1
    setups = {"eager": lambda: _setup_eager(model, stats),
              "torch.compile": lambda: _setup_torch_compile(model, inputs, stats),
              "onnxruntime": lambda: _setup_onnxruntime(model, inputs, stats)}
    return [_measure(PeerResult(peer=p), setups[p](), inputs, reference, repeat, warmup, labels, batch, keep)
            for p in peers]


def time_blocks(fns: dict[str, Callable], inputs: tuple, blocks: int, per_block: int,
                warmup: int = 3, pause: float = 0.0) -> dict[str, list[list[float]]]:
    """Call times (ms) of each of ``fns`` in ``blocks`` rounds; in each round every callable runs a
    block (``warmup`` untimed calls, then ``per_block`` timed ones) after the other. A burst of load from
    outside slows one block, not a runtime's every block, so the best block median is the steady-state
    latency. Blocks, not single calls, alternate: the runtime that ran just before keeps its worker
    threads spinning for a while (ONNX Runtime's pool, OpenMP's) and takes cores from the next one, a
    cost no single-runtime deployment pays (measured: +45 % on fxpress right after ORT, 2 cores).
    ``pause``: seconds of sleep after each block, to let those threads go idle."""
    times: dict[str, list[list[float]]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(blocks):
            for label, fn in fns.items():
                for _ in range(warmup):
                    fn(*inputs)
                block = []
                for _ in range(per_block):
                    t0 = time.perf_counter_ns()
                    fn(*inputs)
                    block.append((time.perf_counter_ns() - t0) / 1e6)
                times[label].append(block)
                time.sleep(pause)
    return times


def bench_fxpress(model: nn.Module, example_inputs, target: str = "llvm", passes="default", repeat: int = 20,
                  warmup: int | None = None, labels=None, calibration=None, tolerance: float | None = None,
                  options: dict | None = None, tune: int = 0,
                  reference: list[torch.Tensor] | None = None, keep: bool = False) -> PeerResult:
    """Compile with fxpress for one target and pass set, and time it like the peers.

    keep: leave the CompiledModel on ``result.compiled`` (for a report); it is never serialised."""
    inputs = _inputs(example_inputs)
    model = model.eval()
    if reference is None:
        with torch.no_grad():
            reference = _flat(model(*inputs))
    batch = inputs[0].shape[0] if inputs[0].dim() else 1
    res = PeerResult(peer=f"fxpress:{target}", passes=passes_label(passes))
    return _measure(res, _setup_fxpress(model, inputs, target, passes, calibration, tolerance, options, tune),
                    inputs, reference, repeat, _warmup(repeat, warmup), labels, batch, keep)


def _inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _warmup(repeat: int, warmup: int | None) -> int:
    return max(2, min(10, repeat // 5)) if warmup is None else warmup


def bench_model(model: nn.Module, example_inputs, targets: Sequence[str] = ("llvm", "onnx"), passes="default",
                repeat: int = 20, *, peers: Sequence[str] = PEERS, warmup: int | None = None, labels=None,
                calibration=None, tolerance: float | None = None, options: dict | None = None, tune: int = 0,
                name: str | None = None) -> BenchResult:
    """Benchmark fxpress (each of ``targets``, with ``passes``) next to ``peers``, in this process.

    labels: (x, y) for top-1 accuracy (x is fed in batches of the example batch size).
    Failures of any peer or target are caught and show as "failed" rows with the error.
    """
    inputs = _inputs(example_inputs)
    model = model.eval()
    warmup = _warmup(repeat, warmup)
    with torch.no_grad():
        reference = _flat(model(*inputs))
    stats = _model_stats(model, inputs)
    results = bench_peers(model, inputs, peers, repeat, warmup, labels, stats, reference)
    for t in targets:
        results.append(bench_fxpress(model, inputs, t, passes, repeat, warmup, labels, calibration, tolerance,
                                     options, tune, reference))
    return BenchResult(model=name or type(model).__name__, passes=passes_label(passes), inputs=_input_specs(inputs),
                       repeat=repeat, warmup=warmup, peers=results, memory_method=memory_method(),
                       threads=thread_info(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


# ----------------------------------------------------------------------------- machine

def machine_info() -> dict[str, Any]:
    """CPU model, cores, OS, Python and library versions: what a benchmark result must carry."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_vnni", "amx_tile") if x in have)
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_flags": flags, "logical_cores": os.cpu_count(), "usable_cores": usable,
            "memory_bytes": mem, "os": platform.platform(), "python": platform.python_version(),
            "versions": versions()}


def versions() -> dict[str, str]:
    out = {}
    for mod in ("fxpress", "torch", "tvm", "onnx", "onnxruntime", "onnxscript", "numpy"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001
            out[mod] = "not installed"
    return out
