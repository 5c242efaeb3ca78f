"""FX GraphModule → ONNX model file, valid under onnx.checker and loadable by ONNX Runtime.

Uses torch's dynamo exporter with fxpress's custom ops translated through the registry, then pins
the IR version: onnx 1.23 writes IR 14 by default, which ONNX Runtime 1.31 rejects.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass

import torch

from fxpress.errors import LoweringError

from .registry import onnx_translations

OPSET = 18
MAX_IR_VERSION = 10  # highest IR version ONNX Runtime 1.31 accepts


@dataclass
class OnnxModel:
    path: str
    input_names: list[str]
    output_names: list[str]
    opset: int


def to_onnx(gm: torch.nn.Module, example_inputs: tuple, path: str, opset: int = OPSET) -> OnnxModel:
    import onnx

    n_in = len(example_inputs)
    input_names = [f"input_{i}" for i in range(n_in)]
    # The exporter logs progress and registry warnings (torchvision ops) at import; keep the
    # user's terminal for the report.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            prog = torch.onnx.export(
                gm, tuple(example_inputs), dynamo=True, opset_version=opset, input_names=input_names,
                custom_translation_table=onnx_translations() or None, optimize=True, verbose=False,
                external_data=False)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        raise LoweringError(
            f"ONNX export failed: {type(e).__name__}: {msg[0] if msg else ''}\n"
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
                     output_names=[o.name for o in model.graph.output], opset=opset)
