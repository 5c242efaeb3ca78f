"""Load an exported artifact directory and run it on numpy arrays. Imports no torch."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from fxpress.errors import ArtifactError, InputError

from .backends import ORTExecutor, TVMExecutor
from .manifest import artifact_file, read_manifest


def check_inputs(inputs: Sequence[Any], specs: list[dict[str, Any]], convert=np.asarray) -> list:
    """Validate count, shape, dtype (and the index range, where the spec has one) against the
    manifest's input specs (clear messages)."""
    if len(inputs) != len(specs):
        raise InputError(f"the model takes {len(specs)} input(s) "
                         f"({', '.join(s['name'] for s in specs)}), got {len(inputs)}")
    out = []
    for i, (x, spec) in enumerate(zip(inputs, specs)):
        x = convert(x)
        shape, dtype = tuple(x.shape), str(x.dtype).replace("torch.", "")
        dynamic = spec.get("dynamic_dims") or ()  # dims compiled as symbolic (any size >= 1)
        if len(shape) != len(spec["shape"]) or dtype != spec["dtype"] or any(
                a != b and not (d in dynamic and a >= 1) for d, (a, b) in enumerate(zip(shape, spec["shape"]))):
            free = f" (dim {', '.join(map(str, dynamic))} may take any size)" if dynamic else ""
            raise InputError(
                f"input {i} ('{spec['name']}'): expected shape {tuple(spec['shape'])}{free} dtype {spec['dtype']}, "
                f"got shape {shape} dtype {dtype}. The model was compiled for {'these' if dynamic else 'fixed'} "
                "shapes: pass inputs of that shape, or compile again with example inputs of the new shape.")
        if spec.get("range") and (x.numel() if hasattr(x, "numel") else x.size):
            lo, hi = spec["range"]
            x_min, x_max = int(x.min()), int(x.max())
            if x_min < lo or x_max > hi:
                raise InputError(
                    f"input {i} ('{spec['name']}') holds index {x_max if x_max > hi else x_min}, outside "
                    f"[{lo}, {hi}]: it indexes an embedding table of {hi - lo + 1} rows. Pass indices in that "
                    "range (the compiled kernels do not check them).")
        out.append(x)
    return out


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


def _pick_backend(manifest: dict[str, Any], backend: str) -> str:
    available = list(manifest.get("backends", {}))
    if backend == "auto":
        for b in ("tvm", "onnx"):
            if b in available:
                return b
        raise ArtifactError(f"manifest lists no backend this runtime can run (has {available})")
    if backend not in available:
        raise ArtifactError(f"backend {backend!r} is not in this artifact (it has {available}); "
                            f"choose one of those or re-export")
    return backend


def make_executor(root: str, manifest: dict[str, Any], backend: str, device: str | None = None):
    """The executor for one graph's entry in ``manifest['backends']``."""
    info = manifest["backends"][backend]
    if backend == "tvm":
        params = artifact_file(root, manifest, info["params"]) if info.get("params") else None
        return TVMExecutor(artifact_file(root, manifest, info.get("library")), params,
                           device or info.get("device", "cpu"))
    if backend == "onnx":
        return ORTExecutor(artifact_file(root, manifest, info.get("file")), device or "cpu")
    raise ArtifactError(f"unknown backend {backend!r} in manifest")


def load(path: str, backend: str = "auto", device: str | None = None) -> Runtime:
    """Load an artifact exported by ``cm.export(path)``.

    backend: "auto" (TVM when present, else ONNX Runtime), "tvm" or "onnx".
    Every file's sha256 is checked against the manifest before anything is loaded: a TVM
    library is native code, so load artifacts only from sources you trust.
    """
    root = os.path.abspath(path)
    manifest = read_manifest(root)
    if "host_program" in manifest:  # a split dynamic model: regions + host program (host_program.py)
        from .host_program import load_host_program

        return load_host_program(root, manifest, backend, device)
    chosen = _pick_backend(manifest, backend)
    return Runtime(root, manifest, chosen, make_executor(root, manifest, chosen, device))
