#!/usr/bin/env python
"""fxpress default vs tuned vs eager vs torch.compile vs ONNX Runtime, on the reference models.

CPU (default): for ResNet-18 (width 64, 1x3x112x112) and the BERT-style encoder (hidden 384,
6 layers, 12 heads, FFN 1536, 1x64 tokens), in this one process on the same inputs:

  eager            torch, no_grad
  torch.compile    Inductor, freezing=True
  onnxruntime      torch.onnx (dynamo) export of the original model, ORT CPU provider
  fxpress default  fxpress.compile(passes="none", target="llvm"): default schedules
  fxpress tuned    the same with tune=--trials (MetaSchedule, per kernel); its compile time is the
                   tuning time; a second compile then shows the database reuse
  fxpress tuned+passes  tune with passes="default" (fusion etc.) — only with --passes

Every row carries median and minimum latency and the ratio to the best peer (<1: faster than it).
Results: benchmarks/results/tuning_cpu.{json,md} (or --out).

    .venv/bin/python benchmarks/bench_tuning.py                     # ~30-60 min on 2 loaded cores
    .venv/bin/python benchmarks/bench_tuning.py --trials 8 --models resnet18 --repeat 5   # quick
    .venv/bin/python benchmarks/bench_tuning.py --gpu               # on a CUDA machine: fxpress
        (target="cuda", tuned) vs torch.compile and ORT's CUDA provider -> tuning_gpu.{json,md}

The tuning database is --database-dir (default: fxpress's cache); records shipped in
fxpress/codegen/records are used too, so a run on the CI machine kind reuses them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def models(names: list[str]):
    import torch

    from fxpress.models.bert import bert_small
    from fxpress.models.resnet import resnet18

    gen = torch.Generator().manual_seed(0)
    out = {}
    if "resnet18" in names:
        out["resnet18"] = (resnet18(), (torch.randn(1, 3, 112, 112, generator=gen),),
                           "ResNet-18 (width 64), 1x3x112x112")
    if "bert_small" in names:
        out["bert_small"] = (bert_small(), (torch.randint(0, 30522, (1, 64), generator=gen),),
                             "BERT-style encoder, hidden 384 x 6 layers, 12 heads, FFN 1536, 1x64 tokens")
    return out


def row(res, label: str) -> dict:
    d = {k: getattr(res, k) for k in ("ok", "error", "median_ms", "min_ms", "p10_ms", "p90_ms", "runs",
                                      "compile_s", "max_rel_error", "load_avg", "note")}
    d["peer"] = label
    return d


def model_result(desc: str, rows: list[dict]) -> dict:
    """One model's entry: its rows, each successful one with its ratio to the fastest non-fxpress peer."""
    peers_ok = [r for r in rows if r.get("ok") and not r["peer"].startswith("fxpress")]
    best = min(peers_ok, key=lambda r: r["median_ms"]) if peers_ok else None
    for r in rows:
        if best and r.get("ok"):
            r["ratio_to_best_peer"] = round(r["median_ms"] / best["median_ms"], 2)
    return {"description": desc, "best_peer": best and best["peer"], "rows": rows}


def bench_cpu(args) -> dict:
    import torch

    from fxpress.bench import bench_fxpress, bench_peers, machine_info, thread_info

    torch.manual_seed(0)
    out = {"mode": "cpu", "trials": args.trials, "machine": machine_info(), "threads": thread_info(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": {}}
    tune_opts = {"tune": {"database_dir": args.database_dir}} if args.database_dir else None
    for name, (model, inputs, desc) in models(args.models).items():
        print(f"== {name}: {desc}", flush=True)
        with torch.no_grad():
            reference = [model(*inputs)]
        rows = []
        for res in bench_peers(model, inputs, peers=["eager", "torch.compile", "onnxruntime"],
                               repeat=args.repeat, reference=reference):
            rows.append(row(res, res.peer))
            print(f"   {res.peer:16s} {res.median_ms} ms", flush=True)
        variants = [("fxpress default", 0, "none"), ("fxpress tuned", args.trials, "none"),
                    ("fxpress tuned (2nd compile)", args.trials, "none")]
        if args.passes:
            variants.append(("fxpress tuned+passes", args.trials, "default"))
        for label, trials, passes in variants:
            # the default row must not pick up records of earlier runs (user cache, shipped records)
            saved = os.environ.get("FXPRESS_TUNING_CACHE")
            if trials == 0:
                os.environ["FXPRESS_TUNING_CACHE"] = "0"
            try:
                res = bench_fxpress(model, inputs, target="llvm", passes=passes, repeat=args.repeat,
                                    tune=trials, options=tune_opts, reference=reference, keep=True)
            finally:
                if saved is None:
                    os.environ.pop("FXPRESS_TUNING_CACHE", None)
                else:
                    os.environ["FXPRESS_TUNING_CACHE"] = saved
            r = row(res, label)
            built = getattr(getattr(getattr(res.compiled, "_lowered", None), "built", None), "tuning", None) \
                if res.compiled is not None else None
            if built is not None:
                r["tuning"] = {"tasks": len(built.tasks), "tuned": len(built.tuned), "reused": len(built.reused),
                               "trials": built.trials, "tuning_s": round(built.seconds, 1)}
            rows.append(r)
            print(f"   {label:16s} {res.median_ms} ms (compile {res.compile_s and round(res.compile_s, 1)} s)"
                  f" {r.get('tuning', '')} {res.error[:200] if not res.ok else ''}", flush=True)
        out["models"][name] = model_result(desc, rows)
    return out


def bench_cpu_time(args) -> dict:
    """One thread everywhere, CPU time per call (time.process_time): the work each peer does per
    inference, which machine load does not distort the way it distorts wall clock."""
    import numpy as np
    import torch

    import fxpress
    from fxpress.bench import machine_info

    torch.set_num_threads(1)
    out = {"mode": "cpu-time, 1 thread", "trials": args.trials, "machine": machine_info(),
           "threads": {"torch": 1, "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS"), "ORT intra-op": 1},
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": {}}

    def cpu_ms(fn, repeat):
        with torch.no_grad():
            for _ in range(2):
                fn()
            ts = []
            for _ in range(repeat):
                c0 = time.process_time()
                fn()
                ts.append((time.process_time() - c0) * 1e3)
        return {"ok": True, "median_ms": statistics.median(ts), "min_ms": min(ts), "runs": repeat}

    tune_opts = {"tune": {"database_dir": args.database_dir, "progress": False}} if args.database_dir else None
    for name, (model, inputs, desc) in models(args.models).items():
        rows = []
        rows.append({"peer": "eager", **cpu_ms(lambda: model(*inputs), args.repeat)})
        try:
            import torch._inductor.config as cfg

            torch._dynamo.reset()
            compiled = torch.compile(model)
            with torch.no_grad(), cfg.patch(freezing=True):
                compiled(*inputs)
            rows.append({"peer": "torch.compile", **cpu_ms(lambda: compiled(*inputs), args.repeat)})
        except Exception as e:  # noqa: BLE001
            rows.append({"peer": "torch.compile", "ok": False, "error": str(e)[:300]})
        try:
            import tempfile

            from fxpress.lowering import to_onnx
            from fxpress.runtime.backends import ORTExecutor

            with tempfile.TemporaryDirectory() as tmp:
                to_onnx(model, inputs, os.path.join(tmp, "m.onnx"))
                ex = ORTExecutor(open(os.path.join(tmp, "m.onnx"), "rb").read(), threads=1)
            np_in = [x.numpy() for x in inputs]
            rows.append({"peer": "onnxruntime", **cpu_ms(lambda: ex.run(np_in), args.repeat)})
        except Exception as e:  # noqa: BLE001
            rows.append({"peer": "onnxruntime", "ok": False, "error": str(e)[:300]})
        for label, trials in (("fxpress default", 0), ("fxpress tuned", args.trials)):
            try:
                cm = fxpress.compile(model, inputs, passes="none", target="llvm", tune=trials, options=tune_opts)
                rows.append({"peer": label, **cpu_ms(lambda: cm(*inputs), args.repeat)})
            except Exception as e:  # noqa: BLE001
                rows.append({"peer": label, "ok": False, "error": str(e)[:300]})
        out["models"][name] = model_result(desc, rows)
        for r in rows:
            print(f"   {name} {r['peer']:16s} {r.get('median_ms')} {r.get('error', '')[:120]}", flush=True)
    return out


def bench_gpu(args) -> dict:
    """fxpress target="cuda" (tuned) vs torch.compile and ORT's CUDA provider, timed with syncs."""
    import numpy as np
    import torch

    from fxpress.bench import machine_info

    if not torch.cuda.is_available():
        print("note: torch sees no CUDA device; torch peers will be skipped", flush=True)
    out = {"mode": "gpu", "trials": args.trials, "machine": machine_info(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": {}}

    def timed(fn, sync, repeat):
        for _ in range(3):
            fn()
        sync()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append((time.perf_counter() - t0) * 1e3)
        return {"ok": True, "median_ms": statistics.median(ts), "min_ms": min(ts), "runs": repeat}

    for name, (model, inputs, desc) in models(args.models).items():
        rows = []
        with torch.no_grad():
            ref = model(*inputs).numpy()
        # torch eager / torch.compile on the GPU
        if torch.cuda.is_available():
            m = model.cuda()
            xs = tuple(x.cuda() for x in inputs)
            for label, fn in (("eager cuda", m), ("torch.compile cuda", None)):
                try:
                    if fn is None:
                        import torch._inductor.config as cfg

                        torch._dynamo.reset()
                        fn = torch.compile(m)
                        with torch.no_grad(), cfg.patch(freezing=True):
                            fn(*xs)
                    with torch.no_grad():
                        r = timed(lambda: fn(*xs), torch.cuda.synchronize, args.repeat)
                    rows.append({"peer": label, **r})
                except Exception as e:  # noqa: BLE001
                    rows.append({"peer": label, "ok": False, "error": str(e)[:500]})
            model = model.cpu()
        # ORT CUDA provider
        try:
            import tempfile

            from fxpress.lowering import to_onnx
            from fxpress.runtime.backends import ORTExecutor

            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "m.onnx")
                to_onnx(model, inputs, path)
                ex = ORTExecutor(open(path, "rb").read(), device="cuda")
            np_in = [x.numpy() for x in inputs]
            r = timed(lambda: ex.run(np_in), lambda: None, args.repeat)
            r["note"] = "numpy in/out (host<->device copies inside the timing); providers: " + \
                str(getattr(getattr(ex, "session", None), "get_providers", lambda: "?")())
            rows.append({"peer": "onnxruntime cuda", **r})
        except Exception as e:  # noqa: BLE001
            rows.append({"peer": "onnxruntime cuda", "ok": False, "error": str(e)[:500]})
        # fxpress cuda, default and tuned
        import fxpress

        for label, trials in (("fxpress cuda default", 0), ("fxpress cuda tuned", args.trials)):
            try:
                t0 = time.perf_counter()
                cm = fxpress.compile(model, inputs, passes="none", target="cuda", tune=trials,
                                     options={"tune": {"database_dir": args.database_dir}} if args.database_dir else None)
                compile_s = time.perf_counter() - t0
                y = cm(*inputs)
                err = float(np.abs(y.numpy() - ref).max() / np.abs(ref).max())
                r = timed(lambda: cm(*inputs), lambda: None, args.repeat)
                r.update(compile_s=round(compile_s, 1), max_rel_error=err,
                         note="torch CPU tensors in/out (copies inside the timing)")
                rows.append({"peer": label, **r})
            except Exception as e:  # noqa: BLE001
                rows.append({"peer": label, "ok": False, "error": str(e)[:500]})
        out["models"][name] = model_result(desc, rows)
        for r in rows:
            print(f"   {name} {r['peer']:22s} {r.get('median_ms')} {r.get('error', '')[:120]}", flush=True)
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# fxpress tuning benchmark ({result['mode']})", "",
             f"Date {result['date']}; trials per kernel: {result['trials']}; machine: "
             f"{m.get('cpu', '?')} ({m.get('cpu_flags', '')}), {m.get('logical_cores', '?')} cores; {platform.python_version()}.", ""]
    if "threads" in result:
        lines.append(f"Threads: {result['threads']}.")
        lines.append("")
    lines.append("Latency is the median of the timed calls (min in brackets); ratio = median / best "
                 "non-fxpress peer's median (<1 is faster). load = 1-min load average when the row's "
                 "timing started (this CI machine is shared: compare rows of one run, not across runs).")
    for name, mres in result["models"].items():
        lines += ["", f"## {name}: {mres['description']}", "",
                  "| peer | median ms (min) | ratio to best peer | compile s | rel. error | load | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in mres["rows"]:
            if not r.get("ok"):
                lines.append(f"| {r['peer']} | failed: {(r.get('error') or '')[:80]} | | | | | |")
                continue
            tun = r.get("tuning")
            note = (r.get("note") or "")
            if tun:
                note = (f"{tun['tasks']} kernels ({tun['tuned']} tuned now, {tun['reused']} reused), "
                        f"{tun['trials']} trials, tuning {tun['tuning_s']} s. " + note)
            err = r.get("max_rel_error")
            lines.append(f"| {r['peer']} | {r['median_ms']:.2f} ({r.get('min_ms', r['median_ms']):.2f}) | "
                         f"{r.get('ratio_to_best_peer', '')} | {r.get('compile_s') or '':.4} | "
                         f"{'' if err is None else f'{err:.1e}'} | {r.get('load_avg', '')} | {note} |"
                         if isinstance(r.get("compile_s"), (int, float)) else
                         f"| {r['peer']} | {r['median_ms']:.2f} ({r.get('min_ms', r['median_ms']):.2f}) | "
                         f"{r.get('ratio_to_best_peer', '')} | | {'' if err is None else f'{err:.1e}'} | "
                         f"{r.get('load_avg', '')} | {note} |")
    return "\n".join(lines) + "\n"


def _early_threads() -> None:
    # TVM sizes its pool when it first starts; --cpu-time must pin it before fxpress imports tvm.
    if "--cpu-time" in sys.argv:
        os.environ["TVM_NUM_THREADS"] = "1"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,bert_small")
    ap.add_argument("--trials", type=int, default=32, help="MetaSchedule trials per kernel")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--database-dir", default=None)
    ap.add_argument("--passes", action="store_true", help="also tune with the default pass pipeline")
    ap.add_argument("--gpu", action="store_true", help="CUDA mode (needs a GPU)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="1 thread everywhere, CPU time per call (robust to machine load)")
    ap.add_argument("--out", default=None, help="output path without extension")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    sys.path.insert(0, ROOT)
    if args.cpu_time:
        result = bench_cpu_time(args)
    else:
        result = bench_gpu(args) if args.gpu else bench_cpu(args)
    default_name = "tuning_gpu" if args.gpu else "tuning_cpu_time" if args.cpu_time else "tuning_cpu"
    out = args.out or os.path.join(HERE, "results", default_name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(out + ".md", "w") as f:
        f.write(markdown(result))
    print(f"wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    _early_threads()
    sys.exit(main())
