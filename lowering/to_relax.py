"""FX GraphModule → TVM Relax IRModule, via torch.export and TVM's exported-program importer.

Parameters stay function inputs (``keep_params_as_input``) and travel beside the library as an
.npz, so the compiled library holds code only and compressed weights are never constant-folded
back into dense matrices. Every op is checked against the importer's table first, so an
unsupported op is reported with its node and the user's source line instead of a bare
AssertionError from inside TVM.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from fxpress.errors import LoweringError
from fxpress.passes.trace import node_source

from .registry import relax_converters
from .index_checks import INDEX_CONVERTERS, guard_indices
from .torch_semantics import (NAN_CONVERTERS, _with_importer, ascending_aranges, nonnegative_selects, promote_dtypes,
                              views_as_reshapes)


@dataclass
class RelaxModule:
    mod: "tvm.IRModule"  # noqa: F821 - tvm is imported lazily
    params: list[np.ndarray]  # may be views of the lowered graph's (and so the caller's) tensors: read only
    param_names: list[str]
    num_inputs: int
    ir_text: str = ""
    notes: list[str] = field(default_factory=list)


def batch_dynamic_shapes(example_inputs: tuple):
    """torch.export ``dynamic_shapes`` making dim 0 of every input one shared symbolic batch size."""
    from torch.export import Dim

    # No upper bound: the importer turns one into tir_var_upper_bound, and memory planning then
    # allocates every buffer for the largest batch (std::bad_alloc).
    batch = Dim("batch", min=1)
    return [{0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs]


def export_program(gm: torch.nn.Module, example_inputs: tuple, dynamic_batch: bool = False) -> torch.export.ExportedProgram:
    """``dynamic_batch``: capture dim 0 of every input as one symbolic size. Raises torch's error
    (not a LoweringError) when the graph fixes the batch, so the caller can fall back to static shapes."""
    if dynamic_batch:
        ep = torch.export.export(views_as_reshapes(gm), tuple(example_inputs), strict=False,
                                 dynamic_shapes=batch_dynamic_shapes(example_inputs))
        return ep.run_decompositions()
    try:
        ep = torch.export.export(views_as_reshapes(gm), tuple(example_inputs), strict=False)
        return ep.run_decompositions()
    except Exception as e:  # noqa: BLE001
        raise LoweringError(f"torch.export could not capture the graph for lowering: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _origin(ep_node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The node of ``gm`` an exported node came from (torch.export records provenance)."""
    sources = ep_node.meta.get("from_node") or []
    if not sources:
        return None
    src = sources[-1]
    while getattr(src, "from_node", None):
        src = src.from_node[-1]
    by_name = {n.name: n for n in gm.graph.nodes}
    return by_name.get(src.name)


def _describe(ep_node: fx.Node, gm) -> str:
    """'node NAME at FILE:LINE: CODE' for the user's node an exported node came from."""
    origin = _origin(ep_node, gm) if isinstance(gm, fx.GraphModule) else None
    if origin is None:
        return f"node '{ep_node.name}'"
    where = node_source(origin)
    return f"node '{origin.name}'" + (f" at {where}" if where else "")


def check_supported(ep: torch.export.ExportedProgram, gm: fx.GraphModule, custom: dict) -> None:
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    known = set(ExportedProgramImporter().convert_map) | set(custom)
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target.__name__ in known:
            continue
        origin = _origin(node, gm) if isinstance(gm, fx.GraphModule) else None
        where = node_source(origin) if origin is not None else None
        raise LoweringError(
            f"op {node.target} (node '{origin.name if origin is not None else node.name}') is not supported by "
            f"TVM's Relax importer.\n  source: {where or '(unknown)'}\n"
            "What to do: compile with target='onnx' or target='torch', replace the op in the model, or "
            "register a converter with fxpress.lowering.register_relax_converter."
        )


def expand_alpha(ep: torch.export.ExportedProgram) -> None:
    """Rewrite ``add/sub(x, y, alpha=a)`` as ``add/sub(x, y * a)`` in place.

    TVM 0.27's Relax importer drops the ``alpha`` keyword of aten.add/sub (``torch.add(x, y, alpha=0.5)``
    silently became ``x + y``); found by tests/test_fuzz.py.
    """
    aten = torch.ops.aten
    graph = ep.graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.add.Tensor, aten.sub.Tensor):
            continue
        alpha = node.kwargs.get("alpha", 1)
        if alpha == 1 or len(node.args) < 2:
            continue
        other = node.args[1]
        with graph.inserting_before(node):
            if isinstance(other, fx.Node):
                scaled = graph.call_function(aten.mul.Tensor, (other, alpha))
                scaled.meta.update({k: v for k, v in other.meta.items() if k == "val"})
            else:
                scaled = other * alpha
        node.args = (node.args[0], scaled, *node.args[2:])
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "alpha"}
        changed = True
    if changed:
        ep.graph_module.recompile()


def to_relax(gm: torch.nn.Module, example_inputs: tuple, dynamic_batch: bool = False,
             check_indices: bool = True) -> RelaxModule:
    """``check_indices``: bounds-check index operands in compiled CPU loops (lowering/index_checks.py);
    off for GPU targets, where that loop would need a thread binding."""
    import tvm  # noqa: F401 - imported here so that importing fxpress.lowering stays light
    from tvm import relax
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    ep = export_program(gm, example_inputs, dynamic_batch)
    expand_alpha(ep)
    ascending_aranges(ep.graph_module)
    nonnegative_selects(ep.graph_module)
    promote_dtypes(ep.graph_module)
    if check_indices:
        guard_indices(ep.graph_module, lambda node: _describe(node, gm))
    # every custom converter also works inside torch.cond branches (called there without the importer)
    custom = {k: _with_importer(v) for k, v in {**NAN_CONVERTERS, **INDEX_CONVERTERS, **relax_converters()}.items()}
    check_supported(ep, gm, custom)
    try:
        mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=False,
                                    custom_convert_map=custom, run_ep_decomposition=False)
    except Exception as e:  # noqa: BLE001
        raise LoweringError(f"TVM's Relax importer failed: {type(e).__name__}: {e}") from e
    mod, params = detach_params(mod)
    # The importer marks main with num_input; fxpress.lower sets it again when it wants the build to
    # lift weight-only work (and then applies BuiltModule.transform_params). Without it, build(mod)
    # takes exactly these params.
    if mod["main"].attrs is not None and "num_input" in mod["main"].attrs:
        mod["main"] = mod["main"].without_attr("num_input")
    tensors = params.get("main", [])
    names = [p.name for p in mod["main"].params[len(example_inputs):]]
    from fxpress.runtime.backends import tvm_tensor_as_numpy

    # Views of the graph's own tensors (the importer takes them through DLPack, and the export shares the
    # graph's weights): no copy here. BuiltModule.transform_params makes the build's own copy.
    arrays = [tvm_tensor_as_numpy(t) for t in tensors]
    return RelaxModule(mod=mod, params=arrays, param_names=names, num_inputs=len(example_inputs),
                       ir_text=mod.script(show_meta=False))
