"""Benchmark: split-compiled dynamic models vs eager PyTorch, per path; and the torch.cond lowering.

For every dynamic reference model (fxpress.models.dynamic) and target, random inputs are grouped by the
path the host program takes (which branch / exit / how many iterations); for one input per path the
best latency (of N runs) of
  eager      the PyTorch model (torch.no_grad)
  split      the DynamicCompiledModel: host program + one compiled region per straight-line piece
             (torch tensors in and out, as users call it)
  host-only  the same host program on numpy arrays (what the torch-free runtime does), and the part of
             it spent inside the region executors (the rest is the interpreter's dispatch)
  native     lowering="native": one graph with torch.cond (relax.If / ONNX If), loops unrolled
  compile    torch.compile of the same model (Inductor; graph breaks at the data-dependent branches)
is measured (median of N runs; run it under ../shared/tools/quiet-run). Per model, a summary row gives the
share-weighted geometric mean speedup over eager and over torch.compile (DyCL reports 1.12-20.21x over
eager), and the host program's own cost per region call. Results: benchmarks/results/split_branches.{json,md}.

    .venv/bin/python benchmarks/bench_split_branches.py [--models early_exit ...] [--targets llvm onnx]
"""
from __future__ import annotations

import argparse
import json
import os
import time


if __name__ == "__main__":  # TVM sizes its thread pool when it first starts: set it before any import of tvm
    import sys

    _t = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
    os.environ["TVM_NUM_THREADS"] = _t

import torch

import fxpress
from fxpress.models.registry import dynamic_names, get_dynamic
from fxpress.runtime.host_program import HostInterpreter

HERE = os.path.dirname(os.path.abspath(__file__))


def best_us(fn, repeats: int, warmup: int = 5) -> float:
    """The median of ``repeats`` runs, in µs (time it on a quiet machine: quiet-run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e6


class Timed:
    """Wraps a region executor and accumulates the time spent inside it."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def run(self, inputs):
        t0 = time.perf_counter()
        out = self.inner.run(inputs)
        self.seconds += time.perf_counter() - t0
        return out


def pin_threads(cm, threads: int) -> None:
    """Rebuild ONNX Runtime sessions with ``threads`` intra-op threads (fxpress builds them with the default)."""
    from fxpress.runtime.backends import ORTExecutor

    def fix(ex):
        if isinstance(ex, ORTExecutor):
            sess = ex.session
            return ORTExecutor(sess._model_bytes if sess._model_bytes is not None else sess._model_path,
                               threads=threads)
        return ex

    if getattr(cm, "_interp", None) is not None:
        cm._interp.executors = {k: fix(e) for k, e in cm._interp.executors.items()}  # noqa: SLF001
    if getattr(cm, "native", None) is not None:
        cm.native._executor = fix(cm.native._executor)  # noqa: SLF001


def bench_model(name: str, targets: list[str], samples: int, repeats: int, native: bool,
                threads: int) -> list[dict]:
    spec = get_dynamic(name)
    model = spec.build()
    rows = []
    for target in targets:
        t0 = time.perf_counter()
        cm = fxpress.compile(model, spec.example_inputs(), passes=["split_branches"], target=target,
                             options={"split_branches": dict(spec.options)})
        compile_s = time.perf_counter() - t0
        nat = None
        if native:
            t0 = time.perf_counter()
            nat = fxpress.compile(model, spec.example_inputs(), passes=["split_branches"], target=target,
                                  options={"split_branches": {**spec.options, "lowering": "native"}})
            native_compile_s = time.perf_counter() - t0
        pin_threads(cm, threads)
        if nat is not None:
            pin_threads(nat, threads)
        compiled_torch = torch.compile(model)
        # one representative input per path
        by_path: dict[str, tuple] = {}
        counts: dict[str, int] = {}
        for seed in range(samples):
            x = spec.sample(seed)
            _, trace = cm.run_with_trace(*x)
            counts[trace.key()] = counts.get(trace.key(), 0) + 1
            by_path.setdefault(trace.key(), x)
        timed = {n: Timed(e) for n, e in cm._interp.executors.items()}  # noqa: SLF001
        interp = HostInterpreter(cm._interp.program, timed)  # noqa: SLF001
        for path, x in sorted(by_path.items(), key=lambda kv: -counts[kv[0]]):
            arrays = [t.numpy() for t in x]
            with torch.no_grad():
                eager = best_us(lambda: model(*x), repeats)
                inductor = best_us(lambda: compiled_torch(*x), repeats)
            split = best_us(lambda: cm(*x), repeats)
            host = best_us(lambda: interp.run(arrays), repeats)
            per_run = []
            for _ in range(repeats):
                for t in timed.values():
                    t.seconds = 0.0
                interp.run(arrays)
                per_run.append(sum(t.seconds for t in timed.values()))
            in_regions = min(per_run) * 1e6
            row = {"model": name, "target": target, "path": path, "share": counts[path] / samples,
                   "regions_called": _calls(cm, arrays),
                   "eager_us": eager, "split_us": split, "host_us": host, "in_regions_us": in_regions,
                   "dispatch_us": host - in_regions, "speedup_split": eager / split,
                   "torch_compile_us": inductor, "speedup_vs_compile": inductor / split,
                   "compile_s": compile_s, "regions": len(cm.regions)}
            if nat is not None:
                row["native_us"] = best_us(lambda: nat(*x), repeats)
                row["speedup_native"] = eager / row["native_us"]
                row["native_compile_s"] = native_compile_s
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _calls(cm, arrays) -> int:
    n = {"calls": 0}

    class Count:
        def __init__(self, inner):
            self.inner = inner

        def run(self, inputs):
            n["calls"] += 1
            return self.inner.run(inputs)

    interp = HostInterpreter(cm._interp.program, {k: Count(e) for k, e in cm._interp.executors.items()})  # noqa: SLF001
    interp.run(arrays)
    return n["calls"]


def _line(r: dict) -> str:
    native = f" native {r['native_us']:8.1f}us ({r['speedup_native']:.2f}x)" if "native_us" in r else ""
    return (f"{r['model']:13s} {r['target']:5s} {r['path'][:44]:44s} {r['share']:5.0%}  eager {r['eager_us']:8.1f}us"
            f"  split {r['split_us']:8.1f}us ({r['speedup_split']:.2f}x)  host {r['host_us']:8.1f}us"
            f" [regions {r['in_regions_us']:7.1f}us, {r['regions_called']} calls]{native}")


def write_markdown(rows: list[dict], path: str, meta: dict) -> None:
    lines = ["# split_branches: latency per path (µs, best of the timed runs)", "",
             f"{meta['machine']}; {meta['when']}; {meta['threads']} thread(s) for torch, TVM and ORT; "
             f"{meta['samples']} random inputs per model grouped by path, {meta['repeats']} timed runs each.",
             "split = DynamicCompiledModel call (torch in/out); host = torch-free host program on numpy; "
             "regions = time inside the compiled regions; native = one torch.cond graph.", "",
             "## Per model (share-weighted geometric mean over the paths)", "",
             "| model | target | split vs eager | split vs torch.compile | native vs eager | host cost per region call (µs) |",
             "|---|---|---|---|---|---|"]
    for (model, target), group in _groups(rows).items():
        lines.append(f"| {model} | {target} | {_gmean(group, 'speedup_split'):.2f}x | "
                     f"{_gmean(group, 'speedup_vs_compile'):.2f}x | "
                     f"{_gmean(group, 'speedup_native'):.2f}x | "
                     f"{sum(r['dispatch_us'] / max(r['regions_called'], 1) for r in group) / len(group):.1f} |")
    lines += ["", "## Per path (µs, median)", "",
              "| model | target | path | share | regions called | eager | torch.compile | split | speedup | host "
              "| in regions | native | native speedup |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        native = (f"{r['native_us']:.1f} | {r['speedup_native']:.2f}x" if "native_us" in r else "- | -")
        lines.append(f"| {r['model']} | {r['target']} | {r['path']} | {r['share']:.0%} | {r['regions_called']} | "
                     f"{r['eager_us']:.1f} | {r['torch_compile_us']:.1f} | {r['split_us']:.1f} | "
                     f"{r['speedup_split']:.2f}x | {r['host_us']:.1f} | {r['in_regions_us']:.1f} | {native} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _groups(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["model"], r["target"]), []).append(r)
    return out


def _gmean(group: list[dict], key: str) -> float:
    """Share-weighted geometric mean of ``key`` over a model's paths (nan when absent)."""
    import math

    pairs = [(r["share"], r[key]) for r in group if key in r]
    if not pairs:
        return float("nan")
    total = sum(w for w, _ in pairs)
    return math.exp(sum(w * math.log(v) for w, v in pairs) / total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=dynamic_names())
    ap.add_argument("--targets", nargs="*", default=["llvm", "onnx"])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--no-native", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for torch, TVM and ONNX Runtime alike (default 1: on a shared machine, parallel "
                         "kernels mostly measure the other processes)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "split_branches"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.targets, args.samples, args.repeats, not args.no_native, args.threads)
    import platform
    import subprocess

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    isa = sorted({f for ln in open("/proc/cpuinfo") if ln.startswith("flags")
                  for f in ln.split(":", 1)[1].split() if f in ("avx2", "avx512f", "avx512_vnni", "amx_tile")})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    meta = {"machine": f"{cpu} ({' '.join(isa)}), {os.cpu_count()} cores, load average "
                       f"{os.getloadavg()[0]:.1f}, commit {commit}",
            "when": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads,
            "samples": args.samples, "repeats": args.repeats}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    write_markdown(rows, args.out + ".md", meta)
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
