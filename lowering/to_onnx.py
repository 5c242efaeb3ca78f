"""FX GraphModule → ONNX model file, valid under onnx.checker and loadable by ONNX Runtime.

Uses torch's dynamo exporter with fxpress's custom ops translated through the registry, then pins
the IR version: onnx 1.23 writes IR 14 by default, which ONNX Runtime 1.31 rejects.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from dataclasses import dataclass

import torch

from fxpress.errors import LoweringError

from .registry import onnx_translations
from .torch_semantics import views_as_reshapes

OPSET = 18
MAX_IR_VERSION = 10  # highest IR version ONNX Runtime 1.31 accepts


@dataclass
class OnnxModel:
    path: str
    input_names: list[str]
    output_names: list[str]
    opset: int
    dynamic_batch: bool = False  # dim 0 of every input is symbolic ("batch")


def _failure_detail(err: BaseException, gm) -> str:
    """The op and node the exporter stopped at, and the user's source line where it can be found.

    torch's exporter buries them in a long message ("No ONNX function found for <OpOverload(op='…')>",
    "Error when translating node %name"); the node names are the exporter's own, so the source line is
    looked up on the fx node whose target carries the same op name.
    """
    from fxpress.passes.trace import node_source

    text = str(err)
    op = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    node = re.search(r"Error when translating node %(\w+)", text)
    if not op and not node:
        return ""
    op_name = op.group(1) if op else None
    lines = [f"  op: {op_name or '(unknown)'} (node '{node.group(1) if node else '?'}' of the exported program) "
             "has no ONNX translation"]
    base = op_name.split(".")[-1] if op_name else node.group(1)
    for n in getattr(getattr(gm, "graph", None), "nodes", []):
        if n.op in ("call_function", "call_method") and base in str(getattr(n.target, "__name__", n.target)):
            lines.append(f"  source: {node_source(n) or '(unknown)'} (fx node '{n.name}')")
            break
    return "\n".join(lines) + "\n"


def to_onnx(gm: torch.nn.Module, example_inputs: tuple, path: str, opset: int = OPSET,
            dynamic_batch: bool | None = None) -> OnnxModel:
    """``dynamic_batch``: True exports dim 0 of every input as one symbolic batch (torch's error when the
    graph fixes it), False exports the example's shapes, None tries dynamic and falls back to static."""
    if dynamic_batch is None:
        try:
            return to_onnx(gm, example_inputs, path, opset, dynamic_batch=True)
        except Exception:  # noqa: BLE001 - the graph fixes the batch (or dynamic export fails): static
            return to_onnx(gm, example_inputs, path, opset, dynamic_batch=False)
    import onnx
    from torch.export import Dim

    n_in = len(example_inputs)
    input_names = [f"input_{i}" for i in range(n_in)]
    # The exporter logs progress and registry warnings (torchvision ops) at import; keep the
    # user's terminal for the report.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    extra = {}
    if dynamic_batch:
        batch = Dim("batch", min=1, max=1 << 20)
        extra["dynamic_shapes"] = [{0: batch} if x.dim() > 0 else None for x in example_inputs]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            prog = torch.onnx.export(
                views_as_reshapes(gm), tuple(example_inputs), dynamo=True, opset_version=opset, input_names=input_names,
                custom_translation_table=onnx_translations() or None, optimize=True, verbose=False,
                external_data=False, **extra)
    except Exception as e:  # noqa: BLE001
        if dynamic_batch:
            raise
        msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()  # the exporter colours its text
        raise LoweringError(
            f"ONNX export failed: {type(e).__name__}: {msg[0] if msg else ''}\n{_failure_detail(e, gm)}"
            "What to do: compile with target='llvm' or 'torch', or register an ONNX translation for the "
            "op with fxpress.lowering.register_onnx_translation.") from e
    model = prog.model_proto
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise LoweringError(f"exported ONNX model fails onnx.checker: {e}") from e
    tmp = f"{path}.tmp-{os.getpid()}"
    onnx.save(model, tmp)
    os.replace(tmp, path)
    return OnnxModel(path=path, input_names=[i.name for i in model.graph.input],
                     output_names=[o.name for o in model.graph.output], opset=opset,
                     dynamic_batch=bool(dynamic_batch))
