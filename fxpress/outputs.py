"""Rebuilding a compiled model's outputs in the structure eager PyTorch returns, quickly.

``torch.utils._pytree.tree_unflatten`` rebuilds a transformers ``ModelOutput`` through its dataclass
constructor and ``__post_init__`` checks: 10-15 µs per call, as much as the whole of a small
encoder's kernels. ``output_builder`` returns a function that builds the same object directly
(attributes and dict entries set as the constructor would), checked once against tree_unflatten's
result; any difference (another transformers version, a structure it does not know) and it is
tree_unflatten itself.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import torch.utils._pytree as pytree


def output_builder(spec: pytree.TreeSpec) -> Callable[[list], Any]:
    """``leaves -> outputs`` for ``spec``: direct for a ModelOutput (checked on the first call)."""
    direct = _model_output_builder(spec)
    if direct is None:
        return lambda leaves: pytree.tree_unflatten(leaves, spec)
    return _CheckedBuilder(spec, direct)


class _CheckedBuilder:
    """The direct builder once its first result matched tree_unflatten's, tree_unflatten otherwise."""

    def __init__(self, spec: pytree.TreeSpec, direct: Callable[[list], Any]):
        self.spec, self.direct, self.checked = spec, direct, False

    def __call__(self, leaves: list) -> Any:
        if self.checked:
            return self.direct(leaves)
        reference = pytree.tree_unflatten(leaves, self.spec)
        if self.direct is not None and _same(self.direct(leaves), reference):
            self.checked = True
        else:
            self.direct = None
        return reference


def _model_output_builder(spec: pytree.TreeSpec) -> Callable[[list], Any] | None:
    """A direct builder for a flat transformers ModelOutput (a dataclass that is an OrderedDict whose
    entries are its non-None fields), else None."""
    cls = spec.type
    if not (isinstance(cls, type) and issubclass(cls, collections.OrderedDict) and dataclasses.is_dataclass(cls)):
        return None
    if not all(child.is_leaf() for child in spec.children_specs):
        return None
    keys = list(spec.context) if isinstance(spec.context, (list, tuple)) else None
    if keys is None or len(keys) != spec.num_leaves:
        return None
    names = [f.name for f in dataclasses.fields(cls)]
    if not set(keys) <= set(names):
        return None
    set_attr, set_item = object.__setattr__, collections.OrderedDict.__setitem__

    def build(leaves: list) -> Any:
        obj = cls.__new__(cls)
        values = dict(zip(keys, leaves))
        for name in names:
            set_attr(obj, name, values.get(name))
        for key, value in zip(keys, leaves):
            if value is not None:
                set_item(obj, key, value)
        return obj

    return build


def _same(a: Any, b: Any) -> bool:
    """Same type, same entries in the same order, same attributes (identical objects)."""
    if type(a) is not type(b) or list(a.keys()) != list(b.keys()):
        return False
    if any(a[k] is not b[k] for k in b.keys()):
        return False
    return vars(a).keys() == vars(b).keys() and all(vars(a)[k] is vars(b)[k] for k in vars(b))
