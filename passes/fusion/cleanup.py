"""Fuse steps that delete work: dropout, identities, no-op reshapes / contiguous, and constant folding
of subgraphs that depend only on parameters and buffers."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .common import FuseState, eliminate_dead_code, has_inplace, is_inplace, kind_of, module_of
from ..graph import unique_name
from ..stats import dtype_of, shape_of

DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# functional dropout → (position, keyword) of its "training" flag and the flag's default.
DROPOUT_FUNCTIONS = {
    F.dropout: (2, "training", True), F.dropout1d: (2, "training", True), F.dropout2d: (2, "training", True),
    F.dropout3d: (2, "training", True), F.alpha_dropout: (2, "training", False),
    F.feature_alpha_dropout: (2, "training", False),
    torch.dropout: (2, "train", None), torch.alpha_dropout: (2, "train", None),
    torch.feature_dropout: (2, "train", None), torch.feature_alpha_dropout: (2, "train", None),
}

# Ops that return their input unchanged when the output shape (and dtype) equals the input's.
RESHAPE_METHODS = {"reshape", "view", "flatten", "unflatten", "squeeze", "expand", "expand_as", "reshape_as",
                   "view_as", "broadcast_to"}
RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.squeeze, torch.broadcast_to}
RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
CAST_METHODS = {"to", "type", "type_as", "float", "double", "half", "bfloat16"}

# x op c is x itself for these (op, scalar) pairs, when x already has the output's shape and dtype.
_IDENTITY_SCALARS = {
    operator.add: 0, torch.add: 0, "add": 0, operator.sub: 0, torch.sub: 0, "sub": 0,
    operator.mul: 1, torch.mul: 1, "mul": 1, operator.truediv: 1, torch.div: 1, "div": 1,
}
_COMMUTATIVE = {operator.add, torch.add, "add", operator.mul, torch.mul, "mul"}

# Never evaluated at compile time: random, or stateful, or fxpress's own (compressed) ops.
_IMPURE_FUNCTIONS = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
                     torch.bernoulli, torch.multinomial, torch.normal, torch.poisson} | set(DROPOUT_FUNCTIONS)


def _replace(state: FuseState, node: fx.Node, by: fx.Node, kind: str, **detail) -> None:
    node.replace_all_uses_with(by)
    state.gm.graph.erase_node(node)
    state.result.rewrite(kind, [node], [], op=detail.pop("op", None) or "", **detail)


def _same_shape_dtype(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = shape_of(a), shape_of(b)
    return sa is not None and sa == sb and dtype_of(a) == dtype_of(b)


def _dropout_training(node: fx.Node) -> bool | None:
    pos, kw, default = DROPOUT_FUNCTIONS[node.target]
    if kw in node.kwargs:
        return node.kwargs[kw]
    if len(node.args) > pos:
        return node.args[pos]
    return default


def _is_identity_perm(node: fx.Node) -> bool:
    r = len(shape_of(node.args[0]) or ())
    if not r:
        return False
    if node.target in ("transpose", torch.transpose):
        dims = list(node.args[1:3]) or [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
        return len(dims) == 2 and all(isinstance(d, int) for d in dims) and dims[0] % r == dims[1] % r
    if node.target in ("permute", torch.permute):
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        dims = dims or node.kwargs.get("dims", ())
        return all(isinstance(d, int) for d in dims) and [d % r for d in dims] == list(range(r))
    return False


def remove_noops(state: FuseState) -> bool:
    """Dropout (eval), nn.Identity, contiguous, reshapes/casts that change nothing, x+0, x*1."""
    gm, changed = state.gm, False
    # x + 0 is a new tensor, x itself is not: with in-place ops around, dropping the copy could let a
    # write reach x's other readers.
    arithmetic_ok = not has_inplace(gm)
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method") or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node):
            continue
        if node.op == "call_module":
            mod = module_of(gm, node)
            if isinstance(mod, DROPOUT_MODULES):
                if mod.training:
                    state.why_not(node, f"{type(mod).__name__} is in training mode (random); call model.eval()")
                    continue
                _replace(state, node, src, "remove_dropout", op=type(mod).__name__)
                changed = True
            elif isinstance(mod, nn.Identity):
                _replace(state, node, src, "remove_identity", op="Identity")
                changed = True
            elif isinstance(mod, RESHAPE_MODULES) and _same_shape_dtype(node, src):
                _replace(state, node, src, "remove_noop_reshape", op=type(mod).__name__)
                changed = True
            continue
        target = node.target
        if node.op == "call_function" and target in DROPOUT_FUNCTIONS:
            training = _dropout_training(node)
            if training is False:
                _replace(state, node, src, "remove_dropout", op=kind_of(gm, node))
                changed = True
            else:
                state.why_not(node, f"{kind_of(gm, node)} with training={training!r} is random; not removed")
            continue
        if node.op == "call_method" and target == "contiguous" and not node.kwargs and len(node.args) == 1:
            # contiguous only changes memory layout; a later view() may need it, so those become reshape().
            for user in list(node.users):
                if user.op == "call_method" and user.target == "view":
                    user.target = "reshape"
            _replace(state, node, src, "remove_contiguous", op="contiguous")
            changed = True
            continue
        is_reshape = (node.op == "call_method" and target in RESHAPE_METHODS) or \
            (node.op == "call_function" and target in RESHAPE_FUNCTIONS)
        if is_reshape and _same_shape_dtype(node, src):
            _replace(state, node, src, "remove_noop_reshape", op=kind_of(gm, node))
            changed = True
            continue
        if target in ("transpose", "permute", torch.transpose, torch.permute) and _is_identity_perm(node):
            _replace(state, node, src, "remove_noop_reshape", op=kind_of(gm, node))
            changed = True
            continue
        if node.op == "call_method" and target in CAST_METHODS and _same_shape_dtype(node, src) \
                and _cast_args_ok(node):
            _replace(state, node, src, "remove_noop_cast", op=target)
            changed = True
            continue
        if arithmetic_ok and target in _IDENTITY_SCALARS and not node.kwargs and len(node.args) == 2:
            a, b = node.args
            neutral = _IDENTITY_SCALARS[target]
            x = None
            if isinstance(a, fx.Node) and not isinstance(b, fx.Node) and _is_scalar(b, neutral):
                x = a
            elif target in _COMMUTATIVE and isinstance(b, fx.Node) and not isinstance(a, fx.Node) \
                    and _is_scalar(a, neutral):
                x = b
            if x is not None and _same_shape_dtype(node, x) and (dtype_of(x) or torch.int64).is_floating_point:
                _replace(state, node, x, "remove_identity", op=f"{kind_of(gm, node)} {neutral}")
                changed = True
    return changed


def _is_scalar(v, neutral) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == neutral


def _cast_args_ok(node: fx.Node) -> bool:
    """A cast whose only arguments are dtypes / a like-tensor (no device moves, no copy=True)."""
    if node.kwargs and set(node.kwargs) - {"dtype"}:
        return False
    return all(isinstance(a, (torch.dtype, fx.Node)) for a in node.args[1:])


# ----------------------------------------------------------------------------- constant folding

def _fetch(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _constant_nodes(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """Nodes computed from get_attr tensors only (no graph inputs, no randomness, no fxpress ops)."""
    const: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _fetch(gm, node.target)
            # Integer/packed buffers stay as they are: folding them could expand a compressed weight.
            const[node] = isinstance(value, torch.Tensor) and value.is_floating_point()
            continue
        if node.op not in ("call_function", "call_method", "call_module"):
            const[node] = False
            continue
        inputs = node.all_input_nodes
        if not inputs or not all(const.get(i, False) for i in inputs):
            const[node] = False
            continue
        if node.op == "call_function" and (node.target in _IMPURE_FUNCTIONS or _is_fxpress_op(node.target)
                                           or _is_nondeterministic(node.target)):
            const[node] = False
            continue
        if is_inplace(gm, node):
            const[node] = False  # would write into a parameter
            continue
        if node.op == "call_module":
            mod = module_of(gm, node)
            if isinstance(mod, DROPOUT_MODULES) or mod.training:
                const[node] = False
                continue
        const[node] = True
    return const


def _is_fxpress_op(target) -> bool:
    """fxpress's own ops hold compressed layers: never evaluated back into dense tensors."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace == "fxpress"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.startswith("fxpress::")
    return False


def _is_nondeterministic(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


def _evaluate(gm: fx.GraphModule, const: dict[fx.Node, bool]) -> dict[fx.Node, object]:
    """Values of the constant nodes; a node that fails to evaluate (and what reads it) stays in the graph."""
    env: dict[fx.Node, object] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if not const.get(node):
                continue
            if not all(i in env for i in node.all_input_nodes):
                const[node] = False
                continue
            try:
                if node.op == "get_attr":
                    env[node] = _fetch(gm, node.target)
                    continue
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                if node.op == "call_function":
                    env[node] = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    env[node] = module_of(gm, node)(*args, **kwargs)
            except Exception:  # noqa: BLE001 - not foldable; running the graph will show any real error
                const[node] = False
    return env


def _freed_elements(gm: fx.GraphModule, sub: set[fx.Node]) -> int:
    """Parameter elements no longer needed once ``sub`` is replaced by one buffer."""
    called = [n.target + "." for n in gm.graph.nodes if n.op == "call_module"]
    freed = 0
    for leaf in (n for n in sub if n.op == "get_attr"):
        still_read = any(u not in sub for u in leaf.users) or any(
            n.op == "get_attr" and n.target == leaf.target and n not in sub for n in gm.graph.nodes)
        if not still_read and not any(leaf.target.startswith(c) for c in called):
            freed += _fetch(gm, leaf.target).numel()
    return freed


def fold_constants(state: FuseState) -> bool:
    """Evaluate subgraphs that read only parameters/buffers once; keep their result as a buffer."""
    gm = state.gm
    const = _constant_nodes(gm)
    if not any(const.get(n) for n in gm.graph.nodes if n.op != "get_attr"):
        return False
    env = _evaluate(gm, const)
    frontier = [n for n in gm.graph.nodes if const.get(n) and n.op != "get_attr"
                and any(not const.get(u, False) for u in n.users)]
    max_growth = state.options.get("fold_max_growth", 4)
    folded: list[set[fx.Node]] = []
    for node in frontier:
        value = env[node]
        if not isinstance(value, torch.Tensor):
            continue
        sub = _subgraph(node, const)
        freed = _freed_elements(gm, sub)
        if value.numel() > max(max_growth * freed, 1024):
            state.why_not(node, f"constant subgraph result has {value.numel()} elements and folding frees "
                                f"{freed} parameter elements (> {max_growth}x); kept as computed")
            continue
        name = unique_name(gm, f"{node.name}_folded")
        gm.register_buffer(name, value.detach().clone().contiguous())
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(name)
        new.meta.update({k: v for k, v in node.meta.items() if k == "tensor_meta"})
        node.replace_all_uses_with(new)
        state.result.rewrite("fold_constant", sorted(sub, key=lambda n: n.name), [new], shape=list(value.shape))
        folded.append(sub)
    if not folded:
        return False
    leaves = {n.target for sub in folded for n in sub if n.op == "get_attr"}
    eliminate_dead_code(gm)
    _drop_orphan_attrs(gm, leaves)
    return True


def _drop_orphan_attrs(gm: fx.GraphModule, targets: set[str]) -> None:
    """Delete root-level tensors that the graph no longer reads (submodules go in finalize)."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for t in targets:
        if "." not in t and t not in read and hasattr(gm, t):
            delattr(gm, t)


def _subgraph(node: fx.Node, const: dict) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or not const.get(n):
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen
