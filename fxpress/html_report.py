"""One self-contained HTML page per compiled model: what every stage did, and what came out.

``write_html_report(cm, path)`` writes:
- the per-stage table (params, size, MACs, multiplies, nodes, error, seconds) and its notes,
- plots of size / MACs / error per stage (base64 PNG, matplotlib),
- each pass's rewrites, skips, metrics and per-layer rows,
- the unified diff of the FX code between consecutive stages (difflib),
- a picture of the FX graph after every stage that changed it (SVG, nodes the stage produced
  in orange), embedded, and also written beside the page (``<name>.graphs/``) and linked,
- the Relax IR of the final module (from the ``lower:llvm``/``lower:cuda`` stage; for other targets
  the IR fxpress would build for llvm is generated for the page), and the ONNX graph text when the
  target was ONNX.

Everything the page shows is inside the file (styles, images); no scripts, no network.
``cm`` may also be a bare ``Report`` (e.g. read back from an artifact's report.json): the page then
has everything but the graph pictures and a generated Relax IR.
"""
from __future__ import annotations

import base64
import difflib
import html
import io
import os
import time
from typing import Any, Iterable, Sequence

from .report import Report, human, human_bytes

MAX_DIFF_LINES = 4000
MAX_IR_CHARS = 2_000_000
MAX_OTHER_IR_CHARS = 100_000  # ONNX text holds the weights; the head is what a reader needs
MAX_ROWS = 300  # per list of rewrites / skips / layers

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px 32px;color:#1d1d1f;background:#fff;max-width:1400px}
h1{font-size:26px;margin:0 0 6px} h2{font-size:20px;margin:28px 0 8px;border-bottom:2px solid #e3e3e8;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px}
.meta{color:#555;font-size:14px;line-height:1.5}
nav a{margin-right:14px;font-size:14px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 10px}
th,td{border:1px solid #d0d0d7;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f0f0f5} td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#fafafc}
.st-applied{color:#0a7a28;font-weight:600}.st-unchanged{color:#777}.st-rolled{color:#b35c00;font-weight:600}
.st-failed{color:#c00;font-weight:600}.st-ok{color:#0a5aa8}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:10px;overflow:auto;font-size:12px;line-height:1.35;max-height:640px}
pre.diff span{display:block}
.add{background:#e6ffec;color:#044317}.del{background:#ffebe9;color:#82071e}.hunk{color:#0550ae;background:#ddf4ff}
.hdr{color:#57606a;font-weight:600}
details{margin:6px 0 10px} summary{cursor:pointer;font-weight:600}
img.plot{max-width:100%;border:1px solid #eee} img.graph{max-width:100%;background:#fff}
.note{color:#555;font-size:13px}
.graphs{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.graphs figure{margin:0;border:1px solid #e3e3e8;padding:8px;max-width:640px}
figcaption{font-size:13px;margin-bottom:6px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _status_class(status: str) -> str:
    return {"applied": "st-applied", "unchanged": "st-unchanged", "rolled back": "st-rolled",
            "failed": "st-failed"}.get(status, "st-ok")


def _records(cm) -> tuple[Report, Any]:
    if isinstance(cm, Report):
        return cm, None
    return cm.report, cm


def stage_table_html(report: Report) -> str:
    cols = ["stage", "kind", "status", "params", "size", "MACs", "mults", "nodes", "max rel err",
            "Δ size vs trace", "seconds"]
    base = report.records[0].param_bytes if len(report) else 0
    out = ['<table class="stages"><thead><tr>' + "".join(
        f'<th class="{"l" if i < 3 else ""}">{_e(c)}</th>' for i, c in enumerate(cols)) + "</tr></thead><tbody>"]
    for r in report:
        err = "-" if r.max_rel_error is None else f"{r.max_rel_error:.2e}"
        ratio = f"{r.param_bytes / base:.2f}×" if base else "-"
        cells = [f'<td class="l">{_e(r.name)}</td>', f'<td class="l">{_e(r.kind)}</td>',
                 f'<td class="l {_status_class(r.status)}">{_e(r.status)}</td>',
                 f"<td>{_e(human(r.params))}</td>", f"<td>{_e(human_bytes(r.param_bytes))}</td>",
                 f"<td>{_e(human(r.macs))}</td>", f"<td>{_e(human(r.multiplies))}</td>",
                 f"<td>{r.nodes}</td>", f"<td>{err}</td>", f"<td>{ratio}</td>", f"<td>{r.seconds:.2f}</td>"]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    notes = [(r.name, r.note) for r in report if r.note]
    if notes:
        out.append('<ul class="note">' + "".join(f"<li><b>{_e(n)}</b>: {_e(t)}</li>" for n, t in notes) + "</ul>")
    return "\n".join(out)


def _rows_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys: list[str] = []
    for row in rows[:MAX_ROWS]:
        keys += [k for k in row if k not in keys]
    out = ["<table><thead><tr>" + "".join(f'<th class="l">{_e(k)}</th>' for k in keys) + "</tr></thead><tbody>"]
    for row in rows[:MAX_ROWS]:
        out.append("<tr>" + "".join(f'<td class="l">{_e(_fmt(row.get(k, "")))}</td>' for k in keys) + "</tr>")
    out.append("</tbody></table>")
    if len(rows) > MAX_ROWS:
        out.append(f'<p class="note">… {len(rows) - MAX_ROWS} more rows</p>')
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _result_dict(r) -> dict[str, Any] | None:
    res = r.result
    if res is None:
        return None
    if isinstance(res, dict):
        return res
    return res.to_dict()


def pass_details_html(report: Report) -> str:
    out = []
    for r in report:
        if r.kind != "pass":
            continue
        res = _result_dict(r)
        out.append(f'<h3>{_e(r.name)} <span class="{_status_class(r.status)}">({_e(r.status)})</span></h3>')
        if res is None:
            out.append('<p class="note">no pass result recorded</p>')
            continue
        rw, sk = res.get("rewrites", []), res.get("skipped", [])
        out.append(f'<p class="note">{len(rw)} rewrite(s), {len(sk)} skip(s), {r.seconds:.2f} s</p>')
        if res.get("metrics"):
            out.append(_rows_table([{"metric": k, "value": v} for k, v in res["metrics"].items()]))
        for n in res.get("notes", []):
            out.append(f'<p class="note">note: {_e(n)}</p>')
        if rw:
            rows = [{"kind": w.get("kind"), "consumed": ", ".join(w.get("consumed", [])),
                     "produced": ", ".join(w.get("produced", [])) or "(removed)",
                     "detail": ", ".join(f"{k}={_fmt(v)}" for k, v in (w.get("detail") or {}).items())} for w in rw]
            out.append(f"<details><summary>rewrites ({len(rw)})</summary>{_rows_table(rows)}</details>")
        if sk:
            out.append(f"<details><summary>skipped ({len(sk)})</summary>{_rows_table(sk)}</details>")
        if res.get("layers"):
            out.append(f"<details open><summary>per-layer ({len(res['layers'])})</summary>"
                       f"{_rows_table(res['layers'])}</details>")
    return "\n".join(out) or '<p class="note">no passes ran (passes="none" or an empty default pipeline)</p>'


def code_diff(before: str, after: str, a: str, b: str) -> list[str]:
    return list(difflib.unified_diff(before.splitlines(), after.splitlines(), fromfile=a, tofile=b, lineterm="", n=2))


def _diff_html(lines: list[str]) -> str:
    shown = lines[:MAX_DIFF_LINES]
    spans = []
    for ln in shown:
        cls = ("hdr" if ln.startswith(("---", "+++")) else "hunk" if ln.startswith("@@")
               else "add" if ln.startswith("+") else "del" if ln.startswith("-") else "")
        spans.append(f'<span class="{cls}">{_e(ln) or "&nbsp;"}</span>')
    more = f'<span class="hunk">… {len(lines) - MAX_DIFF_LINES} more lines</span>' if len(lines) > MAX_DIFF_LINES else ""
    return '<pre class="diff">' + "".join(spans) + more + "</pre>"


def diffs_html(report: Report) -> str:
    stages = [r for r in report if r.code]
    if len(stages) < 2:
        if stages:
            return (f'<p class="note">only one FX stage ({_e(stages[0].name)}); its code:</p>'
                    f"<pre>{_e(stages[0].code)}</pre>")
        return '<p class="note">no FX code recorded</p>'
    out = []
    for prev, cur in zip(stages, stages[1:]):
        lines = code_diff(prev.code, cur.code, prev.name, cur.name)
        add = sum(1 for ln in lines if ln.startswith("+") and not ln.startswith("+++"))
        rem = sum(1 for ln in lines if ln.startswith("-") and not ln.startswith("---"))
        title = f"{prev.name} → {cur.name}: +{add} −{rem} lines"
        if not lines:
            out.append(f'<p class="note">{_e(prev.name)} → {_e(cur.name)}: FX code unchanged ({_e(cur.status)})</p>')
        else:
            out.append(f"<details open><summary>{_e(title)}</summary>{_diff_html(lines)}</details>")
    out.append(f"<details><summary>final FX code ({_e(stages[-1].name)})</summary><pre>{_e(stages[-1].code)}</pre></details>")
    return "\n".join(out)


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def stage_plots_png(report: Report) -> str | None:
    """One PNG (base64) with size, MACs and output error per stage."""
    recs = list(report)
    if not recs:
        return None
    try:
        import matplotlib
    except ImportError:  # an install without matplotlib: the report, without plots
        return None

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    names = [r.name for r in recs]
    colors = ["#4c78a8" if r.kind == "trace" else "#f58518" if r.kind == "pass" else "#54a24b" for r in recs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = [("weights (KiB)", [r.param_bytes / 1024 for r in recs], False),
              ("MACs (M)", [r.macs / 1e6 for r in recs], False),
              ("max relative error vs eager", [r.max_rel_error or 0.0 for r in recs], True)]
    for ax, (title, vals, log) in zip(axes, panels):
        if log:  # exact stages (error 0) get no bar, just a label
            floor = min([v for v in vals if v > 0] or [1e-7]) / 10
            ax.bar(range(len(vals)), [v if v > 0 else floor for v in vals], color=colors, bottom=0)
            ax.set_yscale("log")
            for i, v in enumerate(vals):
                if v <= 0:
                    ax.text(i, floor, "0 (exact)", ha="center", va="bottom", fontsize=8)
        else:
            ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    data = _png_b64(fig)
    plt.close(fig)
    return data


def _graph_stages(cm, report: Report) -> list[tuple[str, Any, set[str]]]:
    """(stage, graph, nodes new in this stage) for trace and every stage that changed the graph."""
    from .graph_svg import changed_nodes

    graphs = getattr(cm, "_graphs", None) or {}
    out = []
    prev = None
    for r in report:
        gm = graphs.get(r.name)
        if gm is None:
            continue
        if prev is None:
            out.append((r.name, gm, set()))
        elif gm is not prev:
            out.append((r.name, gm, changed_nodes(prev, gm)))
        prev = gm
    return out


def graphs_html(cm, report: Report, path: str, graph_files: bool, engine: str) -> tuple[str, list[str]]:
    if cm is None:
        return '<p class="note">graph pictures need the CompiledModel (not available from a saved report)</p>', []
    from .graph_svg import graph_to_svg, have_dot

    stages = _graph_stages(cm, report)
    if not stages:
        return '<p class="note">no FX graphs recorded</p>', []
    files: list[str] = []
    side_dir = os.path.splitext(path)[0] + ".graphs"
    figs = []
    for name, gm, new in stages:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        try:
            svg = graph_to_svg(gm, title=f"after {name}", highlight=new, engine=engine)
        except Exception as e:  # noqa: BLE001 - a picture must never break the report
            figs.append(f'<figure><figcaption>{_e(name)}: no picture ({_e(type(e).__name__)}: {_e(e)})</figcaption></figure>')
            continue
        link = ""
        if graph_files:
            os.makedirs(side_dir, exist_ok=True)
            fpath = os.path.join(side_dir, f"{safe}.svg")
            with open(fpath, "w") as f:
                f.write(svg)
            files.append(fpath)
            rel = os.path.relpath(fpath, os.path.dirname(os.path.abspath(path)))
            link = f' · <a href="{_e(rel)}">open SVG</a>'
        b64 = base64.b64encode(svg.encode()).decode("ascii")
        cap = f"after <b>{_e(name)}</b> ({len(gm.graph.nodes)} nodes" + (
            f", {len(new)} new/changed in orange" if new else "") + f"){link}"
        figs.append(f'<figure id="graph-{_e(safe)}"><figcaption>{cap}</figcaption>'
                    f'<img class="graph" alt="FX graph after {_e(name)}" src="data:image/svg+xml;base64,{b64}"></figure>')
    how = "Graphviz dot" if (engine in ("auto", "dot") and have_dot()) else "networkx layered layout (matplotlib)"
    intro = (f'<p class="note">Drawn with {how}. One picture for the traced graph and one after each stage that '
             "changed it; consecutive pictures are a pass's before/after.</p>")
    return intro + '<div class="graphs">' + "\n".join(figs) + "</div>", files


def _lowering_irs(cm, report: Report, relax_fallback: bool) -> str:
    out = []
    relax = [r for r in report if r.kind == "lowering" and r.ir and r.name in ("lower:llvm", "lower:cuda")]
    other = [r for r in report if r.kind == "lowering" and r.ir and r not in relax]
    if relax:
        r = relax[-1]
        out.append(f"<h3>Relax IR of the final module ({_e(r.name)})</h3>{_ir_pre(r.ir)}")
        after = (r.extra or {}).get("ir_after") or {}
        for k, v in after.items():
            if isinstance(v, str) and v:
                out.append(f"<details><summary>IR after {_e(k)}</summary>{_ir_pre(v)}</details>")
    elif cm is not None and relax_fallback and getattr(cm, "gm", None) is not None:
        try:
            from fxpress.lowering import to_relax

            text = to_relax(cm.gm, cm.example_inputs).ir_text
            out.append(f"<h3>Relax IR of the final module</h3><p class=\"note\">This model was compiled for "
                       f"target={_e(cm.target)!s}; the Relax IR below is what fxpress builds for llvm/cuda from the "
                       f"same final FX graph (generated for this page).</p>{_ir_pre(text)}")
        except Exception as e:  # noqa: BLE001
            out.append(f'<p class="note">Relax IR could not be generated: {_e(type(e).__name__)}: {_e(e)}</p>')
    else:
        out.append('<p class="note">no Relax IR recorded (the model was not lowered through TVM)</p>')
    for r in other:
        label = "ONNX graph" if r.name == "lower:onnx" else "IR"
        out.append(f"<details><summary>{label} ({_e(r.name)})</summary>{_ir_pre(r.ir, MAX_OTHER_IR_CHARS)}</details>")
    return "\n".join(out)


def _ir_pre(text: str, limit: int = MAX_IR_CHARS) -> str:
    more = ""
    if len(text) > limit:
        more = f"\n… {len(text) - limit} more characters (cut here to keep the page small)"
        text = text[:limit]
    return f'<pre class="ir">{_e(text)}{_e(more)}</pre>'


def _extra_plots_html(plots: Sequence[str | tuple[str, bytes]]) -> str:
    out = []
    for p in plots:
        if isinstance(p, tuple):
            title, data = p
        else:
            title = os.path.basename(p)
            with open(p, "rb") as f:
                data = f.read()
        out.append(f"<figure><figcaption>{_e(title)}</figcaption>"
                   f'<img class="plot" alt="{_e(title)}" src="data:image/png;base64,{base64.b64encode(data).decode()}"></figure>')
    return "\n".join(out)


def render_html(cm, title: str | None = None, plots: Sequence[str | tuple[str, bytes]] = (),
                bench=None, path: str = "report.html", graph_files: bool = True, engine: str = "auto",
                relax_fallback: bool = True) -> tuple[str, list[str]]:
    """(HTML text, side files written). See ``write_html_report``."""
    from . import __version__

    report, model = _records(cm)
    target = getattr(model, "target", None) or next(
        (r.name.split(":", 1)[1] for r in report if r.kind == "lowering"), "?")
    passes = getattr(model, "passes", None) or [r.name for r in report if r.kind == "pass"]
    title = title or "compiled model"
    meta = [f"target <b>{_e(target)}</b>", f"passes <b>{_e(', '.join(passes) or 'none')}</b>"]
    if model is not None:
        meta.append(f"traced with {_e(model.trace_method or '?')}")
        meta.append("inputs " + ", ".join(f"{_e(s['name'])}: {_e('x'.join(map(str, s['shape'])))} {_e(s['dtype'])}"
                                          for s in model.input_specs))
        meta.append("outputs " + ", ".join(f"{_e('x'.join(map(str, s['shape'])))} {_e(s['dtype'])}"
                                           for s in model.output_specs))
    meta.append(f"fxpress {_e(__version__)}, generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    graphs, files = graphs_html(model, report, path, graph_files, engine)
    plot = stage_plots_png(report)
    plot_html = (f'<img class="plot" alt="size, MACs and error per stage" src="data:image/png;base64,{plot}">'
                 if plot else "")
    bench_html = ""
    if bench is not None:
        bench_html = f'<h2 id="bench">Benchmark</h2><pre>{_e(bench.table())}</pre>'
    sections = [
        ("stages", "Per-stage report", stage_table_html(report)),
        ("plots", "Plots", plot_html + _extra_plots_html(plots)),
        ("passes", "What each pass did", pass_details_html(report)),
        ("diffs", "FX code diff between consecutive stages", diffs_html(report)),
        ("graphs", "FX graphs", graphs),
        ("ir", "Lowered module", _lowering_irs(model, report, relax_fallback)),
    ]
    if getattr(model, "auto", None) is not None:  # passes="auto": the search's choices (fxpress/auto/html.py)
        from .auto.html import auto_section_html
        sections.insert(1, ("auto", "Auto search: per-layer choice and Pareto front", auto_section_html(model.auto)))
    nav = " ".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t, _ in sections) + (
        ' <a href="#bench">Benchmark</a>' if bench_html else "")
    body = "\n".join(f'<h2 id="{sid}">{_e(t)}</h2>\n{content}' for sid, t, content in sections)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>fxpress report: {_e(title)}</title><style>{_CSS}</style></head><body>\n"
            f"<h1>fxpress report: {_e(title)}</h1>\n<p class=\"meta\">{' · '.join(meta)}</p>\n<nav>{nav}</nav>\n"
            f"{body}\n{bench_html}\n</body></html>\n")
    return page, files


def write_html_report(cm, path: str, title: str | None = None, plots: Iterable[str | tuple[str, bytes]] = (),
                      bench=None, graph_files: bool = True, engine: str = "auto") -> str:
    """Write the report page of ``cm`` (a CompiledModel or a Report) to ``path``; returns ``path``.

    plots:       extra PNGs to embed (file paths or (title, png bytes)), e.g. benchmark plots
    bench:       a fxpress.bench.BenchResult whose table is appended
    graph_files: also write the graph SVGs to ``<path without .html>.graphs/`` and link them
    engine:      graph drawing: "auto" (dot if installed), "dot" or "matplotlib"
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    page, _ = render_html(cm, title=title, plots=list(plots), bench=bench, path=path,
                          graph_files=graph_files, engine=engine)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
