"""Names an AST node reads, binds or mutates (one scope), and renaming them."""
from __future__ import annotations

import ast


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
