"""Coverage benchmark (issue #14): what every pass set does to real architectures, and whether it is right.

For each model of the corpus (fxpress.models.corpus: transformers models from small configs, recurrent,
depthwise, shape-checked and closure models) and of the bundled reference models, each pass set

  none, default, fuse+quantize, fuse+low_rank (budget 0.5), fuse+shift_add

and each target (llvm, onnx), one run records:
  - per pass: "applied k/n" (layers rewritten of the eligible Linear/Conv layers it found), or
    "unchanged" with the reason, or the error (first line);
  - the final stage's output error against eager, and whether a lossless pass set stayed <= 1e-4;
  - compile seconds;
  - latency (median) of the compiled model, next to eager PyTorch and ONNX Runtime on the original
    model, all in this one process on the same inputs.

Writes benchmarks/results/coverage.{md,json}. Time it alone: ../shared/tools/quiet-run.

    .venv/bin/python benchmarks/coverage.py                 # everything (tens of minutes)
    .venv/bin/python benchmarks/coverage.py --quick         # the CI slice: 3 models, 2 pass sets, llvm
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import os
import subprocess
import time
import warnings

import torch

import fxpress
from fxpress.bench import bench_peers, machine_info, time_blocks
from fxpress.models import corpus, registry

HERE = os.path.dirname(os.path.abspath(__file__))
PASS_SETS = {
    "none": ("none", None),
    "default": ("default", None),
    "fuse+quantize": (["fuse", "quantize"], None),
    "fuse+low_rank": (["fuse", "low_rank"], {"low_rank": {"budget": 0.5}}),
    "fuse+shift_add": (["fuse", "shift_add"], None),
}
LOSSLESS = {"none", "default"}
QUICK = {"models": ["hf_bert", "hf_gpt2", "depthwise_net"], "pass_sets": ["default", "fuse+quantize"],
         "targets": ["llvm"]}


def model_entries(names: list[str] | None) -> list[tuple[str, callable, callable]]:
    """(name, build, example_inputs(batch)) for the corpus and the bundled small models."""
    out = [(n, s.build, s.example_inputs) for n, s in corpus.CORPUS.items()]
    for n in registry.names():
        spec = registry.get(n, "small")
        out.append((n, spec.build, lambda batch, spec=spec: _rebatch(spec.example_inputs(), batch)))
    return [e for e in out if names is None or e[0] in names]


def _rebatch(inputs: tuple, batch: int) -> tuple:
    return tuple(t[:1].expand(batch, *t.shape[1:]).clone() if t.dim() else t for t in inputs)


def pass_status(cm) -> list[dict]:
    """One entry per pass stage: name, status, layers rewritten / found, and the note or reason."""
    rows = []
    for rec in cm.report:
        if rec.kind != "pass":
            continue
        result = rec.result
        cov = dict(getattr(result, "coverage", {}) or {}) if result is not None else {}
        reason = rec.note or ""
        if rec.status != "applied" and result is not None and not reason:
            reason = "; ".join(str(s) for s in result.skipped[:3]) or "; ".join(result.notes[:2])
        rows.append({"pass": rec.name, "status": rec.status, "found": cov.get("layers_found"),
                     "rewritten": cov.get("layers_rewritten"), "note": reason[:300]})
    return rows


def _status_text(passes: list[dict]) -> str:
    parts = []
    for p in passes:
        if p["pass"] == "fuse" and len(passes) > 1:
            continue  # the lossless clean-up: its row is in the JSON
        if p["status"] == "applied" and p["found"]:
            parts.append(f"{p['pass']} {p['rewritten']}/{p['found']}")
        elif p["status"] == "applied":
            parts.append(f"{p['pass']} applied")
        else:
            parts.append(f"{p['pass']} {p['status']}" + (f" ({p['note'][:60]})" if p["note"] else ""))
    return ", ".join(parts) or "-"


def time_ms(fn, inputs: tuple, repeat: int) -> float:
    for _ in range(max(2, repeat // 5)):
        fn(*inputs)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def run_one(name, build, inputs, pass_set: str, target: str, repeat: int, ort=None) -> dict:
    """``ort``: the ONNX Runtime peer's callable, to time the llvm target against in pairs."""
    passes, options = PASS_SETS[pass_set]
    row = {"model": name, "pass_set": pass_set, "target": target, "batch": int(inputs[0].shape[0])}
    model = build()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = fxpress.compile(model, inputs, passes=passes, target=target, options=options,
                                 calibration=[inputs])
    except Exception as e:  # noqa: BLE001 - a clear fxpress error is a result here
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}",
                   compile_s=time.perf_counter() - t0)
        return row
    row["compile_s"] = time.perf_counter() - t0
    row["passes"] = pass_status(cm)
    row["status"] = _status_text(row["passes"])
    with torch.no_grad():
        ref = model(*inputs)
    row["max_rel_error"] = cm.report[-1].max_rel_error
    row["lossless_ok"] = (pass_set not in LOSSLESS or
                          (row["max_rel_error"] is not None and row["max_rel_error"] <= 1e-4))
    row["ok"] = True
    row["latency_ms"] = time_ms(cm, inputs, repeat)
    if ort is not None and target == "llvm":
        row["latency_ms"], row["ort_paired_ms"] = paired_ms(cm, ort, inputs, row["latency_ms"])
    del ref
    return row


def paired_ms(fx, ort, inputs: tuple, first_ms: float) -> tuple[float, float]:
    """fxpress and ONNX Runtime timed again in alternating blocks (fxpress.bench.time_blocks), best
    block median each: a sub-millisecond model's 20-call median moves 20-50 % with this VM's drift, the
    pair does not. Blocks hold ~0.1 s of calls."""
    per_block = int(min(2000, max(20, 100 / max(first_ms, 1e-3))))
    times = time_blocks({"fxpress": fx, "onnxruntime": ort}, inputs, blocks=3, per_block=per_block,
                        warmup=5, pause=0.05)
    best = {k: min(statistics.median(b) for b in blocks) for k, blocks in times.items()}
    return best["fxpress"], best["onnxruntime"]


def run(models, pass_sets, targets, batches, repeat, on_model=None) -> tuple[list[dict], list[dict]]:
    """``on_model(rows, peers)`` is called after each model (the script writes its files then, so a long
    run that is stopped keeps what it measured)."""
    rows, peers = [], []
    for name, build, make_inputs in model_entries(models):
        for batch in batches:
            inputs = make_inputs(batch)
            model = build()
            ort = None
            for p in bench_peers(model, inputs, peers=("eager", "onnxruntime"), repeat=repeat, keep=True):
                peers.append({"model": name, "batch": batch, "peer": p.peer, "ok": p.ok,
                              "median_ms": p.median_ms, "error": p.short_error()})
                if p.peer == "onnxruntime" and p.ok:
                    ort = p.compiled
            for pass_set in pass_sets:
                for target in targets:
                    row = run_one(name, build, inputs, pass_set, target, repeat, ort=ort)
                    rows.append(row)
                    print(_line(row), flush=True)
        if on_model is not None:
            on_model(rows, peers)
    return rows, peers


def _line(r: dict) -> str:
    if not r["ok"]:
        return f"{r['model']:20s} b{r['batch']} {r['pass_set']:15s} {r['target']:5s} ERROR {r['error'][:100]}"
    return (f"{r['model']:20s} b{r['batch']} {r['pass_set']:15s} {r['target']:5s} err {r['max_rel_error']:.1e} "
            f"{r['latency_ms']:7.2f} ms  compile {r['compile_s']:5.1f}s  {r['status'][:80]}")


def _peer_ms(peers, model, batch, peer):
    return next((p["median_ms"] for p in peers if p["model"] == model and p["batch"] == batch
                 and p["peer"] == peer and p["ok"]), None)


def _ort_ms(row: dict, peers: list[dict]) -> float | None:
    """ONNX Runtime's time for ``row``: timed in pairs with it where it was, else the peer's own median."""
    return row.get("ort_paired_ms") or _peer_ms(peers, row["model"], row["batch"], "onnxruntime")


def summary(rows: list[dict], peers: list[dict]) -> dict:
    ok = [r for r in rows if r["ok"]]
    silent = [r for r in ok if not r["lossless_ok"]]
    ratios = [r["latency_ms"] / _ort_ms(r, peers) for r in ok
              if r["pass_set"] == "default" and r["target"] == "llvm" and _ort_ms(r, peers)]
    return {"runs": len(rows), "compiled": len(ok), "clear_errors": len(rows) - len(ok),
            "silent_lossless_mismatches": len(silent),
            "llvm_default_vs_ort_geomean": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None}


def write(rows, peers, meta, out: str) -> None:
    s = summary(rows, peers)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "summary": s, "rows": rows, "peers": peers}, f, indent=1)
    lines = ["# Coverage: pass sets x targets on real architectures", "",
             f"{meta['machine']['cpu']} ({meta['machine']['cpu_flags']}), commit {meta['commit']}, {meta['when']}, "
             f"load up to {meta['load']:.1f}. Latency: median ms, in one process on the same inputs; llvm rows and "
             "their ORT column: best block median of fxpress and ORT timed in alternating blocks"
             + (" (**timed on a busy machine: indicative only**)" if meta["load"] > 1.5 else "") + ".", "",
             f"**{s['compiled']}/{s['runs']} compiled, {s['clear_errors']} clear errors, "
             f"{s['silent_lossless_mismatches']} silent lossless mismatches.**"
             + (f" llvm default vs ONNX Runtime, geometric mean: {s['llvm_default_vs_ort_geomean']:.2f}x."
                if s["llvm_default_vs_ort_geomean"] else ""), "",
             "| model | batch | pass set | target | status (layers rewritten/found) | error | compile s | ms | "
             "eager ms | ORT ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eager, ort = _peer_ms(peers, r["model"], r["batch"], "eager"), _ort_ms(r, peers)
        fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        if r["ok"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['pass_set']} | {r['target']} | {r['status']} | "
                         f"{fmt(r['max_rel_error'])} | {r['compile_s']:.1f} | {fmt(r['latency_ms'])} | {fmt(eager)} | "
                         f"{fmt(ort)} |")
        else:
            lines.append(f"| {r['model']} | {r['batch']} | {r['pass_set']} | {r['target']} | error: "
                         f"{r['error'][:120].replace('|', '/')} | - | {r['compile_s']:.1f} | - | {fmt(eager)} | "
                         f"{fmt(ort)} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--pass-sets", nargs="*", default=list(PASS_SETS), choices=list(PASS_SETS))
    ap.add_argument("--targets", nargs="*", default=["llvm", "onnx"], choices=["llvm", "onnx", "torch"])
    ap.add_argument("--batches", nargs="*", type=int, default=[1])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="the CI slice")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "coverage"))
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.pass_sets, args.targets = QUICK["models"], QUICK["pass_sets"], QUICK["targets"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    meta = {"machine": machine_info(), "commit": commit, "when": time.strftime("%Y-%m-%d %H:%M"),
            "load": os.getloadavg()[0], "batches": args.batches, "repeat": args.repeat}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    def save(rows, peers):
        meta["load"] = max(meta["load"], os.getloadavg()[0])  # the worst load seen: a noise indicator
        write(rows, peers, meta, args.out)

    rows, peers = run(args.models, args.pass_sets, args.targets, args.batches, args.repeat, on_model=save)
    save(rows, peers)
    print(f"wrote {args.out}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
