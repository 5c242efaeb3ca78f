"""The host program's control-flow graph (networkx) and backward liveness: each region's inputs and outputs."""
from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass

import networkx as nx

from . import ir
from .names import loaded_names, mutated_names, stored_names
from .regions import RegionDef


def uses_defs(stmts: list[ast.stmt]) -> tuple[list[str], set[str], list[str]]:
    """(names read before they are surely written, names surely written, names maybe written in order)."""
    uses: list[str] = []
    definite: set[str] = set()
    maybe: list[str] = []
    for s in stmts:
        reads = loaded_names(s)
        if isinstance(s, ast.AugAssign) and isinstance(s.target, ast.Name):
            reads = [s.target.id] + reads
        for n in reads:
            if n not in definite and n not in uses:
                uses.append(n)
        written = stored_names(s)
        # An object changed in place (`outs.append(y)`) is a new value that later code must see.
        mutated = [m for m in mutated_names(s) if m not in written]
        maybe += [w for w in written + mutated if w not in maybe]
        if isinstance(s, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            definite.update(written)
        if isinstance(s, (ast.Expr, ast.Assign, ast.AnnAssign, ast.AugAssign)):
            definite.update(m for m in mutated if m in definite or m in uses)
    return uses, definite, maybe


@dataclass
class Liveness:
    graph: nx.DiGraph
    live_in: dict[int, set[str]]
    live_out: dict[int, set[str]]
    vertex_of: dict[int, int]        # id(host node) → CFG vertex
    follow_of: dict[int, int]        # id(host node) → CFG vertex that runs after it (joins, loop exits)


def liveness(body: list, regions: dict[str, RegionDef], params: list[str]) -> Liveness:
    """Build the host program's control-flow graph and compute live variables on it."""
    g = nx.DiGraph()
    counter = itertools.count()
    vertex_of: dict[int, int] = {}
    follow_of: dict[int, int] = {}

    def vertex(kind: str, uses=(), defs=(), node=None) -> int:
        v = next(counter)
        g.add_node(v, kind=kind, uses=set(uses), defs=set(defs), node=node)
        if node is not None:
            vertex_of[id(node)] = v
        return v

    entry = vertex("entry", defs=params)
    exit_ = vertex("exit")

    def seq(nodes: list, follow: int, loop: tuple[int, int] | None) -> int:
        nxt = follow
        for n in reversed(nodes):
            follow_of[id(n)] = nxt
            if isinstance(n, ir.Call):
                r = regions[n.region]
                v = vertex("call", r.uses, r.defs, n)
                g.add_edge(v, nxt)
            elif isinstance(n, ir.Set):
                v = vertex("set", (), n.values, n)
                g.add_edge(v, nxt)
            elif isinstance(n, ir.If):
                v = vertex("if", [n.cond], (), n)
                g.add_edge(v, seq(n.then, nxt, loop))
                g.add_edge(v, seq(n.orelse, nxt, loop))
            elif isinstance(n, ir.While):
                head = vertex("while", [n.cond], (), n)
                cond_entry = seq(n.cond_body, head, loop)
                body_entry = seq(n.body, cond_entry, (nxt, cond_entry))
                g.add_edge(head, body_entry)
                g.add_edge(head, nxt)
                v = cond_entry
            elif isinstance(n, ir.ForRange):
                head = vertex("for", [n.count] if isinstance(n.count, str) else [], [n.index] if n.index else [], n)
                body_entry = seq(n.body, head, (nxt, head))
                g.add_edge(head, body_entry)
                g.add_edge(head, nxt)
                v = head
            elif isinstance(n, ir.Unrolled):
                v = vertex("unrolled", node=n)
                after = nxt
                for it in reversed(n.iterations):
                    after = seq(it, after, (nxt, after))
                g.add_edge(v, after)
            elif isinstance(n, ir.Break):
                v = vertex("break", node=n)
                g.add_edge(v, loop[0])
            elif isinstance(n, ir.Continue):
                v = vertex("continue", node=n)
                g.add_edge(v, loop[1])
            elif isinstance(n, ir.Return):
                v = vertex("return", n.values, (), n)
                g.add_edge(v, exit_)
            else:  # pragma: no cover
                raise TypeError(n)
            nxt = v
        return nxt

    g.add_edge(entry, seq(body, exit_, None))
    live_in = {v: set() for v in g}
    live_out = {v: set() for v in g}
    changed = True
    order = list(nx.dfs_postorder_nodes(g, entry))  # successors first: few rounds for a backward problem
    order += [v for v in g if v not in set(order)]
    while changed:
        changed = False
        for v in order:
            out = set().union(*(live_in[s] for s in g.successors(v))) if g.out_degree(v) else set()
            data = g.nodes[v]
            inn = data["uses"] | (out - data["defs"])
            if out != live_out[v] or inn != live_in[v]:
                live_out[v], live_in[v] = out, inn
                changed = True
    return Liveness(g, live_in, live_out, vertex_of, follow_of)
