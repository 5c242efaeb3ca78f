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


class _Tracer(fx.Tracer):
    # Keep the user's source line on each node so later errors can point at it.
    record_stack_traces = True


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def trace(model: nn.Module, example_inputs: tuple) -> Traced:
    """Trace ``model``; raise TraceError naming the offending line if no tracer can."""
    try:
        gm = symbolic_trace(model)
        annotate_shapes(gm, example_inputs)
        return Traced(gm, "symbolic_trace")
    except Exception as fx_err:  # noqa: BLE001 - any tracer failure means "try the fallback"
        fx_line = user_line(fx_err)
        try:
            ep = torch.export.export(model, example_inputs, strict=False)
            gm = ep.module()
            # torch.export's unlifted module is a GraphModule with pytree plumbing; re-trace
            # it into a plain GraphModule so passes see one consistent form.
            gm = _plain_graph_module(gm, example_inputs)
            gm.train(model.training)  # make_fx's module starts in training mode; exporters warn about it
            annotate_shapes(gm, example_inputs)
            return Traced(gm, "torch.export", f"symbolic_trace failed at {fx_line}: {_first_line(fx_err)}")
        except Exception as ex_err:  # noqa: BLE001
            line = user_line(ex_err) or fx_line
            raise TraceError(
                f"cannot trace {type(model).__name__}: the forward has Python control flow or an op that "
                f"neither torch.fx nor torch.export can capture.\n"
                f"  offending line: {line or '(unknown)'}\n"
                f"  torch.fx said: {_first_line(fx_err)}\n"
                f"  torch.export said: {_first_line(ex_err)}\n"
                "What to do: if the branch depends on tensor values, use passes=['split_branches', ...] "
                "(dynamic-branch splitting) or rewrite it with torch.cond / torch.where."
            ) from ex_err


def _plain_graph_module(gm: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    if isinstance(gm, fx.GraphModule) and not hasattr(gm, "_in_spec"):
        return gm
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(gm, tracing_mode="real")(*example_inputs)


def annotate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> fx.GraphModule:
    """Run ShapeProp so every node carries ``meta['tensor_meta']`` (shape, dtype)."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    return gm


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy that keeps node metadata (shapes, stack traces)."""
    new = copy.deepcopy(gm)
    for a, b in zip(gm.graph.nodes, new.graph.nodes):
        for k, v in a.meta.items():
            b.meta.setdefault(k, v)
    return new


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
