"""Load an exported artifact directory and run it on numpy arrays. Imports no torch."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from fxpress.errors import ArtifactError

from .executors import _pick_backend, check_inputs, make_executor  # noqa: F401 - check_inputs: public here too
from .manifest import read_manifest


class Runtime:
    """A loaded artifact: ``rt(x, ...)`` returns one numpy array, or a tuple for several outputs."""

    def __init__(self, root: str, manifest: dict[str, Any], backend: str, executor):
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.executor = executor
        self.inputs = manifest["inputs"]
        self.outputs = manifest["outputs"]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.executor.run(check_inputs(inputs, self.inputs))

    def __call__(self, *inputs: np.ndarray):
        outs = self.run(inputs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __repr__(self) -> str:
        return f"Runtime({self.root!r}, backend={self.backend!r}, inputs={[tuple(s['shape']) for s in self.inputs]})"




def load(path: str, backend: str = "auto", device: str | None = None) -> Runtime:
    """Load an artifact exported by ``cm.export(path)``.

    backend: "auto" (what the export was made for: TVM for llvm/cuda exports, ONNX Runtime for onnx
    ones; the other one, with a logged line, when that cannot run here: package missing, CPU lacking
    the library's ISA features), "tvm" or "onnx".
    The manifest is checked against its schema and every file's sha256 against the manifest before
    anything is loaded: a TVM library is native code, so load artifacts only from sources you trust.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ArtifactError(f"artifact path {path!r} is empty; pass the directory cm.export(dir) wrote")
    root = os.path.abspath(os.fspath(path))
    manifest = read_manifest(root)
    manifest_view = {**manifest, "_root": root}
    if "host_program" in manifest:  # a split dynamic model: regions + host program (host_program.py)
        from .host_program import load_host_program

        return load_host_program(root, manifest, _pick_backend(manifest_view, backend, device), device)
    chosen = _pick_backend(manifest_view, backend, device)
    return Runtime(root, manifest, chosen, make_executor(root, manifest, chosen, device))
