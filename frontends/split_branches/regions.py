"""Cut the structured program into regions (maximal straight-line runs) and the host program skeleton."""
from __future__ import annotations

import ast
import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

from . import ir
from .program import Analysis, SBreak, SContinue, SFor, SIf, SReturn, SStmt, SUnrolled, SWhile
from .source import FnInfo


PREFIX = "_sb_"


@dataclass
class RegionDef:
    name: str
    stmts: list[ast.stmt]
    fns: list[FnInfo]
    # liveness
    uses: list[str] = field(default_factory=list)
    defs: set[str] = field(default_factory=set)      # definitely assigned
    maybe: list[str] = field(default_factory=list)   # possibly assigned, in order
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    # exploration
    in_layout: list | None = None                    # [(name, kind, extra)]
    out_layout: list | None = None
    example_inputs: tuple | None = None              # flat tensors
    example_outputs: list | None = None              # flat tensors (the eager reference)
    consts: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        by_file: dict[str, list[int]] = {}
        for s, f in zip(self.stmts, self.fns):
            lines = by_file.setdefault(f.filename, [])
            lines += [getattr(s, "lineno", 0), getattr(s, "end_lineno", None) or getattr(s, "lineno", 0)]
        return "; ".join(f"{fname}:{min(v)}-{max(v)}" if min(v) != max(v) else f"{fname}:{min(v)}"
                         for fname, v in by_file.items())

    @property
    def filename(self) -> str:
        return self.fns[0].filename if self.fns else "<split_branches>"

    def code(self) -> str:
        return "\n".join(ast.unparse(s) for s in self.stmts)


class Builder:
    """Structured program → host program skeleton (ir nodes) + region definitions."""

    def __init__(self, analysis: Analysis):
        self.a = analysis
        self.regions: dict[str, RegionDef] = {}
        self._ids = itertools.count(1)
        self._vars = itertools.count(1)
        self._regions = itertools.count(0)

    def var(self, base: str) -> str:
        return f"{PREFIX}{base}{next(self._vars)}"

    def build(self) -> list:
        return self.block(self.a.program, tail=[])

    def _flush(self, pending: list, out: list) -> None:
        if not pending:
            return
        name = f"r{next(self._regions)}"
        self.regions[name] = RegionDef(name, [s for s, _ in pending], [f for _, f in pending])
        out.append(ir.Call(region=name))
        pending.clear()

    def block(self, nodes: list, tail: list, pending: list | None = None, open_end: bool = False,
              marked: bool = False) -> list:
        """Host nodes for ``nodes``. ``pending`` holds statements not yet placed in a region (they are
        consumed); with ``open_end`` the statements left at the end stay in ``pending`` for the caller."""
        out: list = []
        if pending is None:
            pending = []  # (stmt, FnInfo)
        terminated = False
        for n in nodes:
            if isinstance(n, SStmt):
                pending.append((n.stmt, n.fn))
            elif isinstance(n, SIf):
                c = self.var("c")
                pending.append((assign_stmt(c, n.test), n.fn))
                self._flush(pending, out)
                out.append(ir.If(id=next(self._ids), cond=c, then=self.block(n.body, [], marked=True),
                                 orelse=self.block(n.orelse, [], marked=True), loc=n.loc, then_line=n.then_line,
                                 else_line=n.else_line))
            elif isinstance(n, SWhile):
                c = self.var("c")
                test = assign_stmt(c, n.test)
                rotate = not any(isinstance(x, SContinue) for x in _loop_level(n.body))
                if rotate:
                    pending.append((test, n.fn))
                    self._flush(pending, out)
                    body = self.block(n.body, tail=[(copy.deepcopy(test), n.fn)], marked=True)
                    cond_body: list = []
                else:
                    self._flush(pending, out)
                    cond_body = self.block([SStmt(test, n.fn)], [])
                    body = self.block(n.body, [], marked=True)
                out.append(ir.While(id=next(self._ids), cond=c, cond_body=cond_body, body=body,
                                    max_iter=n.max_iter, on_exceed=n.on_exceed, loc=n.loc, body_line=n.body_line))
            elif isinstance(n, SFor):
                count, k = self.var("n"), self.var("k")
                start_const = isinstance(n.start, ast.Constant) and n.start.value == 0
                if start_const:
                    pending.append((assign_stmt(count, n.stop), n.fn))
                    index = n.index
                    body_nodes = n.body
                else:
                    s = self.var("s")
                    pending.append((assign_stmt(s, n.start), n.fn))
                    pending.append((assign_stmt(count, ast.BinOp(n.stop, ast.Sub(), ast.Name(s, ast.Load()))), n.fn))
                    index = k
                    body_nodes = ([SStmt(assign_stmt(n.index, ast.BinOp(ast.Name(s, ast.Load()), ast.Add(),
                                                                     ast.Name(k, ast.Load()))), n.fn)]
                                  if n.index else []) + n.body
                self._flush(pending, out)
                out.append(ir.ForRange(id=next(self._ids), count=count, index=index,
                                       body=self.block(body_nodes, [], marked=True),
                                       max_iter=n.max_iter, on_exceed=n.on_exceed, loc=n.loc, body_line=n.body_line))
            elif isinstance(n, SUnrolled):
                if not any(isinstance(x, (SBreak, SContinue)) for it in n.iterations for x in _loop_level(it)):
                    # No break/continue: the iterations are just a sequence; splice them in, so the code
                    # between two dynamic branches of consecutive iterations stays one region.
                    spliced = [x for it in n.iterations for x in it]
                    inner = self.block(spliced, tail=[], pending=pending, open_end=True)
                    out.extend(inner)
                    continue
                first = self.block(n.iterations[0], [], pending=pending, marked=True) if n.iterations else []
                out.append(ir.Unrolled(id=next(self._ids),
                                       iterations=[first] + [self.block(it, [], marked=True)
                                                             for it in n.iterations[1:]],
                                       loc=n.loc, body_line=n.body_line))
            elif isinstance(n, SReturn):
                value = n.value if n.value is not None else ast.Constant(None)
                names = _plain_names(value)
                is_tuple = names is not None and isinstance(value, ast.Tuple)
                if names is None:
                    r = self.var("ret")
                    pending.append((assign_stmt(r, value), n.fn))
                    names = [r]
                self._flush(pending, out)
                # When the return is the first statement of a branch or loop body, the marker of entering
                # that body is this very line: eager PyTorch executes it once, so record it once.
                line = None if (marked and n is nodes[0]) else n.line
                ret = ir.Return(values=names, loc=n.loc, line=line)
                ret._tuple = is_tuple  # noqa: SLF001 - compile-time only
                out.append(ret)
                terminated = True
            elif isinstance(n, SBreak):
                self._flush(pending, out)
                out.append(ir.Break(loc=n.loc))
                terminated = True
            elif isinstance(n, SContinue):
                self._flush(pending, out)
                out.append(ir.Continue(loc=n.loc))
                terminated = True
            else:  # pragma: no cover - the reader produces nothing else
                raise TypeError(n)
            if terminated:
                break
        if not terminated:
            pending.extend(tail)
            if not open_end:
                self._flush(pending, out)
        else:
            pending.clear()
        return out


def _loop_level(nodes):
    """Nodes of a loop body that belong to this loop (not to nested loops)."""
    for n in nodes:
        yield n
        if isinstance(n, SIf):
            yield from _loop_level(n.body)
            yield from _loop_level(n.orelse)


def assign_stmt(name: str, value: ast.expr) -> ast.stmt:
    node = ast.Assign(targets=[ast.Name(name, ast.Store())], value=value)
    if hasattr(value, "lineno"):
        ast.copy_location(node, value)
    return ast.fix_missing_locations(node)


def _plain_names(value: ast.expr) -> list[str] | None:
    if isinstance(value, ast.Name):
        return [value.id]
    if isinstance(value, ast.Tuple) and value.elts and all(isinstance(e, ast.Name) for e in value.elts):
        return [e.id for e in value.elts]
    return None
