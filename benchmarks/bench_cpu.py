#!/usr/bin/env python
"""fxpress llvm vs eager, torch.compile (freezing) and ONNX Runtime on the CPU (issue #18).

Three models, each in this one process on the same inputs:

  resnet18    ResNet-18 (width 64), 1x3x224x224
  bert_small  fxpress.models BERT-style encoder, hidden 384 x 6 layers, 12 heads, FFN 1536, 1x128 tokens
  hf_bert     transformers BertModel(hidden 384, 6 layers, 6 heads, intermediate 1536), seeded, 1x128

Rows: eager, torch.compile (Inductor, freezing=True), onnxruntime (CPU provider), fxpress llvm default
(``fxpress.compile(model, x, target="llvm")`` as a user calls it: the default pass set, ``fuse``, which is
lossless: BN folded, Q/K/V merged), fxpress llvm with no passes (the kernels alone), and with --int8
fxpress llvm fuse+quantize. Each row: median and min wall-clock ms,
the ratio of its median to the best peer's, and its max relative output error vs eager.

Per GEMM (fxpress default, BERT-style and transformers BERT): every call of the BLAS GEMM shim is
timed alone through the VM's instrument hook and reported as GFLOP/s and as a fraction of the FMA
peak, cores x GHz x fp32 lanes x 2 FMA ports x 2 (the formula of issue #18). On AMD Zen 4 a 512-bit
FMA occupies a 256-bit pipe twice, so its data-path peak is half that; both fractions are written.

Results: benchmarks/results/cpu-<isa>.{json,md} (<isa> from codegen/isa.py, e.g. avx512-bw-vnni).
``--avx2`` runs the same on an AVX-512 machine as an AVX2-only part would (fxpress compiled for
znver3, OpenBLAS/torch/oneDNN/MKL held to AVX2 by their switches; ONNX Runtime has none).
Time it only on a quiet machine: /work/shared/tools/quiet-run python benchmarks/bench_cpu.py

    .venv/bin/python benchmarks/bench_cpu.py                       # all three models, 30 timed calls
    .venv/bin/python benchmarks/bench_cpu.py --models bert_small --repeat 10 --no-int8   # quick
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time

# this folder is on sys.path when the script runs: one ratio-to-best-peer step for both benchmarks
from bench_tuning import model_result  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = ("resnet18", "bert_small", "hf_bert")


def build_model(name: str):
    """(model, inputs, description), seeded."""
    import torch

    gen = torch.Generator().manual_seed(0)
    if name == "resnet18":
        from fxpress.models.resnet import resnet18

        return resnet18(), (torch.randn(1, 3, 224, 224, generator=gen),), "ResNet-18 (width 64), 1x3x224x224"
    if name == "bert_small":
        from fxpress.models.bert import bert_small

        return (bert_small(), (torch.randint(0, 30522, (1, 128), generator=gen),),
                "BERT-style encoder (fxpress.models), hidden 384 x 6, 12 heads, FFN 1536, 1x128 tokens")
    if name == "hf_bert":
        import transformers

        cfg = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                                      intermediate_size=1536)
        cfg._attn_implementation = "eager"  # SDPA dispatch is decided by runtime checks tracers bake in
        torch.manual_seed(0)
        model = transformers.BertModel(cfg).eval()

        class LastHidden(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, ids):
                return self.m(input_ids=ids).last_hidden_state

        return (LastHidden(model).eval(), (torch.randint(0, cfg.vocab_size, (1, 128), generator=gen),),
                "transformers BertModel, hidden 384 x 6, 6 heads, intermediate 1536, 1x128 tokens")
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def cpu_facts() -> dict:
    """Model name, vendor/family, nominal MHz, the ISA (codegen/isa.py) and the FMA peaks."""
    from fxpress.codegen import isa
    from fxpress.codegen.targets import resolve_target

    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "vendor_id", "cpu family", "model", "cpu MHz") and key not in info:
                info[key] = value.strip()
    target = resolve_target("llvm")
    feats = isa.features(target)
    cores = os.cpu_count() or 1
    ghz = float(info.get("cpu MHz", 0)) / 1000
    lanes = feats.lanes_fp32
    peak = cores * ghz * lanes * 2 * 2
    zen4 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25" and feats.avx512f
    datapath = cores * ghz * (8 if zen4 else lanes) * 2 * 2
    return {"cpu": info.get("model name"), "vendor": info.get("vendor_id"), "family": info.get("cpu family"),
            "model": info.get("model"), "nominal_ghz": round(ghz, 3), "cores": cores,
            "llvm_mcpu": str(target.attrs.get("mcpu")), "isa": feats.key(), "fp32_lanes": lanes,
            "peak_gflops_formula": round(peak, 1), "peak_gflops_datapath": round(datapath, 1),
            "datapath_note": ("AMD Zen 4: 512-bit FMAs run on 256-bit pipes (2 per cycle), so the "
                              "data-path peak is half the formula's; both use the nominal clock, and "
                              "boost clocks above it show as more than 100 %") if zen4 else ""}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def fxpress_rows(int8: bool) -> list[tuple[str, str | list[str]]]:
    """(label, passes) of the fxpress rows: the user's default call, the kernels alone, and int8."""
    rows = [("fxpress llvm default", "default"), ("fxpress llvm no passes", "none")]
    return rows + [("fxpress llvm fuse+quantize", ["fuse", "quantize"])] if int8 else rows


def paired_ratios(rows: list[dict]) -> None:
    """``ratio_paired``: per round, a row's block median over the best peer's block median in the same
    round; the median over rounds. The machine's speed drifts (a shared VM); rows of one round share it."""
    peers = [r for r in rows if r.get("block_medians_ms") and not r["peer"].startswith("fxpress")]
    if not peers:
        return
    rounds = min(len(r["block_medians_ms"]) for r in peers)
    best = [min(r["block_medians_ms"][i] for r in peers) for i in range(rounds)]
    for r in rows:
        if r.get("block_medians_ms") and len(r["block_medians_ms"]) >= rounds:
            r["ratio_paired"] = round(statistics.median(m / b for m, b in zip(r["block_medians_ms"], best)), 2)


def row(res, label: str) -> dict:
    keys = ("ok", "error", "median_ms", "min_ms", "p10_ms", "p90_ms", "runs", "compile_s", "max_rel_error",
            "load_avg", "note")
    d = {k: getattr(res, k) for k in keys}
    d["peer"] = label
    return d


def gemm_shapes(built) -> dict[str, tuple[int, int, int, int]]:
    """GEMM kernel name → (batch, M, N, K), read from the shim calls in the scheduled TIR."""
    text = built.ir_after.get("tir.scheduled") or built.ir_after["relax.fused"]
    out = {}
    for chunk in re.split(r"\n    @T.prim_func[^\n]*\n    def ", text):
        name = chunk.split("(", 1)[0].strip()
        m = re.search(r'"fxpress_sgemm", \w+, T\.int64\(\d+\), T\.int64\((\d+)\), T\.int64\((\d+)\), '
                      r'T\.int64\((\d+)\), T\.int64\((\d+)\)', chunk)
        if m:
            out[name] = tuple(int(g) for g in m.groups())
    return out


def per_gemm(cm, inputs, peak: float, datapath: float, calls: int = 10) -> list[dict]:
    """Each GEMM kernel timed alone (VM instrument hook, wall clock), min over ``calls`` model runs."""
    built = cm._lowered.built
    shapes = gemm_shapes(built)
    vm = cm._executor.vm
    best: dict[str, float] = collections.defaultdict(lambda: float("inf"))
    count = collections.Counter()
    started = {}

    def instrument(func, symbol, before, ret, *args):
        if symbol in shapes:
            if before:
                started[symbol] = time.perf_counter()
            else:
                dt = time.perf_counter() - started[symbol]
                best[symbol] = min(best[symbol], dt)
                count[symbol] += 1
        return 0

    vm.set_instrument(instrument)
    try:
        for _ in range(calls):
            cm(*inputs)
    finally:
        vm.set_instrument(None)  # None clears it; a no-op callback still costs ~5 % per call
    rows = []
    for name, (batch, m, n, k) in sorted(shapes.items()):
        if name not in best:
            continue
        gflops = 2 * batch * m * n * k / best[name] / 1e9
        rows.append({"kernel": name, "batch": batch, "M": m, "N": n, "K": k, "calls_per_run": count[name] // calls,
                     "min_ms": round(best[name] * 1e3, 4), "gflops": round(gflops, 1),
                     "pct_peak_formula": round(100 * gflops / peak, 1),
                     "pct_peak_datapath": round(100 * gflops / datapath, 1)})
    return rows


def run(args) -> dict:
    import torch

    from fxpress.bench import bench_fxpress, bench_peers, machine_info, thread_info, time_blocks
    from fxpress.codegen import blas
    from fxpress.runtime import blas as runtime_blas

    facts = cpu_facts()
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit(),
           "restricted_to_avx2": {k: os.environ.get(k) for k in AVX2_ENV} if args.avx2 else None,
           "machine": machine_info(), "cpu": facts, "threads": thread_info(),
           "blas": {"available": blas.available(), "symbol": None}, "models": {}}
    os.environ["FXPRESS_TUNING_CACHE"] = "0"  # the default path only: no records of earlier runs
    for name in args.models:
        model, inputs, desc = build_model(name)
        print(f"== {name}: {desc}", flush=True)
        with torch.no_grad():
            reference = [model(*inputs)]
        rows, callables = [], {}
        for res in bench_peers(model, inputs, peers=["eager", "torch.compile", "onnxruntime"],
                               repeat=args.repeat, reference=reference, keep=True):
            rows.append(row(res, res.peer))
            if res.ok:
                callables[res.peer] = res.compiled
            print(f"   {res.peer:28s} {res.median_ms} ms {res.error[:200] if not res.ok else ''}", flush=True)
        gemms = None
        for label, passes in fxpress_rows(args.int8):
            res = bench_fxpress(model, inputs, target="llvm", passes=passes, repeat=args.repeat,
                                reference=reference, keep=True)
            rows.append(row(res, label))
            print(f"   {label:28s} {res.median_ms} ms (compile {res.compile_s and round(res.compile_s, 1)} s) "
                  f"err {res.max_rel_error} {res.error[:300] if not res.ok else ''}", flush=True)
            if passes == "default" and res.ok:
                gemms = per_gemm(res.compiled, inputs, facts["peak_gflops_formula"], facts["peak_gflops_datapath"])
                out["blas"]["symbol"] = blas.bound_symbol()
                out["blas"].update(runtime_blas.choice())
            if res.ok:
                callables[label] = res.compiled
        # The figures: every row timed again in BLOCKS rounds of blocks, the best block median kept (the
        # first timing above is one block per row; on this shared VM a burst of outside load can slow a
        # block by 30 %, and it then hits one row only).
        times = time_blocks(callables, inputs, blocks=BLOCKS, per_block=args.repeat)
        for r in rows:
            if r["peer"] in times:
                medians = [statistics.median(b) for b in times[r["peer"]]]
                r["block_medians_ms"] = [round(m, 3) for m in [r["median_ms"], *medians]]
                r["median_ms"] = min(medians)
                r["min_ms"] = min(min(b) for b in times[r["peer"]])
                r["runs"] = args.repeat * BLOCKS
                print(f"   best of {BLOCKS} blocks {r['peer']:28s} {r['median_ms']:.2f} ms "
                      f"(block medians {r['block_medians_ms']})", flush=True)
        callables.clear()
        paired_ratios(rows)
        entry = model_result(desc, rows)
        if gemms:
            entry["gemms"] = gemms
        out["models"][name] = entry
    return out


def run_cpu_time(args) -> dict:
    """One thread everywhere, CPU time per call (time.process_time): the work each peer does per
    inference, which machine load distorts far less than wall clock. Not the acceptance metric."""
    import statistics

    import numpy as np
    import torch

    import fxpress
    from fxpress.bench import machine_info
    from fxpress.lowering import to_onnx
    from fxpress.runtime.backends import ORTExecutor

    torch.set_num_threads(1)
    facts = cpu_facts()
    out = {"mode": "cpu-time, 1 thread", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "commit": commit(), "machine": machine_info(), "cpu": facts,
           "threads": {"torch": 1, "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS"), "ORT intra-op": 1},
           "restricted_to_avx2": {k: os.environ.get(k) for k in AVX2_ENV} if args.avx2 else None,
           "blas": {}, "models": {}}

    def cpu_ms(fn):
        with torch.no_grad():
            for _ in range(3):
                fn()
            ts = []
            for _ in range(args.repeat):
                c0 = time.process_time()
                fn()
                ts.append((time.process_time() - c0) * 1e3)
        return {"ok": True, "median_ms": statistics.median(ts), "min_ms": min(ts), "runs": args.repeat,
                "load_avg": round(os.getloadavg()[0], 2)}

    for name in args.models:
        model, inputs, desc = build_model(name)
        print(f"== {name}: {desc}", flush=True)
        rows = [{"peer": "eager", **cpu_ms(lambda: model(*inputs))}]
        try:
            import torch._inductor.config as cfg

            torch._dynamo.reset()
            compiled = torch.compile(model)
            with torch.no_grad(), cfg.patch(freezing=True):
                compiled(*inputs)
            rows.append({"peer": "torch.compile", **cpu_ms(lambda: compiled(*inputs))})
        except Exception as e:  # noqa: BLE001 - a failing peer is a row
            rows.append({"peer": "torch.compile", "ok": False, "error": str(e)[:300]})
        try:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                to_onnx(model, inputs, os.path.join(tmp, "m.onnx"))
                with open(os.path.join(tmp, "m.onnx"), "rb") as f:
                    ex = ORTExecutor(f.read(), threads=1)
            np_in = [x.numpy() for x in inputs]
            rows.append({"peer": "onnxruntime", **cpu_ms(lambda: ex.run(np_in))})
        except Exception as e:  # noqa: BLE001
            rows.append({"peer": "onnxruntime", "ok": False, "error": str(e)[:300]})
        with torch.no_grad():
            ref = model(*inputs).numpy()
        gemms = None
        for label, passes in fxpress_rows(args.int8):
            try:
                cm = fxpress.compile(model, inputs, passes=passes, target="llvm")
                y = np.asarray(cm(*inputs))
                err = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))
                rows.append({"peer": label, **cpu_ms(lambda: cm(*inputs)), "max_rel_error": err})
                if passes == "default":  # one thread: the peak of one core
                    cores = facts["cores"]
                    gemms = per_gemm(cm, inputs, facts["peak_gflops_formula"] / cores,
                                     facts["peak_gflops_datapath"] / cores)
            except Exception as e:  # noqa: BLE001
                rows.append({"peer": label, "ok": False, "error": str(e)[:300]})
        for r in rows:
            print(f"   {r['peer']:28s} {r.get('median_ms')} {r.get('error', '')[:200]}", flush=True)
        out["models"][name] = model_result(desc, rows)
        if gemms:
            out["models"][name]["gemms"] = gemms
    return out


def markdown(out: dict) -> str:
    c = out["cpu"]
    lines = [f"# CPU benchmark, {c['isa']} ({out['date']}, commit {out['commit']})", "",
             f"CPU: {c['cpu']} ({c['vendor']} family {c['family']} model {c['model']}), {c['cores']} cores, "
             f"nominal {c['nominal_ghz']} GHz; LLVM mcpu {c['llvm_mcpu']}; flags: {out['machine'].get('cpu_flags')}.",
             f"FMA peak (cores x GHz x {c['fp32_lanes']} lanes x 2 ports x 2): {c['peak_gflops_formula']} GFLOP/s"
             + (f"; data-path peak {c['peak_gflops_datapath']} GFLOP/s ({c['datapath_note']})"
                if c["datapath_note"] else "") + ".",
             f"Threads: {out['threads']}. GEMM library: {out['blas']}.", "",
             *([f"Restricted to AVX2: {out['restricted_to_avx2']} (ONNX Runtime has no such switch)", ""]
               if out.get("restricted_to_avx2") else []),
             ("CPU time per call, ONE thread everywhere (time.process_time): the work per inference, "
              "not the latency; median (min) ms; ratio = median / best peer's median."
              if out.get("mode") else
              f"Median (min) ms per call, in one process: every row timed in {BLOCKS} rounds of blocks (3 "
              "warm-up calls, then the timed ones; each row's block in turn), the best block median kept; "
              "ratio = median / best peer's median. 'block medians' lists the first timing and each round's; "
              "'paired ratio' = the median over those rounds of the row's block median / the best peer's in "
              "the same round (the machine's speed drifts; a round's rows share it)."), ""]
    for name, m in out["models"].items():
        lines += [f"## {name}: {m['description']}", "", "| peer | median ms | min ms | ratio to best peer | "
                  "max rel. error | compile s | load | block medians ms | paired ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in m["rows"]:
            if not r.get("ok"):
                lines.append(f"| {r['peer']} | failed: {(r.get('error') or '')[:120]} | | | | | | | |")
                continue
            err = r.get("max_rel_error")
            block = " / ".join(f"{m:.1f}" for m in r.get("block_medians_ms") or [])
            lines.append(f"| {r['peer']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
                         f"{r.get('ratio_to_best_peer', '')} | {err:.1e} | "
                         f"{(r.get('compile_s') or 0):.1f} | {r.get('load_avg')} | {block} | {r.get('ratio_paired', '')} |"
                         if err is not None else
                         f"| {r['peer']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
                         f"{r.get('ratio_to_best_peer', '')} | | | {r.get('load_avg')} | {block} | {r.get('ratio_paired', '')} |")
        if m.get("gemms"):
            one = " on one thread, against one core's peak" if out.get("mode") else ""
            lines += ["", f"GEMMs of `fxpress llvm default` (each timed alone, min of 10 model calls{one}):", "",
                      "| kernel | batch x M x N x K | calls/run | min ms | GFLOP/s | % formula peak | "
                      "% data-path peak |", "|---|---|---:|---:|---:|---:|---:|"]
            for g in m["gemms"]:
                lines.append(f"| {g['kernel']} | {g['batch']}x{g['M']}x{g['N']}x{g['K']} | {g['calls_per_run']} | "
                             f"{g['min_ms']} | {g['gflops']} | {g['pct_peak_formula']} | {g['pct_peak_datapath']} |")
        lines.append("")
    return "\n".join(lines)


BLOCKS = 3  # rounds of blocks in the final timing (best block median: the steady state)

AVX2_ENV = {  # set before numpy/torch load their libraries
    "FXPRESS_LLVM_MCPU": "znver3",      # fxpress's TVM kernels: AVX2 + FMA code
    "OPENBLAS_CORETYPE": "Haswell",     # the GEMM shim's OpenBLAS: its AVX2 kernels
    "ATEN_CPU_CAPABILITY": "avx2",      # torch's own vectorized kernels
    "DNNL_MAX_CPU_ISA": "AVX2",         # oneDNN (torch, Inductor's packed GEMMs)
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL (torch's, and the GEMM shim's when it picks the mkl wheel)
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="also time fxpress llvm with passes fuse+quantize (int8)")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/cpu-<isa>)")
    p.add_argument("--cpu-time", action="store_true",
                   help="one thread everywhere, CPU time per call (usable on a loaded machine); "
                        "results go to cpu-<isa>-cputime.*")
    p.add_argument("--avx2", action="store_true",
                   help="restrict everything that has a switch to AVX2 (see AVX2_ENV; ONNX Runtime has "
                        "none and keeps its AVX-512 kernels); results go to cpu-avx2-fma.*")
    args = p.parse_args(argv)
    if args.avx2:
        if "numpy" in sys.modules or "torch" in sys.modules:
            raise SystemExit("--avx2 must be set before numpy/torch load")
        os.environ.update(AVX2_ENV)
    if args.cpu_time:
        os.environ["TVM_NUM_THREADS"] = "1"  # read when TVM's pool first starts
    sys.path.insert(0, ROOT)
    out = run_cpu_time(args) if args.cpu_time else run(args)
    suffix = "-cputime" if args.cpu_time else ""
    stem = args.out or os.path.join(HERE, "results", f"cpu-{out['cpu']['isa']}{suffix}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown(out))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
