#!/usr/bin/env python
"""The benchmark sweep: every reference model × every pass set, fxpress next to its peers.

For each model of fxpress.models: eager PyTorch, torch.compile (Inductor, freezing) and ONNX Runtime
on the original model are timed once; then fxpress compiles the model under each pass set
(none, fuse, fuse+low_rank, fuse+shift_add, fuse+quantize, default) for each target (llvm, onnx)
and is timed the same way, in this one process, on the same inputs. A pass set whose passes are not
registered is skipped with a note. Results go to benchmarks/results/<tag>.json and <tag>.md (with
date, machine, versions, git commit and load average), plots to <tag>-accuracy_vs_size.png and
<tag>-latency_vs_passes.png, and an HTML report of the default pipeline (first model, or every
model with --html all) to <tag>-<model>.html. --render-only redraws the Markdown and plots from
the JSON.

    .venv/bin/python benchmarks/run_all.py --quick          # 3 small models, 10 runs each (~8 min of CPU time)
    .venv/bin/python benchmarks/run_all.py                  # all models, small size, 20 runs
    .venv/bin/python benchmarks/run_all.py --size full --models resnet18,bert_small
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

# OMP_WAIT_POLICY is left alone (recorded in the results). ACTIVE makes PyTorch's OpenMP threads
# spin forever after every op: measured here, they then steal the cores TVM's and ONNX Runtime's
# pools need later in the same process (fxpress default BERT 25 ms alone, 600 ms after eager ran).

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PASS_SETS: dict[str, list[str] | str] = {
    "none": "none",
    "fuse": ["fuse"],
    "fuse+low_rank": ["fuse", "low_rank"],
    "fuse+shift_add": ["fuse", "shift_add"],
    "fuse+quantize": ["fuse", "quantize"],
    "default": "default",
}
QUICK_MODELS = ["digits_cnn", "resnet18", "bert_small"]


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def resolve_pass_set(name: str) -> tuple[list[str] | str | None, str]:
    """(passes argument for compile, note). None means: skip this pass set."""
    from fxpress.passes.base import available_passes, default_pipeline

    spec = PASS_SETS[name]
    if spec == "none":
        return "none", ""
    if spec == "default":
        pipe = default_pipeline()
        return "default", f"default pipeline = {'+'.join(pipe) if pipe else '(empty: no pass is on by default yet)'}"
    missing = [p for p in spec if p not in available_passes()]
    if missing:
        return None, f"skipped: pass(es) {', '.join(missing)} not registered yet"
    return list(spec), ""


def model_inputs(spec, has_labels: bool):
    """(labels for accuracy, calibration batches) for a registry model."""
    import torch

    if not has_labels:
        return None, None
    from fxpress.models import digits_data

    x_tr, _, x_te, y_te = digits_data()
    batch = spec.example_inputs()[0].shape[0]
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x_tr), generator=g)[: 8 * batch]
    calibration = [(b,) for b in x_tr[idx].split(batch) if len(b) == batch]
    return (x_te, y_te), calibration


def bench_one_model(name: str, size: str, targets: list[str], pass_sets: list[str], repeat: int, peers: list[str],
                    html_dir: str | None, tag: str, log) -> dict:
    import torch

    from fxpress import models
    from fxpress.bench import bench_fxpress, bench_peers, _model_stats, thread_info

    spec = models.get(name, size=size)
    model = spec.build().eval()
    inputs = spec.example_inputs()
    labels, calibration = model_inputs(spec, spec.has_labels)
    with torch.no_grad():
        reference = [t.detach() for t in torch.utils._pytree.tree_flatten(model(*inputs))[0]]
    stats = _model_stats(model, inputs)
    out = {"model": name, "size": size, "description": spec.description,
           "inputs": [{"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")} for x in inputs],
           "has_labels": spec.has_labels, "original": stats, "threads": thread_info(),
           "peers": [], "fxpress": [], "skipped": []}
    log(f"[{name}] peers: {', '.join(peers)}")
    for r in bench_peers(model, inputs, peers, repeat=repeat, labels=labels, stats=stats, reference=reference):
        out["peers"].append(r)
        log(f"[{name}]   {r.peer}: " + (f"{r.median_ms:.3f} ms (compile {r.compile_s:.1f} s)" if r.ok
                                         else f"FAILED {r.short_error()}"))
    keep_for_html = None
    for ps in pass_sets:
        passes, note = resolve_pass_set(ps)
        if passes is None:
            out["skipped"].append({"passes": ps, "reason": note})
            log(f"[{name}] {ps}: {note}")
            continue
        for t in targets:
            keep = html_dir is not None and ps == "default" and t == targets[0]
            r = bench_fxpress(model, inputs, t, passes, repeat=repeat, labels=labels, calibration=calibration,
                              reference=reference, keep=keep)
            r.passes = ps
            if note:
                r.note = f"{note}; {r.note}" if r.note else note
            out["fxpress"].append(r)
            if keep and r.compiled is not None:
                keep_for_html = r.compiled
            log(f"[{name}] {ps} / {t}: " + (f"{r.median_ms:.3f} ms, compile {r.compile_s:.1f} s, "
                                             f"err {r.max_rel_error:.1e}" if r.ok else f"FAILED {r.short_error()}"))
    out["_compiled"] = keep_for_html
    torch._dynamo.reset()
    return out


# ----------------------------------------------------------------------------- writing

def _serialisable(result: dict) -> dict:
    from dataclasses import asdict

    from fxpress.bench import _clean

    d = {k: v for k, v in result.items() if not k.startswith("_")}
    d["peers"] = [_clean(asdict(p)) for p in result["peers"]]
    d["fxpress"] = [_clean(asdict(p)) for p in result["fxpress"]]
    return d


def write_json(path: str, meta: dict, results: list[dict]) -> None:
    data = dict(meta, models=[_serialisable(r) for r in results])
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def summary_table(results: list[dict]) -> str:
    """One line per model: the peers' latency and fxpress's best row (fastest among fxpress rows)."""
    from fxpress.report import human_bytes

    lines = ["| model | eager ms | torch.compile ms | ORT ms | fxpress llvm ms, best pass set | fxpress onnx ms, best pass set "
             "| smallest fxpress size (pass set) | its error / accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        peer = {p.peer: p for p in r["peers"]}

        def ms(p):
            if p is None:
                return "-"
            if not p.ok:
                return "failed"
            return f"{p.median_ms:.3g}" + (f" ({p.min_ms:.3g})" if p.min_ms is not None else "")

        def best(target):
            rows = [p for p in r["fxpress"] if p.ok and p.peer == f"fxpress:{target}"]
            if not rows:
                return "failed" if any(p.peer == f"fxpress:{target}" for p in r["fxpress"]) else "-"
            b = min(rows, key=lambda p: p.median_ms)
            return f"{ms(b)} {b.passes}"

        ok = [p for p in r["fxpress"] if p.ok and p.size_bytes is not None]
        if ok:
            small = min(ok, key=lambda p: (p.size_bytes, p.max_rel_error or 0))
            orig = r["original"]["size_bytes"] or 1
            size = f"{human_bytes(small.size_bytes)} = {small.size_bytes / orig:.2f}× ({small.passes})"
            q = f"{small.max_rel_error:.1e}" + (f" / {100 * small.accuracy:.2f}%" if small.accuracy is not None else "")
        else:
            size, q = "-", "-"
        lines.append(f"| {r['model']} | {ms(peer.get('eager'))} | {ms(peer.get('torch.compile'))} | "
                     f"{ms(peer.get('onnxruntime'))} | {best('llvm')} | {best('onnx')} | {size} | {q} |")
    return "\n".join(lines)


def write_markdown(path: str, meta: dict, results: list[dict], plots: list[str]) -> None:
    from fxpress.bench import markdown_table, memory_method
    from fxpress.report import human_bytes

    m = meta["machine"]
    lines = [f"# fxpress benchmark ({meta['tag']})", "",
             f"- date: {meta['date']}",
             f"- machine: {m['cpu']} ({m['cpu_flags'] or 'no AVX2'}), {m['usable_cores']} usable of "
             f"{m['logical_cores']} logical cores, {human_bytes(m['memory_bytes'] or 0)} RAM, {m['os']}",
             f"- load average at start / end: {meta['load_start']} / {meta.get('load_end', '?')} "
             "(the machine is shared: a load above the core count means other work ran beside this benchmark)",
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f", Python {m['python']}",
             f"- commit: {meta['commit']}",
             "- environment: " + ", ".join(f"{k}={v or '(unset)'}" for k, v in meta.get("env", {}).items()),
             f"- command: `{meta['command']}`",
             f"- {meta['repeat']} timed runs per row after a warm-up; latency is the median; "
             f"memory is {memory_method()}; error is max |y - eager| / max |eager|.",
             "", "## Summary", "",
             "Latency: median (min) in ms. On a loaded machine the median carries the interference of "
             "other processes; the min is closer to what the code can do.", "",
             summary_table(results), ""]
    for p in plots:
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})", ""]
    for r in results:
        baseline = next((p.median_ms for p in r["peers"] if p.peer == "eager" and p.ok), None)
        o = r["original"]
        lines += [f"## {r['model']} ({r['size']})", "",
                  f"{r['description']}; inputs " + ", ".join("x".join(map(str, i["shape"])) + f" {i['dtype']}"
                                                              for i in r["inputs"])
                  + f"; original: {o['params']:,} params, {human_bytes(o['size_bytes'])}, "
                  + (f"{o['macs']:,} MACs" if o.get("macs") is not None else "MACs unknown"), "",
                  markdown_table(r["peers"] + r["fxpress"], baseline=baseline), ""]
        for s in r["skipped"]:
            lines.append(f"- {s['passes']}: {s['reason']}")
        if r.get("html"):
            lines.append(f"- HTML report (default passes): [{os.path.basename(r['html'])}]({os.path.basename(r['html'])})")
        if r.get("error"):
            lines.append(f"- model failed: {r['error']}")
        lines.append("")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)


def _group_points(pts: list[tuple[float, float, str]], log_y: bool) -> list[tuple[float, float, str]]:
    """Merge points that would sit on top of each other (x within 3 %, y within 0.3 points or a
    factor 2 on a log axis) into one point labelled with all their pass sets."""
    import math

    groups: list[list[tuple[float, float, str]]] = []
    for pt in sorted(pts):
        for g in groups:
            x0, y0, _ = g[0]
            close_x = abs(pt[0] - x0) <= 0.03 * max(abs(x0), 1e-12)
            close_y = (abs(math.log10(pt[1] / y0)) <= 0.3) if log_y else abs(pt[1] - y0) <= 0.3
            if close_x and close_y:
                g.append(pt)
                break
        else:
            groups.append([pt])
    out = []
    for g in groups:
        labels = list(dict.fromkeys(lab for _, _, lab in g))
        out.append((sum(p[0] for p in g) / len(g), max(p[1] for p in g), ", ".join(labels)))
    return out


def plot_accuracy_vs_size(path: str, results: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    labeled = [r for r in results if r["has_labels"]]
    accs: list[float] = []
    for r in labeled:
        orig = r["original"]["size_bytes"] / 1024
        eager = next((p for p in r["peers"] if p.peer == "eager" and p.ok and p.accuracy is not None), None)
        if eager:
            ax1.scatter([orig], [100 * eager.accuracy], marker="*", s=220, color="black", zorder=3,
                        label=f"{r['model']} original (eager)")
            accs.append(100 * eager.accuracy)
        pts = [(p.size_bytes / 1024, 100 * p.accuracy, p.passes) for p in r["fxpress"]
               if p.ok and p.accuracy is not None]
        accs += [y for _, y, _ in pts]
        for k, (x, y, labs) in enumerate(_group_points(pts, log_y=False)):
            ax1.scatter([x], [y], s=60, alpha=0.8)
            up = k % 2 == 1  # alternate above / below so neighbours' labels do not overlap
            ax1.annotate(labs, (x, y), fontsize=7, xytext=(6, 5 if up else -5), textcoords="offset points",
                         va="bottom" if up else "top")
    if accs:
        ax1.set_ylim(min(accs) - 3, min(100.5, max(accs) + 1.5))
    ax1.set_xlabel("weights (KiB)")
    ax1.set_ylabel("top-1 accuracy (%)")
    ax1.set_title("accuracy vs size (models with labels: " + (", ".join(r["model"] for r in labeled) or "none") + ")",
                  fontsize=10)
    ax1.grid(alpha=0.3)
    if labeled:
        ax1.legend(fontsize=8, loc="lower right")
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(results):
        orig = r["original"]["size_bytes"] or 1
        per_set: dict[str, tuple[float, float]] = {}  # pass set → (size ratio, worst error over targets)
        for p in r["fxpress"]:
            if p.ok and p.size_bytes is not None:
                old = per_set.get(p.passes, (p.size_bytes / orig, 0.0))
                per_set[p.passes] = (old[0], max(old[1], p.max_rel_error or 0.0, 1e-9))
        pts = _group_points([(x, y, lab) for lab, (x, y) in per_set.items()], log_y=True)
        if pts:
            ax2.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], color=cmap(i % 10), label=r["model"], s=40)
            for x, y, lab in pts:
                ax2.annotate(lab, (x, y), fontsize=6, xytext=(4, 2), textcoords="offset points", color=cmap(i % 10))
    ax2.set_yscale("log")
    ax2.set_xlabel("weights / original weights")
    ax2.set_ylabel("max relative output error vs eager (1e-9 floor)")
    ax2.set_title("output error vs compression, every model", fontsize=10)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_vs_passes(path: str, results: list[dict], targets: list[str]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    n = len(results)
    if not n:
        return None
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    peer_style = {"eager": ("black", "-"), "torch.compile": ("tab:red", "--"), "onnxruntime": ("tab:purple", ":")}
    for ax, r in zip(axes.flat, results):
        sets = list(dict.fromkeys(p.passes for p in r["fxpress"]))
        width = 0.8 / max(1, len(targets))
        for j, t in enumerate(targets):
            vals = []
            for s in sets:
                p = next((q for q in r["fxpress"] if q.passes == s and q.peer == f"fxpress:{t}"), None)
                vals.append(p.median_ms if p is not None and p.ok else 0.0)
            xs = [i + (j - (len(targets) - 1) / 2) * width for i in range(len(sets))]
            ax.bar(xs, [v if v > 0 else float("nan") for v in vals], width, label=f"fxpress:{t}")
            for x, v in zip(xs, vals):
                if v <= 0:
                    ax.text(x, 0.01, "failed", rotation=90, ha="center", va="bottom", fontsize=7,
                            transform=ax.get_xaxis_transform())
        for p in r["peers"]:
            if p.ok:
                c, ls = peer_style.get(p.peer, ("gray", "-"))
                ax.axhline(p.median_ms, color=c, ls=ls, lw=1.2, label=f"{p.peer} {p.median_ms:.3g} ms")
        ax.set_yscale("log")
        ax.set_xticks(range(len(sets)), sets, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("median latency (ms, log)")
        ax.set_title(f"{r['model']} ({r['size']})", fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_results(json_path: str) -> tuple[dict, list[dict]]:
    """Read a results JSON back: (meta, per-model dicts with PeerResult rows)."""
    from dataclasses import fields

    from fxpress.bench import PeerResult

    with open(json_path) as f:
        data = json.load(f)
    names = {fl.name for fl in fields(PeerResult)}
    results = data.pop("models")
    for r in results:
        r["peers"] = [PeerResult(**{k: v for k, v in p.items() if k in names}) for p in r["peers"]]
        r["fxpress"] = [PeerResult(**{k: v for k, v in p.items() if k in names}) for p in r["fxpress"]]
    return data, results


def render_only(out: str, tag: str) -> int:
    meta, results = load_results(os.path.join(out, f"{tag}.json"))
    plots = [p for p in (plot_accuracy_vs_size(os.path.join(out, f"{tag}-accuracy_vs_size.png"), results),
                         plot_latency_vs_passes(os.path.join(out, f"{tag}-latency_vs_passes.png"), results,
                                                meta.get("targets", ["llvm", "onnx"])))
             if p]
    md = os.path.join(out, f"{tag}.md")
    write_markdown(md, meta, results, plots)
    print(f"wrote {md}" + "".join(f", {p}" for p in plots))
    print(summary_table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"small run: {', '.join(QUICK_MODELS)}, 10 runs each")
    ap.add_argument("--models", default=None, help="comma list of registry models (default: all; --quick: a few)")
    ap.add_argument("--size", default="small", choices=["small", "full"])
    ap.add_argument("--pass-sets", default=",".join(PASS_SETS), help=f"comma list from {', '.join(PASS_SETS)}")
    ap.add_argument("--targets", default="llvm,onnx")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per row (default 20, --quick 10)")
    ap.add_argument("--no-torch-compile", action="store_true", help="leave out the torch.compile peer (slow to compile)")
    ap.add_argument("--html", default="first", choices=["first", "all", "none"],
                    help="HTML report of the default pipeline for the first model (default), every model, or none "
                         "(each page is a few hundred KiB: it embeds the plots, graph pictures and IR)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default=None, help="file name stem (default: 'quick' or 'full-<size>')")
    ap.add_argument("--render-only", action="store_true",
                    help="measure nothing: rewrite <tag>.md and the plots from an existing <tag>.json")
    args = ap.parse_args(argv)
    if args.render_only:
        tag = args.tag or ("quick" if args.quick else f"full-{args.size}")
        return render_only(args.out, tag)

    from fxpress import models
    from fxpress.bench import machine_info

    names = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else models.names())
    bad = [n for n in names if n not in models.names()]
    pass_sets = [s for s in args.pass_sets.split(",") if s]
    bad += [s for s in pass_sets if s not in PASS_SETS]
    if bad:
        ap.error(f"unknown model(s)/pass set(s): {bad}; models: {models.names()}; pass sets: {list(PASS_SETS)}")
    targets = [t for t in args.targets.split(",") if t]
    repeat = args.repeat or (10 if args.quick else 20)
    peers = ["eager", "onnxruntime"] if args.no_torch_compile else ["eager", "torch.compile", "onnxruntime"]
    tag = args.tag or ("quick" if args.quick else f"full-{args.size}")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    meta = {"tag": tag, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
            "machine": machine_info(), "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + (argv or sys.argv[1:])),
            "repeat": repeat, "targets": targets, "pass_sets": pass_sets, "peers": peers,
            "load_start": round(os.getloadavg()[0], 2),
            "env": {k: os.environ.get(k, "") for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "TVM_NUM_THREADS")}}
    json_path = os.path.join(args.out, f"{tag}.json")
    md_path = os.path.join(args.out, f"{tag}.md")
    results: list[dict] = []
    for k, name in enumerate(names):
        want_html = args.html == "all" or (args.html == "first" and k == 0)
        try:
            r = bench_one_model(name, args.size, targets, pass_sets, repeat, peers,
                                args.out if want_html else None, tag, log)
        except Exception as e:  # noqa: BLE001 - one broken model must not lose the others' numbers
            traceback.print_exc()
            log(f"[{name}] FAILED: {type(e).__name__}: {e}")
            continue
        cm = r.pop("_compiled", None)
        results.append(r)
        if cm is not None:
            r["_cm"] = cm
        meta["load_end"] = round(os.getloadavg()[0], 2)
        meta["seconds"] = round(time.time() - t_start, 1)
        write_json(json_path, meta, results)  # after every model: a crash keeps what was measured
    plots = [p for p in (plot_accuracy_vs_size(os.path.join(args.out, f"{tag}-accuracy_vs_size.png"), results),
                         plot_latency_vs_passes(os.path.join(args.out, f"{tag}-latency_vs_passes.png"), results, targets))
             if p]
    if args.html != "none":
        from fxpress.html_report import write_html_report

        for r in results:
            cm = r.pop("_cm", None)
            if cm is None:
                continue
            path = os.path.join(args.out, f"{tag}-{r['model']}.html")
            try:
                write_html_report(cm, path, title=f"{r['model']} ({r['size']}), default passes", plots=plots,
                                  graph_files=False)
                r["html"] = os.path.basename(path)
            except Exception as e:  # noqa: BLE001
                log(f"[{r['model']}] HTML report failed: {type(e).__name__}: {e}")
    for r in results:
        r.pop("_cm", None)
    meta["load_end"] = round(os.getloadavg()[0], 2)
    meta["seconds"] = round(time.time() - t_start, 1)
    write_json(json_path, meta, results)
    write_markdown(md_path, meta, results, plots)
    log(f"wrote {md_path}, {json_path}" + "".join(f", {p}" for p in plots))
    print()
    print(summary_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
