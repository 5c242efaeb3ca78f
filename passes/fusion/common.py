"""Shared pieces of the ``fuse`` pass family: op classification, module bookkeeping, step state.

The fuse steps (cleanup, bn, linear, act) each take a ``FuseState`` and
edit ``state.gm`` in place; the driver in driver.py runs them to a fixed point.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..base import PassResult
from ..graph import eliminate_dead_code, finalize, has_inplace, is_inplace  # noqa: F401 - re-exported for fusion modules
from ..graph import is_module as _is_module
from ..graph import module_of
from ..stats import shape_of

# ----------------------------------------------------------------------------- op classes

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Layers whose output is an affine function of their input with per-output-channel weights.
AFFINE_LAYER_TYPES = CONV_TYPES + CONVT_TYPES + (nn.Linear,)

ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
               nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh, nn.Softplus)
ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
                 F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.hardtanh, F.softplus,
                 torch.clamp, torch.clip}
ACT_METHODS = {"relu", "sigmoid", "tanh", "clamp", "clip"}

# Ops that only reinterpret the shape / order of elements: an elementwise op commutes with them.
SHAPE_METHODS = {"reshape", "view", "flatten", "unflatten", "transpose", "permute", "squeeze", "unsqueeze",
                 "contiguous"}
SHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.squeeze,
                   torch.unsqueeze}
SHAPE_MODULES = (nn.Flatten, nn.Unflatten)

FUNCTIONAL_BN = {F.batch_norm, torch.batch_norm}

def is_module(gm: fx.GraphModule, node: Any, types) -> bool:
    """graph.is_module that also accepts non-node arguments (constants, lists)."""
    return isinstance(node, fx.Node) and _is_module(gm, node, types)


def is_bn(gm: fx.GraphModule, node: fx.Node) -> bool:
    return is_module(gm, node, BN_TYPES) or (node.op == "call_function" and node.target in FUNCTIONAL_BN)


def bn_count(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if is_bn(gm, n))


def is_activation(gm: fx.GraphModule, node: Any) -> bool:
    """An elementwise unary activation of its first argument (scalar extra arguments only)."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(module_of(gm, node), ACT_MODULES) and len(node.args) == 1
    known = (node.op == "call_function" and node.target in ACT_FUNCTIONS) or \
        (node.op == "call_method" and node.target in ACT_METHODS)
    return known and not _has_node((node.args[1:], node.kwargs))


def _has_node(args) -> bool:
    found = []
    fx.node.map_arg(args, lambda n: found.append(n))
    return bool(found)


def activation_signature(gm: fx.GraphModule, node: fx.Node) -> tuple:
    """Two activations with equal signatures compute the same function."""
    if node.op == "call_module":
        mod = module_of(gm, node)
        return ("module", type(mod), mod.extra_repr())
    return (node.op, node.target, repr(node.args[1:]), repr(sorted(node.kwargs.items())))


def is_shape_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op that moves elements around without changing their values (first argument only)."""
    if any(isinstance(a, torch.dtype) for a in node.args[1:]):
        return False  # x.view(torch.int32) reinterprets bits
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    if node.op == "call_function":
        return node.target in SHAPE_FUNCTIONS
    return is_module(gm, node, SHAPE_MODULES)


def is_affine_layer(gm: fx.GraphModule, node: Any) -> bool:
    return is_module(gm, node, AFFINE_LAYER_TYPES)


def kind_of(gm: fx.GraphModule, node: fx.Node) -> str:
    """Short readable kind of a node for messages: module class, function or method name."""
    if node.op == "call_module":
        return type(module_of(gm, node)).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def rank(node: fx.Node) -> int | None:
    s = shape_of(node)
    return None if s is None else len(s)


# ----------------------------------------------------------------------------- module bookkeeping

def module_users(gm: fx.GraphModule, mod: nn.Module) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and gm.get_submodule(n.target) is mod]


def _path_taken(gm: nn.Module, path: str) -> bool:
    obj: Any = gm
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def fresh_path(gm: fx.GraphModule, path: str) -> str:
    """``path`` or ``path_1``, ``path_2`` … whichever names nothing yet."""
    candidate, i = path, 1
    while _path_taken(gm, candidate):
        candidate, i = f"{path}_{i}", i + 1
    return candidate


def path_for(targets: list[str], suffix: str = "") -> str:
    """A readable qualified name for a module made from the modules at ``targets``.

    Placed under their deepest common parent; leaf names joined, e.g. q, k, v → ``attn.q_k_v``.
    """
    split = [t.split(".") for t in targets]
    common: list[str] = []
    for parts in zip(*[s[:-1] for s in split]):
        if all(p == parts[0] for p in parts):
            common.append(parts[0])
        else:
            break
    leaves = ["_".join(s[len(common):]) for s in split]
    name = "_".join(dict.fromkeys(leaves)) + (f"_{suffix}" if suffix else "")
    return ".".join(common + [name])


def add_module(gm: fx.GraphModule, path: str, module: nn.Module) -> str:
    path = fresh_path(gm, path)
    gm.add_submodule(path, module)
    return path


def own_module(gm: fx.GraphModule, node: fx.Node, suffix: str) -> nn.Module:
    """The module ``node`` calls, safe to edit: cloned under a new name if anything else uses it.

    Other users are other call_module nodes of the same module object and get_attr nodes reading
    its parameters (tied weights read directly would see the edited values).
    """
    mod = module_of(gm, node)
    prefix = node.target + "."
    shared = len(module_users(gm, mod)) > 1 or any(
        n.op == "get_attr" and (n.target == node.target or n.target.startswith(prefix)) for n in gm.graph.nodes)
    if not shared:
        return mod
    clone = copy.deepcopy(mod)
    node.target = add_module(gm, f"{node.target}_{suffix}", clone)
    return clone


def set_param(mod: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor | None) -> None:
    """Replace (never edit in place) a parameter, keeping dtype and requires_grad of ``like``."""
    dtype = like.dtype if like is not None else value.dtype
    requires_grad = like.requires_grad if like is not None else False
    setattr(mod, name, nn.Parameter(value.detach().to(dtype).contiguous(), requires_grad=requires_grad))


def node_order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for k in ("stack_trace", "nn_module_stack"):
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def is_tuple_getitem(node: fx.Node) -> bool:
    """getitem picking one tensor out of a multi-output op (e.g. a split's part): no kernel of its own."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return False
    meta = node.args[0].meta.get("tensor_meta")  # TensorMetadata is a NamedTuple itself: tell them apart
    return isinstance(meta, (tuple, list)) and not hasattr(meta, "shape")


# ----------------------------------------------------------------------------- step state

@dataclass
class FuseState:
    """What every fuse step reads and writes."""

    gm: fx.GraphModule
    result: PassResult
    options: dict[str, Any]
    # Reasons for leaving a node alone, by node name; the driver reports those of nodes still present.
    reasons: dict[str, str] = field(default_factory=dict)

    def enabled(self, step: str) -> bool:
        return bool(self.options.get(step, True))

    def why_not(self, node: fx.Node | str, reason: str) -> None:
        self.reasons[node if isinstance(node, str) else node.name] = reason
