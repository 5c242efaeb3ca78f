"""Writing an artifact directory: ONNX model, TVM library + params, manifest. Atomic."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from fxpress.errors import ArtifactError
from fxpress.runtime.manifest import FORMAT_VERSION, write_manifest
from fxpress.runtime.schema import validate_manifest

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
    params = [np.asarray(p) for p in built.relax.params]
    np.savez(os.path.join(tvm_dir, "params.npz"), **{f"p{i}": p for i, p in enumerate(params)})
    entry = {"library": "tvm/model.so", "params": "tvm/params.npz", "param_names": built.relax.param_names,
             "param_specs": [{"name": f"p{i}", "shape": list(p.shape), "dtype": str(p.dtype)}
                             for i, p in enumerate(params)],
             "device": "cuda" if target == "cuda" else "cpu"}
    entry.update(_target_fields(built.built.target))
    _link_index_tables(cm, params)
    return entry


def _target_fields(target) -> dict[str, Any]:
    """What the library was compiled for: the TVM target, its CPU and the ISA features the loader checks."""
    from tvm.target import codegen

    from fxpress.codegen.targets import portable_requested
    from fxpress.runtime.cpu import checked_features

    host = target.host if target.kind.name == "cuda" and target.host is not None else target
    fields: dict[str, Any] = {"target": str(target), "mcpu": str(host.attrs.get("mcpu", "generic")),
                              "portable": portable_requested()}
    try:
        fields["isa"] = checked_features(codegen.llvm_get_cpu_features(host))
    except Exception:  # noqa: BLE001 - an LLVM without the query: no ISA check at load
        fields["isa"] = []
    return fields


def _link_index_tables(cm, params: list[np.ndarray]) -> None:
    """For each ranged (embedding index) input, name the parameter holding its table, so load() can
    check the declared range against the table's rows (a widened range would read past it)."""
    tables = getattr(cm, "index_tables", {}) or {}
    for i, weight in tables.items():
        if i >= len(cm.input_specs) or "range" not in cm.input_specs[i]:
            continue
        w = np.asarray(weight)
        found = [k for k, p in enumerate(params) if p.shape == w.shape and p.dtype == w.dtype and np.array_equal(p, w)]
        if len(found) == 1:
            cm.input_specs[i]["table_param"] = f"p{found[0]}"


def _write_onnx(cm, root: str) -> dict[str, Any]:
    from fxpress.lowering import to_onnx

    m = to_onnx(cm.gm, cm.example_inputs, os.path.join(root, "model.onnx"))
    return {"file": "model.onnx", "opset": m.opset, "input_names": m.input_names, "output_names": m.output_names}


def write_artifact(cm, path: str, backends=("onnx", "tvm")) -> str:
    backends = check_backends(backends)

    def write_backends(tmp: str) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        if "onnx" in backends:
            entries["onnx"] = _write_onnx(cm, tmp)
        if "tvm" in backends:
            entries["tvm"] = _write_tvm(cm, os.path.join(tmp, "tvm"))
        return {"backends": entries}

    return write_artifact_dir(cm, path, backends, write_backends)


def write_artifact_dir(model, path: str, backends, write_files: Callable[[str], dict[str, Any]], *,
                       require_backend: bool = True) -> str:
    """The steps every artifact shares (single-graph here, split dynamic models in dynamic_model.py).

    Checks ``path`` and ``backends``, runs ``write_files(tmp)`` in a temp dir beside ``path`` (it
    returns the manifest's model-specific fields, e.g. ``backends``), adds ``report.json`` and
    ``manifest.json`` from ``model`` (``report``, ``input_specs``, ``output_specs``, ``target``),
    then swaps the dir into place; on any failure the temp dir is removed and ``path`` is untouched.
    ``path`` must be missing, empty or an earlier artifact (``check_export_path``); ``backends`` must
    name at least one backend (``require_backend`` is kept for callers; an empty tuple is always refused).
    """
    backends = check_backends(backends)
    path = check_export_path(path)
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    except OSError as e:
        raise ArtifactError(f"cannot create the artifact directory {path} ({e.strerror or e}); "
                            "choose a writable export path") from e
    try:
        # mkdtemp makes the dir private (0o700); the artifact gets the mode any other tool would give it.
        os.chmod(tmp, 0o777 & ~_umask())
        fields = write_files(tmp)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            f.write(model.report.to_json(full=True))
        manifest = write_manifest(tmp, {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": model.input_specs,
            "outputs": model.output_specs,
            "passes": [{"name": r.name, "status": r.status} for r in model.report if r.kind == "pass"],
            "target": model.target,
            **fields,
            "versions": _versions(),
        })
        # never put in place an artifact load() would refuse (e.g. an output dtype the runtime lacks)
        validate_manifest(json.loads(json.dumps(manifest)), f"the manifest for {path}", FORMAT_VERSION)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def check_backends(backends) -> tuple[str, ...]:
    """``backends`` as a tuple of known names: a single string is one backend; empty is refused."""
    if isinstance(backends, str):
        backends = (backends,)
    try:
        backends = tuple(backends)
    except TypeError:
        raise ArtifactError(f"backends must be 'onnx', 'tvm' or a tuple of them, got {backends!r}") from None
    unknown = [b for b in backends if b not in ("onnx", "tvm")]
    if unknown:
        raise ArtifactError(f"unknown export backend(s) {unknown}; choose from 'onnx', 'tvm'")
    if not backends:
        raise ArtifactError("backends is empty: an artifact needs at least one of 'onnx', 'tvm' "
                            "(leave it out for both)")
    return backends


def check_export_path(path) -> str:
    """The absolute export path, refusing any path whose current content export would destroy.

    Export replaces ``path`` only when it is missing, an empty directory or an fxpress artifact
    (a manifest.json this runtime can read). The current directory, the file system root and the
    home directory are refused outright, whatever they hold.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ArtifactError(f"export path {path!r} is empty; name a new directory, e.g. cm.export('model_artifact')")
    path = os.path.abspath(os.fspath(path))
    real = os.path.realpath(path)
    protected = {os.path.realpath(os.sep): "the file system root", os.path.realpath(os.getcwd()): "the current directory",
                 os.path.realpath(os.path.expanduser("~")): "your home directory"}
    if real in protected:
        raise ArtifactError(f"refusing to export to {path}: it is {protected[real]}, and export replaces the "
                            "whole directory. Name a new subdirectory, e.g. ./model_artifact")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ArtifactError(f"{path} exists and is not a directory; choose another export path")
        _check_replaceable(path)
    return path


def _check_replaceable(path: str) -> None:
    """Raise unless ``path`` (an existing directory) is empty or an fxpress artifact."""
    from fxpress.runtime.manifest import MANIFEST, read_manifest

    try:
        entries = os.listdir(path)
    except OSError as e:
        raise ArtifactError(f"cannot read {path} ({e.strerror}); choose another export path") from e
    if not entries:
        return
    why = "it holds no manifest.json"
    if MANIFEST in entries:
        try:
            read_manifest(path, verify=False)
            return
        except ArtifactError as e:
            why = f"its manifest is not one this fxpress can read ({e})"
    raise ArtifactError(f"refusing to export to {path}: it is a directory that is not an fxpress artifact "
                        f"({why}), and export would replace all of its {len(entries)} entries. Choose a new "
                        "or empty directory, or remove this one yourself.")


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it as it reads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _swap_into_place(tmp: str, path: str) -> None:
    """Put the finished ``tmp`` dir at ``path``; at every instant ``path`` is the old or the new artifact.

    rename() is atomic but cannot replace a non-empty directory. On Linux, renameat2(RENAME_EXCHANGE)
    swaps the two directories in one step (the old one lands at ``tmp`` and is then removed).
    Elsewhere the old dir is moved aside first, which leaves a short window without ``path``.
    """
    if not os.path.exists(path):
        try:
            os.rename(tmp, path)
            return
        except OSError as e:  # another exporter put its artifact there in between: replace that one
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    _check_replaceable(path)  # again, just before: another process may have put something there meanwhile
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
