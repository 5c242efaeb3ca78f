#!/usr/bin/env python
"""Benchmark of the quantize pass (not a test): accuracy, fidelity, size and latency vs fp32.

* digits CNN (trained, calibrated on 512 training images): top-1 accuracy on the held-out split for
  fp32, static int8 / int4 / int2 with and without SplitQuant, each activation observer, dynamic int8
  and weight-only int4; weight bytes. The int8 accuracy is also measured on the lowered models
  (ORT, TVM llvm) — they match the FX graph.
* BERT-style encoder (``--bert-size``; full = hidden 384 × 6 layers, seq 128): output fidelity
  (cosine similarity, relative error of the logits on held-out token batches) and latency of the
  same graph on ONNX Runtime (fp32 vs int8 QDQ → QGemm/MatMulIntegerToFloat) and on TVM llvm
  (fp32 default schedules vs the int8 AVX2 kernels), plus eager PyTorch fp32.
* kernels: one int8 GEMM (C = 1), SplitQuant's fused three-cluster GEMM (C = 3) and three separate
  int8 GEMMs on TVM, BERT FFN shape.

    .venv/bin/python benchmarks/bench_quantize.py                    # BERT full (~15 min CPU on 2 cores)
    .venv/bin/python benchmarks/bench_quantize.py --bert-size small  # quick

Results: benchmarks/results/quantize[-<tag>].json and .md. Timings are medians of ``--runs`` calls
(2 threads, busy-waiting OpenMP); the load average at the start and end is recorded — on a shared
machine compare numbers from one run only.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))


def _time(fn, runs: int) -> dict:
    import numpy as np

    fn()
    fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return {"median_ms": float(np.median(ts) * 1e3), "min_ms": float(np.min(ts) * 1e3)}


def _time_interleaved(fns: dict, runs: int) -> dict:
    """Like ``_time`` for several callables, called in turn, so a shared machine's load hits them alike."""
    import numpy as np

    for fn in fns.values():
        fn()
        fn()
    ts = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: {"median_ms": float(np.median(v) * 1e3), "min_ms": float(np.min(v) * 1e3)} for k, v in ts.items()}


def _compile(model, x, calib=None, target="torch", **opts):
    import fxpress

    passes = ["quantize"] if opts.pop("quantize", True) else "none"
    return fxpress.compile(model, x, passes=passes, target=target, calibration=calib, options={"quantize": opts})


def _weights(cm) -> dict:
    st = cm.report["quantize"]
    m = st.result.metrics
    return {"weight_bytes_fp32": m["weight_bytes_fp32"], "weight_bytes_stored": m["weight_bytes_stored"],
            "weight_bytes_packed": m["weight_bytes_packed"], "model_bytes": st.param_bytes,
            "output_rel_error": m["output_rel_error"]}


# ----------------------------------------------------------------------------- digits

def bench_digits(log) -> dict:
    import torch

    from fxpress import models

    xtr, _, xte, yte = models.digits_data()
    model = copy.deepcopy(models.trained_digits_cnn())
    calib = [(xtr[i:i + 128],) for i in range(0, 512, 128)]
    x = (xte,)
    out = {"fp32": {"accuracy": models.accuracy(model, xte, yte)}}
    log(f"digits fp32 accuracy {out['fp32']['accuracy']:.4f}")
    configs = {}
    for bits in (8, 4, 2):
        for split in (False, True):
            configs[f"static int{bits}{' +SplitQuant' if split else ''}"] = dict(bits=bits, splitquant=split)
    configs["static int8 percentile"] = dict(observer="percentile")
    configs["static int8 mse"] = dict(observer="mse")
    configs["static int4 per-tensor"] = dict(bits=4, per_channel=False)
    configs["static int4 per-tensor +SplitQuant"] = dict(bits=4, per_channel=False, splitquant=True)
    configs["dynamic int8"] = dict(mode="dynamic")
    configs["weight-only int4"] = dict(mode="weight_only", bits=4)
    configs["weight-only int4 +SplitQuant"] = dict(mode="weight_only", bits=4, splitquant=True)
    for name, opts in configs.items():
        t = time.perf_counter()
        cm = _compile(model, x, calib, **opts)
        with torch.no_grad():
            acc = models.accuracy(lambda b: cm.gm(b), xte, yte)
        out[name] = {"accuracy": acc, "options": opts, "pass_seconds": cm.report["quantize"].seconds, **_weights(cm)}
        log(f"digits {name}: accuracy {acc:.4f} ({time.perf_counter() - t:.1f}s)")
    # the lowered int8 models compute what the FX graph computes
    for target in ("onnx", "llvm"):
        cm = _compile(model, x, calib, target=target)
        acc = models.accuracy(lambda b: cm(b), xte, yte, batch_size=len(xte))
        out[f"static int8 on {target}"] = {"accuracy": acc}
        log(f"digits static int8 lowered to {target}: accuracy {acc:.4f}")
    return out


# ----------------------------------------------------------------------------- BERT

def _fidelity(fn, model, batches) -> dict:
    import torch

    cos, rel, agree = [], [], []
    with torch.no_grad():
        for (b,) in batches:
            y, r = fn(b), model(b)
            y = torch.as_tensor(y)
            cos.append(float(torch.nn.functional.cosine_similarity(y.flatten(), r.flatten(), dim=0)))
            rel.append(float((y - r).abs().max() / r.abs().max()))
            agree.append(float((y.argmax(-1) == r.argmax(-1)).float().mean()))
    return {"cosine": min(cos), "rel_error": max(rel), "argmax_agreement": sum(agree) / len(agree)}


def _ort_session(gm, x, workdir, name):
    import onnx
    import onnxruntime as ort

    from fxpress.lowering import to_onnx

    path = to_onnx(gm, x, os.path.join(workdir, f"{name}.onnx")).path
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(os.environ.get("TVM_NUM_THREADS", "2"))
    so.log_severity_level = 3
    so.optimized_model_filepath = os.path.join(workdir, f"{name}.opt.onnx")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for n in onnx.load(so.optimized_model_filepath).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return sess, ops, os.path.getsize(path)


def _tvm_runner(gm, x):
    from fxpress.codegen import build
    from fxpress.lowering import to_relax
    from fxpress.runtime.backends import TVMExecutor

    t = time.perf_counter()
    rm = to_relax(gm, x)
    built = build(rm.mod, "llvm")  # applies the quantize family's AVX2 kernels (codegen.build)
    ex = TVMExecutor.from_built(built.executable, rm.params, "cpu")
    arrays = [a.numpy() for a in x]
    return (lambda: ex.run(arrays)), time.perf_counter() - t


def bench_bert(size: str, runs: int, workdir: str, log, skip_tvm_fp32: bool, only: list[str] | None = None,
               latency: bool = True) -> dict:
    import torch

    from fxpress import models

    spec = models.get("bert_small", size)
    model = spec.build()
    x = spec.example_inputs()
    vocab = model.tok_emb.num_embeddings
    shape = tuple(x[0].shape)
    g = torch.Generator().manual_seed(123)
    calib = [(torch.randint(0, vocab, shape, generator=g),) for _ in range(8)]
    held_out = [(torch.randint(0, vocab, shape, generator=g),) for _ in range(4)]
    out: dict = {"size": size, "input_shape": list(shape)}
    configs = {
        "static int8": {},
        "static int8 percentile": {"observer": "percentile"},
        "static int8 mse": {"observer": "mse"},
        "static int8 +SplitQuant": {"splitquant": True},
        "static int4 (weights)": {"bits": 4},
        "static int4 (weights) +SplitQuant": {"bits": 4, "splitquant": True},
        "static int2 (weights)": {"bits": 2},
        "static int2 (weights) +SplitQuant": {"bits": 2, "splitquant": True},
        "dynamic int8": {"mode": "dynamic"},
        "weight-only int8": {"mode": "weight_only"},
        "weight-only int4": {"mode": "weight_only", "bits": 4},
    }
    timed = ("static int8", "static int8 +SplitQuant", "dynamic int8")
    if only:
        unknown = set(only) - set(configs)
        if unknown:
            raise SystemExit(f"unknown BERT config(s) {sorted(unknown)}; known: {list(configs)}")
        configs = {k: v for k, v in configs.items() if k in only or (latency and k in timed)}
    graphs = {}
    for name, opts in configs.items():
        t = time.perf_counter()
        cm = _compile(model, x, calib, **opts)
        graphs[name] = cm.gm
        fid = _fidelity(lambda b: cm.gm(b), model, held_out)
        out[name] = {"options": opts, **fid, **_weights(cm), "pass_seconds": cm.report["quantize"].seconds}
        log(f"bert {name}: cosine {fid['cosine']:.5f} rel {fid['rel_error']:.4f} ({time.perf_counter() - t:.1f}s)")
    if not latency:
        return out
    fp32_gm = _compile(model, x, quantize=False).gm

    lat: dict = {}
    with torch.no_grad():
        lat["torch eager fp32"] = _time(lambda: model(*x), runs)
    feed_x = x[0].numpy()
    sessions = {}
    for name, gm in (("fp32", fp32_gm), ("static int8", graphs["static int8"]), ("dynamic int8", graphs["dynamic int8"])):
        sess, ops, nbytes = _ort_session(gm, x, workdir, name.replace(" ", "_"))
        sessions[name] = sess
        lat[f"ORT {name}"] = {"ops": ops, "onnx_bytes": nbytes}
    timed = _time_interleaved({k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed_x}))
                               for k, s in sessions.items()}, runs)
    for k, v in timed.items():
        lat[f"ORT {k}"].update(v)
        log(f"ORT {k}: {v['median_ms']:.2f} ms (min {v['min_ms']:.2f})  ops {lat[f'ORT {k}']['ops']}")
    runners = {}
    for name, gm in (("fp32", fp32_gm), ("static int8", graphs["static int8"]),
                     ("static int8 +SplitQuant", graphs["static int8 +SplitQuant"])):
        if name == "fp32" and skip_tvm_fp32:
            continue
        run, build_s = _tvm_runner(gm, x)
        runners[name] = run
        lat[f"TVM llvm {name}"] = {"build_seconds": build_s}
    timed = _time_interleaved(runners, max(3, runs // 4))
    for k, v in timed.items():
        lat[f"TVM llvm {k}"].update(v)
        log(f"TVM llvm {k}: {v['median_ms']:.2f} ms (min {v['min_ms']:.2f})")
    out["latency"] = lat
    return out


# ----------------------------------------------------------------------------- kernels

def bench_kernels(runs: int, log) -> dict:
    import numpy as np
    import tvm

    from fxpress.codegen import quantize_kernels as qk
    from fxpress.codegen import resolve_target

    target = resolve_target("llvm")
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    out = {}
    for (M, K, N) in [(128, 384, 1536), (128, 1536, 384)]:
        row = {}
        for C in (1, 3):
            f = qk.qlinear_avx2_func(M, K, C, N, 0.02, 7) if qk.has_avx2(target) else qk.qlinear_func(M, K, C, N, 0.02, 7)
            lib = tvm.compile(tvm.IRModule({"main": f}), target=target)
            args = [rng.integers(0, 256, (M, K)).astype(np.uint8), rng.integers(-127, 128, (C, N, K)).astype(np.int8),
                    (rng.random((C, N)) * 0.01).astype(np.float32), rng.integers(-99, 99, (C, N)).astype(np.int32),
                    np.zeros((M, N), np.float32)]
            a = [tvm.runtime.tensor(v, dev) for v in args]
            row[f"C={C}"] = _time(lambda: lib(*a), runs)
        row["3 x C=1 (separate)"] = {"median_ms": 3 * row["C=1"]["median_ms"]}
        row["gmacs_C1"] = M * K * N / row["C=1"]["median_ms"] / 1e6
        out[f"{M}x{K}x{N}"] = row
        log(f"kernel {M}x{K}x{N}: C=1 {row['C=1']['median_ms']:.2f} ms, fused C=3 {row['C=3']['median_ms']:.2f} ms, "
            f"3 separate {row['3 x C=1 (separate)']['median_ms']:.2f} ms")
    return out


# ----------------------------------------------------------------------------- output

def _md(meta: dict, res: dict) -> str:
    lines = [f"# quantize benchmark ({meta['date']})", "",
             f"machine: {meta['machine']}, {meta.get('threads', 2)} thread(s); load average {meta['load_start']} → {meta['load_end']}; "
             f"torch {meta['torch']}, tvm {meta['tvm']}, onnxruntime {meta['onnxruntime']}", ""]
    if "digits" in res:
        d = res["digits"]
        lines += ["## digits CNN (top-1 on the held-out split, 450 images)", "",
                  "| config | accuracy | weight bytes (stored / packed / fp32) |", "|---|---|---|"]
        for k, v in d.items():
            wb = f"{v['weight_bytes_stored']} / {v['weight_bytes_packed']} / {v['weight_bytes_fp32']}" if "weight_bytes_fp32" in v else ""
            lines.append(f"| {k} | {v['accuracy']:.4f} | {wb} |")
        lines.append("")
    if "bert" in res:
        b = res["bert"]
        lines += [f"## BERT-style encoder ({b['size']}, input {b['input_shape']}): fidelity on 4 held-out batches", "",
                  "| config | min cosine | max rel err | argmax agreement | model bytes |", "|---|---|---|---|---|"]
        for k, v in b.items():
            if isinstance(v, dict) and "cosine" in v:
                lines.append(f"| {k} | {v['cosine']:.5f} | {v['rel_error']:.4f} | {v['argmax_agreement']:.3f} | "
                             f"{v['model_bytes']} |")
        lines += ["", "| runtime | median ms | min ms |", "|---|---|---|"]
        for k, v in b.get("latency", {}).items():
            lines.append(f"| {k} | {v['median_ms']:.2f} | {v['min_ms']:.2f} |")
        lines.append("")
    if "kernels" in res:
        lines += ["## TVM int8 GEMM kernels (AVX2, 2 threads)", "", "| shape MxKxN | C=1 | SplitQuant fused C=3 | 3 separate |",
                  "|---|---|---|---|"]
        for k, v in res["kernels"].items():
            lines.append(f"| {k} | {v['C=1']['median_ms']:.2f} | {v['C=3']['median_ms']:.2f} | "
                         f"{v['3 x C=1 (separate)']['median_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bert-size", default="full", choices=["small", "full"])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--tag", default="")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: digits,bert,kernels")
    ap.add_argument("--skip-tvm-fp32", action="store_true", help="TVM's untuned fp32 BERT is slow to run")
    ap.add_argument("--threads", type=int, default=2, help="threads for ORT, TVM and torch (TVM_NUM_THREADS)")
    ap.add_argument("--bert-configs", default="", help="comma list: only these BERT configs (plus the timed ones)")
    ap.add_argument("--no-latency", action="store_true", help="BERT: fidelity only")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool
    import tempfile

    import onnxruntime
    import torch
    import tvm

    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores", "load_start": os.getloadavg()[0], "torch": torch.__version__,
            "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads}

    def log(msg):
        print(msg, flush=True)

    res = {}
    if "digits" not in skip:
        res["digits"] = bench_digits(log)
    if "bert" not in skip:
        with tempfile.TemporaryDirectory(prefix="fxpress-bench-q-") as wd:
            only = [c.strip() for c in args.bert_configs.split(",") if c.strip()] or None
            res["bert"] = bench_bert(args.bert_size, args.runs, wd, log, args.skip_tvm_fp32, only, not args.no_latency)
    if "kernels" not in skip:
        res["kernels"] = bench_kernels(args.runs, log)
    meta["load_end"] = os.getloadavg()[0]
    base = os.path.join(HERE, "results", "quantize" + (f"-{args.tag}" if args.tag else ""))
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "results": res}, f, indent=2, default=str)
    with open(base + ".md", "w") as f:
        f.write(_md(meta, res))
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
