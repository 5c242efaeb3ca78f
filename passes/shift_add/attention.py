"""Find ``softmax(q @ k^T [* c]) @ v`` (and ``scaled_dot_product_attention``) and replace it with
``fxpress::binary_attention(q, k, v)``: sign-binarized queries and keys, attention as additions over V.

This changes the function (softmax attention → additive linear attention over Hamming matches), so
the shift_add pass only runs it when asked (``attention=True``) and reports what it costs.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from . import ops  # noqa: F401 - registers fxpress::binary_attention
from ..stats import shape_of

BINARY_ATTENTION = torch.ops.fxpress.binary_attention.default

_MATMUL = {torch.matmul, operator.matmul, torch.ops.aten.matmul.default}
_SOFTMAX_FN = {torch.softmax, F.softmax, torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}
_SCALE = {operator.mul, operator.truediv, torch.mul, torch.div}
_TRANSPOSE_FN = {torch.transpose, torch.ops.aten.transpose.int}
_SDPA = {F.scaled_dot_product_attention}


@dataclass
class AttentionMatch:
    out: fx.Node                # the node whose value the rewrite replaces
    q: fx.Node
    k: fx.Node | None           # keys as [..., N, D]; None when only k^T exists (a transpose is added)
    k_t: fx.Node | None
    v: fx.Node
    nodes: list[fx.Node]        # nodes the rewrite makes dead (for the report)


def _is_matmul(n) -> bool:
    return isinstance(n, fx.Node) and ((n.op == "call_function" and n.target in _MATMUL)
                                       or (n.op == "call_method" and n.target == "matmul"))


def _softmax_input(n: fx.Node) -> fx.Node | None:
    """Input of a softmax over the last dimension, else None."""
    if n.op == "call_function" and n.target in _SOFTMAX_FN:
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    elif n.op == "call_method" and n.target == "softmax":
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    else:
        return None
    src = n.args[0]
    shape = shape_of(src)
    if not isinstance(src, fx.Node) or dim is None:
        return None
    if dim == -1 or (shape is not None and dim == len(shape) - 1):
        return src
    return None


def _transposed_last_two(n) -> fx.Node | None:
    """x when n is x.transpose(-2, -1) (any spelling of the last two dims), else None."""
    if not isinstance(n, fx.Node):
        return None
    if (n.op == "call_method" and n.target == "transpose") or (n.op == "call_function" and n.target in _TRANSPOSE_FN):
        src = n.args[0]
        dims = list(n.args[1:3])
        shape = shape_of(src)
        if shape is None or len(dims) != 2:
            return None
        nd = len(shape)
        if sorted(d % nd for d in dims) == [nd - 2, nd - 1]:
            return src
    return None


def find_attention(gm: fx.GraphModule) -> list[AttentionMatch]:
    found = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _SDPA:
            if len(n.args) == 3 and not any(n.kwargs.get(k) for k in ("attn_mask", "dropout_p", "is_causal")):
                q, k, v = n.args
                found.append(AttentionMatch(n, q, k, None, v, [n]))
            continue
        src = _softmax_input(n)
        if src is None or len(n.users) != 1:
            continue
        (user,) = n.users
        if not _is_matmul(user) or user.args[0] is not n:
            continue
        chain = [n, user]
        scores = src
        is_scale = scores.op in ("call_function", "call_method") and (
            scores.target in _SCALE or scores.target in ("mul", "div"))
        if is_scale and len(scores.users) == 1 and isinstance(scores.args[1], (int, float)):
            chain.append(scores)
            scores = scores.args[0]
        if not _is_matmul(scores) or len(scores.users) != 1:
            continue
        chain.append(scores)
        q, kt = scores.args[0], scores.args[1]
        k = _transposed_last_two(kt)
        found.append(AttentionMatch(user, q, k, None if k is not None else kt, user.args[1], chain))
    return found


def rewrite_attention(gm: fx.GraphModule, match: AttentionMatch) -> fx.Node:
    """Insert ``binary_attention(q, k, v)`` in place of ``match.out``; returns the new node."""
    g = gm.graph
    with g.inserting_before(match.out):
        k = match.k
        if k is None:
            k = g.call_function(torch.transpose, (match.k_t, -2, -1))
        new = g.call_function(BINARY_ATTENTION, (match.q, k, match.v))
    new.meta.update({key: val for key, val in match.out.meta.items() if key in ("tensor_meta", "stack_trace")})
    match.out.replace_all_uses_with(new)
    return new
