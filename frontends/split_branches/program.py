"""The structured program the reader produces: straight-line statements and the dynamic nodes the host
program runs; the ``Analysis`` that carries it; transforms on it (inlined returns, def sites)."""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

from fxpress.errors import TraceError

from .names import stored_names
from .source import FnInfo


@dataclass
class SStmt:
    stmt: ast.stmt
    fn: FnInfo


@dataclass
class SIf:
    test: ast.expr
    body: list
    orelse: list
    fn: FnInfo
    loc: str
    then_line: str | None
    else_line: str | None


@dataclass
class SWhile:
    test: ast.expr
    body: list
    fn: FnInfo
    loc: str
    body_line: str | None
    max_iter: int
    on_exceed: str


@dataclass
class SFor:
    index: str | None
    start: ast.expr
    stop: ast.expr
    body: list
    fn: FnInfo
    loc: str
    body_line: str | None
    max_iter: int
    on_exceed: str


@dataclass
class SUnrolled:
    iterations: list
    loc: str
    body_line: str | None


@dataclass
class SBreak:
    loc: str


@dataclass
class SContinue:
    loc: str


@dataclass
class SReturn:
    value: ast.expr | None
    fn: FnInfo
    loc: str
    line: str | None


STRUCTURED = (SIf, SWhile, SFor, SUnrolled, SBreak, SContinue, SReturn)


def sp_walk(nodes):
    for n in nodes:
        yield n
        for sub in sp_children(n):
            yield from sp_walk(sub)


def sp_children(n) -> list[list]:
    if isinstance(n, SIf):
        return [n.body, n.orelse]
    if isinstance(n, (SWhile, SFor)):
        return [n.body]
    if isinstance(n, SUnrolled):
        return list(n.iterations)
    return []


@dataclass
class Analysis:
    """What the reader found: the structured program and everything regions need to compile."""

    program: list
    root_fn: FnInfo
    params: list[str]                      # forward's tensor parameters, in order
    bindings: dict[str, Any]               # compile-time constants regions read by name
    data: set[str]                         # data names (all functions, after renaming)
    varying: set[str]
    def_sites: dict[str, int]              # number of assignment sites per name, whole program
    code_objects: set                      # functions whose lines the decision trace follows
    dynamic_sites: list[str]               # "file:line: what" for every split point found
    inlined: list[str]                     # "qualname (file:line)" of inlined callees
    notes: list[str] = field(default_factory=list)

    def namespace(self) -> dict[str, Any]:
        ns = dict(self.root_fn.globals)
        ns.update(self.root_fn.closure)
        ns.update(self.bindings)
        return ns

    @property
    def has_dynamic(self) -> bool:
        return any(isinstance(n, STRUCTURED) and not _is_final_return(n, self.program) for n in sp_walk(self.program))


def _is_final_return(n, program) -> bool:
    return isinstance(n, SReturn) and program and program[-1] is n


def loc_line(fn: FnInfo, stmts: list[ast.stmt]) -> str | None:
    return fn.loc(stmts[0]) if stmts else None


def lift_returns(nodes: list, ret: str, fn: FnInfo) -> tuple[list, bool]:
    """Inline a callee's returns: ``return e`` becomes ``ret = e``; code after a branch that returns
    moves into the branch that does not. Returns (nodes, whether every path returned)."""
    out: list = []
    for i, n in enumerate(nodes):
        if isinstance(n, SReturn):
            value = n.value if n.value is not None else ast.Constant(None)
            stmt = ast.Assign(targets=[ast.Name(ret, ast.Store())], value=value)
            out.append(SStmt(ast.copy_location(stmt, value) if hasattr(value, "lineno") else ast.fix_missing_locations(stmt), n.fn))
            return out, True
        if isinstance(n, SIf):
            then_has = any(isinstance(x, SReturn) for x in sp_walk(n.body))
            else_has = any(isinstance(x, SReturn) for x in sp_walk(n.orelse))
            if then_has or else_has:
                rest = nodes[i + 1:]
                then_b, then_r = lift_returns(n.body if not (else_has and not then_has) else n.body + rest, ret, fn)
                else_b, else_r = lift_returns(n.orelse if not (then_has and not else_has) else n.orelse + rest, ret, fn)
                if then_has and else_has and not (then_r and else_r):
                    # both return on some paths only: the rest runs after either when it did not return
                    raise TraceError(f"split_branches: {n.loc}: early returns on both sides of a branch that do not "
                                     f"always return are not supported inside an inlined forward ({fn.qualname}); "
                                     "restructure it so each branch either returns or falls through")
                out.append(SIf(n.test, then_b, else_b, n.fn, n.loc, n.then_line, n.else_line))
                return out, then_r and else_r
            out.append(n)
            continue
        if isinstance(n, (SWhile, SFor, SUnrolled)) and any(isinstance(x, SReturn) for x in sp_walk([n])):
            raise TraceError(f"split_branches: {n.loc}: a `return` inside a loop of an inlined forward "
                             f"({fn.qualname}) is not supported; return from the loop in the model's top-level forward, "
                             "or break and return after the loop")
        out.append(n)
    return out, False


def program_def_sites(program: list, params: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {p: 1 for p in params}

    def visit(nodes, mult):
        for n in nodes:
            if isinstance(n, SStmt):
                for name in stored_names(n.stmt):
                    counts[name] = counts.get(name, 0) + mult
            elif isinstance(n, (SWhile, SFor)):
                if isinstance(n, SFor) and n.index:
                    counts[n.index] = counts.get(n.index, 0) + 2
                visit(n.body, 2)
            elif isinstance(n, SIf):
                visit(n.body, mult)
                visit(n.orelse, mult)
            elif isinstance(n, SUnrolled):
                for it in n.iterations:
                    visit(it, mult)

    visit(program, 1)
    return counts
