"""Choosing and building one graph's executor from a checked manifest, and checking call inputs:
what the static loader (loader.py) and the host program of a split model (host_program.py) share,
so neither imports the other."""
from __future__ import annotations

import importlib.util
import logging
import os
import zipfile
from typing import Any, Sequence

import numpy as np

from fxpress.errors import ArtifactError, InputError, TargetUnavailableError

from .backends import ORTExecutor, TVMExecutor
from .cpu import missing_features
from .manifest import artifact_file

log = logging.getLogger("fxpress.runtime")

# What each backend needs installed, for the one-line message when it is missing.
_PACKAGES = {"tvm": ("tvm", "apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0"),
             "onnx": ("onnxruntime", "onnxruntime")}


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


def check_per_sample_inputs(inputs: Sequence[Any], specs: list[dict[str, Any]], convert=np.asarray) -> list:
    """Inputs of a split model whose host program runs once per sample: any batch N, the same N on every
    input, the other dims and the dtype as compiled (clear messages)."""
    if len(inputs) != len(specs):
        raise InputError(f"the model takes {len(specs)} input(s), got {len(inputs)}")
    out, batch = [], None
    for i, (x, spec) in enumerate(zip(inputs, specs)):
        x = convert(x)
        if x.ndim < 1 or list(x.shape[1:]) != list(spec["shape"][1:]) or str(x.dtype) != spec["dtype"]:
            raise InputError(f"input {i} ('{spec['name']}'): expected shape (N, "
                             f"{', '.join(map(str, spec['shape'][1:]))}) dtype {spec['dtype']} (any batch N, "
                             f"the program runs per sample), got shape {tuple(x.shape)} dtype {x.dtype}")
        if batch is not None and x.shape[0] != batch:
            raise InputError(f"input {i} has batch {x.shape[0]}, input 0 has {batch}; per-sample models need "
                             "the same batch on every input")
        batch = x.shape[0]
        out.append(x)
    return out


def _unusable(backend: str, info: dict[str, Any], device: str | None) -> str | None:
    """Why ``backend`` cannot run here (missing package, a CPU without the library's ISA features), or None."""
    module, pip_name = _PACKAGES[backend]
    if importlib.util.find_spec(module) is None:
        return f"the {module!r} package is not installed (pip install {pip_name})"
    if backend == "tvm" and (device or info.get("device", "cpu")) == "cuda" and not _cuda_present():
        return "its TVM library is for CUDA and this machine has no CUDA GPU"
    if backend == "tvm" and (device or info.get("device", "cpu")) == "cpu":
        missing = missing_features(info.get("isa") or [])
        if missing:
            return (f"its TVM library was compiled for CPU {info.get('mcpu', '?')!r} and this CPU lacks "
                    f"{', '.join(missing)} (running it would crash with an illegal instruction); re-export "
                    "with `fxpress export --portable` (or FXPRESS_PORTABLE=1) for a library that runs on any x86-64")
    return None


def _cuda_present() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - no driver, or a TVM built without CUDA
        return False


def _tvm_info(manifest: dict[str, Any]) -> dict[str, Any]:
    """The tvm entry that says what the library needs: the graph's own, or any region's (split models)."""
    host = manifest.get("host_program")
    if host:
        for region in host["regions"].values():
            if "tvm" in region["backends"]:
                return region["backends"]["tvm"]
    return manifest["backends"].get("tvm", {})


def _pick_backend(manifest: dict[str, Any], backend: str, device: str | None = None) -> str:
    """The backend to run: the one asked for, or for "auto" the one the export was made for (TVM for
    "llvm"/"cuda" exports, ONNX Runtime for "onnx" ones), falling back to the other with one logged
    line when it cannot run here."""
    available = list(manifest.get("backends", {}))
    if backend not in ("auto", *_PACKAGES):
        raise ArtifactError(f"unknown backend {backend!r}; choose 'auto', 'tvm' or 'onnx'")
    if backend != "auto":
        if backend not in available:
            raise ArtifactError(f"backend {backend!r} is not in this artifact (it has {available}); "
                                f"choose one of those or re-export")
        why = _unusable(backend, _tvm_info(manifest) if backend == "tvm" else {}, device)
        if why:
            raise TargetUnavailableError(f"cannot load this artifact with backend={backend!r}: {why}"
                                         + ("; or load it with backend='onnx'" if "onnx" in available and backend == "tvm" else ""))
        return backend
    made_for = manifest.get("target")
    order = ["onnx", "tvm"] if made_for == "onnx" else ["tvm", "onnx"]
    order = [b for b in order if b in available]
    reasons = []
    for b in order:
        why = _unusable(b, _tvm_info(manifest) if b == "tvm" else {}, device)
        if why is None:
            if reasons:
                log.warning("fxpress: running %s with %s: %s", os.path.basename(manifest.get("_root", "")) or "artifact",
                            b, "; ".join(reasons))
            return b
        reasons.append(f"{b} skipped, {why}")
    if not order:
        raise ArtifactError(f"manifest lists no backend this runtime can run (has {available})")
    raise TargetUnavailableError("cannot run this artifact here: " + "; ".join(reasons))


def check_params(root: str, manifest: dict[str, Any], info: dict[str, Any], params_path: str) -> None:
    """The params file holds exactly the arrays the manifest declares (names p0.., shapes, dtypes), read
    from the .npz headers alone; and every ranged input's table has the rows its range claims."""
    try:
        found = npz_headers(params_path)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{params_path} is not a readable .npz of arrays ({e}); re-export the artifact") from e
    specs = info.get("param_specs")
    if specs is None:  # artifacts from before param_specs: the count, at least
        names = info.get("param_names")
        if names is not None and len(names) != len(found):
            raise ArtifactError(f"{params_path} holds {len(found)} arrays, the manifest names {len(names)} "
                                "parameters; re-export the artifact")
        return
    expected = {s["name"]: (tuple(s["shape"]), s["dtype"]) for s in specs}
    if set(expected) != set(found):
        raise ArtifactError(f"{params_path} holds arrays {sorted(found)[:8]}, the manifest declares "
                            f"{sorted(expected)[:8]}; the parameters do not belong to this library. Re-export the artifact.")
    for name, (shape, dtype) in expected.items():
        if found[name] != (shape, dtype):
            raise ArtifactError(f"{params_path}: parameter {name} has shape {found[name][0]} dtype {found[name][1]}, "
                                f"the manifest says shape {shape} dtype {dtype}; re-export the artifact")
    for i, spec in enumerate(manifest.get("inputs", [])):
        table = spec.get("table_param")
        if spec.get("range") and table is not None:
            if table not in found or not found[table][0]:
                raise ArtifactError(f"input {i} ('{spec['name']}') names index table {table!r}, which "
                                    f"{params_path} lacks; re-export the artifact")
            rows = found[table][0][0]
            if spec["range"][1] >= rows:
                raise ArtifactError(f"input {i} ('{spec['name']}') declares index range {spec['range']}, but its "
                                    f"table {table} has {rows} rows: indices up to {spec['range'][1]} would read "
                                    "past it. The manifest was edited or damaged; re-export the artifact.")


def npz_headers(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every array in an .npz, reading only the .npy headers (no pickle)."""
    out = {}
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            if not member.endswith(".npy"):
                raise ValueError(f"member {member!r} is not an .npy array")
            with z.open(member) as f:
                version = np.lib.format.read_magic(f)
                reader = {(1, 0): np.lib.format.read_array_header_1_0,
                          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if reader is None:
                    raise ValueError(f"member {member!r} has .npy format {version}")
                shape, _, dtype = reader(f)
            if dtype.hasobject:
                raise ValueError(f"member {member!r} holds Python objects")
            out[member[:-4]] = (tuple(shape), str(dtype))
    return out


def make_executor(root: str, manifest: dict[str, Any], backend: str, device: str | None = None):
    """The executor for one graph's entry in ``manifest['backends']``."""
    info = manifest["backends"][backend]
    if backend == "tvm":
        params = artifact_file(root, manifest, info["params"]) if info.get("params") else None
        if params:
            check_params(root, manifest, info, params)
        return TVMExecutor(artifact_file(root, manifest, info.get("library")), params,
                           device or info.get("device", "cpu"))
    if backend == "onnx":
        return ORTExecutor(artifact_file(root, manifest, info.get("file")), device or "cpu")
    raise ArtifactError(f"unknown backend {backend!r} in manifest")
