"""split_branches, middle end: cut the structured program into regions and build the host program.

1. ``build_skeleton``: every maximal run of straight-line statements becomes a region; a dynamic
   test becomes an assignment ``_sb_cN = <test>`` at the end of the region before it, so a
   condition is always a region output. Loops are rotated (the test is computed before the loop
   and again at the end of the body) when the body has no ``continue``.
2. ``liveness``: a control-flow graph of the host program (networkx) and a backward liveness
   analysis give each region its inputs and outputs.
3. ``Explorer``: runs the program eagerly on the example inputs, taking *both* sides of every
   branch and every loop body once, so every region gets example inputs (for tracing and for
   lowering with fixed shapes). Where a variable has a different shape, dtype or kind on the two
   sides of a branch and is still needed after it, the code after the branch is duplicated into
   both sides (each copy is traced with its own shapes) and the exploration starts again.
4. ``RegionModule``: a region as an nn.Module that shares the model's submodules, ready for
   fxpress's tracer, passes and lowering.

Values that cross a region boundary are tensors, (lists/tuples of) tensors, Python numbers that
differ by path (the host carries them; regions take them as 0-d tensors), or compile-time
constants (a name assigned once from shapes and attributes: baked into the regions that read it).
"""
from __future__ import annotations

import ast
import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from fxpress.errors import TraceError

from . import split_branches_ir as ir
from .split_branches_ast import (Analysis, FnInfo, SBreak, SContinue, SFor, SIf, SReturn, SStmt, SUnrolled,
                                 SWhile, Taint, loaded_names, mutated_names, stored_names)

PREFIX = "_sb_"


# ----------------------------------------------------------------------------- regions

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
                pending.append((_assign(c, n.test), n.fn))
                self._flush(pending, out)
                out.append(ir.If(id=next(self._ids), cond=c, then=self.block(n.body, [], marked=True),
                                 orelse=self.block(n.orelse, [], marked=True), loc=n.loc, then_line=n.then_line,
                                 else_line=n.else_line))
            elif isinstance(n, SWhile):
                c = self.var("c")
                test = _assign(c, n.test)
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
                    pending.append((_assign(count, n.stop), n.fn))
                    index = n.index
                    body_nodes = n.body
                else:
                    s = self.var("s")
                    pending.append((_assign(s, n.start), n.fn))
                    pending.append((_assign(count, ast.BinOp(n.stop, ast.Sub(), ast.Name(s, ast.Load()))), n.fn))
                    index = k
                    body_nodes = ([SStmt(_assign(n.index, ast.BinOp(ast.Name(s, ast.Load()), ast.Add(),
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
                    pending.append((_assign(r, value), n.fn))
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
            else:  # pragma: no cover - the front end produces nothing else
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


def _assign(name: str, value: ast.expr) -> ast.stmt:
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


# ----------------------------------------------------------------------------- liveness

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


# ----------------------------------------------------------------------------- tensor semantics in regions

class TensorSemantics(ast.NodeTransformer):
    """Rewrite Python scalar conversions of tensors so a region stays one graph:
    ``t.item()`` → ``t``, ``int(t)``/``float(t)``/``bool(t)`` → casts, ``and``/``or``/``not``
    and chained comparisons on tensors → logical ops; asserts on tensor values are dropped."""

    def __init__(self, taint: Taint, fn_name: str):
        self.taint = taint
        self.where = fn_name
        self.dropped: list[str] = []

    def dyn(self, e) -> bool:
        return self.taint.dynamic(e)

    def visit_Call(self, node: ast.Call):
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "item" and not node.args and self.dyn(f.value):
            return f.value
        if isinstance(f, ast.Name) and f.id in ("int", "float", "bool") and len(node.args) == 1 \
                and not node.keywords and self.dyn(node.args[0]):
            return ast.copy_location(ast.Call(ast.Name(f"{PREFIX}{f.id}", ast.Load()), node.args, []), node)
        return node

    def visit_BoolOp(self, node: ast.BoolOp):
        self.generic_visit(node)
        if not self.dyn(node):
            return node
        helper = f"{PREFIX}and" if isinstance(node.op, ast.And) else f"{PREFIX}or"
        thunks = [_thunk(v) for v in node.values]
        return ast.copy_location(ast.Call(ast.Name(helper, ast.Load()), thunks, []), node)

    def visit_UnaryOp(self, node: ast.UnaryOp):
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and self.dyn(node.operand):
            return ast.copy_location(ast.Call(ast.Name(f"{PREFIX}not", ast.Load()), [node.operand], []), node)
        return node

    def visit_Compare(self, node: ast.Compare):
        self.generic_visit(node)
        if len(node.ops) < 2 or not self.dyn(node):
            return node
        parts, left = [], node.left
        for op, right in zip(node.ops, node.comparators):
            parts.append(_thunk(ast.Compare(left, [op], [right])))
            left = right
        return ast.copy_location(ast.Call(ast.Name(f"{PREFIX}and", ast.Load()), parts, []), node)

    def visit_IfExp(self, node: ast.IfExp):
        self.generic_visit(node)
        if self.dyn(node.test):
            raise TraceError(
                f"split_branches: {self.where}:{node.lineno}: `{ast.unparse(node)}` chooses a value by a tensor "
                "condition inside an expression.\nWhat to do: write it as an if statement (split into a branch) or "
                "as torch.where(cond, a, b).")
        return node

    def visit_Assert(self, node: ast.Assert):
        if self.dyn(node.test):
            self.dropped.append(f"{self.where}:{node.lineno}: assert {ast.unparse(node.test)}")
            return ast.copy_location(ast.Pass(), node)
        return node


def _thunk(e: ast.expr) -> ast.Lambda:
    return ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[],
                                         kwarg=None, defaults=[]), body=e)


def _is_t(v) -> bool:
    return isinstance(v, (torch.Tensor, fx.Proxy))


def _sb_int(v):
    return v.long() if _is_t(v) else int(v)


def _sb_float(v):
    return v.double() if _is_t(v) else float(v)


def _sb_bool(v):
    # .bool() is Python's truth test for every dtype, and a no-op on bool tensors (`b != 0` on a bool
    # tensor compared a 1-bit value as a float in TVM's lowering).
    return v.bool() if _is_t(v) else bool(v)


def _sb_and(*thunks):
    out = None
    for th in thunks:
        v = th()
        if _is_t(v):
            b = v.bool()
            out = b if out is None else torch.logical_and(out, b)
        elif not v:
            return False
    return True if out is None else out


def _sb_or(*thunks):
    out = None
    for th in thunks:
        v = th()
        if _is_t(v):
            b = v.bool()
            out = b if out is None else torch.logical_or(out, b)
        elif v:
            return True
    return False if out is None else out


def _sb_not(v):
    return torch.logical_not(v) if _is_t(v) else (not v)


HELPERS = {f"{PREFIX}int": _sb_int, f"{PREFIX}float": _sb_float, f"{PREFIX}bool": _sb_bool,
           f"{PREFIX}and": _sb_and, f"{PREFIX}or": _sb_or, f"{PREFIX}not": _sb_not}


def make_region_function(region: RegionDef, analysis: Analysis, namespace: dict[str, Any], taint: Taint,
                         notes: list[str]):
    """Compile a region's statements into ``fn(*inputs) -> {output name: value}``."""
    rewriter = TensorSemantics(taint, region.filename)
    stmts = [rewriter.visit(copy.deepcopy(s)) for s in region.stmts]
    notes.extend(f"dropped data-dependent assert at {d}" for d in rewriter.dropped if d not in notes)
    body = list(stmts)
    out_name = f"{PREFIX}out"
    body.append(_assign(out_name, ast.Dict(keys=[], values=[])))
    for name in region.outputs:
        setitem = ast.Assign(targets=[ast.Subscript(ast.Name(out_name, ast.Load()), ast.Constant(name), ast.Store())],
                             value=ast.Name(name, ast.Load()))
        body.append(ast.Try(body=[setitem], handlers=[ast.ExceptHandler(type=ast.Name("NameError", ast.Load()),
                                                                        name=None, body=[ast.Pass()])],
                            orelse=[], finalbody=[]))
    body.append(ast.Return(ast.Name(out_name, ast.Load())))
    args = ast.arguments(posonlyargs=[], args=[ast.arg(n) for n in region.inputs], vararg=None, kwonlyargs=[],
                         kw_defaults=[], kwarg=None, defaults=[])
    fdef = ast.FunctionDef(name=f"{PREFIX}region_{region.name}", args=args, body=body, decorator_list=[],
                           returns=None, type_params=[])
    if stmts:
        ast.copy_location(fdef, stmts[0])
    module = ast.fix_missing_locations(ast.Module(body=[fdef], type_ignores=[]))
    code = compile(module, region.filename, "exec")
    exec(code, namespace)  # noqa: S102 - the user's own model code, re-arranged
    return namespace[fdef.name]


# ----------------------------------------------------------------------------- values

def kind_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, (bool, int, float)) or value is None:
        return "scalar"
    if isinstance(value, (list, tuple, dict)):
        # An empty list is a tree too: `outs = []` before a loop that appends to it.
        if all(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(value)):
            return "tree"
    return "object"


def signature(kind: str, value) -> tuple:
    if kind == "tensor":
        return ("tensor", tuple(value.shape), value.dtype)
    if kind == "tree":
        leaves, spec = pytree.tree_flatten(value)
        return ("tree", str(spec), tuple((tuple(x.shape), x.dtype) for x in leaves))
    if kind == "scalar":
        if isinstance(value, (bool, int, float)):
            # A region takes a Python number as a 0-d tensor and hands back a 0-d tensor (`i += 1` on a
            # counter): both are the same value to the host and to the compiled regions.
            return ("tensor", (), _TORCH_DTYPES[scalar_dtype(value)])
        return ("scalar", type(value).__name__)
    if kind == "static":
        try:
            hash(value)
            return ("static", type(value).__name__, value)
        except TypeError:
            return ("static", type(value).__name__, id(value))
    return (kind, id(value))


def scalar_dtype(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, float):
        return "float64"
    raise TypeError(value)


_TORCH_DTYPES = {"bool": torch.bool, "int64": torch.int64, "float64": torch.float64}


@dataclass
class Slot:
    kind: str   # tensor | tree | scalar | static
    value: Any


def _merge(a: dict | None, b: dict | None, conflicts: set[str]) -> dict | None:
    if a is None:
        return None if b is None else dict(b)
    if b is None:
        return dict(a)
    out = {}
    for name in set(a) | set(b):
        if name in a and name in b:
            sa, sb = a[name], b[name]
            if signature(sa.kind, sa.value) == signature(sb.kind, sb.value):
                out[name] = sa
                continue
        conflicts.add(name)
    return out


@dataclass
class Outcome:
    fall: dict | None = None
    brk: dict | None = None
    cont: dict | None = None


class NeedsDuplication(Exception):
    pass


class Explorer:
    """Runs the host program eagerly, both sides of every branch, to find every region's inputs."""

    def __init__(self, body: list, regions: dict[str, RegionDef], analysis: Analysis, live: Liveness,
                 namespace: dict[str, Any], taint: Taint, out_spec, notes: list[str]):
        self.body, self.regions, self.a, self.live = body, regions, analysis, live
        self.ns, self.taint, self.out_spec, self.notes = namespace, taint, out_spec, notes
        self.fns: dict[str, Any] = {}
        self.visited: set[str] = set()
        self.duplicate: list = []          # If nodes whose continuation must be duplicated
        self.returns: dict[int, list[str]] = {}  # id(Return) → flat output names
        self.static: dict[str, dict[str, Any]] = {}
        # Objects some region changes in place (`outs.append`) are values, never baked-in constants.
        self.mutated = {m for r in regions.values() for st in r.stmts for m in mutated_names(st)}

    # ------------------------------------------------------------------ driver
    def run(self, inputs: dict[str, torch.Tensor]) -> None:
        env = {k: Slot("tensor", v) for k, v in inputs.items()}
        with torch.no_grad():
            self.block(self.body, env)

    def live_after(self, node) -> set[str]:
        return self.live.live_in[self.live.follow_of[id(node)]]

    def block(self, nodes: list, env: dict | None) -> Outcome:
        out = Outcome()
        for n in nodes:
            if env is None:
                break
            if isinstance(n, ir.Call):
                env = self.call(n, env)
            elif isinstance(n, ir.If):
                env = self.branch(n, env, out)
            elif isinstance(n, ir.While):
                env = self.loop_while(n, env)
            elif isinstance(n, ir.ForRange):
                env = self.loop_for(n, env)
            elif isinstance(n, ir.Unrolled):
                env = self.unrolled(n, env)
            elif isinstance(n, ir.Break):
                out.brk = _merge(out.brk, env, set())
                env = None
            elif isinstance(n, ir.Continue):
                out.cont = _merge(out.cont, env, set())
                env = None
            elif isinstance(n, ir.Return):
                self.ret(n, env)
                env = None
        out.fall = env
        return out

    def _merge_checked(self, a, b, live: set[str], where: str, node=None) -> dict | None:
        conflicts: set[str] = set()
        env = _merge(a, b, conflicts)
        bad = sorted(conflicts & live)
        if bad:
            if node is not None:
                # Explore on with one side's values; this round's results are dropped after duplicating.
                self.duplicate.append(node)
                return dict(a) if a is not None else env
            details = []
            for name in bad:
                sa, sb = (a or {}).get(name), (b or {}).get(name)
                details.append(f"`{name}`: {_describe(sa)} vs {_describe(sb)}")
            raise TraceError(
                f"split_branches: {where}: after this loop a variable differs between the ways the loop can end "
                f"({'; '.join(details)}).\nWhat to do: give it the same shape, dtype and kind on every path (or "
                "assign it before the loop so every path defines it).")
        return env

    # ------------------------------------------------------------------ nodes
    def call(self, n: ir.Call, env: dict) -> dict:
        r = self.regions[n.region]
        if r.name not in self.fns:
            # Inputs are the live names this region reads that some path has defined by now.
            r.inputs = [u for u in r.inputs if u in env]
            self.fns[r.name] = make_region_function(r, self.a, self.ns, self.taint, self.notes)
        args, in_layout, flat = [], [], []
        for name in r.inputs:
            slot = env.get(name)
            if slot is None:
                raise TraceError(f"split_branches: {r.source}: `{name}` is read here but is not assigned on every "
                                 "path that reaches this code; assign it on every path (e.g. before the branch)")
            if slot.kind == "tensor":
                args.append(slot.value)
                flat.append(slot.value)
                in_layout.append((name, "tensor", None))
            elif slot.kind == "tree":
                leaves, spec = pytree.tree_flatten(slot.value)
                # Fresh containers: a region that appends to a list must not change the value other
                # explored paths hold.
                args.append(pytree.tree_unflatten(leaves, spec))
                flat.extend(leaves)
                in_layout.append((name, "tree", spec))
            elif slot.kind == "scalar":
                if slot.value is None:
                    raise TraceError(f"split_branches: {r.source}: `{name}` is None on some path into this code, "
                                     "where it is needed; give it a tensor or number value on every path")
                dt = scalar_dtype(slot.value)
                t = torch.tensor(slot.value, dtype=_TORCH_DTYPES[dt])
                args.append(t)
                flat.append(t)
                in_layout.append((name, "scalar", dt))
            else:  # a compile-time constant: baked into the region
                args.append(slot.value)
                in_layout.append((name, "static", slot.value))
        try:
            result = self.fns[r.name](*args)
        except TraceError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TraceError(f"split_branches: running region {r.name} ({r.source}) on the example inputs failed: "
                             f"{type(e).__name__}: {e}") from e
        env = dict(env)
        out_layout, flat_out, consts = [], [], {}
        for name in r.outputs:
            if name not in result:
                continue
            value = result[name]
            kind = kind_of(value)
            static_ok = (not name.startswith(PREFIX) and self.a.def_sites.get(name, 0) <= 1
                         and name not in self.a.data and name not in self.mutated)
            if kind == "tree" and static_ok and not pytree.tree_leaves(value):
                kind = "static"  # an empty container nobody fills: a constant
            if kind == "tensor":
                out_layout.append((name, "tensor", None))
                flat_out.append(value)
            elif kind == "tree":
                leaves, spec = pytree.tree_flatten(value)
                out_layout.append((name, "tree", spec))
                flat_out.extend(leaves)
            elif static_ok:
                kind = "static"
            elif kind == "scalar":
                consts[name] = value
            else:
                raise TraceError(
                    f"split_branches: {r.source}: `{name}` holds a {type(value).__name__}, is assigned at several "
                    "places and is needed after a data-dependent branch or loop; only tensors, lists/tuples of "
                    "tensors and numbers can cross one.\nWhat to do: assign it once, before the control flow.")
            env[name] = Slot(kind, value)
        if r.name not in self.visited:
            self.visited.add(r.name)
            r.in_layout, r.out_layout = in_layout, out_layout
            r.example_inputs = tuple(flat)
            r.example_outputs = [t.detach() for t in flat_out]
            r.consts = dict(consts)
        else:
            for name, value in consts.items():
                if r.consts.get(name, value) != value:
                    raise TraceError(f"split_branches: {r.source}: `{name}` took different constant values on "
                                     "different visits of this code")
                r.consts[name] = value
        return env

    def branch(self, n: ir.If, env: dict, out: Outcome) -> dict | None:
        self._check_cond(n.cond, env, n.loc)
        a = self.block(n.then, dict(env))
        b = self.block(n.orelse, dict(env))
        for k in ("brk", "cont"):
            setattr(out, k, _merge(_merge(getattr(out, k), getattr(a, k), set()), getattr(b, k), set()))
        return self._merge_checked(a.fall, b.fall, self.live_after(n), n.loc, node=n)

    def _check_cond(self, cond: str, env: dict, loc: str) -> None:
        slot = env.get(cond)
        if slot is None:
            raise TraceError(f"split_branches: {loc}: internal error: condition {cond} was not computed")
        if slot.kind == "tensor" and slot.value.numel() != 1:
            raise TraceError(
                f"split_branches: {loc}: the condition is a tensor of shape {tuple(slot.value.shape)}; a Python "
                "`if`/`while` needs a single value (eager PyTorch raises 'Boolean value of Tensor with more than one "
                "value is ambiguous').\nWhat to do: reduce it (.all(), .any(), .min() ...) so the decision is one per "
                "batch, or compile with options={'split_branches': {'per_sample': True}} to decide per sample.")
        if slot.kind in ("tree", "static") and not isinstance(slot.value, (bool, int, float)):
            raise TraceError(f"split_branches: {loc}: the condition is a {type(slot.value).__name__}; "
                             "fxpress needs a tensor or a number")

    def loop_while(self, n: ir.While, env: dict) -> dict | None:
        head = self.block(n.cond_body, dict(env)).fall
        self._check_cond(n.cond, head, n.loc)
        body = self.block(n.body, dict(head))
        again = _merge(body.fall, body.cont, set())
        if again is not None:
            if n.cond_body:
                again = self.block(n.cond_body, again).fall
            self._check_carried(head, again, n)
        return self._merge_checked(head, body.brk, self.live_after(n), n.loc)

    def loop_for(self, n: ir.ForRange, env: dict) -> dict | None:
        count = env.get(n.count) if isinstance(n.count, str) else Slot("scalar", n.count)
        if count is None or (count.kind == "tensor" and count.value.numel() != 1) or count.kind in ("tree",):
            raise TraceError(f"split_branches: {n.loc}: the trip count of this loop must be one integer")
        head = dict(env)
        if n.index:
            head[n.index] = Slot("tensor", torch.tensor(0, dtype=torch.int64))
        body = self.block(n.body, dict(head))
        again = _merge(body.fall, body.cont, set())
        if again is not None:
            self._check_carried(head, again, n)
        return self._merge_checked(env if not n.index else {**env, n.index: head[n.index]}, body.brk,
                                   self.live_after(n), n.loc)

    def _check_carried(self, before: dict, after: dict, n) -> None:
        head_live = self.live.live_in[self.live.vertex_of[id(n)]] if id(n) in self.live.vertex_of else set()
        for name in sorted(head_live):
            a, b = before.get(name), after.get(name)
            if a is None or b is None:
                continue
            if signature(a.kind, a.value) != signature(b.kind, b.value):
                raise TraceError(
                    f"split_branches: {n.loc}: `{name}` changes from {_describe(a)} to {_describe(b)} in one iteration "
                    "of this loop; a rolled loop needs the same shape, dtype and kind in every iteration.\n"
                    "What to do: keep its shape fixed inside the loop (or unroll a static loop: drop fxpress.bound).")

    def unrolled(self, n: ir.Unrolled, env: dict) -> dict | None:
        exits = None
        for it in n.iterations:
            if env is None:
                break
            res = self.block(it, dict(env))
            exits = _merge(exits, res.brk, set())
            env = _merge(res.fall, res.cont, set())
        # Exits that leave different shapes (a list grown up to the break) get their own copy of the
        # code after the loop (break_duplicate), like the two sides of a branch.
        return self._merge_checked(env, exits, self.live_after(n), n.loc, node=n) if exits is not None else env

    def ret(self, n: ir.Return, env: dict) -> None:
        values = []
        flat_names: list[str] = []
        for name in n.values:
            slot = env.get(name)
            if slot is None or slot.kind not in ("tensor", "tree"):
                raise TraceError(f"split_branches: {n.loc}: the model returns `{name}`, which is "
                                 f"{_describe(slot)}; fxpress compiles models whose outputs are tensors")
            values.append(slot.value)
            if slot.kind == "tensor":
                flat_names.append(name)
            else:
                flat_names += [f"{name}__{i}" for i in range(len(pytree.tree_leaves(slot.value)))]
        value = tuple(values) if getattr(n, "_tuple", False) else values[0]
        _, spec = pytree.tree_flatten(value)
        if self.out_spec is not None and spec != self.out_spec:
            raise TraceError(f"split_branches: {n.loc}: this return gives a {spec} structure, the model's output on "
                             f"the example inputs is {self.out_spec}; every return must give the same structure")
        self.returns[id(n)] = flat_names


def _describe(slot) -> str:
    if slot is None:
        return "undefined"
    if slot.kind == "tensor":
        return f"a tensor {tuple(slot.value.shape)} {str(slot.value.dtype).replace('torch.', '')}"
    if slot.kind == "tree":
        return f"a {type(slot.value).__name__} of {len(pytree.tree_leaves(slot.value))} tensors"
    return f"{slot.kind} {slot.value!r}"


# ----------------------------------------------------------------------------- tail duplication

def find_parent(body: list, target) -> tuple[list, int, Any] | None:
    """(list holding target, index, the node owning that list or None)."""

    def search(nodes, owner):
        for i, n in enumerate(nodes):
            if n is target:
                return nodes, i, owner
            for sub in ir.children(n):
                found = search(sub, n)
                if found:
                    return found
        return None

    return search(body, None)


def clone_nodes(nodes: list, regions: dict[str, RegionDef], fresh_region, fresh_id) -> list:
    out = []
    for n in nodes:
        n2 = copy.copy(n)
        if isinstance(n, ir.Call):
            new = fresh_region()
            src = regions[n.region]
            regions[new] = RegionDef(new, copy.deepcopy(src.stmts), list(src.fns))
            n2.region = new
            n2.consts = {}
        if hasattr(n2, "id"):
            n2.id = fresh_id()
        if isinstance(n, ir.If):
            n2.then = clone_nodes(n.then, regions, fresh_region, fresh_id)
            n2.orelse = clone_nodes(n.orelse, regions, fresh_region, fresh_id)
        elif isinstance(n, ir.While):
            n2.cond_body = clone_nodes(n.cond_body, regions, fresh_region, fresh_id)
            n2.body = clone_nodes(n.body, regions, fresh_region, fresh_id)
        elif isinstance(n, ir.ForRange):
            n2.body = clone_nodes(n.body, regions, fresh_region, fresh_id)
        elif isinstance(n, ir.Unrolled):
            n2.iterations = [clone_nodes(it, regions, fresh_region, fresh_id) for it in n.iterations]
        out.append(n2)
    return out


def _block_effects(nodes: list, regions: dict[str, RegionDef]) -> tuple[set[str], set[str]]:
    """(names read, names maybe written) by a block of host nodes."""
    reads, writes = set(), set()
    for n in ir.walk(nodes):
        if isinstance(n, ir.Call):
            uses, _, maybe = uses_defs(regions[n.region].stmts)
            reads.update(uses)
            writes.update(maybe)
        elif isinstance(n, ir.If):
            reads.add(n.cond)
        elif isinstance(n, ir.While):
            reads.add(n.cond)
        elif isinstance(n, ir.ForRange):
            reads.update([n.count] if isinstance(n.count, str) else [])
            writes.update([n.index] if n.index else [])
        elif isinstance(n, ir.Return):
            reads.update(n.values)
    return reads, writes


def hoist_regions(body: list, regions: dict[str, RegionDef]) -> int:
    """Move a region that follows an ``if`` to before it when it neither reads what the branches write
    nor touches what they read (BlockDrop's ``keep[:, 1]`` test need not wait for block 0): it then
    merges with the region before the ``if``, one region fewer to compile and call. Returns moves."""
    moved = 0
    i = 2
    while i < len(body):
        n, prev, before = body[i], body[i - 1], body[i - 2]
        if isinstance(n, ir.Call) and isinstance(prev, ir.If) and isinstance(before, ir.Call) \
                and not any(isinstance(x, (ir.Return, ir.Break, ir.Continue)) for x in ir.walk([prev])):
            uses, _, maybe = uses_defs(regions[n.region].stmts)
            b_reads, b_writes = _block_effects([prev], regions)
            if not (set(uses) & b_writes) and not (set(maybe) & (b_reads | b_writes)):
                first = regions[before.region]
                first.stmts = first.stmts + regions[n.region].stmts
                first.fns = first.fns + regions[n.region].fns
                del body[i]
                moved += 1
                continue
        i += 1
    for n in body:
        for sub in ir.children(n):
            moved += hoist_regions(sub, regions)
    return moved


def merge_adjacent(body: list, regions: dict[str, RegionDef]) -> None:
    """Fuse consecutive region calls in the same block (tail duplication leaves such pairs)."""
    i = 0
    while i < len(body):
        n = body[i]
        if isinstance(n, ir.Call) and i + 1 < len(body) and isinstance(body[i + 1], ir.Call):
            first, second = regions[n.region], regions[body[i + 1].region]
            first.stmts = first.stmts + second.stmts
            first.fns = first.fns + second.fns
            del body[i + 1]
            continue
        for sub in ir.children(n):
            merge_adjacent(sub, regions)
        i += 1


def tail_duplicate(body: list, node: ir.If, regions: dict[str, RegionDef], fresh_region, fresh_id) -> str:
    """Move what follows ``node`` into both of its branches. Returns a note for the report."""
    found = find_parent(body, node)
    assert found is not None
    nodes, i, owner = found
    rest = nodes[i + 1:]
    if not rest:
        if isinstance(owner, ir.If):
            return tail_duplicate(body, owner, regions, fresh_region, fresh_id)
        raise TraceError(
            f"split_branches: {node.loc}: a variable has a different shape, dtype or kind on the two sides of this "
            "branch and the branch is the last statement of a loop body, so the code that reads it cannot be "
            "specialised per side.\nWhat to do: make both sides produce the same shape.")
    del nodes[i + 1:]
    node.then = node.then + clone_nodes(rest, regions, fresh_region, fresh_id)
    node.orelse = node.orelse + rest
    return f"{node.loc}: the two sides of this branch give different shapes; duplicated the code after it into both"


def _own_breaks(nodes: list):
    """(list, index) of every Break in ``nodes`` that leaves the loop owning ``nodes`` (not a nested one)."""
    for i, n in enumerate(nodes):
        if isinstance(n, ir.Break):
            yield nodes, i
        elif isinstance(n, ir.If):
            yield from _own_breaks(n.then)
            yield from _own_breaks(n.orelse)


def break_duplicate(body: list, node: ir.Unrolled, regions: dict[str, RegionDef], fresh_region, fresh_id) -> str:
    """Replace each ``break`` of an unrolled loop by a copy of the code after the loop, so each way out
    (a list of 1, 2, ... steps in a greedy decoder) runs code traced for its own shapes."""
    found = find_parent(body, node)
    assert found is not None
    nodes, i, owner = found
    rest = nodes[i + 1:]
    if owner is not None or not rest or not isinstance(rest[-1], ir.Return):
        raise TraceError(
            f"split_branches: {node.loc}: a variable has a different shape or length depending on the iteration "
            "this loop leaves at, and the loop is nested in other control flow, so the code after it cannot be "
            "specialised per exit.\nWhat to do: move the loop to the top level of forward, or keep the shapes "
            "fixed (e.g. write into a preallocated tensor instead of growing a list).")
    for it in node.iterations:
        for holder, j in reversed(list(_own_breaks(it))):
            holder[j:j + 1] = clone_nodes(rest, regions, fresh_region, fresh_id)
    return (f"{node.loc}: the ways out of this loop give different shapes; each break runs its own copy of the "
            "code after the loop")


def duplicate_continuation(body: list, node, regions: dict[str, RegionDef], fresh_region, fresh_id) -> str:
    if isinstance(node, ir.Unrolled):
        return break_duplicate(body, node, regions, fresh_region, fresh_id)
    return tail_duplicate(body, node, regions, fresh_region, fresh_id)


# ----------------------------------------------------------------------------- region modules

class RegionModule(nn.Module):
    """A region of the model as a module: shares the model's submodules, parameters and buffers, so
    fxpress's tracer records the same module paths (``blocks.0.conv``) as for the whole model."""

    def __init__(self, root: nn.Module, fn, in_layout: list, out_layout: list):
        super().__init__()
        for n, m in root.named_children():
            self.add_module(n, m)
        for n, p in root.named_parameters(recurse=False):
            self.register_parameter(n, p)
        for n, b in root.named_buffers(recurse=False):
            self.register_buffer(n, b)
        self._sb_fn = fn
        self._sb_in = in_layout
        self._sb_out = out_layout
        self.train(root.training)

    def _sb_run(self, flat):
        args, i = [], 0
        for _, kind, extra in self._sb_in:
            if kind in ("tensor", "scalar"):
                args.append(flat[i])
                i += 1
            elif kind == "tree":
                n = extra.num_leaves
                args.append(pytree.tree_unflatten(list(flat[i:i + n]), extra))
                i += n
            else:
                args.append(extra)
        out = self._sb_fn(*args)
        res = []
        for name, kind, _ in self._sb_out:
            if kind == "tensor":
                res.append(out[name])
            else:
                res.extend(pytree.tree_leaves(out[name]))
        return tuple(res)


def flat_input_names(in_layout: list) -> list[str]:
    names = []
    for name, kind, extra in in_layout:
        if kind in ("tensor", "scalar"):
            names.append(name)
        elif kind == "tree":
            names += [f"{name}__{i}" for i in range(extra.num_leaves)]
    return names


def flat_output_names(out_layout: list) -> list[str]:
    names = []
    for name, kind, extra in out_layout:
        names += [name] if kind == "tensor" else [f"{name}__{i}" for i in range(extra.num_leaves)]
    return names


def region_module(root: nn.Module, region: RegionDef, fn) -> RegionModule:
    params = flat_input_names(region.in_layout)
    ident = [_ident(p) for p in params]
    joined = ", ".join(ident)
    src = (f"def forward(self{', ' if ident else ''}{joined}):\n"
           f"    return self._sb_run(({joined}{',' if len(ident) == 1 else ''}))\n")
    ns: dict[str, Any] = {}
    exec(src, ns)  # noqa: S102 - a generated signature
    cls = type(f"Region_{region.name}", (RegionModule,), {"forward": ns["forward"]})
    return cls(root, fn, region.in_layout, region.out_layout)


def _ident(name: str) -> str:
    return name if name.isidentifier() and not name.startswith("__") else "v_" + "".join(
        c if c.isalnum() else "_" for c in name)
