"""A region's statements as a Python function that stays one graph when traced (scalar conversions of
tensors become tensor ops)."""
from __future__ import annotations

import ast
import copy
from typing import Any

import torch
from torch import fx

from fxpress.errors import TraceError

from .program import Analysis
from .regions import PREFIX, RegionDef, assign_stmt
from .taint import Taint


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
    body.append(assign_stmt(out_name, ast.Dict(keys=[], values=[])))
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
