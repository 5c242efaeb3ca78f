"""Writing an artifact directory: ONNX model, TVM library + params, manifest. Atomic."""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

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
    def write_backends(tmp: str) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        if "onnx" in backends:
            entries["onnx"] = _write_onnx(cm, tmp)
        if "tvm" in backends:
            entries["tvm"] = _write_tvm(cm, os.path.join(tmp, "tvm"))
        return {"backends": entries}

    return write_artifact_dir(cm, path, backends, write_backends)


def write_artifact_dir(model, path: str, backends, write_files: Callable[[str], dict[str, Any]], *,
                       require_backend: bool = False) -> str:
    """The steps every artifact shares (single-graph here, split dynamic models in dynamic.py).

    Checks ``path`` and ``backends``, runs ``write_files(tmp)`` in a temp dir beside ``path`` (it
    returns the manifest's model-specific fields, e.g. ``backends``), adds ``report.json`` and
    ``manifest.json`` from ``model`` (``report``, ``input_specs``, ``output_specs``, ``target``),
    then swaps the dir into place; on any failure the temp dir is removed and ``path`` is untouched.
    ``require_backend`` refuses an empty ``backends``.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ArtifactError(f"{path} exists and is not a directory; choose another export path")
    unknown = set(backends) - {"onnx", "tvm"}
    if unknown or (require_backend and not backends):
        raise ArtifactError(f"unknown export backend(s) {sorted(unknown) or '(none)'}; choose from 'onnx', 'tvm'")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        fields = write_files(tmp)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            f.write(model.report.to_json(full=True))
        write_manifest(tmp, {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": model.input_specs,
            "outputs": model.output_specs,
            "passes": [{"name": r.name, "status": r.status} for r in model.report if r.kind == "pass"],
            "target": model.target,
            **fields,
            "versions": _versions(),
        })
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _swap_into_place(tmp: str, path: str) -> None:
    """Put the finished ``tmp`` dir at ``path``; at every instant ``path`` is the old or the new artifact.

    rename() is atomic but cannot replace a non-empty directory. On Linux, renameat2(RENAME_EXCHANGE)
    swaps the two directories in one step (the old one lands at ``tmp`` and is then removed).
    Elsewhere the old dir is moved aside first, which leaves a short window without ``path``.
    """
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = f"{tmp}.old"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system lacks it
        return False
    raise OSError(err, os.strerror(err), b)
