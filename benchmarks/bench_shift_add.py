"""Shift/add benchmark (not a test): kernel latency and memory vs dense fp32, and model accuracy/size.

    .venv/bin/python benchmarks/bench_shift_add.py [--quick] [--tune TRIALS] [--out benchmarks/results]

Writes ``shift_add_<device>.json`` and ``.md`` (device = cpu, or cuda when a GPU is present).

Kernels (llvm; and CUDA when a GPU is present): the shift matmul / conv in both arithmetic variants
(float exponent-add, integer shift) with 1 and 2 terms, against a dense fp32 kernel written the same
way (same TE form, same hand schedule) and against torch's eager fp32 op. ``--tune N`` also runs
MetaSchedule (N trials each) on the dense kernel and the two 1-term shift variants of the first
linear shape. Timings interleave the variants round-robin and report the minimum and the median:
this machine is shared, and the minimum is the figure least disturbed by other work.

Models: digits CNN accuracy on its test split, BERT-style cosine similarity of the logits on 32
random sequences (small and full size), ViT cosine, weights converted, bits per weight, model bytes,
multiplies removed, for 1 and 2 terms and with the binarized-attention rewrite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

if "--threads" in sys.argv:  # must be set before TVM starts its thread pool
    os.environ["TVM_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fxpress  # noqa: E402
from fxpress import models  # noqa: E402
from fxpress.codegen import gpu_available, resolve_target  # noqa: E402
from fxpress.codegen import shift_add_kernels as K  # noqa: E402
from fxpress.passes import PassContext, get_pass, trace  # noqa: E402
from fxpress.passes.shift_add import ops as S  # noqa: E402

LINEAR_SHAPES = [("bert_ffn", 128, 384, 1536), ("square", 64, 512, 512), ("gemv", 1, 2048, 2048)]
CONV_SHAPES = [("resnet_3x3", (1, 64, 28, 28), 64, 3, 1)]
QUICK_LINEAR = [("small", 32, 256, 256)]
QUICK_CONV = [("small_3x3", (1, 16, 16, 16), 32, 3, 1)]


# ----------------------------------------------------------------------------- timing

def _interleaved(fns: dict[str, callable], rounds: int, inner: int) -> dict[str, dict[str, float]]:
    for f in fns.values():  # warm up
        f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                f()
            samples[k].append((time.perf_counter() - t) / inner * 1e3)
    return {k: {"min_ms": min(v), "median_ms": statistics.median(v)} for k, v in samples.items()}


def _tvm_callable(func, arrays, out_shape, target, dev):
    import tvm

    ex = tvm.compile(tvm.IRModule({"main": func}), target=target)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"), dev)
    fn = ex["main"]

    def call():
        fn(*args, out)
        if dev.dlpack_device_type() != 1:
            dev.sync()

    call.result = lambda: out.numpy()
    return call


def _tune(func, target, trials: int, work_dir: str):
    from tvm.s_tir import meta_schedule as ms

    def fast_build(mod, tgt, _params):
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=tgt)

    db = ms.tune_tir(func, target, work_dir=work_dir, max_trials_global=trials, num_trials_per_iter=min(32, trials),
                     builder=ms.builder.LocalBuilder(f_build=fast_build, max_workers=2, timeout_sec=120),
                     runner=ms.runner.LocalRunner(timeout_sec=120))
    sch = ms.tir_integration.compile_tir(db, func, target)
    return None if sch is None else sch.mod["main"]


# ----------------------------------------------------------------------------- kernels

def _linear_inputs(M, K_, N, terms, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K_, generator=g) * K_ ** -0.5
    codes, scale = S.encode_pow2(w, terms)
    x = torch.randn(M, K_, generator=g)
    bias = torch.randn(N, generator=g) * 0.1
    return w, S.linear_codes(codes), scale, bias, x


def bench_linear(name, M, K_, N, target, dev, schedule, rounds, inner, tune, work_dir):
    rows = []
    w, _, _, bias, x = _linear_inputs(M, K_, N, 1)
    fns, checks, mem = {}, {}, {}
    dense = K.dense_linear_func(M, K_, N)
    fns["dense_fp32"] = _tvm_callable(schedule(dense), [x.numpy(), w.T.contiguous().numpy(), bias.numpy()],
                                      (M, N), target, dev)
    mem["dense_fp32"] = w.numel() * 4
    amax = float(x.abs().max())
    for terms in (1, 2):
        _, lc, scale, _, _ = _linear_inputs(M, K_, N, terms)
        for variant, frac in (("float", -1), ("int", S.frac_bits_for(amax, terms, K_))):
            key = f"shift_{variant}_t{terms}"
            f = K.shift_linear_func(M, K_, N, terms, frac)
            fns[key] = _tvm_callable(schedule(f), [x.numpy(), lc.numpy(), scale.numpy(), bias.numpy()], (M, N),
                                     target, dev)
            checks[key] = S.shift_linear(x, lc, scale, bias, frac).numpy()
            mem[key] = lc.numel() + scale.numel() * 4
    if dev.dlpack_device_type() == 1:
        tw = w.contiguous()
        fns["torch_fp32"] = lambda: F.linear(x, tw, bias)
        mem["torch_fp32"] = w.numel() * 4
    res = _interleaved(fns, rounds, inner)
    for key, t in res.items():
        err = None
        if key in checks:
            y = fns[key].result()
            err = float(np.abs(y - checks[key]).max() / max(np.abs(checks[key]).max(), 1e-30))
        rows.append(dict(kernel="linear", shape=name, dims=[M, K_, N], variant=key, schedule="hand",
                         weight_bytes=mem[key], vs_dense=t["min_ms"] / res["dense_fp32"]["min_ms"],
                         rel_err_vs_reference=err, **t))
    if tune:
        tuned = {}
        _, lc, scale, _, _ = _linear_inputs(M, K_, N, 1)
        candidates = {"dense_fp32": (dense, [x.numpy(), w.T.contiguous().numpy(), bias.numpy()])}
        for variant, frac in (("float", -1), ("int", S.frac_bits_for(amax, 1, K_))):
            candidates[f"shift_{variant}_t1"] = (K.shift_linear_func(M, K_, N, 1, frac),
                                                 [x.numpy(), lc.numpy(), scale.numpy(), bias.numpy()])
        for key, (func, arrays) in candidates.items():
            t0 = time.perf_counter()
            sched = _tune(func, target, tune, os.path.join(work_dir, f"{name}_{key}"))
            secs = time.perf_counter() - t0
            if sched is not None:
                tuned[key] = (_tvm_callable(sched, arrays, (M, N), target, dev), secs)
        res = _interleaved({k: v[0] for k, v in tuned.items()}, rounds, inner)
        for key, t in res.items():
            rows.append(dict(kernel="linear", shape=name, dims=[M, K_, N], variant=key,
                             schedule=f"metaschedule_{tune}", tuning_s=round(tuned[key][1], 1),
                             weight_bytes=mem[key], vs_dense=t["min_ms"] / res.get("dense_fp32", t)["min_ms"],
                             rel_err_vs_reference=None, **t))
    return rows


def bench_conv(name, xs, oc, k, pad, target, dev, schedule, rounds, inner):
    g = torch.Generator().manual_seed(1)
    ic = xs[1]
    w = torch.randn(oc, ic, k, k, generator=g) * (ic * k * k) ** -0.5
    bias = torch.randn(oc, generator=g) * 0.1
    x = torch.randn(*xs, generator=g)
    fns, checks, mem = {}, {}, {}
    dense = K.dense_conv2d_func(xs, (ic, k, k, oc), (1, 1), (pad, pad))
    oh = xs[2] + 2 * pad - k + 1
    out_shape = (xs[0], oc, oh, xs[3] + 2 * pad - k + 1)
    fns["dense_fp32"] = _tvm_callable(schedule(dense), [x.numpy(), w.permute(1, 2, 3, 0).contiguous().numpy(),
                                                        bias.numpy()], out_shape, target, dev)
    mem["dense_fp32"] = w.numel() * 4
    amax = float(x.abs().max())
    for terms in (1, 2):
        codes, scale = S.encode_pow2(w, terms)
        cc = S.conv_codes(codes, w.shape)
        for variant, frac in (("float", -1), ("int", S.frac_bits_for(amax, terms, ic * k * k))):
            key = f"shift_{variant}_t{terms}"
            f = K.shift_conv2d_func(xs, tuple(cc.shape), (1, 1), (pad, pad), (1, 1), 1, frac)
            fns[key] = _tvm_callable(schedule(f), [x.numpy(), cc.numpy(), scale.numpy(), bias.numpy()], out_shape,
                                     target, dev)
            checks[key] = S.shift_conv2d(x, cc, scale, bias, [1, 1], [pad, pad], [1, 1], 1, frac).numpy()
            mem[key] = cc.numel() + scale.numel() * 4
    if dev.dlpack_device_type() == 1:
        fns["torch_fp32"] = lambda: F.conv2d(x, w, bias, 1, pad)
        mem["torch_fp32"] = w.numel() * 4
    res = _interleaved(fns, rounds, inner)
    rows = []
    for key, t in res.items():
        err = None
        if key in checks:
            y = fns[key].result()
            err = float(np.abs(y - checks[key]).max() / max(np.abs(checks[key]).max(), 1e-30))
        rows.append(dict(kernel="conv2d", shape=name, dims=[*xs, oc, k], variant=key, schedule="hand",
                         weight_bytes=mem[key], vs_dense=t["min_ms"] / res["dense_fp32"]["min_ms"],
                         rel_err_vs_reference=err, **t))
    return rows


# ----------------------------------------------------------------------------- models

def _cos(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _apply(model, x, **opts):
    ref = [model(*x).detach()]
    ctx = PassContext(example_inputs=x, target="torch", reference_outputs=ref)
    return get_pass("shift_add", **opts).run(trace(model, x).gm, ctx)


def bench_models(quick: bool) -> list[dict]:
    rows = []
    spec = models.get("digits_cnn")
    model, x = spec.build(), spec.example_inputs()
    _, _, xt, yt = models.digits_data()
    with torch.no_grad():
        dense_acc = models.accuracy(model, xt, yt)
    configs = [("1 term", {}), ("2 terms", {"terms": 2}), ("1 term, all layers", {"keep_first_last": False}),
               ("2 terms, all layers", {"terms": 2, "keep_first_last": False}),
               ("int, 1 term", {"mode": "int"})]
    for label, opts in configs:
        gm, res = _apply(model, x, **opts)
        m = res.metrics
        with torch.no_grad():
            acc = models.accuracy(gm, xt, yt)
        rows.append(dict(model="digits_cnn", config=label, metric="accuracy", dense=dense_acc, value=acc,
                         **_size_fields(m)))
    bert_sizes = ["small"] if quick else ["small", "full"]
    for size in bert_sizes:
        spec = models.get("bert_small", size)
        model, x = spec.build(), spec.example_inputs()
        vocab = model.tok_emb.num_embeddings
        seq = x[0].shape[1]
        xs = torch.randint(0, vocab, (32, seq), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            dense = model(xs)
        for label, opts in [("1 term", {}), ("2 terms", {"terms": 2}), ("2 terms + binarized attention",
                                                                        {"terms": 2, "attention": True}),
                            ("binarized attention only", {"exclude": ["*"], "attention": True})]:
            gm, res = _apply(model, x, **opts)
            with torch.no_grad():
                cos = _cos(gm(xs), dense)
            rows.append(dict(model=f"bert_small/{size}", config=label, metric="logit cosine (32 seqs)", dense=1.0,
                             value=cos, **_size_fields(res.metrics)))
    spec = models.get("vit_tiny")
    model, x = spec.build(), spec.example_inputs()
    xs = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model(xs)
    for label, opts in [("1 term", {}), ("2 terms", {"terms": 2}),
                        ("binarized attention only", {"exclude": ["*"], "attention": True})]:
        gm, res = _apply(model, x, **opts)
        with torch.no_grad():
            cos = _cos(gm(xs), dense)
        rows.append(dict(model="vit_tiny/small", config=label, metric="logit cosine (16 images)", dense=1.0,
                         value=cos, **_size_fields(res.metrics)))
    return rows


def _size_fields(m: dict) -> dict:
    return dict(layers=m["layers_converted"], weights=m["weights_converted"], bits=m["bits_per_weight"],
                model_bytes_before=m["model_bytes_before"], model_bytes_after=m["model_bytes_after"],
                multiplies_before=m["multiplies_before"], multiplies_after=m["multiplies_after"],
                output_rel_error=round(m.get("output_rel_error", float("nan")), 5))


def bench_compiled(quick: bool) -> list[dict]:
    """Whole small models through fxpress.compile on llvm: dense vs shift_add (default schedules)."""
    rows = []
    names = ["digits_cnn"] if quick else ["digits_cnn", "bert_small"]
    for name in names:
        spec = models.get(name)
        model, x = spec.build(), spec.example_inputs()
        cms = {"dense": fxpress.compile(model, x, passes="none", target="llvm"),
               "shift auto": fxpress.compile(model, x, passes=["shift_add"], target="llvm"),
               "shift float": fxpress.compile(model, x, passes=["shift_add"], target="llvm",
                                              options={"shift_add": {"mode": "float"}}),
               "shift int": fxpress.compile(model, x, passes=["shift_add"], target="llvm",
                                            options={"shift_add": {"mode": "int"}})}
        res = _interleaved({k: (lambda cm=cm: cm(*x)) for k, cm in cms.items()}, rounds=7, inner=5)
        for k, t in res.items():
            rows.append(dict(model=name, build=k, **t))
    return rows


# ----------------------------------------------------------------------------- main

def _md(report: dict) -> str:
    out = [f"# shift_add benchmark ({report['device']})", "",
           f"{report['when']}; {report['machine']}; TVM_NUM_THREADS={report['threads']}; "
           f"load average at start {report['load']}.", "",
           "Times in ms (min / median over interleaved rounds). `vs dense` = min time / dense fp32 min time "
           "(same TE form and hand schedule). Weight bytes: fp32 matrix vs uint8 codes + fp32 channel scale.", "",
           "## Kernels", "",
           "| kernel | shape | variant | schedule | min ms | median ms | vs dense | weight bytes | rel err vs ref op |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in report["kernels"]:
        err = "" if r.get("rel_err_vs_reference") is None else f"{r['rel_err_vs_reference']:.1e}"
        out.append(f"| {r['kernel']} | {r['shape']} {r['dims']} | {r['variant']} | {r['schedule']} | "
                   f"{r['min_ms']:.3f} | {r['median_ms']:.3f} | {r['vs_dense']:.2f}x | {r['weight_bytes']:,} | {err} |")
    if report.get("compiled"):
        out += ["", "## Whole models through fxpress.compile (llvm, default schedules)", "",
                "| model | build | min ms | median ms |", "|---|---|---|---|"]
        for r in report["compiled"]:
            out.append(f"| {r['model']} | {r['build']} | {r['min_ms']:.3f} | {r['median_ms']:.3f} |")
    if report.get("models"):
        out += ["", "## Accuracy, size, multiplies", "",
                "| model | config | metric | dense | shift | layers | weights | bits/w | model bytes | multiplies | rel err |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["models"]:
            out.append(f"| {r['model']} | {r['config']} | {r['metric']} | {r['dense']:.4f} | {r['value']:.4f} | "
                       f"{r['layers']} | {r['weights']:,} | {r['bits']} | {r['model_bytes_before']:,} → "
                       f"{r['model_bytes_after']:,} | {r['multiplies_before']:,} → {r['multiplies_after']:,} | "
                       f"{r['output_rel_error']} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, fewer rounds, no BERT full")
    ap.add_argument("--tune", type=int, default=0, help="MetaSchedule trials per kernel (first linear shape)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="TVM and torch threads (default: all cores); 1 is steadier on a shared machine")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ["TVM_NUM_THREADS"]))
    import tvm

    on_gpu = gpu_available()
    device = "cuda" if on_gpu else "cpu"
    report = {"device": device, "when": time.strftime("%Y-%m-%d %H:%M"), "threads": os.environ["TVM_NUM_THREADS"],
              "machine": f"{platform.machine()} {os.cpu_count()} logical CPUs, LLVM cpu "
                         f"{resolve_target('llvm').attrs.get('mcpu')}",
              "load": " ".join(f"{v:.1f}" for v in os.getloadavg()), "kernels": []}
    rounds, inner = (5, 3) if args.quick else (9, 5)
    lin = QUICK_LINEAR if args.quick else LINEAR_SHAPES
    conv = QUICK_CONV if args.quick else CONV_SHAPES
    work_dir = tempfile.mkdtemp(prefix="fxpress-bench-shift-")
    targets = [("llvm", resolve_target("llvm"), tvm.cpu(), K.schedule_cpu)]
    if on_gpu:
        targets.append(("cuda", resolve_target("cuda"), tvm.cuda(0), K.schedule_cuda))
        from fxpress.codegen import cuda as cuda_mod

        cuda_mod.install_compiler()
    for tname, target, dev, schedule in targets:
        with target:
            for i, (name, M, K_, N) in enumerate(lin):
                print(f"[{tname}] linear {name}", file=sys.stderr, flush=True)
                rows = bench_linear(name, M, K_, N, target, dev, schedule, rounds, inner,
                                    args.tune if (i == 0 and tname == "llvm") else 0, work_dir)
                report["kernels"] += [dict(r, target=tname) for r in rows]
            for name, xs, oc, k, pad in conv:
                print(f"[{tname}] conv {name}", file=sys.stderr, flush=True)
                rows = bench_conv(name, xs, oc, k, pad, target, dev, schedule, rounds, inner)
                report["kernels"] += [dict(r, target=tname) for r in rows]
    if not args.skip_models:
        print("models", file=sys.stderr, flush=True)
        report["models"] = bench_models(args.quick)
        print("compiled models", file=sys.stderr, flush=True)
        report["compiled"] = bench_compiled(args.quick)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"shift_add_{device}_t{report['threads']}{'_quick' if args.quick else ''}")
    for path, text in ((stem + ".json", json.dumps(report, indent=1)), (stem + ".md", _md(report))):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    print(_md(report))
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
