"""Benchmark: peak resident memory of ``fxpress.compile`` on transformers BertModels of two sizes.

Each size is compiled in a fresh subprocess (so one run's allocations cannot hide another's peak):

  1. import torch, transformers, fxpress and TVM; RSS now is the *runtime* (the libraries);
  2. build BertModel from a config made in code, weights seeded random (nothing is downloaded); RSS now
     also holds the model: *weights* = bytes of its parameters and buffers;
  3. reset the kernel's high-water mark (/proc/self/clear_refs), compile, read the peak (VmHWM).

Each row runs *cold* (the first compile in the process: the libraries a compile imports or pages in on
first use — torch.export, TVM's importer, LLVM — count as compile memory) and, with ``--start warm``,
*warm* (a tiny BertModel compiled first, for the same target, and freed: those libraries count as
runtime, so the ratio is what the weights cost). The .md also gives the *slope* between the two sizes,
(peak_110M - peak_30M) / (weights_110M - weights_30M): bytes of memory per byte of weights, free of any
fixed cost.

``ratio`` = (peak - runtime) / weights: the model itself counts 1.0, so the compile's own overhead is
ratio - 1 (the private copy compile() makes of the model, the stage snapshots, reference runs, the
lowered model's weights). The target of issue #19 is ratio <= 1.5 plus the runtime's own weight copy
(the TVM/ONNX parameters the compiled model keeps: ~1.0 on llvm/onnx, 0 on target "torch").

Memory is far less sensitive to machine load than timing; the compile seconds are not, so run it
through /work/shared/tools/quiet-run. Results: benchmarks/results/compile_memory.{md,json}.

    .venv/bin/python benchmarks/bench_compile_memory.py [--sizes bert-30M bert-110M] [--target llvm torch]
        [--start cold warm]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# BertConfig keyword arguments; defaults of BertConfig are bert-base (110M parameters).
SIZES = {
    "bert-30M": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "bert-110M": dict(),
}
SEQ = 64


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _trim() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS marks count live memory, not old garbage."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _last_hidden(bert):
    import torch

    class LastHidden(torch.nn.Module):  # tensors out (compile() refuses ModelOutput's extras)
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask):
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    return LastHidden(bert).eval()


def child(size: str, target: str, passes: str, start: str = "cold") -> dict:
    """Runs in the subprocess: one compile, its memory figures as a dict."""
    import torch
    import transformers

    import fxpress
    import fxpress.codegen  # noqa: F401 - TVM's libraries count as the runtime, not as the compile
    import fxpress.lowering  # noqa: F401

    torch.set_num_threads(1)
    # transformers imports a model's code on first use: a tiny BertModel first, so its modules count as runtime
    tiny = transformers.BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                   intermediate_size=8, max_position_embeddings=8)
    tiny._attn_implementation = "eager"
    tiny_model = transformers.BertModel(tiny).eval()
    if start == "warm":  # one compile first: what it loads on first use counts as runtime
        short = (torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))
        fxpress.compile(_last_hidden(tiny_model), short, passes=None if passes == "none" else passes, target=target)
        import gc

        gc.collect()
    _trim()
    runtime = _status_kib("VmRSS") * 1024
    cfg = transformers.BertConfig(**SIZES[size])
    cfg._attn_implementation = "eager"  # as models/corpus.py: tracers bake in SDPA's kernel choice
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()

    wrapped = _last_hidden(model)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=g)
    mask = torch.ones(1, SEQ, dtype=torch.long)
    _trim()
    with_model = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    t0 = time.perf_counter()
    cm = fxpress.compile(wrapped, (ids, mask), passes=None if passes == "none" else passes, target=target)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    after = _status_kib("VmRSS") * 1024
    return dict(size=size, target=target, passes=passes, start=start, params=params, weights_bytes=weights,
                runtime_rss=runtime, model_rss=with_model, peak_rss=peak, after_rss=after,
                ratio=(peak - runtime) / weights, compile_overhead=(peak - with_model) / weights,
                compile_seconds=seconds, stages=cm.report.names())


# Runs this script with the editable install's package folders pointed at another source tree (argv[1]).
_REMAP = """
import runpy, sys, glob, importlib, os
root = sys.argv[1]
sys.path = [p for p in sys.path if p not in ("", os.getcwd())]  # the cwd may hold another fxpress/
for finder in glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "__editable___fxpress_*_finder.py")):
    mod = importlib.import_module(os.path.basename(finder)[:-3])
    for name, path in mod.MAPPING.items():
        mod.MAPPING[name] = os.path.join(root, os.path.basename(path))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def write_results(rows: list[dict], meta: dict, stem: str, before: dict | None = None) -> None:
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", stem + ".json"), "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=2)
    lines = [
        "# Compile memory: transformers BertModel", "",
        f"`benchmarks/bench_compile_memory.py`, commit {meta['commit']}, {meta['date']}, {meta['machine']}.",
        f"Inputs: batch 1, {SEQ} tokens. One fresh subprocess per row; seeded random weights (nothing downloaded).", "",
        "runtime = RSS after importing torch, transformers, fxpress and TVM (start *cold*), or after that and "
        "one compile of a tiny BertModel, freed (start *warm*: what a compile loads on first use counts as "
        "runtime); peak = the kernel's high-water mark during `fxpress.compile` (reset just before it). "
        "ratio = (peak - runtime) / weights: the model itself counts 1.0; the compiled model's own weight copy "
        "(TVM/ONNX parameters) is in it too.", "",
        "| model | params | weights | target | passes | start | runtime RSS | peak RSS | ratio | compile s |"
        + (" peak before | ratio before |" if before else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if before else ""),
    ]
    for r in rows:
        b = before.get(_key(r)) if before else None
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {gb(r['weights_bytes'])} | {r['target']} | "
                     f"{r['passes']} | {_start(r)} | {gb(r['runtime_rss'])} | {gb(r['peak_rss'])} | {r['ratio']:.2f} | "
                     f"{r['compile_seconds']:.1f} |"
                     + ((f" {gb(b['peak_rss'])} | {b['ratio']:.2f} |" if b else " - | - |") if before else ""))
    slopes = _slopes(rows)
    if slopes:
        lines += ["", "Slope between the sizes, (peak - peak) / (weights - weights): memory per byte of weights, "
                  "without fixed costs: " + "; ".join(f"{t} {s}: {v:.2f}" for (t, s), v in slopes.items()) + "."]
    if before:
        lines += ["", f"*before*: {meta['compare']}."]
    lines += ["", "Memory figures depend little on machine load (they are allocations, not time); the compile "
              "seconds do: take them under `/work/shared/tools/quiet-run` " + meta.get("load_note", "") + "."]
    if meta.get("note"):
        lines += ["", meta["note"]]
    with open(os.path.join(HERE, "results", stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _start(row: dict) -> str:
    return row.get("start", "cold")  # results from before the warm rows were all cold


def _key(row: dict) -> tuple:
    return row["size"], row["target"], row["passes"], _start(row)


def _slopes(rows: list[dict]) -> dict[tuple[str, str], float]:
    """(target, start) -> (peak_b - peak_a) / (weights_b - weights_a) between its smallest and largest model."""
    out = {}
    for key in dict.fromkeys((r["target"], _start(r)) for r in rows):
        rs = sorted((r for r in rows if (r["target"], _start(r)) == key), key=lambda r: r["weights_bytes"])
        if len(rs) > 1 and rs[-1]["weights_bytes"] > rs[0]["weights_bytes"]:
            out[key] = (rs[-1]["peak_rss"] - rs[0]["peak_rss"]) / (rs[-1]["weights_bytes"] - rs[0]["weights_bytes"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--target", nargs="+", default=["llvm"])
    ap.add_argument("--passes", default="default")
    ap.add_argument("--start", nargs="+", default=["cold"], choices=["cold", "warm"],
                    help="cold: the first compile in the process; warm: after a tiny model's compile")
    ap.add_argument("--child", nargs=4, metavar=("SIZE", "TARGET", "PASSES", "START"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="compile_memory", help="results file stem under benchmarks/results")
    ap.add_argument("--note", default="", help="a line added to the .md (e.g. the conditions)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--rewrite", metavar="JSON", help="write the .md again from this results .json (no measuring)")
    ap.add_argument("--compare", help="a results .json of an earlier run: its peaks go in the table as 'before'")
    ap.add_argument("--source", help="measure the fxpress source tree in this folder (e.g. an older commit from "
                                     "`git archive`) instead of the installed one; needs an editable install")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)), flush=True)
        return
    if args.rewrite:
        with open(args.rewrite) as f:
            saved = json.load(f)
        rows = saved.pop("rows")
        before = None
        if args.compare:
            with open(args.compare) as f:
                before = {_key(r): r for r in json.load(f)["rows"]}
        write_results(rows, saved, args.out, before)
        return
    rows = []
    for size, target, start in ((s, t, w) for w in args.start for t in args.target for s in args.sizes):
        cmd = [os.path.abspath(__file__), "--child", size, target, args.passes, start]
        if args.source:
            cmd = ["-c", _REMAP, os.path.abspath(args.source)] + cmd
        proc = subprocess.run([sys.executable] + cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{size}/{target}/{start} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        row = json.loads(line[len("RESULT "):])
        rows.append(row)
        print(f"{size:10} {target:6} {start:5} weights {gb(row['weights_bytes'])}  runtime {gb(row['runtime_rss'])}  "
              f"peak {gb(row['peak_rss'])}  ratio {row['ratio']:.2f}  {row['compile_seconds']:.1f} s", flush=True)
    meta = dict(commit=_commit(), date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=_machine(), load=os.getloadavg(), note=args.note,
                load_note=f"(1-min load at the end: {os.getloadavg()[0]:.2f})")
    if args.source:
        meta["commit"] = f"source tree {args.source} (run from {meta['commit']})"
    before = None
    if args.compare:
        with open(args.compare) as f:
            earlier = json.load(f)
        before = {_key(r): r for r in earlier["rows"]}
        meta["compare"] = f"{os.path.basename(args.compare)}: {earlier['commit']}, {earlier['date']}" + (
            f"; {earlier['note']}" if earlier.get("note") else "")
    if not args.no_write:
        write_results(rows, meta, args.out, before)


if __name__ == "__main__":
    main()
