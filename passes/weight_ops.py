"""One view of the weight-bearing ops of a graph, whatever tracer produced it.

A Linear or a convolution reaches the passes in many spellings: an ``nn.Linear`` / ``nn.Conv*`` module
(symbolic_trace), ``F.linear`` / ``F.conv*`` on parameters, ``aten.linear`` / ``aten.convolution``, or the
decomposed forms torch.export's re-trace hands over: ``aten.addmm(b, x, aten.t(W))``, ``aten.mm(x, t(W))``,
``matmul(x, W.t())``, and Hugging Face's ``Conv1D`` (``addmm(b, x, W)`` with ``W: [in, out]``).
``find_weight_ops`` recognises each by what it computes (one operand a stored tensor, the other an
activation) and returns a ``WeightOp`` per call site with the weight in one layout (Linear ``[out, in]``,
convolution ``[out, in/groups, *kernel]``), its bias, its input node and its geometry. Ops that look like a
layer but are not one (a weight computed from activations, a weight on the left of a matmul, a batched
weight) come back as near misses with the reason, so a pass can tell the user why it left them.

``lift_to_modules`` then rewrites every functional / ATen Linear and convolution into a call of a real
``nn.Linear`` / ``nn.Conv{1,2,3}d`` / ``nn.ConvTranspose{1,2,3}d`` submodule (sharing the stored tensor when
its layout already fits, so no weight is copied), and eval-mode ATen batch norms into ``nn.BatchNorm*d``.
After it, every pass sees one form: a ``call_module`` per layer, exactly what symbolic_trace gives. The
lift is exact (the module calls the same kernel on the same tensors) and runs before every pass
(``Pass.__call__``). See docs/passes/weight_ops.md for why this shape was chosen.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import drop_unused_attributes, unique_name  # noqa: F401 - re-exported

aten = torch.ops.aten

LINEAR = "linear"
CONV = "conv"
CONV_T = "conv_transpose"
EMBEDDING = "embedding"

_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONVT_MODULES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}

_LINEAR_FNS = {F.linear, aten.linear.default, torch._C._nn.linear}
_MM_FNS = {aten.mm.default, aten.matmul.default, torch.matmul, torch.mm, operator.matmul}
_MM_METHODS = {"matmul", "mm", "__matmul__"}
_ADDMM_FNS = {aten.addmm.default, torch.addmm}
_BMM_FNS = {aten.bmm.default, torch.bmm, aten.baddbmm.default, torch.baddbmm}
# (x, w, b, stride, padding, dilation, groups) signatures
_CONV_FNS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, aten.conv1d.default: 1, aten.conv2d.default: 2,
             aten.conv3d.default: 3, aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}
# (x, w, b, stride, padding, output_padding, groups, dilation)
_CONVT_FNS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3,
              aten.conv_transpose1d.default: 1, aten.conv_transpose2d.input: 2, aten.conv_transpose3d.input: 3}
_CONVOLUTION_FNS = {aten.convolution.default, aten._convolution.default}
_EMBEDDING_FNS = {aten.embedding.default: "aten", F.embedding: "F"}
_BN_FNS = {aten._native_batch_norm_legit_no_training.default, aten.native_batch_norm.default,
           aten.batch_norm.default}
# Ops that only move a stored tensor's elements: a chain of them over a parameter is still "the weight".
_LAYOUT_FNS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default, aten.reshape.default,
               aten._unsafe_view.default, aten.clone.default, aten.detach.default, aten.alias.default,
               aten.contiguous.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
               torch.t, torch.transpose, torch.permute, torch.reshape, operator.getitem}
_LAYOUT_METHODS = {"t", "transpose", "permute", "view", "reshape", "contiguous", "detach", "clone", "T"}
# What a weight may be computed by and still count as stored: layout ops and weight norm (HF Wav2Vec2's
# positional conv). Nothing else is evaluated, so an fxpress op (packed weights) is never made dense again,
# and other weight arithmetic is left for fuse's constant folding.
_CONST_FNS = _LAYOUT_FNS | {aten._weight_norm_interface.default, torch._weight_norm}


@dataclass
class ConvGeometry:
    dims: int                      # 1, 2 or 3 spatial dims
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    output_padding: tuple[int, ...] = ()

    def symmetric_padding(self, kernel: tuple[int, ...]) -> tuple[int, ...] | None:
        """Integer padding per spatial dim, or None for an asymmetric 'same' (even kernel)."""
        p = self.padding
        if isinstance(p, str):
            if p == "valid":
                return (0,) * self.dims
            total = [d * (k - 1) for k, d in zip(kernel, self.dilation)]
            return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
        return tuple(p)


@dataclass
class WeightOp:
    """One call site of a weight-bearing op."""

    node: fx.Node
    kind: str                      # LINEAR | CONV | CONV_T | EMBEDDING
    form: str                      # how the graph spells it: "nn.Linear", "aten.addmm(b, x, t(W))", ...
    label: str                     # for the report: module path, parameter path, or node name + shape
    key: str                       # call sites sharing weights share the key
    x: fx.Node | None              # the activation input (indices for an embedding)
    weight: torch.Tensor           # Linear [out, in]; conv [out, in/groups, *k]; ConvT [in, out/groups, *k]
    bias: torch.Tensor | None
    module: nn.Module | None = None
    conv: ConvGeometry | None = None
    # The stored tensor(s) the weight / bias came from, unchanged in layout, or None when the weight
    # is a transposed / computed value (lifting then stores a copy).
    weight_param: torch.Tensor | None = None
    bias_param: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[1] * self.conv.groups if self.kind == CONV_T else self.weight.shape[0]

    @property
    def weight_params(self) -> int:
        return self.weight.numel()

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.weight.shape)
        kind = {CONV: f"conv{self.conv.dims}d" if self.conv else "conv",
                CONV_T: f"conv_transpose{self.conv.dims}d" if self.conv else "conv_transpose"}.get(self.kind, self.kind)
        return f"{kind} {shape} ({self.form})"


@dataclass
class Scan:
    """Everything ``find_weight_ops`` saw."""

    ops: list[WeightOp] = field(default_factory=list)
    near_misses: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason)
    seen: Counter = field(default_factory=Counter)  # call targets in the graph, for "nothing found" notes

    def layers(self, kinds=(LINEAR, CONV)) -> list[WeightOp]:
        return [w for w in self.ops if w.kind in kinds]

    def nothing_found(self) -> str:
        top = ", ".join(f"{k} x{v}" for k, v in self.seen.most_common(8))
        return f"no weight-bearing op found (the graph calls: {top or 'nothing'})"


# ----------------------------------------------------------------------------- constants

class _Consts:
    """Values of nodes computed from stored tensors only (parameters, buffers, constants)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.memo: dict[fx.Node, Any] = {}

    def attr(self, target: str):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def value(self, a, depth: int = 0):
        """The value of argument ``a`` when it depends on no graph input, else None (non-tensors pass through)."""
        if not isinstance(a, fx.Node):
            if isinstance(a, (list, tuple)):
                vals = [self.value(v, depth) for v in a]
                return None if any(v is None and isinstance(x, fx.Node) for v, x in zip(vals, a)) else type(a)(vals)
            return a
        if a in self.memo:
            return self.memo[a]
        v = None
        if a.op == "get_attr":
            v = self.attr(a.target)
        elif depth < 12 and ((a.op == "call_function" and a.target in _CONST_FNS) or
                             (a.op == "call_method" and a.target in _LAYOUT_METHODS)) and not _impure(a):
            args = [self.value(x, depth + 1) for x in a.args]
            kwargs = {k: self.value(x, depth + 1) for k, x in a.kwargs.items()}
            if not any(x is None and isinstance(y, fx.Node) for x, y in zip(args, a.args)) and \
                    not any(kwargs[k] is None and isinstance(y, fx.Node) for k, y in a.kwargs.items()):
                try:
                    with torch.no_grad():
                        if a.op == "call_method":
                            v = getattr(args[0], a.target)(*args[1:], **kwargs)
                        else:
                            v = a.target(*args, **kwargs)
                except Exception:  # noqa: BLE001 - not evaluable here: treat as not constant
                    v = None
        self.memo[a] = v
        return v

    def tensor(self, a) -> torch.Tensor | None:
        v = self.value(a)
        return v if isinstance(v, torch.Tensor) else None

    def stored(self, a) -> torch.Tensor | None:
        """The stored tensor itself when ``a`` is a plain get_attr (so a lifted module can share it)."""
        if isinstance(a, fx.Node) and a.op == "get_attr":
            v = self.attr(a.target)
            return v if isinstance(v, torch.Tensor) else None
        return None

    def transposed_stored(self, a) -> torch.Tensor | None:
        """The stored [out, in] tensor when ``a`` is ``t(W)`` / ``W.t()`` / ``transpose(W, 0, 1)`` of a get_attr."""
        if not isinstance(a, fx.Node) or not a.args:
            return None
        is_t = (a.op == "call_function" and a.target in (aten.t.default, torch.t)) or \
            (a.op == "call_method" and a.target == "t") or \
            (a.target in (aten.transpose.int, torch.transpose, "transpose") and sorted(a.args[1:3]) in ([0, 1], [-2, -1],
                                                                                                        [-1, 0]))
        w = self.stored(a.args[0]) if is_t else None
        return w if w is not None and w.dim() == 2 else None


def _impure(n: fx.Node) -> bool:
    if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
        if n.target._schema.is_mutable or "rand" in n.target._schema.name or "dropout" in n.target._schema.name:
            return True
    return n.is_impure()


def _param_name(n) -> str | None:
    """'encoder.layer.0.query' for a get_attr 'encoder.layer.0.query.weight' (None when anonymous)."""
    while isinstance(n, fx.Node) and n.op != "get_attr" and n.args:
        n = n.args[0]
    if not isinstance(n, fx.Node) or n.op != "get_attr":
        return None
    t = str(n.target)
    if t.startswith("_param_constant") or t.startswith("_tensor_constant") or "." not in t and t.startswith("_"):
        return None
    return t.rsplit(".", 1)[0] if t.endswith((".weight", ".bias")) else t


def _weight_key(n) -> str:
    while isinstance(n, fx.Node) and n.op != "get_attr" and n.args:
        n = n.args[0]
    return str(n.target) if isinstance(n, fx.Node) else repr(n)


def _tuple(v, dims: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * dims
    v = tuple(int(i) for i in v)
    return v * dims if len(v) == 1 and dims > 1 else v


# ----------------------------------------------------------------------------- scanning

def find_weight_ops(gm: fx.GraphModule) -> Scan:
    """Every weight-bearing op of ``gm`` in graph order, plus near misses with their reasons."""
    scan = Scan()
    consts = _Consts(gm)
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        scan.seen[_target_name(gm, n)] += 1
        try:
            found = _match(gm, n, consts)
        except Exception as e:  # noqa: BLE001 - an odd node must not stop the scan; say what happened
            found = f"not recognised as a layer ({type(e).__name__}: {e})"
        if isinstance(found, WeightOp):
            scan.ops.append(found)
        elif isinstance(found, str):
            scan.near_misses.append((n.name, found))
    return scan


def _target_name(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    if n.op == "call_method":
        return f".{n.target}()"
    t = n.target
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def _arg(n: fx.Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _match(gm: fx.GraphModule, n: fx.Node, c: _Consts) -> WeightOp | str | None:
    if n.op == "call_module":
        return _match_module(gm, n)
    t = n.target
    if n.op == "call_method":
        if t in _MM_METHODS and len(n.args) == 2:
            return _match_mm(n, n.args[0], n.args[1], None, f".{t}()", c)
        if t == "addmm" and len(n.args) == 3:
            return _match_mm(n, n.args[1], n.args[2], n.args[0], ".addmm()", c)
        return None
    if t in _LINEAR_FNS:
        x, w, b = _arg(n, 0, "input"), _arg(n, 1, "weight"), _arg(n, 2, "bias")
        wt = c.tensor(w)
        if wt is None or wt.dim() != 2:
            return "linear whose weight is computed in the graph, not a stored tensor (fuse folds constant weights)"
        bt = c.tensor(b) if b is not None else None
        if b is not None and bt is None:
            return "linear whose bias is computed in the graph"
        form = "F.linear" if t is F.linear or t is torch._C._nn.linear else "aten.linear"
        return _linear(n, x, wt, bt, form, c.stored(w), c.stored(b) if b is not None else None, w, b)
    if t in _ADDMM_FNS:
        if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
            return "addmm with beta/alpha != 1"
        return _match_mm(n, _arg(n, 1, "mat1"), _arg(n, 2, "mat2"), _arg(n, 0, "input"), _target_name(gm, n), c)
    if t in _MM_FNS and len(n.args) == 2:
        return _match_mm(n, n.args[0], n.args[1], None, _target_name(gm, n), c)
    if t in _BMM_FNS:
        ops = [a for a in n.args[:3] if isinstance(a, fx.Node)]
        if any(c.tensor(a) is not None for a in ops):
            return "bmm with a stored operand (a batched weight, not one Linear): left alone"
        return None
    if t in _CONV_FNS or t in _CONVT_FNS or t in _CONVOLUTION_FNS:
        return _match_conv(n, c)
    if t in _EMBEDDING_FNS:
        w, ids = (_arg(n, 0, "weight"), _arg(n, 1, "indices")) if _EMBEDDING_FNS[t] == "aten" else \
            (_arg(n, 1, "weight"), _arg(n, 0, "input"))
        wt = c.tensor(w)
        if wt is None:
            return None
        return WeightOp(n, EMBEDDING, f"{_EMBEDDING_FNS[t]}.embedding", _param_name(w) or f"{n.name}[{_shape(wt)}]",
                        _weight_key(w), ids if isinstance(ids, fx.Node) else None, wt, None, weight_param=c.stored(w))
    return None


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape)


def _match_module(gm: fx.GraphModule, n: fx.Node) -> WeightOp | str | None:
    mod = gm.get_submodule(n.target)
    x = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    name = type(mod).__name__
    if isinstance(mod, nn.Linear):
        return WeightOp(n, LINEAR, f"nn.{name}" if type(mod) is nn.Linear else name, str(n.target), str(n.target), x,
                        mod.weight, mod.bias, mod, weight_param=mod.weight, bias_param=mod.bias)
    for table, kind in ((_CONV_MODULES, CONV), (_CONVT_MODULES, CONV_T)):
        dims = next((d for cls, d in table.items() if isinstance(mod, cls)), None)
        if dims is not None:
            if mod.padding_mode != "zeros":
                return f"{name} with padding_mode={mod.padding_mode!r}: only zero padding is rewritten"
            geo = ConvGeometry(dims, tuple(mod.stride), mod.padding if isinstance(mod.padding, str) else tuple(mod.padding),
                               tuple(mod.dilation), mod.groups, tuple(getattr(mod, "output_padding", ()) or ()))
            return WeightOp(n, kind, f"nn.{name}", str(n.target), str(n.target), x, mod.weight, mod.bias, mod, geo,
                            weight_param=mod.weight, bias_param=mod.bias)
    if isinstance(mod, nn.Embedding):
        return WeightOp(n, EMBEDDING, "nn.Embedding", str(n.target), str(n.target), x, mod.weight, None, mod,
                        weight_param=mod.weight)
    return None


def _linear(n, x, w, b, form, w_param, b_param, w_node, b_node) -> WeightOp | str:
    if not isinstance(x, fx.Node):
        return "linear whose input is not a graph value"
    if b is not None and b.numel() != w.shape[0]:
        return f"bias of {b.numel()} values for {w.shape[0]} outputs"
    label = _param_name(w_node) or f"{n.name}[{_shape(w)}]"
    return WeightOp(n, LINEAR, form, label, _weight_key(w_node) + ("^T" if w_param is None else ""), x, w,
                    b.reshape(-1) if b is not None else None, weight_param=w_param,
                    bias_param=b_param if b_param is not None and b_param.dim() == 1 else None)


def _match_mm(n, a, w, b, form, c: _Consts) -> WeightOp | str | None:
    """``a @ w (+ b)`` is a Linear when ``w`` is a stored 2-D tensor (any layout) and ``a`` an activation."""
    at, wt = c.tensor(a), c.tensor(w)
    if wt is None:
        if at is not None and isinstance(w, fx.Node):
            return f"{form} with the stored operand on the left (W @ x): not rewritten as a layer"
        return None  # activation x activation (attention): not a weight op
    if at is not None:
        return None  # constant x constant: folding's job
    if wt.dim() != 2:
        return f"{form} with a {wt.dim()}-D stored operand: not one Linear"
    bt = None
    if b is not None:
        bt = c.tensor(b)
        if bt is None:
            return f"{form} whose added term is computed in the graph"
        if bt.numel() != wt.shape[1]:
            return f"{form} whose added term ({_shape(bt)}) is not a per-output bias"
    stored_t = c.transposed_stored(w)  # x @ t(W): W is already [out, in]
    if stored_t is not None:
        weight, w_param, how = stored_t, stored_t, f"{form}(x, t(W))"
    else:
        weight, w_param = wt.t(), None
        how = f"{form}(x, W) with W [in, out]" + (" (HF Conv1D)" if b is not None and c.stored(w) is not None else "")
    b_param = c.stored(b) if b is not None else None
    return _linear(n, a, weight, bt, how, w_param, b_param, w, b)


def _match_conv(n: fx.Node, c: _Consts) -> WeightOp | str | None:
    t = n.target
    x, w, b = _arg(n, 0, "input"), _arg(n, 1, "weight"), _arg(n, 2, "bias")
    wt = c.tensor(w)
    if wt is None:
        return "convolution whose weight is computed in the graph, not a stored tensor (fuse folds constant weights)"
    bt = c.tensor(b) if b is not None else None
    if b is not None and bt is None:
        return "convolution whose bias is computed in the graph"
    if t in _CONVOLUTION_FNS:
        dims = wt.dim() - 2
        transposed = bool(_arg(n, 6, "transposed"))
        geo = ConvGeometry(dims, _tuple(_arg(n, 3, "stride"), dims), _tuple(_arg(n, 4, "padding"), dims),
                           _tuple(_arg(n, 5, "dilation"), dims), int(_arg(n, 8, "groups")),
                           _tuple(_arg(n, 7, "output_padding"), dims))
        form = str(t.overloadpacket.__name__ if hasattr(t, "overloadpacket") else t)
        form = f"aten.{form}"
    elif t in _CONV_FNS:
        dims, transposed = _CONV_FNS[t], False
        pad = _arg(n, 4, "padding", 0)
        geo = ConvGeometry(dims, _tuple(_arg(n, 3, "stride", 1), dims), pad if isinstance(pad, str) else _tuple(pad, dims),
                           _tuple(_arg(n, 5, "dilation", 1), dims), int(_arg(n, 6, "groups", 1)))
        form = f"F.conv{dims}d" if t in (F.conv1d, F.conv2d, F.conv3d) else f"aten.conv{dims}d"
    else:
        dims, transposed = _CONVT_FNS[t], True
        geo = ConvGeometry(dims, _tuple(_arg(n, 3, "stride", 1), dims), _tuple(_arg(n, 4, "padding", 0), dims),
                           _tuple(_arg(n, 7, "dilation", 1), dims), int(_arg(n, 6, "groups", 1)),
                           _tuple(_arg(n, 5, "output_padding", 0), dims))
        form = f"conv_transpose{dims}d"
    if wt.dim() != dims + 2 or not isinstance(x, fx.Node):
        return f"{form} with a {wt.dim()}-D weight for {dims} spatial dims"
    label = _param_name(w) or f"{n.name}[{_shape(wt)}]"
    return WeightOp(n, CONV_T if transposed else CONV, form, label, _weight_key(w), x, wt, bt, None, geo,
                    weight_param=c.stored(w), bias_param=c.stored(b) if b is not None else None)


# ----------------------------------------------------------------------------- roles

def stems_and_heads(gm: fx.GraphModule, ops: list[WeightOp]) -> tuple[set[str], set[str]]:
    """Node names of the *stem* layers (no other weight op upstream of them: the first conv on pixels /
    audio, a patch embedding) and of the *head* (the last layer in graph order).

    These, with embeddings, are what the passes' ``keep_first_last`` default keeps dense and what the
    coverage numbers leave out of "body" layers.
    """
    weight_nodes = {w.node for w in ops}
    behind: dict[fx.Node, bool] = {}  # node -> some weight op is among its ancestors
    for n in gm.graph.nodes:
        behind[n] = any(behind.get(a, False) or a in weight_nodes for a in n.all_input_nodes)
    layers = [w for w in ops if w.kind in (LINEAR, CONV, CONV_T)]
    stems = {w.node.name for w in layers if not behind.get(w.node, False)}
    heads = {layers[-1].node.name} if layers else set()
    return stems, heads


# ----------------------------------------------------------------------------- lifting

def lift_to_modules(gm: fx.GraphModule, scan: Scan | None = None) -> list[str]:
    """Rewrite functional / ATen Linears, convolutions and eval batch norms as ``call_module`` of real
    modules. Call sites that share a weight share the module. Returns the new module names.

    Exact: each module computes its op with the same kernel on the same values.
    """
    scan = scan or find_weight_ops(gm)
    made: dict[str, str] = {}
    replaced: dict[fx.Node, fx.Node] = {}  # a lifted layer feeding the next one
    for w in scan.ops:
        if w.module is not None or w.kind not in (LINEAR, CONV, CONV_T):
            continue
        if w.kind == CONV and w.conv.padding == "same" and w.conv.symmetric_padding(tuple(w.weight.shape[2:])) is None:
            continue  # nn.Conv with an asymmetric 'same' pads the same way; keep the functional call
        name = made.get(w.key)
        if name is None:
            name = unique_name(gm, (w.label.split("[")[0] if "[" in w.label else w.label) or "layer")
            gm.add_submodule(name, _module_for(w))
            made[w.key] = name
        with gm.graph.inserting_before(w.node):
            new = gm.graph.call_module(name, (replaced.get(w.x, w.x),))
        new.meta.update({k: v for k, v in w.node.meta.items() if k in ("tensor_meta", "stack_trace", "val")})
        w.node.replace_all_uses_with(new)
        gm.graph.erase_node(w.node)
        replaced[w.node] = new
    made_bn = _lift_batch_norms(gm)
    shared = _share_identical_layout_nodes(gm) if made else 0
    if made or made_bn or shared:
        drop_dead_weight_nodes(gm)
        gm.recompile()
    return list(made.values()) + made_bn


def _share_identical_layout_nodes(gm: fx.GraphModule) -> int:
    """One node for identical reshapes of one tensor: torch.export gives Q, K and V each their own
    ``view(h, [16, 64])``, which hides that they read the same input (fuse merges parallel Linears)."""
    seen: dict[tuple, fx.Node] = {}
    merged = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in _LAYOUT_FNS or n.target is operator.getitem:
            continue
        key = (n.target, repr(n.args), repr(sorted(n.kwargs.items())), tuple(id(a) for a in n.all_input_nodes))
        first = seen.setdefault(key, n)
        if first is not n:
            n.replace_all_uses_with(first)
            gm.graph.erase_node(n)
            merged += 1
    return merged


def _param(t: torch.Tensor | None, value: torch.Tensor) -> nn.Parameter:
    """The stored tensor itself when it is a Parameter with the right layout, else a copy."""
    if isinstance(t, nn.Parameter) and t.shape == value.shape:
        return t
    return nn.Parameter(value.detach().contiguous().clone(), requires_grad=False)


def _module_for(w: WeightOp) -> nn.Module:
    dev, dt = w.weight.device, w.weight.dtype
    if w.kind == LINEAR:
        m = nn.Linear(w.weight.shape[1], w.weight.shape[0], bias=w.bias is not None, device="meta")
    else:
        g = w.conv
        k = tuple(w.weight.shape[2:])
        if w.kind == CONV:
            cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[g.dims]
            m = cls(w.weight.shape[1] * g.groups, w.weight.shape[0], k, g.stride, g.padding, g.dilation, g.groups,
                    bias=w.bias is not None, device="meta")
        else:
            cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[g.dims]
            m = cls(w.weight.shape[0], w.weight.shape[1] * g.groups, k, g.stride, g.padding, g.output_padding, g.groups,
                    bias=w.bias is not None, dilation=g.dilation, device="meta")
    m.weight = _param(w.weight_param, w.weight.to(dev, dt))
    if w.bias is not None:
        m.bias = _param(w.bias_param, w.bias.reshape(-1).to(dev))
    return m.eval()


def _lift_batch_norms(gm: fx.GraphModule) -> list[str]:
    """aten eval batch norm (``_native_batch_norm_legit_no_training`` / ``native_batch_norm(training=False)``)
    whose only used output is the normalized tensor → ``nn.BatchNorm{1,2,3}d`` (fuse / quantize fold it)."""
    c = _Consts(gm)
    made = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in _BN_FNS:
            continue
        a = list(n.args)
        if n.target is aten.batch_norm.default:
            if len(a) < 8 or a[5]:
                continue
            x, w, b, rm, rv, eps, out = a[0], a[1], a[2], a[3], a[4], a[7], n
        else:
            if n.target is aten.native_batch_norm.default:
                if len(a) < 8 or a[5]:
                    continue
                x, w, b, rm, rv, eps = a[0], a[1], a[2], a[3], a[4], a[7]
            else:
                x, w, b, rm, rv, eps = a[0], a[1], a[2], a[3], a[4], a[6]
            users = list(n.users)
            if not all(u.target is operator.getitem for u in users):
                continue
            firsts = [u for u in users if u.args[1] == 0]
            if len(firsts) != 1 or any(len(u.users) for u in users if u.args[1] != 0):
                continue
            out = firsts[0]
        ts = [c.tensor(v) if v is not None else None for v in (w, b, rm, rv)]
        shape = getattr(x.meta.get("tensor_meta"), "shape", None) if isinstance(x, fx.Node) else None
        if ts[2] is None or ts[3] is None or shape is None or len(shape) not in (2, 3, 4, 5) or \
                (w is not None and ts[0] is None) or (b is not None and ts[1] is None):
            continue
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
        bn = cls(ts[2].numel(), eps=float(eps), affine=ts[0] is not None or ts[1] is not None)
        with torch.no_grad():
            bn.running_mean.copy_(ts[2])
            bn.running_var.copy_(ts[3])
            if bn.affine:
                bn.weight = _param(c.stored(w), ts[0] if ts[0] is not None else torch.ones_like(ts[2]))
                bn.bias = _param(c.stored(b), ts[1] if ts[1] is not None else torch.zeros_like(ts[2]))
        name = unique_name(gm, (_param_name(w) or _param_name(rm) or "batch_norm"))
        gm.add_submodule(name, bn.eval())
        with gm.graph.inserting_before(n):
            new = gm.graph.call_module(name, (x,))
        new.meta.update({k: v for k, v in out.meta.items() if k in ("tensor_meta", "stack_trace", "val")})
        out.replace_all_uses_with(new)
        if out is not n:
            for u in list(n.users):
                gm.graph.erase_node(u)
        gm.graph.erase_node(n)
        made.append(name)
    return made


def drop_dead_weight_nodes(gm: fx.GraphModule) -> None:
    """Remove get_attr / layout-only nodes nobody reads (left behind when a layer was replaced)."""
    changed = True
    while changed:
        changed = False
        for n in reversed(list(gm.graph.nodes)):
            if n.users or n.op == "output" or n.op == "placeholder":
                continue
            if n.op == "get_attr" or (n.op == "call_function" and n.target in _LAYOUT_FNS) or \
                    (n.op == "call_method" and n.target in _LAYOUT_METHODS):
                gm.graph.erase_node(n)
                changed = True


# ----------------------------------------------------------------------------- replacing

def replace_weight_op(gm: fx.GraphModule, w: WeightOp, build: Callable[[fx.Graph, fx.Node], fx.Node],
                      as_2d: bool = True) -> fx.Node:
    """Replace call site ``w`` with what ``build(graph, x)`` inserts; returns the new output node.

    A 1-D convolution is handed to ``build`` as a 2-D one (``x.unsqueeze(2)``, kernel ``1 x k``) and its
    output squeezed back, so ops written for Conv2d serve Conv1d unchanged (see ``as_conv2d``).
    """
    g = gm.graph
    with g.inserting_before(w.node):
        x = w.x
        conv1d = as_2d and w.kind in (CONV, CONV_T) and w.conv.dims == 1
        if conv1d:
            x = g.call_function(torch.unsqueeze, (x, 2))
        new = build(g, x)
        out = g.call_function(torch.squeeze, (new, 2)) if conv1d else new
    for k in ("tensor_meta", "stack_trace"):
        if k in w.node.meta:
            out.meta[k] = w.node.meta[k]
    w.node.replace_all_uses_with(out)
    g.erase_node(w.node)
    return out


def as_conv2d(w: WeightOp) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """A 1-D or 2-D convolution as a 2-D one: (weight [out, in/g, kh, kw], geometry with 2-tuples), or
    None when the padding is an asymmetric 'same'."""
    g = w.conv
    k = tuple(w.weight.shape[2:])
    pad = g.symmetric_padding(k)
    if pad is None or g.dims not in (1, 2):
        return None
    if g.dims == 1:
        return w.weight.unsqueeze(2), dict(stride=[1, g.stride[0]], padding=[0, pad[0]], dilation=[1, g.dilation[0]],
                                           groups=g.groups, kernel=(1, k[0]))
    return w.weight, dict(stride=list(g.stride), padding=list(pad), dilation=list(g.dilation), groups=g.groups,
                          kernel=k)
