"""Find a model's data-dependent control flow in its Python source (``analyze``).

The forward's AST (and that of every submodule forward or ``self`` method it calls whose control
flow depends on data, inlined) is read into a *structured program*: straight-line statements
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
import types
from typing import Any

import torch
from torch import nn

from fxpress.control import bound as bound_marker  # fxpress.bound(...): compared by identity
from fxpress.errors import TraceError

from .counter_bound import counter_bound
from .names import function_locals, rename, stored_names, target_names
from .options import SplitOptions, split_options
from .program import (Analysis, SBreak, SContinue, SFor, SIf, SReturn, SStmt, SUnrolled, SWhile, lift_returns, loc_line,
                      program_def_sites)
from .source import FnInfo, load_function
from .taint import Taint, analyze_taint, child_blocks


MAX_UNROLL = 256


class _Frame:
    """Reading state for one function body (the forward or an inlined callee)."""

    def __init__(self, fn: FnInfo, taint: Taint, self_name: str):
        self.fn = fn
        self.taint = taint
        self.self_name = self_name
        self.consts: dict[str, Any] = {}  # static locals evaluated at compile time
        self.shapes: dict[str, Any] = {}  # forward's inputs as meta tensors (shapes only), root frame only


class ProgramReader:
    """Reads the forward (and every dynamic callee it reaches, inlined) into a structured program."""

    def __init__(self, root: nn.Module, options: SplitOptions, n_inputs: int | None = None, example_inputs=None):
        self.root = root
        self.options = options
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
        program = self.read_block(fdef.body, frame)
        self._stack.pop()
        return Analysis(program=program, root_fn=fn, params=params, bindings=self.bindings, data=self.data,
                        varying=self.varying, def_sites=program_def_sites(program, params),
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
        if not ok or f is not bound_marker:
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
            return any(self.needs_split(c, frame, loop_inside) for b in child_blocks(s) for c in b)
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

    # ------------------------------------------------------------------ reading statements
    def read_block(self, stmts: list[ast.stmt], frame: _Frame) -> list:
        out: list = []
        for i, s in enumerate(stmts):
            if not self.needs_split(s, frame, False):
                out.append(SStmt(s, frame.fn))
                self._record_const(s, frame)
                continue
            out.extend(self.read_stmt(s, frame, stmts[:i]))
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

    def read_stmt(self, s: ast.stmt, frame: _Frame, preceding: list[ast.stmt] = ()) -> list:
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
                return [SIf(s.test, self.read_block(s.body, frame), self.read_block(s.orelse, frame), fn,
                            fn.loc(s), loc_line(fn, s.body), loc_line(fn, s.orelse))]
            ok, value = self.try_static_eval(s.test, frame)
            if not ok:
                raise TraceError(
                    f"split_branches: {fn.loc(s)}: `if {ast.unparse(s.test)}:` guards data-dependent control flow, "
                    "but its test could not be evaluated at compile time and does not read a tensor.\n"
                    "What to do: make the test depend only on module attributes and shapes, or compute it from "
                    "the input tensors so it is split as a dynamic branch.")
            return self.read_block(s.body if value else s.orelse, frame)
        if isinstance(s, ast.While):
            return self.read_while(s, frame, preceding)
        if isinstance(s, ast.For):
            return self.read_for(s, frame)
        if isinstance(s, (ast.Assign, ast.Expr, ast.AnnAssign)):
            return self.inline(s, frame)
        what = type(s).__name__
        raise TraceError(
            f"split_branches: {fn.loc(s)}: a `{what.lower()}` statement contains data-dependent control flow, "
            "which split_branches does not split (it handles if/elif/else, for, while, break, continue, return "
            "and calls of submodules).\nWhat to do: move the dynamic part out of the "
            f"`{what.lower()}` block.")

    def read_while(self, s: ast.While, frame: _Frame, preceding: list[ast.stmt] = ()) -> list:
        fn = frame.fn
        if s.orelse:
            raise TraceError(f"split_branches: {fn.loc(s)}: while ... else is not supported; move the else block after the loop")
        bound = self.is_bound_call(s.test, frame)
        test = s.test
        if bound is not None:
            test, max_iter, on_exceed = bound
        else:
            max_iter, on_exceed = self.options.max_loop_iters, self.options.on_exceed
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
        return [SWhile(test, self.read_block(s.body, frame), fn, fn.loc(s), loc_line(fn, s.body),
                       int(max_iter), on_exceed)]

    def read_for(self, s: ast.For, frame: _Frame) -> list:
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
            if self.options.max_loop_iters is None:
                raise TraceError(
                    f"split_branches: {fn.loc(s)}: `for {ast.unparse(s.target)} in {ast.unparse(it)}:` has a "
                    "data-dependent trip count and no declared bound.\nWhat to do: declare the most iterations, e.g.\n"
                    f"    for {ast.unparse(s.target)} in fxpress.bound({ast.unparse(it)}, max_iter=N):\n"
                    "or bound every such loop with compile(..., options={'split_branches': {'max_loop_iters': N}}).")
            max_iter, on_exceed = self.options.max_loop_iters, self.options.on_exceed
        else:
            _, max_iter, on_exceed = bound
        if not (isinstance(s.target, ast.Name)):
            raise TraceError(f"split_branches: {fn.loc(s)}: a bounded for loop needs a plain name as its target")
        start = it.args[0] if len(it.args) == 2 else ast.Constant(0)
        stop = it.args[-1]
        index = None if s.target.id == "_" else s.target.id
        self.dynamic_sites.append(f"{fn.loc(s)}: for {ast.unparse(s.target)} in {ast.unparse(it)} (at most {max_iter})")
        return [SFor(index, start, stop, self.read_block(s.body, frame), fn, fn.loc(s), loc_line(fn, s.body),
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
            iterations.append(self.read_block(body, frame))
        return [SUnrolled(iterations, fn.loc(s), loc_line(fn, s.body))]

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
            body = self.read_block(fdef.body, callee_frame)
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


def analyze(model: nn.Module, options: SplitOptions | dict[str, Any] | None = None, n_inputs: int | None = None,
            example_inputs=None) -> Analysis:
    """Read ``model.forward`` (and the dynamic callees it reaches) into a structured program. With
    ``n_inputs``, forward parameters past the first ``n_inputs`` keep their default values; with
    ``example_inputs``, their shapes are compile-time constants (``for b in range(x.shape[0])``)."""
    return ProgramReader(model, split_options(options), n_inputs, example_inputs).run()
