"""Benchmark: per-call overhead of TVMExecutor.run, copying path vs zero-copy path (CPU).

TVMExecutor.run(inputs, copy=True) is the old path: every input copied into a new TVM tensor
(tvm.runtime.tensor), every output copied out with .numpy(). run(inputs) is the zero-copy path: aligned
contiguous inputs go to TVM through DLPack, outputs come back as numpy views of the VM's tensors
(runtime/backends.py says when it copies anyway). Measured, in one process:

  linear16   one nn.Linear(16, 16), batch 1: almost all of a call is overhead
  digits_cnn the small digits CNN (registry "digits_cnn", "small"), batch 8
  split      split_branches dynamic models (registry get_dynamic): the torch-free host program on numpy,
             many small region calls per inference; regions switched between the two paths

Inputs are 64-byte aligned (as torch tensors and TVM outputs are) unless the row says "misaligned" (a
numpy array at a 16-byte offset, what malloc gives large numpy arrays: the zero-copy path then copies it
into an aligned buffer). Old and new runs alternate in blocks; each figure is the median of all its runs.
TVM runs 1 thread. Results: benchmarks/results/runtime_overhead.md.

    .venv/bin/python benchmarks/bench_runtime_overhead.py [--runs 3000] [--split-runs 300] [--models early_exit ...]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

if __name__ == "__main__":  # TVM sizes its thread pool when it first starts: set it before any import of tvm
    os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np
import torch

import fxpress
from fxpress.models import registry

HERE = os.path.dirname(os.path.abspath(__file__))


def aligned(a: np.ndarray, offset: int = 0) -> np.ndarray:
    buf = np.empty(a.nbytes + 128, dtype=np.uint8)
    start = -buf.ctypes.data % 64 + offset
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def paired_us(old, new, runs: int, block: int = 50) -> tuple[float, float]:
    """Median µs per call of ``old()`` and ``new()``, alternating blocks of ``block`` calls."""
    for _ in range(20):
        old(), new()
    t_old: list[float] = []
    t_new: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(max(1, runs // block)):
        for fn, sink in ((old, t_old), (new, t_new)):
            for _ in range(block):
                t0 = clock()
                fn()
                sink.append(clock() - t0)
    return statistics.median(t_old) / 1e3, statistics.median(t_new) / 1e3


def executor_rows(runs: int) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    spec = registry.get("digits_cnn", "small")
    cases = [("linear16", torch.nn.Linear(16, 16), (torch.randn(1, 16),)),
             ("digits_cnn", spec.build(), spec.example_inputs())]
    for name, model, inputs in cases:
        cm = fxpress.compile(model, inputs, passes="none", target="llvm")
        ex = cm._executor
        for layout, offset in (("aligned", 0), ("misaligned", 16)):
            xs = [aligned(x.numpy(), offset) for x in inputs]
            old, new = paired_us(lambda: ex.run(xs, copy=True), lambda: ex.run(xs), runs)
            shape = "x".join(map(str, inputs[0].shape))
            rows.append({"case": f"{name} ({shape}, {layout})", "calls": 1, "old_us": old, "new_us": new})
            print(f"{rows[-1]['case']:40s} copy {old:8.1f} µs   zero-copy {new:8.1f} µs   {old / new:.2f}x",
                  flush=True)
    return rows


def split_rows(names: list[str], runs: int, samples: int = 8) -> list[dict]:
    rows = []
    for name in names:
        spec = registry.get_dynamic(name)
        cm = fxpress.compile(spec.build(), spec.example_inputs(), passes=["split_branches"], target="llvm",
                             options={"split_branches": dict(spec.options)})
        interp = cm._interp
        executors = list(interp.executors.values())
        batches = [[aligned(a) for a in cm._arrays(spec.sample(seed))] for seed in range(samples)]
        calls = 0
        counting = {}
        for key, ex in interp.executors.items():  # count region calls per inference
            def run(args, _ex=ex, **kw):
                nonlocal calls
                calls += 1
                return type(_ex).run(_ex, args, **kw)
            counting[key] = run
        for key, fn in counting.items():
            interp.executors[key].run = fn
        for b in batches:
            interp.run(b)
        for ex in executors:
            del ex.run
        per_inference = calls / len(batches)

        def set_copy(flag: bool):
            for ex in executors:
                ex._zero_copy = not flag

        def new():
            for b in batches:
                interp.run(b)

        def old():
            set_copy(True)
            try:
                new()
            finally:
                set_copy(False)

        t_old, t_new = paired_us(old, new, runs, block=10)
        rows.append({"case": f"split: {name} (host program, {len(executors)} regions)", "calls": per_inference,
                     "old_us": t_old / len(batches), "new_us": t_new / len(batches)})
        r = rows[-1]
        print(f"{r['case']:40s} copy {r['old_us']:8.1f} µs   zero-copy {r['new_us']:8.1f} µs   "
              f"{r['old_us'] / r['new_us']:.2f}x  ({per_inference:.1f} region calls/inference)", flush=True)
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3000, help="timed calls per path for the executor rows")
    ap.add_argument("--split-runs", type=int, default=300, help="timed passes over the 8 samples per path")
    ap.add_argument("--models", nargs="*", default=["early_exit", "gated_skip", "refine_loop"],
                    help="dynamic models for the split rows (registry.dynamic_names())")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "runtime_overhead.md"))
    args = ap.parse_args()

    import tvm

    load_start = os.getloadavg()
    machine = f"{cpu_name()}, {os.cpu_count()} logical cores (shared)"
    print(f"machine: {machine}; load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
          f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}")
    rows = executor_rows(args.runs) + split_rows(args.models, args.split_runs)
    load_end = os.getloadavg()

    lines = [
        "# TVMExecutor per-call overhead: copying path vs zero-copy (CPU)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; {machine}; load average (1/5/15 min) "
        f"{' '.join(f'{v:.2f}' for v in load_start)} at the start, {' '.join(f'{v:.2f}' for v in load_end)} "
        f"at the end; TVM {tvm.__version__}, numpy {np.__version__}, TVM_NUM_THREADS="
        f"{os.environ.get('TVM_NUM_THREADS')}.",
        "",
        "copy = `TVMExecutor.run(inputs, copy=True)` (inputs into new TVM tensors, outputs out with `.numpy()`); "
        "zero-copy = `run(inputs)` (DLPack in, numpy views of the VM's output tensors out). Median µs per "
        "inference, old and new alternating in blocks in one process (`benchmarks/bench_runtime_overhead.py`). "
        "Split rows: the torch-free host program (`HostInterpreter.run` on numpy) over 8 random samples, every "
        "region's executor switched between the two paths.",
        "",
        "| case | executor calls / inference | copy (µs) | zero-copy (µs) | saved (µs) | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['calls']:.1f} | {r['old_us']:.1f} | {r['new_us']:.1f} | "
                     f"{r['old_us'] - r['new_us']:.1f} | {r['old_us'] / r['new_us']:.2f}x |")
    lines.append("")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines[8:]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
