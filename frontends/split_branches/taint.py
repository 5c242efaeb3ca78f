"""Which names of a function hold input-derived data (*data*) or differ between executions (*varying*)."""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

from .names import iter_child_nodes_same_scope, stored_names, target_names


# Attribute reads / method calls / functions whose result is fixed by shapes (static at compile time).
SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_floating_point", "training"}
SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "element_size", "get_device", "is_floating_point",
                 "is_contiguous", "type"}
SHAPE_FUNCS = {"len", "isinstance", "type", "hasattr", "callable", "id"}


@dataclass
class Taint:
    """Which names of one function hold input-derived data and which vary between executions."""

    data: set[str] = field(default_factory=set)
    varying: set[str] = field(default_factory=set)

    def expr(self, e: ast.AST | None) -> tuple[bool, bool]:
        """(reads data, reads a varying name) for an expression."""
        if e is None:
            return False, False
        return _expr_taint(e, self)

    def dynamic(self, e: ast.AST | None) -> bool:
        d, v = self.expr(e)
        return d or v


def _expr_taint(e: ast.AST, t: Taint) -> tuple[bool, bool]:
    if isinstance(e, ast.Name):
        return e.id in t.data, e.id in t.varying
    # Shapes, dtypes, lengths and None-ness are fixed for a given region: a region is traced once per
    # signature of its inputs (split_branches duplicates code after a branch whose sides differ), so
    # a test on them is static even when the name itself is data or varying.
    if isinstance(e, ast.Attribute) and e.attr in SHAPE_ATTRS:
        return False, False
    if isinstance(e, ast.Call):
        f = e.func
        if (isinstance(f, ast.Attribute) and f.attr in SHAPE_METHODS) or (
                isinstance(f, ast.Name) and f.id in SHAPE_FUNCS):
            return False, False
    if isinstance(e, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot)) for op in e.ops):
        return False, False
    d = v = False
    for c in ast.iter_child_nodes(e):
        cd, cv = _expr_taint(c, t)
        d, v = d or cd, v or cv
    return d, v


def _def_counts(fdef: ast.FunctionDef) -> dict[str, int]:
    """How many times each local may be (re)assigned; a def inside a loop counts twice."""
    counts: dict[str, int] = {}
    for a in fdef.args.posonlyargs + fdef.args.args + fdef.args.kwonlyargs:
        counts[a.arg] = 1

    def visit(stmts, in_loop):
        for s in stmts:
            if isinstance(s, (ast.For, ast.While)):
                for n in (target_names(s.target) if isinstance(s, ast.For) else []):
                    counts[n] = counts.get(n, 0) + 2
                visit(s.body, True)
                visit(s.orelse, in_loop)
                continue
            if isinstance(s, (ast.If, ast.With, ast.Try)):
                for n in (stored_names(s.test) if isinstance(s, ast.If) else []):
                    counts[n] = counts.get(n, 0) + (2 if in_loop else 1)
                if isinstance(s, ast.With):
                    for item in s.items:
                        for n in target_names(item.optional_vars) if item.optional_vars else []:
                            counts[n] = counts.get(n, 0) + (2 if in_loop else 1)
                for block in child_blocks(s):
                    visit(block, in_loop)
                continue
            for n in stored_names(s):
                counts[n] = counts.get(n, 0) + (2 if in_loop else 1)

    visit(fdef.body, False)
    return counts


def child_blocks(s: ast.stmt) -> list[list[ast.stmt]]:
    if isinstance(s, ast.If):
        return [s.body, s.orelse]
    if isinstance(s, (ast.For, ast.While)):
        return [s.body, s.orelse]
    if isinstance(s, ast.With):
        return [s.body]
    if isinstance(s, ast.Try):
        return [s.body, s.orelse, s.finalbody] + [h.body for h in s.handlers]
    return []


def analyze_taint(fdef: ast.FunctionDef, data_params: set[str]) -> Taint:
    counts = _def_counts(fdef)
    t = Taint(data=set(data_params), varying={n for n, c in counts.items() if c >= 2})

    def assign(names, d, v):
        changed = False
        for n in names:
            if d and n not in t.data:
                t.data.add(n)
                changed = True
            if v and n not in t.varying:
                t.varying.add(n)
                changed = True
        return changed

    def visit(stmts) -> bool:
        changed = False
        for s in stmts:
            if isinstance(s, ast.Assign):
                d, v = t.expr(s.value)
                changed |= assign([n for tg in s.targets for n in target_names(tg)], d, v)
            elif isinstance(s, ast.AnnAssign) and s.value is not None:
                d, v = t.expr(s.value)
                changed |= assign(target_names(s.target), d, v)
            elif isinstance(s, ast.AugAssign):
                d1, v1 = t.expr(s.value)
                d2, v2 = t.expr(s.target if not isinstance(s.target, ast.Name) else ast.Name(s.target.id, ast.Load()))
                changed |= assign(target_names(s.target), d1 or d2, v1 or v2)
            elif isinstance(s, ast.For):
                d, v = t.expr(s.iter)
                changed |= assign(target_names(s.target), d, v)
            elif isinstance(s, ast.With):
                for item in s.items:
                    if item.optional_vars is not None:
                        d, v = t.expr(item.context_expr)
                        changed |= assign(target_names(item.optional_vars), d, v)
            for node in iter_child_nodes_same_scope(s):
                if isinstance(node, ast.NamedExpr) and isinstance(node.target, ast.Name):
                    d, v = t.expr(node.value)
                    changed |= assign([node.target.id], d, v)
            for block in child_blocks(s):
                changed |= visit(block)
        return changed

    while visit(fdef.body):
        pass
    return t
