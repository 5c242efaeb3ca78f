#!/usr/bin/env python
"""Benchmark of the low_rank pass (not a test): params, MACs, llvm latency and accuracy vs budget.

Models: the digits-trained CNN (top-1 accuracy on the held-out split) and the BERT-style encoder
(output fidelity on held-out token batches: cosine similarity and relative error of the logits,
and argmax agreement). For each method (svd, activation_aware, fisher) and parameter budget the
pass runs through ``fxpress.compile``; the llvm latency is measured for the default lowering (two
Relax matmuls per low-rank layer) and for the fused two-GEMM TIR kernel (codegen/low_rank_kernels.py,
scheduled with its ``apply_default_schedules``).

    .venv/bin/python benchmarks/bench_low_rank.py                    # small models (~10 min CPU)
    .venv/bin/python benchmarks/bench_low_rank.py --bert-size full   # BERT hidden 384 x 6 layers
    .venv/bin/python benchmarks/bench_low_rank.py --kernels          # fused kernel vs two matmuls only

Results: benchmarks/results/low_rank[-<tag>].json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
BUDGETS = [1.0, 0.8, 0.6, 0.5, 0.4, 0.3]
# method[:sensitivity[:budget_on]]
METHODS = ["svd", "activation_aware", "fisher", "activation_aware:model", "activation_aware:layer:macs"]


CPU_TIME = False  # --cpu-time: one thread everywhere, the calling thread's CPU time, min of runs


def _time(fn, runs: int) -> float:
    """Milliseconds per call after two warm-ups: the median wall time of ``runs`` calls, or with
    --cpu-time the minimum CPU time of the (single) compute thread, which a loaded machine's
    preemption does not inflate."""
    import numpy as np

    fn()
    fn()
    clock = time.thread_time if CPU_TIME else time.perf_counter
    ts = []
    for _ in range(runs):
        t = clock()
        fn()
        ts.append(clock() - t)
    return float((np.min(ts) if CPU_TIME else np.median(ts)) * 1e3)


def llvm_runner(gm, x, impl: str):
    """Build ``gm`` for llvm with every lowrank_linear lowered as ``impl`` ("fused" kernel or two
    "matmul"s) through codegen.build; returns a callable that runs the VM on prepared tensors (no
    numpy/torch conversion in the timed call, unlike CompiledModel.__call__)."""
    import numpy as np
    import tvm
    from tvm import relax

    from fxpress.codegen import build
    from fxpress.lowering import to_relax

    old = os.environ.get("FXPRESS_LOWRANK_IMPL")
    os.environ["FXPRESS_LOWRANK_IMPL"] = impl
    try:
        rm = to_relax(gm, x)
    finally:
        if old is None:
            os.environ.pop("FXPRESS_LOWRANK_IMPL")
        else:
            os.environ["FXPRESS_LOWRANK_IMPL"] = old
    bm = build(rm.mod, "llvm")
    vm = relax.VirtualMachine(bm.executable, tvm.cpu())
    params = [tvm.runtime.tensor(np.ascontiguousarray(p)) for p in rm.params]
    main = vm["main"]
    args = [tvm.runtime.tensor(t.numpy()) for t in x]
    return lambda: main(*args, *params)


def setup_models(bert_size: str):
    import torch

    from fxpress.models import accuracy, digits_data, get

    out = {}
    xtr, ytr, xte, yte = digits_data()
    spec = get("digits_cnn", size="small")
    calib = [(xtr[i:i + 64],) for i in range(0, 512, 64)]
    out["digits_cnn"] = dict(
        spec=spec, calibration=calib, labels=[ytr[i:i + 64] for i in range(0, 512, 64)],
        evaluate=lambda f: {"accuracy": accuracy(f, xte, yte)})

    spec = get("bert_small", size=bert_size)
    ex = spec.example_inputs()[0]
    vocab = 1000 if bert_size == "small" else 30522
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randint(0, vocab, (8, ex.shape[1]), generator=gen),) for _ in range(4 if bert_size == "small" else 2)]
    held = torch.randint(0, vocab, (64 if bert_size == "small" else 16, ex.shape[1]), generator=gen)

    def bert_eval(f, held=held, ref_model=[None]):  # noqa: B006 - cache of the reference output
        with torch.no_grad():
            y = f(held)
            if ref_model[0] is None:
                ref_model[0] = y
            ref = ref_model[0]
        yd, rd = y.double().flatten(), ref.double().flatten()
        return {"cosine": float(yd @ rd / (yd.norm() * rd.norm())),
                "rel_error": float((y - ref).norm() / ref.norm()),
                "argmax_agreement": float((y.argmax(-1) == ref.argmax(-1)).float().mean())}

    out["bert_small"] = dict(spec=spec, calibration=calib, labels=None, evaluate=bert_eval)
    return out


def run_sweep(args) -> list[dict]:
    import torch

    import fxpress

    models = setup_models(args.bert_size)
    rows = []
    for name, m in models.items():
        model = m["spec"].build()
        x = m["spec"].example_inputs()
        base = m["evaluate"](model)  # also primes the BERT reference
        base_cm = fxpress.compile(model, x, passes="none", target="torch")
        base_lat = None if args.no_latency else _time(llvm_runner(base_cm.gm, x, "matmul"), args.runs)
        tr = base_cm.report["trace"]
        rows.append(dict(model=name, method="dense", budget=1.0, params=tr.params, macs=tr.macs, layers=0,
                         llvm_ms=base_lat, llvm_fused_ms=base_lat,
                         torch_ms=None if args.no_latency else _time(lambda: model(*x), args.runs),
                         **base))
        print(rows[-1], flush=True)
        for method in args.methods:
            for budget in args.budgets:
                if budget >= 1.0:
                    continue
                meth, sens, on = (method.split(":") + ["", ""])[:3]
                opts = {"method": meth, "budget": budget, "sensitivity": sens or "layer", "budget_on": on or "params"}
                if meth == "fisher" and m["labels"] is not None:
                    opts["labels"] = m["labels"]
                t0 = time.perf_counter()
                cm = fxpress.compile(model, x, passes=["low_rank"], target="torch" if args.no_latency else "llvm",
                                     calibration=m["calibration"], options={"low_rank": opts})
                if not args.no_latency:  # compiled for llvm: it must agree with the pass's own graph
                    with torch.no_grad():
                        y_fx = cm.gm(*x)
                    assert float((cm(*x) - y_fx).abs().max() / y_fx.abs().max()) < 1e-4
                compile_s = time.perf_counter() - t0
                rec = cm.report["low_rank"]
                with torch.no_grad():
                    quality = m["evaluate"](cm.gm)
                lat = fused_ms = call_ms = None
                if not args.no_latency:
                    lat = _time(llvm_runner(cm.gm, x, "matmul"), args.runs)
                    fused_ms = _time(llvm_runner(cm.gm, x, "fused"), args.runs)
                    call_ms = _time(lambda: cm(*x), args.runs)
                row = dict(model=name, method=method, budget=budget, params=rec.params, macs=rec.macs,
                           layers=len(rec.result.layers), llvm_ms=lat, llvm_fused_ms=fused_ms,
                           torch_ms=None if args.no_latency else _time(lambda: cm.gm(*x), args.runs), compile_s=compile_s,
                           compiled_call_ms=call_ms,
                           ranks={r["layer"]: r["rank"] for r in rec.result.layers},
                           layer_rows=rec.result.layers, **quality)
                rows.append(row)
                print({k: v for k, v in row.items() if k not in ("layer_rows", "ranks")}, flush=True)
    return rows


def run_kernels(args) -> list[dict]:
    """Fused kernel vs two legalized Relax matmuls vs dense linear vs torch, per shape."""
    import numpy as np
    import torch
    import tvm
    from tvm import relax

    from fxpress.codegen import build
    from fxpress.codegen.low_rank_kernels import lowrank_linear_func, schedule_cpu

    def module(M, K, R, N, impl):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((M, K), "float32"))
        U = relax.Var("U", relax.TensorType((K, R), "float32"))
        V = relax.Var("V", relax.TensorType((R, N), "float32"))
        b = relax.Var("b", relax.TensorType((N,), "float32"))
        W = relax.Var("W", relax.TensorType((N, K), "float32"))
        with bb.function("main", [x, W, b] if impl == "dense" else [x, U, V, b]):
            with bb.dataflow():
                if impl == "matmul":
                    y = bb.emit(relax.op.add(bb.emit(relax.op.matmul(bb.emit(relax.op.matmul(x, U)), V)), b))
                elif impl == "dense":
                    y = bb.emit(relax.op.linear(x, W, b))
                else:
                    f = schedule_cpu(lowrank_linear_func(M, K, R, N, scheduled=False, name="lr"))
                    y = bb.emit(relax.call_tir(bb.add_func(f, "lr"), [x, U, V, b], relax.TensorType((M, N), "float32")))
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        return bb.get()

    shapes = [(1, 384, 64, 384), (8, 512, 24, 64), (16, 384, 64, 384), (32, 64, 16, 64), (32, 64, 16, 128),
              (64, 512, 24, 64), (128, 384, 32, 384), (128, 384, 96, 384), (128, 384, 96, 1536),
              (128, 1536, 96, 384), (512, 384, 96, 384)]
    rows = []
    rng = np.random.default_rng(0)
    for M, K, R, N in shapes:
        x, U, V, b = (rng.standard_normal(s).astype("float32") for s in ((M, K), (K, R), (R, N), (N,)))
        W = np.ascontiguousarray((U @ V).T)
        row = dict(shape=[M, K, R, N], lowrank_macs=M * R * (K + N), dense_macs=M * K * N)
        for impl in ("dense", "matmul", "fused"):
            vm = relax.VirtualMachine(build(module(M, K, R, N, impl), "llvm").executable, tvm.cpu())
            a = [tvm.runtime.tensor(v) for v in ((x, W, b) if impl == "dense" else (x, U, V, b))]
            row[f"{impl}_ms"] = _time(lambda: vm["main"](*a), args.runs)
        tx, tU, tV, tb, tW = map(torch.from_numpy, (x, U, V, b, W))
        row["torch_lowrank_ms"] = _time(lambda: tx @ tU @ tV + tb, args.runs)
        row["torch_dense_ms"] = _time(lambda: torch.nn.functional.linear(tx, tW, tb), args.runs)
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(meta: dict, sweep: list[dict], kernels: list[dict]) -> str:
    lines = [f"# low_rank benchmark ({meta['date']})", "",
             f"machine: {meta['machine']}, load average at start {meta['load_start']}, at end {meta['load_end']}; "
             f"torch {meta['torch']}, tvm {meta['tvm']}; {meta['timing']} ({meta['runs']} runs). llvm = the Relax VM "
             "called directly, each low-rank Linear as two Relax matmuls (codegen's contraction schedule); "
             "llvm fused = the same with the fused two-GEMM TIR kernel; torch = the pass's FX graph, eager.", ""]
    if sweep:
        lines += ["| model | method | budget | layers | params | MACs | quality | llvm ms | llvm fused ms | torch ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sweep:
            q = (f"acc {r['accuracy']:.4f}" if "accuracy" in r else
                 f"cos {r['cosine']:.4f}, rel {r['rel_error']:.3f}, argmax {r['argmax_agreement']:.2f}")
            ms = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(f"| {r['model']} | {r['method']} | {r['budget']:g} | {r['layers']} | {r['params']:,} | "
                         f"{r['macs']:,} | {q} | {ms(r['llvm_ms'])} | {ms(r['llvm_fused_ms'])} | {ms(r['torch_ms'])} |")
    if kernels:
        lines += ["", "## fused two-GEMM kernel vs two Relax matmuls (llvm, codegen.build)", "",
                  "| M×K→R→N | dense linear ms | two matmuls ms | fused ms | torch low-rank ms | torch dense ms |",
                  "|---|---|---|---|---|---|"]
        for r in kernels:
            M, K, R, N = r["shape"]
            lines.append(f"| {M}×{K}→{R}→{N} | {r['dense_ms']:.3f} | {r['matmul_ms']:.3f} | {r['fused_ms']:.3f} | "
                         f"{r['torch_lowrank_ms']:.3f} | {r['torch_dense_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bert-size", default="small", choices=["small", "full"])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--kernels", action="store_true", help="only the kernel comparison")
    ap.add_argument("--no-latency", action="store_true", help="quality, params and MACs only (target torch)")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel comparison")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time single-threaded CPU work (thread_time, min of runs): for a shared, loaded machine")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.cpu_time:
        global CPU_TIME
        CPU_TIME = True
        os.environ["TVM_NUM_THREADS"] = "1"  # before TVM starts its pool: kernels run on the calling thread
    args.methods = [m for m in args.methods.split(",") if m]
    args.budgets = [float(b) for b in args.budgets.split(",") if b]

    import torch
    import tvm

    if args.cpu_time:
        torch.set_num_threads(1)
    meta = dict(timing="single-thread CPU time, min of runs" if args.cpu_time else "wall time, median of runs",date=time.strftime("%Y-%m-%d %H:%M"), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                load_start=os.getloadavg(), torch=torch.__version__, tvm=tvm.__version__, runs=args.runs,
                bert_size=args.bert_size, argv=sys.argv[1:])
    sweep = [] if args.kernels else run_sweep(args)
    kernels = [] if args.no_kernels else run_kernels(args)
    meta["load_end"] = os.getloadavg()
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "low_rank" + (f"-{args.tag}" if args.tag else ""))
    with open(stem + ".json.tmp", "w") as f:
        json.dump(dict(meta=meta, sweep=sweep, kernels=kernels), f, indent=1, default=str)
    os.replace(stem + ".json.tmp", stem + ".json")
    with open(stem + ".md.tmp", "w") as f:
        f.write(markdown(meta, sweep, kernels))
    os.replace(stem + ".md.tmp", stem + ".md")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
