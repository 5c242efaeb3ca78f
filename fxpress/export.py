"""Writing an artifact directory: ONNX model, TVM library + params, manifest. Atomic."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from fxpress.errors import ArtifactError
from fxpress.runtime.manifest import write_manifest

from . import __version__


def _versions() -> dict[str, str]:
    import onnx
    import torch
    import tvm

    return {"fxpress": __version__, "torch": torch.__version__, "tvm": tvm.__version__, "onnx": onnx.__version__}


def _write_tvm(cm, tvm_dir: str) -> dict[str, Any]:
    from .lower import build_tvm

    os.makedirs(tvm_dir)
    target = cm.target if cm.target in ("llvm", "cuda") else "llvm"
    built = cm._lowered if (cm._lowered is not None and cm.target == target) else build_tvm(cm.gm, cm.example_inputs, target)
    built.built.export_library(os.path.join(tvm_dir, "model.so"))
    np.savez(os.path.join(tvm_dir, "params.npz"), **{f"p{i}": p for i, p in enumerate(built.relax.params)})
    return {"library": "tvm/model.so", "params": "tvm/params.npz", "param_names": built.relax.param_names,
            "target": str(built.built.target), "device": "cuda" if target == "cuda" else "cpu"}


def _write_onnx(cm, root: str) -> dict[str, Any]:
    from fxpress.lowering import to_onnx

    m = to_onnx(cm.gm, cm.example_inputs, os.path.join(root, "model.onnx"))
    return {"file": "model.onnx", "opset": m.opset, "input_names": m.input_names, "output_names": m.output_names}


def write_artifact(cm, path: str, backends=("onnx", "tvm")) -> str:
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ArtifactError(f"{path} exists and is not a directory; choose another export path")
    unknown = set(backends) - {"onnx", "tvm"}
    if unknown:
        raise ArtifactError(f"unknown export backend(s) {sorted(unknown)}; choose from 'onnx', 'tvm'")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        entries: dict[str, Any] = {}
        if "onnx" in backends:
            entries["onnx"] = _write_onnx(cm, tmp)
        if "tvm" in backends:
            entries["tvm"] = _write_tvm(cm, os.path.join(tmp, "tvm"))
        with open(os.path.join(tmp, "report.json"), "w") as f:
            f.write(cm.report.to_json(full=True))
        write_manifest(tmp, {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": cm.input_specs,
            "outputs": cm.output_specs,
            "passes": [{"name": r.name, "status": r.status} for r in cm.report if r.kind == "pass"],
            "target": cm.target,
            "backends": entries,
            "versions": _versions(),
        })
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _swap_into_place(tmp: str, path: str) -> None:
    """rename() is atomic; a directory cannot be renamed over a non-empty one, so move the old aside."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    old = f"{tmp}.old"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
