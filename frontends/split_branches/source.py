"""Read a Python function's source into an AST, with the globals and closure it runs in."""
from __future__ import annotations

import ast
import copy
import inspect
import textwrap
import types
from dataclasses import dataclass
from typing import Any

from fxpress.errors import TraceError


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
