"""Pictures of FX graphs: one SVG per stage, so a pass's before/after can be looked at.

``graph_to_svg(gm)`` uses Graphviz's ``dot`` when it is on PATH (best layout) and otherwise draws a
layered layout with networkx + matplotlib (always available: both are dependencies). Each box is
one FX node: its name, what it calls and its output shape. Nodes named in ``highlight`` (e.g. the
nodes a pass produced) are drawn in orange.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
from typing import Iterable

from torch import fx

# fill colours by node kind (light, so black text stays readable)
_COLORS = {
    "placeholder": "#cfe8ff",
    "output": "#cfe8ff",
    "get_attr": "#eeeeee",
    "call_module": "#d9f2d9",
    "call_function": "#fff3c4",
    "call_method": "#f3e0ff",
    "fxpress": "#ffd0d0",  # fxpress custom ops (compressed layers)
}
HIGHLIGHT = "#ffa64d"
MAX_NODES = 1500  # beyond this a picture stops being useful and layouts get slow


def _target_text(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(node.target)).__name__
        except AttributeError:
            return str(node.target)
    if node.op in ("placeholder", "output"):
        return node.op
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", None) or str(t)
    ns = getattr(t, "namespace", None) or getattr(getattr(t, "overloadpacket", None), "_qualified_op_name", "")
    if ns == "fxpress" or "fxpress::" in str(t) or str(t).startswith("fxpress."):
        return f"fxpress.{name}"
    return name


def _shape_text(node: fx.Node) -> str:
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    if shape is None:
        return ""
    dtype = str(getattr(tm, "dtype", "")).replace("torch.", "")
    return "x".join(str(int(s)) for s in shape) + ("" if dtype in ("", "float32") else f" {dtype}")


def _kind(node: fx.Node, label: str) -> str:
    return "fxpress" if label.startswith("fxpress.") else node.op


def graph_nodes(gm: fx.GraphModule) -> tuple[list[dict], list[tuple[str, str]]]:
    """(nodes, edges): nodes as dicts name/label/kind, edges producer → user, in graph order."""
    nodes, edges = [], []
    for n in gm.graph.nodes:
        target = _target_text(n, gm)
        shape = _shape_text(n)
        label = n.name if target in (n.name, n.op) else f"{n.name}\n{target}"
        if shape:
            label += f"\n{shape}"
        nodes.append({"name": n.name, "label": label, "kind": _kind(n, target)})
        for u in n.users:
            edges.append((n.name, u.name))
    return nodes, edges


def have_dot() -> bool:
    return shutil.which("dot") is not None


def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_dot(gm: fx.GraphModule, title: str | None = None, highlight: Iterable[str] = ()) -> str:
    nodes, edges = graph_nodes(gm)
    hl = set(highlight)
    lines = ["digraph fx {", '  rankdir=TB; nodesep=0.25; ranksep=0.3;',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, margin="0.08,0.03"];',
             '  edge [color="#666666", arrowsize=0.6];']
    if title:
        lines.append(f'  labelloc=t; fontname="Helvetica"; fontsize=14; label="{_dot_escape(title)}";')
    for n in nodes:
        color = HIGHLIGHT if n["name"] in hl else _COLORS.get(n["kind"], "#ffffff")
        lines.append(f'  "{_dot_escape(n["name"])}" [label="{_dot_escape(n["label"])}", fillcolor="{color}"];')
    for a, b in edges:
        lines.append(f'  "{_dot_escape(a)}" -> "{_dot_escape(b)}";')
    lines.append("}")
    return "\n".join(lines)


def _svg_with_dot(dot_text: str, timeout: float = 60.0) -> str:
    r = subprocess.run(["dot", "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or "<svg" not in r.stdout:
        raise RuntimeError(f"dot failed (exit {r.returncode}): {r.stderr.strip()[:300]}")
    return r.stdout


def layered_positions(nodes: list[dict], edges: list[tuple[str, str]]) -> dict[str, tuple[float, float]]:
    """Sugiyama-lite: layer = longest path from a source; order within a layer by the mean
    position of the predecessors (a few sweeps), which keeps chains straight and crossings few."""
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(n["name"] for n in nodes)
    g.add_edges_from(edges)
    layer: dict[str, int] = {}
    for v in nx.topological_sort(g):
        preds = list(g.predecessors(v))
        layer[v] = 1 + max(layer[p] for p in preds) if preds else 0
    rows: dict[int, list[str]] = {}
    for n in nodes:  # graph order as the initial order
        rows.setdefault(layer[n["name"]], []).append(n["name"])
    x: dict[str, float] = {}
    for row in rows.values():
        for i, v in enumerate(row):
            x[v] = i - (len(row) - 1) / 2
    for _ in range(4):
        for depth in sorted(rows)[1:]:
            row = rows[depth]
            key = {v: (sum(x[p] for p in g.predecessors(v)) / max(1, g.in_degree(v))) for v in row}
            row.sort(key=lambda v: key[v])
            for i, v in enumerate(row):
                x[v] = i - (len(row) - 1) / 2
    return {v: (x[v], -float(layer[v])) for v in layer}


def _svg_with_matplotlib(gm: fx.GraphModule, title: str | None, highlight: Iterable[str]) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    nodes, edges = graph_nodes(gm)
    pos = layered_positions(nodes, edges)
    hl = set(highlight)
    depth = 1 + max((-y for _, y in pos.values()), default=0)
    width = 1 + max((sum(1 for p in pos.values() if p[1] == y) for y in {p[1] for p in pos.values()}), default=1)
    # inches: ~2.2 per column, ~0.75 per layer; matplotlib caps figures at 2^16 px per side
    fig_w = min(60.0, max(4.0, 2.2 * width))
    fig_h = min(400.0, max(2.0, 0.75 * depth + (0.6 if title else 0.2)))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.set_axis_off()
    xs = [p[0] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(-depth + 0.5, 0.6)
    for a, b in edges:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=8, zorder=1,
                                     color="#666666", lw=0.7, shrinkA=15, shrinkB=17,
                                     connectionstyle="arc3,rad=0.0" if x0 == x1 or y0 - y1 <= 1 else "arc3,rad=0.15"))
    for n in nodes:
        x, y = pos[n["name"]]
        color = HIGHLIGHT if n["name"] in hl else _COLORS.get(n["kind"], "#ffffff")
        ax.text(x, y, n["label"], ha="center", va="center", fontsize=7, family="DejaVu Sans", zorder=2,
                bbox=dict(boxstyle="round,pad=0.3", fc=color, ec="#555555", lw=0.6))
    if title:
        ax.set_title(title, fontsize=11)
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def graph_to_svg(gm: fx.GraphModule, path: str | None = None, title: str | None = None,
                 highlight: Iterable[str] = (), engine: str = "auto") -> str:
    """SVG text of ``gm``'s data-flow graph; also written to ``path`` when given.

    engine: "auto" (dot if on PATH, else matplotlib), "dot" or "matplotlib".
    """
    if engine not in ("auto", "dot", "matplotlib"):
        raise ValueError(f"engine must be 'auto', 'dot' or 'matplotlib', got {engine!r}")
    n = len(gm.graph.nodes)
    if n > MAX_NODES:
        raise ValueError(f"graph has {n} nodes (> {MAX_NODES}); too large to draw usefully")
    highlight = list(highlight)
    svg = None
    if engine == "dot" or (engine == "auto" and have_dot()):
        try:
            svg = _svg_with_dot(to_dot(gm, title, highlight))
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            if engine == "dot":
                raise
    if svg is None:
        svg = _svg_with_matplotlib(gm, title, highlight)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(svg)
        os.replace(tmp, path)
    return svg


def changed_nodes(before: fx.GraphModule, after: fx.GraphModule) -> set[str]:
    """Names of nodes in ``after`` that ``before`` lacks, or whose target changed."""
    old = {n.name: (n.op, str(n.target)) for n in before.graph.nodes}
    return {n.name for n in after.graph.nodes
            if n.name not in old or old[n.name] != (n.op, str(n.target))}
