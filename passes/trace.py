"""Capture an nn.Module as an fx.GraphModule with shapes and dtypes on every node.

symbolic_trace keeps module structure (Conv2d stays a call_module), which the passes want.
When it fails (data-dependent shapes, unsupported Python), torch.export's graph is the
fallback. When both fail, the error names the user's Python line that stopped tracing.
"""
from __future__ import annotations

import copy
import os
import traceback
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxpress.errors import TraceError

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Traced:
    gm: fx.GraphModule
    method: str  # "symbolic_trace" | "torch.export"
    fallback_reason: str | None = None


# fp32 noise: what a stage that claims to compute the same function may differ by (max abs error over
# max |reference|, see passes.manager.output_error).
LOSSLESS_RTOL = 1e-4


class _InplaceProxy(fx.Proxy):
    """A Proxy whose augmented assignments stay in place.

    fx.Proxy defines ``__add__`` but not ``__iadd__``, so Python runs ``x += 1`` on a proxy as
    ``x = x + 1``: a new node, while every other name bound to the same tensor (a closure's argument,
    a list entry) keeps the old value. Eager mutates the one tensor all of them see. torch.export's
    own ``nested_function`` example traced 54 % off that way. Recording ``operator.iadd`` keeps the
    aliasing: fx prints it as ``x += 1`` and the tensor is mutated when the graph runs.
    """


def _define_inplace(name: str) -> None:
    import operator

    target = getattr(operator, name)

    def impl(self, other):
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    impl.__name__ = f"__{name}__"
    setattr(_InplaceProxy, f"__{name}__", impl)


_AUGMENTED = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
              "ilshift", "irshift", "imatmul")
for _name in _AUGMENTED:
    _define_inplace(_name)


class _Tracer(fx.Tracer):
    # Keep the user's source line on each node so later errors can point at it.
    record_stack_traces = True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InplaceProxy(node, self)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def trace(model: nn.Module, example_inputs: tuple, reference: list[torch.Tensor] | None = None) -> Traced:
    """Trace ``model``; raise TraceError naming the offending line if no tracer can.

    With ``reference`` (the eager outputs on ``example_inputs``) each captured graph is also run and
    checked against it: a tracer can capture a graph that computes something else (Python semantics
    it does not model). A symbolic_trace graph that diverges falls back to torch.export, and the
    Traced's ``fallback_reason`` says so; when no tracer's graph matches, TraceError names the
    diverging output and what to try.
    """
    fx_err: BaseException | None = None
    fx_wrong: str | None = None
    try:
        gm = symbolic_trace(model)
        annotate_shapes(gm, clone_inputs(example_inputs))
        fx_wrong = _mismatch(gm, example_inputs, reference)
        if fx_wrong is None:
            return Traced(gm, "symbolic_trace")
    except Exception as e:  # noqa: BLE001 - any tracer failure means "try the fallback"
        fx_err = e
    fx_line = user_line(fx_err) if fx_err is not None else None
    why = (f"symbolic_trace failed at {fx_line}: {_first_line(fx_err)}" if fx_err is not None
           else f"symbolic_trace's graph {fx_wrong}, so it was not used")
    try:
        ep = torch.export.export(model, clone_inputs(example_inputs), strict=False)
        gm = ep.module()
        # torch.export's unlifted module is a GraphModule with pytree plumbing; re-trace
        # it into a plain GraphModule so passes see one consistent form.
        gm = _plain_graph_module(gm, clone_inputs(example_inputs))
        gm.train(model.training)  # make_fx's module starts in training mode; exporters warn about it
        annotate_shapes(gm, clone_inputs(example_inputs))
    except Exception as ex_err:  # noqa: BLE001
        line = user_line(ex_err) or fx_line
        raise TraceError(
            f"cannot trace {type(model).__name__}: the forward has Python control flow or an op that "
            f"neither torch.fx nor torch.export can capture.\n"
            f"  offending line: {line or '(unknown)'}\n"
            f"  torch.fx said: {_first_line(fx_err) if fx_err is not None else fx_wrong}\n"
            f"  torch.export said: {_first_line(ex_err)}\n"
            "What to do: if the branch depends on tensor values, use passes=['split_branches', ...] "
            "(dynamic-branch splitting) or rewrite it with torch.cond / torch.where."
        ) from ex_err
    ex_wrong = _mismatch(gm, example_inputs, reference)
    if ex_wrong is not None:
        raise TraceError(
            f"cannot trace {type(model).__name__} faithfully: no tracer's graph matches eager PyTorch on the "
            f"example inputs (fp32 tolerance {LOSSLESS_RTOL:g}).\n"
            f"  symbolic_trace: {why}\n"
            f"  torch.export: its graph {ex_wrong}\n"
            "What to do: look for Python the tracers cannot see (in-place updates of aliased locals, "
            "globals or attributes changed in forward, random ops, data-dependent branches); rewrite it "
            "functionally, or try passes=['split_branches', ...] for data-dependent branches.")
    return Traced(gm, "torch.export", why)


def clone_inputs(inputs: tuple) -> tuple:
    """Private copies, so a graph with in-place ops (``x += 1`` on an input) cannot change the caller's."""
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def _mismatch(gm: fx.GraphModule, example_inputs: tuple, reference: list[torch.Tensor] | None) -> str | None:
    """None when ``gm`` reproduces ``reference`` within LOSSLESS_RTOL, else what differs (for messages)."""
    if reference is None:
        return None
    from .graph import flatten_outputs
    from .measure import output_error

    with torch.no_grad():
        outs = [t.detach() for t in flatten_outputs(gm(*clone_inputs(example_inputs)))]
    try:
        _, rel = output_error(outs, reference)
    except Exception as e:  # noqa: BLE001 - a different output count/shape is a mismatch too
        return f"returns different outputs than eager ({e})"
    if rel <= LOSSLESS_RTOL:
        return None
    return f"differs from eager by relative error {rel:.3g}"


def _plain_graph_module(gm: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    if isinstance(gm, fx.GraphModule) and not hasattr(gm, "_in_spec"):
        return gm
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(gm, tracing_mode="real")(*example_inputs)


def annotate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> fx.GraphModule:
    """Run ShapeProp so every node carries ``meta['tensor_meta']`` (shape, dtype)."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*clone_inputs(example_inputs))  # a graph may update an input in place
    return gm


def copy_graph_module(gm: fx.GraphModule, share_weights: bool = False) -> fx.GraphModule:
    """A deep copy that keeps node metadata (shapes, stack traces).

    ``share_weights``: copy the graph and the module tree but not the tensors: each parameter becomes a
    new nn.Parameter over the same storage (so replacing it, ``.data =`` or ``requires_grad_`` on the
    copy leave the original alone), and buffers and tensor attributes are shared too, except those the
    graph itself writes in place when it runs (a counter a forward increments), which are cloned. An
    in-place write into a shared tensor reaches the original: the pass manager's WeightGuard
    (passes/instruments.py) detects that through the tensors' version counters.
    """
    memo = _shared_tensors(gm, buffers=True, skip=_written_attributes(gm)) if share_weights else {}
    new = copy.deepcopy(gm, memo)
    for a, b in zip(gm.graph.nodes, new.graph.nodes):
        for k, v in a.meta.items():
            b.meta.setdefault(k, v)
    return new


def copy_module(model: nn.Module, share_parameters: bool = False) -> nn.Module:
    """``copy.deepcopy(model)``; with ``share_parameters`` the copy's parameters are new nn.Parameter
    objects over the same storage (buffers, which a forward may update, and everything else are copied)."""
    return copy.deepcopy(model, _shared_tensors(model, buffers=False) if share_parameters else {})


def _shared_tensors(module: nn.Module, buffers: bool, skip: set[str] = frozenset()) -> dict[int, object]:
    """A deepcopy memo that maps each tensor of ``module`` to a view of the same storage (same version
    counter, so in-place writes stay detectable): parameters, and with ``buffers`` buffers and tensor
    attributes of modules in eval mode, except the qualified names in ``skip``."""
    memo: dict[int, object] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        tensors = list(mod._parameters.items())
        if buffers and not mod.training:  # a module in training mode updates its buffers (BatchNorm's statistics)
            tensors += list(mod._buffers.items()) + [(k, v) for k, v in vars(mod).items() if isinstance(v, torch.Tensor)]
        for name, t in tensors:
            if t is None or id(t) in memo or (f"{mod_name}.{name}" if mod_name else name) in skip:
                continue
            memo[id(t)] = (nn.Parameter(t.detach(), requires_grad=t.requires_grad)
                           if isinstance(t, nn.Parameter) else t.detach())
    return memo


def _written_attributes(gm: fx.GraphModule) -> set[str]:
    """Qualified names of the tensors (get_attr targets) the graph writes into when it runs: the first
    argument of an in-place node, followed back through the views and getitems it came from."""
    import operator

    from .graph import is_inplace

    augmented = {getattr(operator, n) for n in _AUGMENTED}
    written: set[str] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or not node.args:
            continue
        if not (is_inplace(gm, node) or (node.op == "call_function" and node.target in augmented)):
            continue
        src, seen = node.args[0], 0
        while isinstance(src, fx.Node) and src.op in ("call_function", "call_method") and src.args and seen < 64:
            src, seen = src.args[0], seen + 1  # views (x[0], x.view(...)) alias what they come from
        if isinstance(src, fx.Node) and src.op == "get_attr":
            written.add(str(src.target))
    return written


def user_line(err: BaseException) -> str | None:
    """The innermost traceback frame in user code (not torch, not fxpress), as 'file:line: code'."""
    found = None
    e: BaseException | None = err
    while e is not None:
        for fr in traceback.extract_tb(e.__traceback__):
            f = os.path.abspath(fr.filename)
            if f.startswith(_TORCH_DIR) or f.startswith(os.path.join(_OWN_DIR, "passes")) or f.startswith("<"):
                continue
            found = f"{fr.filename}:{fr.lineno}: {(fr.line or '').strip()}"
        e = e.__cause__ or e.__context__
        if found:
            break
    return found


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def node_source(node: fx.Node) -> str | None:
    """The user's source line a node came from, when tracing recorded it ('file:line: code')."""
    st = node.meta.get("stack_trace")
    if not st:
        return None
    lines = [ln.strip() for ln in st.strip().splitlines()]
    # The recorded trace runs from the user's frame into torch.fx internals: take the first
    # frame outside torch.
    for i, ln in enumerate(lines):
        if ln.startswith("File ") and _TORCH_DIR not in ln:
            code = lines[i + 1] if i + 1 < len(lines) else ""
            parts = ln.split('"')
            where = f"{parts[1]}:{ln.split('line ')[1].split(',')[0]}" if len(parts) > 2 and "line " in ln else ln
            return f"{where}: {code}"
    return None
