"""The bound of ``while ... and i < N:`` read from the loop itself (no ``fxpress.bound`` needed)."""
from __future__ import annotations

import ast

from .names import iter_child_nodes_same_scope, stored_names


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
