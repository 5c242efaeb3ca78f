"""split_branches, front end: find a model's data-dependent control flow in its Python source.

The forward's AST (and that of every submodule forward or ``self`` method it calls whose control
flow depends on data, inlined) is lowered to a *structured program*: straight-line statements
(``SStmt``, which tracing handles, static Python control flow included) and the dynamic nodes the
host program must run (``SIf``, ``SWhile``, ``SFor``, ``SUnrolled``, ``SBreak``, ``SContinue``,
``SReturn``).

What is dynamic. A name is *data* when its value derives from a forward input (through anything
but ``.shape``/``.size()``/``.dim()``/``len()``/``is None`` and friends, which are fixed by the
compile-time shapes); it is *varying* when it is assigned at more than one place or in a loop, or
computed from a varying name. An ``if`` or ``while`` test that reads a data or varying name is
dynamic. ``for`` over a static iterable (``range(3)``, a ModuleList) is unrolled when its body has
dynamic control flow; ``for`` over a data-dependent iterable and every dynamic ``while`` need a
declared bound (``fxpress.bound``), else a TraceError names the line and how to declare it.
"""
from __future__ import annotations

import ast
import builtins
import copy
import inspect
import textwrap
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxpress.errors import TraceError

# Attribute reads / method calls / functions whose result is fixed by shapes (static at compile time).
SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_floating_point", "training"}
SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "element_size", "get_device", "is_floating_point",
                 "is_contiguous", "type"}
SHAPE_FUNCS = {"len", "isinstance", "type", "hasattr", "callable", "id"}
MAX_UNROLL = 256


# ----------------------------------------------------------------------------- source

@dataclass
class FnInfo:
    """One Python function whose source split_branches reads."""

    fn: types.FunctionType
    fdef: ast.FunctionDef
    filename: str
    globals: dict[str, Any]
    closure: dict[str, Any]

    @property
    def qualname(self) -> str:
        return getattr(self.fn, "__qualname__", self.fn.__name__)

    def loc(self, node: ast.AST) -> str:
        return f"{self.filename}:{getattr(node, 'lineno', '?')}"


_SOURCE_CACHE: dict[types.CodeType, FnInfo] = {}


def load_function(fn) -> FnInfo:
    fn = inspect.unwrap(fn)
    if isinstance(fn, types.MethodType):
        fn = fn.__func__
    code = getattr(fn, "__code__", None)
    if code is None:
        raise TraceError(f"split_branches: cannot read the Python source of {fn!r} (not a Python function)")
    if code in _SOURCE_CACHE:
        info = _SOURCE_CACHE[code]
        return FnInfo(info.fn, copy.deepcopy(info.fdef), info.filename, info.globals, info.closure)
    try:
        lines, start = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or code.co_filename
    except (OSError, TypeError) as e:
        raise TraceError(
            f"split_branches: cannot read the source of {fn.__qualname__} ({code.co_filename}:{code.co_firstlineno}): {e}. "
            "Dynamic-branch splitting reads the forward's Python source; define the model in a .py file.") from e
    tree = ast.parse(textwrap.dedent("".join(lines)))
    ast.increment_lineno(tree, start - 1)
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        raise TraceError(f"split_branches: {filename}:{start}: {fn.__qualname__} is not a plain `def` function")
    fdef.decorator_list = []
    try:
        closure = dict(inspect.getclosurevars(fn).nonlocals)
    except (TypeError, ValueError):
        closure = {}
    # The code object's file name is what tracebacks, fx stack traces and sys.settrace report.
    info = FnInfo(fn, fdef, code.co_filename or filename, fn.__globals__, closure)
    _SOURCE_CACHE[code] = info
    return FnInfo(info.fn, copy.deepcopy(fdef), filename, info.globals, closure)


# ----------------------------------------------------------------------------- names

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp, ast.SetComp,
           ast.DictComp, ast.GeneratorExp)


def iter_child_nodes_same_scope(node: ast.AST):
    """Children of ``node``, not descending into nested function/class/comprehension scopes."""
    for child in ast.iter_child_nodes(node):
        yield child
        if not isinstance(child, _SCOPES):
            yield from iter_child_nodes_same_scope(child)


def stored_names(node: ast.AST) -> list[str]:
    """Names bound by assignment targets in ``node`` (same scope)."""
    out = []
    nodes = [node] + list(iter_child_nodes_same_scope(node))
    for n in nodes:
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            out.append(n.id)
        elif isinstance(n, ast.NamedExpr) and isinstance(n.target, ast.Name):
            out.append(n.target.id)
    return out


def counter_bound(loop: ast.While, preceding, static_eval) -> int | None:
    """The most iterations ``while ... and i < N:`` can take, read from the loop itself.

    A conjunct ``i < N`` / ``i <= N`` (or ``N > i`` / ``N >= i``) bounds the loop when ``N`` is a
    compile-time int, ``i`` was last set to a compile-time int before the loop (in ``preceding``, the
    statements of the same block), and the body changes ``i`` only by one ``i += k`` (k > 0) at its top
    level, with no ``continue`` that could skip it. ``static_eval(expr) -> (ok, value)``. None when no
    conjunct qualifies.
    """
    conjuncts = loop.test.values if isinstance(loop.test, ast.BoolOp) and isinstance(loop.test.op, ast.And) \
        else [loop.test]
    best = None
    for c in conjuncts:
        found = _counter_compare(c)
        if found is None:
            continue
        name, limit_expr, inclusive = found
        ok, limit = static_eval(limit_expr)
        start = _last_int_assignment(name, preceding, static_eval)
        step = _only_increment(name, loop.body, static_eval)
        if not ok or not _is_int(limit) or start is None or step is None:
            continue
        span = limit - start
        trips = (span // step + 1 if span >= 0 else 0) if inclusive else max(0, -(-span // step))
        best = trips if best is None else min(best, trips)
    return best


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _counter_compare(c: ast.expr):
    """(counter name, limit expr, inclusive) for ``i < N``, ``i <= N``, ``N > i``, ``N >= i``."""
    if not (isinstance(c, ast.Compare) and len(c.ops) == 1):
        return None
    left, op, right = c.left, c.ops[0], c.comparators[0]
    if isinstance(left, ast.Name) and isinstance(op, (ast.Lt, ast.LtE)):
        return left.id, right, isinstance(op, ast.LtE)
    if isinstance(right, ast.Name) and isinstance(op, (ast.Gt, ast.GtE)):
        return right.id, left, isinstance(op, ast.GtE)
    return None


def _last_int_assignment(name: str, preceding, static_eval) -> int | None:
    for s in reversed(list(preceding)):
        if name not in stored_names(s):
            continue
        if (isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)
                and s.targets[0].id == name):
            ok, v = static_eval(s.value)
            return v if ok and _is_int(v) else None
        return None  # set some other way (in a branch, a loop, a tuple unpacking): not a known start
    return None


def _only_increment(name: str, body: list[ast.stmt], static_eval) -> int | None:
    if any(isinstance(n, ast.Continue) for s in body for n in [s, *iter_child_nodes_same_scope(s)]):
        return None
    writers = [s for s in body if name in stored_names(s)]
    if len(writers) != 1:
        return None
    s = writers[0]
    if not (isinstance(s, ast.AugAssign) and isinstance(s.op, ast.Add) and isinstance(s.target, ast.Name)):
        return None
    ok, k = static_eval(s.value)
    return k if ok and _is_int(k) and k > 0 else None


# Methods that change their object in place: a region that calls one hands the object on as an output.
_MUTATING_METHODS = {"append", "extend", "insert", "pop", "remove", "clear", "update", "setdefault",
                     "popitem", "sort", "reverse", "__setitem__"}


def mutated_names(node: ast.AST) -> list[str]:
    """Names whose object ``node`` changes in place (same scope): ``outs.append(y)``, ``d[k] = v``,
    ``h.add_(1)`` (torch's trailing-underscore in-place methods)."""
    out = []
    for n in [node, *iter_child_nodes_same_scope(node)]:
        base = None
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name):
            attr = n.func.attr
            if attr in _MUTATING_METHODS or (attr.endswith("_") and not attr.startswith("_")):
                base = n.func.value.id
        elif isinstance(n, (ast.Subscript, ast.Attribute)) and isinstance(n.ctx, ast.Store) \
                and isinstance(n.value, ast.Name):
            base = n.value.id
        if base is not None and base not in out:
            out.append(base)
    return out


def loaded_names(node: ast.AST) -> list[str]:
    """Names read in ``node``, including free names read inside lambdas and comprehensions."""
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]


def function_locals(fdef: ast.FunctionDef) -> set[str]:
    names = {a.arg for a in fdef.args.posonlyargs + fdef.args.args + fdef.args.kwonlyargs}
    for s in fdef.body:
        names.update(stored_names(s))
    return names


def target_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for e in target.elts for n in target_names(e)]
    if isinstance(target, ast.Starred):
        return target_names(target.value)
    return []


class _Rename(ast.NodeTransformer):
    def __init__(self, mapping: dict[str, str]):
        self.mapping = mapping

    def visit_Name(self, node: ast.Name):
        if node.id in self.mapping:
            return ast.copy_location(ast.Name(id=self.mapping[node.id], ctx=node.ctx), node)
        return node

    def visit_arg(self, node: ast.arg):
        if node.arg in self.mapping:
            node.arg = self.mapping[node.arg]
        return node


def rename(node, mapping: dict[str, str]):
    return _Rename(mapping).visit(node)


# ----------------------------------------------------------------------------- taint

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
                for block in _blocks(s):
                    visit(block, in_loop)
                continue
            for n in stored_names(s):
                counts[n] = counts.get(n, 0) + (2 if in_loop else 1)

    visit(fdef.body, False)
    return counts


def _blocks(s: ast.stmt) -> list[list[ast.stmt]]:
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
            for block in _blocks(s):
                changed |= visit(block)
        return changed

    while visit(fdef.body):
        pass
    return t


# ----------------------------------------------------------------------------- structured program

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
    """What the front end found: the structured program and everything regions need to compile."""

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


def _loc_line(fn: FnInfo, stmts: list[ast.stmt]) -> str | None:
    return fn.loc(stmts[0]) if stmts else None


class _Frame:
    """Lowering state for one function body (the forward or an inlined callee)."""

    def __init__(self, fn: FnInfo, taint: Taint, self_name: str):
        self.fn = fn
        self.taint = taint
        self.self_name = self_name
        self.consts: dict[str, Any] = {}  # static locals evaluated at compile time
        self.shapes: dict[str, Any] = {}  # forward's inputs as meta tensors (shapes only), root frame only


class Lowerer:
    def __init__(self, root: nn.Module, options: dict[str, Any] | None = None, n_inputs: int | None = None,
                 example_inputs=None):
        self.root = root
        self.options = options or {}
        self.n_inputs = n_inputs
        # Shapes are fixed at compile time: `range(x.shape[0])` is a static loop. Meta tensors give
        # static evaluation the inputs' shapes and nothing else (a value read fails, as it must).
        self._shape_stand_ins = [torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor)
                                 else None for t in (example_inputs or ())]
        self._root_frame = None
        self.bindings: dict[str, Any] = {"self": root}
        self.data: set[str] = set()
        self.varying: set[str] = set()
        self.code_objects: set = set()
        self.dynamic_sites: list[str] = []
        self.inlined: list[str] = []
        self.notes: list[str] = []
        self._counter = 0
        self._dyn_cache: dict[Any, bool] = {}
        self._stack: list[Any] = []
        from fxpress.control import bound as _bound

        self._bound = _bound

    def fresh(self, base: str) -> str:
        self._counter += 1
        return f"{base}__{self._counter}"

    # ------------------------------------------------------------------ entry
    def run(self) -> Analysis:
        fn = load_function(type(self.root).forward)
        fdef = fn.fdef
        a = fdef.args
        if a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs:
            raise TraceError(f"split_branches: {fn.loc(fdef)}: forward(*args/**kwargs/keyword-only) is not supported; "
                             "give forward plain positional tensor parameters")
        params = [x.arg for x in a.args[1:]]
        self_name = a.args[0].arg if a.args else "self"
        if self_name != "self":
            fdef = rename(fdef, {self_name: "self"})
        if self.n_inputs is not None and self.n_inputs < len(params):
            # trailing parameters the example inputs do not give keep their defaults: constants
            sig = inspect.signature(fn.fn)
            for name in params[self.n_inputs:]:
                default = sig.parameters[name].default
                if default is inspect.Parameter.empty:
                    raise TraceError(f"split_branches: {fn.loc(fdef)}: forward parameter `{name}` has no default and "
                                     f"no example input (got {self.n_inputs} of {len(params)}); pass one")
                self.bindings[name] = default
            params = params[:self.n_inputs]
        taint = analyze_taint(fdef, set(params))
        self.data |= taint.data
        self.varying |= taint.varying
        self.code_objects.add(fn.fn.__code__)
        frame = _Frame(fn, taint, "self")
        frame.shapes = {p: t for p, t in zip(params, self._shape_stand_ins) if t is not None}
        self._stack.append(fn.fn.__code__)
        program = self.lower_block(fdef.body, frame)
        self._stack.pop()
        return Analysis(program=program, root_fn=fn, params=params, bindings=self.bindings, data=self.data,
                        varying=self.varying, def_sites=_program_def_sites(program, params),
                        code_objects=self.code_objects, dynamic_sites=self.dynamic_sites, inlined=self.inlined,
                        notes=self.notes)

    # ------------------------------------------------------------------ static evaluation
    def namespace(self, frame: _Frame) -> dict[str, Any]:
        ns = dict(vars(builtins))
        ns.update(frame.fn.globals)
        ns.update(frame.fn.closure)
        ns.update(self.bindings)
        ns.update(frame.shapes)
        ns.update(frame.consts)
        return ns

    def static_eval(self, expr: ast.expr, frame: _Frame):
        code = compile(ast.Expression(body=_fix(copy.deepcopy(expr))), frame.fn.filename, "eval")
        return eval(code, self.namespace(frame))  # noqa: S307 - the user's own model code

    def try_static_eval(self, expr: ast.expr, frame: _Frame):
        known = set(frame.consts)
        view = Taint(data=frame.taint.data - known, varying=frame.taint.varying - known)
        if view.dynamic(expr):
            return False, None
        try:
            return True, self.static_eval(expr, frame)
        except Exception:  # noqa: BLE001 - "not statically known" is the answer
            return False, None

    def is_bound_call(self, expr, frame: _Frame):
        """(value expr, max_iter, on_exceed) when ``expr`` is ``fxpress.bound(value, max_iter, ...)``."""
        if not isinstance(expr, ast.Call):
            return None
        ok, f = self.try_static_eval(expr.func, frame)
        if not ok or f is not self._bound:
            return None
        args = list(expr.args)
        kw = {k.arg: k.value for k in expr.keywords}
        value = args[0] if args else kw.get("value")
        max_node = args[1] if len(args) > 1 else kw.get("max_iter")
        exceed_node = args[2] if len(args) > 2 else kw.get("on_exceed")
        if value is None or max_node is None:
            raise TraceError(f"{frame.fn.loc(expr)}: fxpress.bound(value, max_iter) needs both arguments")
        ok, max_iter = self.try_static_eval(max_node, frame)
        if not ok or not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 0:
            raise TraceError(f"{frame.fn.loc(expr)}: the max_iter of fxpress.bound must be a non-negative int known "
                             f"at compile time (a literal or a module attribute), got `{ast.unparse(max_node)}`")
        on_exceed = "error"
        if exceed_node is not None:
            ok, on_exceed = self.try_static_eval(exceed_node, frame)
            if not ok or on_exceed not in ("error", "stop"):
                raise TraceError(f"{frame.fn.loc(expr)}: on_exceed must be 'error' or 'stop'")
        return value, max_iter, on_exceed

    # ------------------------------------------------------------------ callees
    def callee(self, call: ast.Call, frame: _Frame):
        """(FnInfo, bound self object) when ``call`` calls a submodule or method with dynamic control flow."""
        if not isinstance(call, ast.Call):
            return None
        ok, obj = self.try_static_eval(call.func, frame)
        if not ok:
            return None
        if isinstance(obj, nn.Module):
            fn, self_obj = type(obj).forward, obj
        elif isinstance(obj, types.MethodType) and isinstance(obj.__self__, nn.Module):
            fn, self_obj = obj.__func__, obj.__self__
        else:
            return None
        fn = inspect.unwrap(fn)
        mod = getattr(fn, "__module__", "") or ""
        if mod.startswith("torch.") or not hasattr(fn, "__code__"):
            return None
        if not self.fn_is_dynamic(fn):
            return None
        return fn, self_obj

    def fn_is_dynamic(self, fn) -> bool:
        code = fn.__code__
        if code in self._dyn_cache:
            return self._dyn_cache[code]
        if code in self._stack:
            return False  # recursion: decided by the outer call
        self._dyn_cache[code] = False
        try:
            info = load_function(fn)
        except TraceError:
            return False
        params = [x.arg for x in info.fdef.args.args[1:]]
        taint = analyze_taint(info.fdef, set(params))
        frame = _Frame(info, taint, info.fdef.args.args[0].arg if info.fdef.args.args else "self")
        self._stack.append(code)
        try:
            body = info.fdef.body
            dyn = any(self.needs_split(s, frame, False) for s in body[:-1]) or (
                bool(body) and not isinstance(body[-1], ast.Return) and self.needs_split(body[-1], frame, False)) or (
                bool(body) and isinstance(body[-1], ast.Return) and self._call_needs(body[-1], frame))
        finally:
            self._stack.pop()
        self._dyn_cache[code] = dyn
        return dyn

    def _call_needs(self, s: ast.stmt, frame: _Frame) -> bool:
        value = getattr(s, "value", None)
        for node in ([value] if value is not None else []):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Call) and self.callee(sub, frame) is not None:
                    return True
        return False

    # ------------------------------------------------------------------ what needs structure
    def needs_split(self, s: ast.stmt, frame: _Frame, loop_inside: bool) -> bool:
        t = frame.taint
        if isinstance(s, ast.Return):
            return True
        if isinstance(s, (ast.Break, ast.Continue)):
            return not loop_inside
        if isinstance(s, ast.If):
            return t.dynamic(s.test) or any(self.needs_split(c, frame, loop_inside) for c in s.body + s.orelse)
        if isinstance(s, ast.While):
            return (t.dynamic(s.test) or self.is_bound_call(s.test, frame) is not None
                    or any(self.needs_split(c, frame, True) for c in s.body + s.orelse))
        if isinstance(s, ast.For):
            if t.dynamic(s.iter) or self.is_bound_call(s.iter, frame) is not None:
                return True
            return any(self.needs_split(c, f, True) for f in self._iteration_frames(s, frame) for c in s.body + s.orelse)
        if isinstance(s, (ast.With, ast.Try)):
            return any(self.needs_split(c, frame, loop_inside) for b in _blocks(s) for c in b)
        if isinstance(s, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            return False
        return self._call_needs(s, frame)

    def _iteration_frames(self, s: ast.For, frame: _Frame) -> list[_Frame]:
        """Frames with the loop variable bound to each item of a static iterable (so a call like
        ``self.blocks[i](x)`` in the body resolves); the frame itself when the items are unknown."""
        ok, items = self.try_static_eval(s.iter, frame)
        try:
            items = list(items) if ok else None
        except TypeError:
            items = None
        if not items or len(items) > MAX_UNROLL:
            return [frame]
        frames = []
        for item in items:
            try:
                values = _destructure(s.target, item, frame.fn)
            except TraceError:
                return [frame]
            f = _Frame(frame.fn, frame.taint, frame.self_name)
            f.consts = {**frame.consts, **values}
            frames.append(f)
        return frames

    # ------------------------------------------------------------------ lowering
    def lower_block(self, stmts: list[ast.stmt], frame: _Frame) -> list:
        out: list = []
        for i, s in enumerate(stmts):
            if not self.needs_split(s, frame, False):
                out.append(SStmt(s, frame.fn))
                self._record_const(s, frame)
                continue
            out.extend(self.lower_stmt(s, frame, stmts[:i]))
            if out and isinstance(out[-1], (SReturn, SBreak, SContinue)):
                break  # the rest of the block is unreachable
        return out

    def _record_const(self, s: ast.stmt, frame: _Frame) -> None:
        """Remember static locals (``n = len(self.blocks)``) so later static tests and loops can use them."""
        if not (isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)):
            return
        name = s.targets[0].id
        if name in frame.taint.varying or name in frame.taint.data:
            return
        ok, value = self.try_static_eval(s.value, frame)
        if ok and isinstance(value, (bool, int, float, str, tuple, type(None), nn.Module)):
            frame.consts[name] = value

    def lower_stmt(self, s: ast.stmt, frame: _Frame, preceding: list[ast.stmt] = ()) -> list:
        fn, t = frame.fn, frame.taint
        if isinstance(s, ast.Return):
            if s.value is not None and self._call_needs(s, frame):
                if not (isinstance(s.value, ast.Call) and self.callee(s.value, frame)):
                    self._nested_call_error(s, frame)
                var = self.fresh("ret")
                assign = ast.copy_location(ast.Assign(targets=[ast.Name(var, ast.Store())], value=s.value), s)
                return self.inline(assign, frame) + [
                    SReturn(ast.copy_location(ast.Name(var, ast.Load()), s), fn, fn.loc(s), fn.loc(s))]
            return [SReturn(s.value, fn, fn.loc(s), fn.loc(s))]
        if isinstance(s, ast.Break):
            return [SBreak(fn.loc(s))]
        if isinstance(s, ast.Continue):
            return [SContinue(fn.loc(s))]
        if isinstance(s, ast.If):
            if t.dynamic(s.test):
                self.dynamic_sites.append(f"{fn.loc(s)}: if {ast.unparse(s.test)}")
                if _one_line(s):
                    self.notes.append(f"{fn.loc(s)}: the branch body shares the `if` line, so the decision trace "
                                      "cannot tell eager's branch from its test; put the body on its own line")
                return [SIf(s.test, self.lower_block(s.body, frame), self.lower_block(s.orelse, frame), fn,
                            fn.loc(s), _loc_line(fn, s.body), _loc_line(fn, s.orelse))]
            ok, value = self.try_static_eval(s.test, frame)
            if not ok:
                raise TraceError(
                    f"split_branches: {fn.loc(s)}: `if {ast.unparse(s.test)}:` guards data-dependent control flow, "
                    "but its test could not be evaluated at compile time and does not read a tensor.\n"
                    "What to do: make the test depend only on module attributes and shapes, or compute it from "
                    "the input tensors so it is split as a dynamic branch.")
            return self.lower_block(s.body if value else s.orelse, frame)
        if isinstance(s, ast.While):
            return self.lower_while(s, frame, preceding)
        if isinstance(s, ast.For):
            return self.lower_for(s, frame)
        if isinstance(s, (ast.Assign, ast.Expr, ast.AnnAssign)):
            return self.inline(s, frame)
        what = type(s).__name__
        raise TraceError(
            f"split_branches: {fn.loc(s)}: a `{what.lower()}` statement contains data-dependent control flow, "
            "which split_branches does not split (it handles if/elif/else, for, while, break, continue, return "
            "and calls of submodules).\nWhat to do: move the dynamic part out of the "
            f"`{what.lower()}` block.")

    def lower_while(self, s: ast.While, frame: _Frame, preceding: list[ast.stmt] = ()) -> list:
        fn = frame.fn
        if s.orelse:
            raise TraceError(f"split_branches: {fn.loc(s)}: while ... else is not supported; move the else block after the loop")
        bound = self.is_bound_call(s.test, frame)
        test = s.test
        if bound is not None:
            test, max_iter, on_exceed = bound
        else:
            max_iter, on_exceed = self.options.get("max_loop_iters"), self.options.get("on_exceed", "error")
            inferred = counter_bound(s, preceding, lambda e: self.try_static_eval(e, frame))
            if inferred is not None:
                # The condition itself caps the trip count: the loop can never want iteration max_iter + 1.
                max_iter = inferred if max_iter is None else min(int(max_iter), inferred)
            if max_iter is None:
                raise TraceError(
                    f"split_branches: {fn.loc(s)}: `while {ast.unparse(s.test)}:` has a data-dependent trip count and "
                    "no declared bound, so it cannot be compiled (the host program needs a maximum to check).\n"
                    f"What to do: declare the most iterations it can take, e.g.\n"
                    f"    while fxpress.bound({ast.unparse(s.test)}, max_iter=N):\n"
                    "or bound every such loop with compile(..., options={'split_branches': {'max_loop_iters': N}}).")
        self.dynamic_sites.append(f"{fn.loc(s)}: while {ast.unparse(test)} (at most {max_iter})")
        return [SWhile(test, self.lower_block(s.body, frame), fn, fn.loc(s), _loc_line(fn, s.body),
                       int(max_iter), on_exceed)]

    def lower_for(self, s: ast.For, frame: _Frame) -> list:
        fn, t = frame.fn, frame.taint
        if s.orelse:
            raise TraceError(f"split_branches: {fn.loc(s)}: for ... else is not supported; move the else block after the loop")
        bound = self.is_bound_call(s.iter, frame)
        it = bound[0] if bound else s.iter
        if bound is None and not t.dynamic(s.iter):
            return self.unroll(s, frame)
        # A rolled loop: range(stop) or range(start, stop), trip count read at run time.
        if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "range"
                and 1 <= len(it.args) <= 2 and not it.keywords):
            raise TraceError(
                f"split_branches: {fn.loc(s)}: `for {ast.unparse(s.target)} in {ast.unparse(it)}:` iterates over a "
                "data-dependent sequence; split_branches compiles data-dependent for loops of the form "
                "`for i in fxpress.bound(range(n), max_iter=N)` (n may be a tensor).")
        if bound is None:
            if self.options.get("max_loop_iters") is None:
                raise TraceError(
                    f"split_branches: {fn.loc(s)}: `for {ast.unparse(s.target)} in {ast.unparse(it)}:` has a "
                    "data-dependent trip count and no declared bound.\nWhat to do: declare the most iterations, e.g.\n"
                    f"    for {ast.unparse(s.target)} in fxpress.bound({ast.unparse(it)}, max_iter=N):\n"
                    "or bound every such loop with compile(..., options={'split_branches': {'max_loop_iters': N}}).")
            max_iter, on_exceed = self.options["max_loop_iters"], self.options.get("on_exceed", "error")
        else:
            _, max_iter, on_exceed = bound
        if not (isinstance(s.target, ast.Name)):
            raise TraceError(f"split_branches: {fn.loc(s)}: a bounded for loop needs a plain name as its target")
        start = it.args[0] if len(it.args) == 2 else ast.Constant(0)
        stop = it.args[-1]
        index = None if s.target.id == "_" else s.target.id
        self.dynamic_sites.append(f"{fn.loc(s)}: for {ast.unparse(s.target)} in {ast.unparse(it)} (at most {max_iter})")
        return [SFor(index, start, stop, self.lower_block(s.body, frame), fn, fn.loc(s), _loc_line(fn, s.body),
                     int(max_iter), on_exceed)]

    def unroll(self, s: ast.For, frame: _Frame) -> list:
        fn = frame.fn
        try:
            items = list(self.static_eval(s.iter, frame))
        except Exception as e:  # noqa: BLE001
            raise TraceError(
                f"split_branches: {fn.loc(s)}: the loop `for {ast.unparse(s.target)} in {ast.unparse(s.iter)}:` has "
                f"data-dependent control flow in its body, so it is unrolled, but its iterable could not be evaluated "
                f"at compile time ({type(e).__name__}: {e}).\nWhat to do: iterate over a range of a constant or "
                "module attribute, or a ModuleList; or keep it rolled with fxpress.bound(range(n), max_iter=N).") from e
        if len(items) > MAX_UNROLL:
            raise TraceError(f"split_branches: {fn.loc(s)}: unrolling {len(items)} iterations is too many (limit "
                             f"{MAX_UNROLL}); keep the loop rolled with `fxpress.bound(range(n), max_iter=N)`")
        names = target_names(s.target)
        stored = {n for b in s.body for n in stored_names(b)}
        clash = stored & set(names)
        if clash:
            raise TraceError(f"split_branches: {fn.loc(s)}: the loop body assigns its own loop variable "
                             f"{sorted(clash)}; use another name")
        self.dynamic_sites.append(f"{fn.loc(s)}: for {ast.unparse(s.target)} in {ast.unparse(s.iter)} "
                                  f"(unrolled, {len(items)} iterations)")
        iterations = []
        for k, item in enumerate(items):
            values = _destructure(s.target, item, fn)
            mapping = {}
            for name, value in values.items():
                b = self.fresh(f"{name}_it{k}")
                self.bindings[b] = value
                mapping[name] = b
            body = [rename(copy.deepcopy(b), mapping) for b in s.body]
            iterations.append(self.lower_block(body, frame))
        return [SUnrolled(iterations, fn.loc(s), _loc_line(fn, s.body))]

    # ------------------------------------------------------------------ inlining
    def _nested_call_error(self, s: ast.stmt, frame: _Frame):
        inner = [c for c in ast.walk(s) if isinstance(c, ast.Call) and self.callee(c, frame) is not None]
        what = ast.unparse(inner[0].func) if inner else "a callee"
        raise TraceError(
            f"split_branches: {frame.fn.loc(s)}: `{ast.unparse(s).strip()}` calls {what}, whose forward has "
            "data-dependent control flow, inside a larger expression.\n"
            f"What to do: call it in a statement of its own, e.g. `y = {what}(...)`, and use y.")

    def inline(self, s: ast.stmt, frame: _Frame) -> list:
        fn = frame.fn
        call = s.value
        target = None
        if isinstance(s, ast.Assign):
            if len(s.targets) != 1:
                raise TraceError(f"split_branches: {fn.loc(s)}: chained assignment of a dynamic submodule call; "
                                 "assign to one target")
            target = s.targets[0]
        elif isinstance(s, ast.AnnAssign):
            target = s.target
        found = self.callee(call, frame) if isinstance(call, ast.Call) else None
        if found is None:
            self._nested_call_error(s, frame)
        cfn, cself = found
        info = load_function(cfn)
        self.code_objects.add(info.fn.__code__)
        self.inlined.append(f"{info.qualname} ({info.loc(info.fdef)})")
        fdef = info.fdef
        a = fdef.args
        if a.vararg or a.kwarg or a.posonlyargs:
            raise TraceError(f"split_branches: {info.loc(fdef)}: cannot inline {info.qualname}: *args/**kwargs")
        k = self.fresh("inl").split("__")[-1]
        params = [x.arg for x in a.args] + [x.arg for x in a.kwonlyargs]
        self_param = params[0]
        locals_ = function_locals(fdef)
        mapping = {n: f"{n}__{k}" for n in locals_ if n != self_param}
        mapping[self_param] = f"self__{k}"
        self.bindings[f"self__{k}"] = cself
        for name in {n.id for n in ast.walk(fdef) if isinstance(n, ast.Name)} - locals_:
            if name in info.closure:
                value = info.closure[name]
            elif name in info.globals:
                value = info.globals[name]
            else:
                continue  # a builtin
            mapping[name] = f"{name}__g{k}"
            self.bindings[mapping[name]] = value
        fdef = rename(fdef, mapping)
        # bind arguments
        sig = inspect.signature(cfn)
        call_kw = {}
        for kw in call.keywords:
            if kw.arg is None:
                raise TraceError(f"split_branches: {fn.loc(s)}: **kwargs in a call of {info.qualname} is not supported")
            call_kw[kw.arg] = kw.value
        if any(isinstance(x, ast.Starred) for x in call.args):
            raise TraceError(f"split_branches: {fn.loc(s)}: *args in a call of {info.qualname} is not supported")
        try:
            bound = sig.bind(None, *call.args, **call_kw)
        except TypeError as e:
            raise TraceError(f"split_branches: {fn.loc(s)}: call of {info.qualname} does not match its signature: {e}") from e
        bound.apply_defaults()
        pre: list = []
        data_params = set()
        for pname, value in list(bound.arguments.items())[1:]:
            new = mapping.get(pname, pname)
            if isinstance(value, ast.AST):
                expr = value
                if frame.taint.dynamic(value):
                    data_params.add(new)
            else:
                b = f"{pname}__d{k}"
                self.bindings[b] = value
                expr = ast.Name(b, ast.Load())
            pre.append(SStmt(ast.copy_location(ast.Assign(targets=[ast.Name(new, ast.Store())], value=expr), s), fn))
        taint = analyze_taint(fdef, data_params)
        self.data |= taint.data
        self.varying |= taint.varying
        callee_frame = _Frame(info, taint, f"self__{k}")
        self._stack.append(info.fn.__code__)
        try:
            body = self.lower_block(fdef.body, callee_frame)
        finally:
            self._stack.pop()
        ret = f"ret__{k}"
        body, _ = lift_returns(body, ret, info)
        post = []
        if target is not None:
            assign = ast.copy_location(ast.Assign(targets=[target], value=ast.Name(ret, ast.Load())), s)
            post.append(SStmt(assign, fn))
            # the caller's names assigned from a dynamic call may differ per path: they are data
        return pre + body + post


def _fix(node):
    return ast.fix_missing_locations(node)


def _one_line(s: ast.If) -> bool:
    return bool(s.body) and s.body[0].lineno == s.lineno


def _destructure(target: ast.expr, item, fn: FnInfo) -> dict[str, Any]:
    if isinstance(target, ast.Name):
        return {target.id: item}
    if isinstance(target, (ast.Tuple, ast.List)):
        items = list(item)
        if len(items) != len(target.elts):
            raise TraceError(f"split_branches: {fn.loc(target)}: cannot unpack {len(items)} values into "
                             f"{ast.unparse(target)}")
        out = {}
        for t, v in zip(target.elts, items):
            out.update(_destructure(t, v, fn))
        return out
    raise TraceError(f"split_branches: {fn.loc(target)}: unsupported loop target `{ast.unparse(target)}`")


def lift_returns(nodes: list, ret: str, fn: FnInfo) -> tuple[list, bool]:
    """Inline a callee's returns: ``return e`` becomes ``ret = e``; code after a branch that returns
    moves into the branch that does not. Returns (nodes, whether every path returned)."""
    out: list = []
    for i, n in enumerate(nodes):
        if isinstance(n, SReturn):
            value = n.value if n.value is not None else ast.Constant(None)
            stmt = ast.Assign(targets=[ast.Name(ret, ast.Store())], value=value)
            out.append(SStmt(ast.copy_location(stmt, value) if hasattr(value, "lineno") else _fix(stmt), n.fn))
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


def _program_def_sites(program: list, params: list[str]) -> dict[str, int]:
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


def analyze(model: nn.Module, options: dict[str, Any] | None = None, n_inputs: int | None = None,
            example_inputs=None) -> Analysis:
    """Read ``model.forward`` (and the dynamic callees it reaches) into a structured program. With
    ``n_inputs``, forward parameters past the first ``n_inputs`` keep their default values; with
    ``example_inputs``, their shapes are compile-time constants (``for b in range(x.shape[0])``)."""
    return Lowerer(model, options, n_inputs, example_inputs).run()
