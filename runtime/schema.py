"""The manifest's schema: checked before any file of the artifact is opened or hashed. Torch-free.

A manifest is JSON anyone can edit, so every field the runtime later relies on is checked here for
type and range, and every file path for staying inside the artifact directory. A violation is an
``ArtifactError`` naming the field and saying what to do, never a KeyError deep in a loader.
"""
from __future__ import annotations

import os
import re
from typing import Any

from fxpress.errors import ArtifactError

# dtypes an input, output or parameter may have (numpy names; bfloat16 as TVM and torch spell it).
DTYPES = frozenset({"float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
                    "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128"})
BACKENDS = ("onnx", "tvm")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, what: str):
        raise ArtifactError(f"{self.where}: {field} {what}; the manifest is damaged or was edited by hand. "
                            "Re-export the artifact with cm.export(dir) or `fxpress export`.")

    def dict(self, value, field: str) -> dict:
        if not isinstance(value, dict):
            self.fail(field, f"must be a JSON object, got {type(value).__name__}")
        return value

    def list(self, value, field: str) -> list:
        if not isinstance(value, list):
            self.fail(field, f"must be a JSON list, got {type(value).__name__}")
        return value

    def str(self, value, field: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(field, f"must be a non-empty string, got {value!r}")
        return value

    def int(self, value, field: str, low: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            self.fail(field, f"must be an integer{f' >= {low}' if low is not None else ''}, got {value!r}")
        return value

    def key(self, d: dict, key: str, field: str):
        if key not in d:
            self.fail(f"{field}.{key}", "is missing")
        return d[key]


def check_rel_path(rel: Any, where: str = "manifest") -> str:
    """``rel`` must be a relative POSIX path that stays below the artifact directory (no ``..``, not
    absolute, no backslashes or NUL): checked on the text alone, before the path is ever opened."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"{where}: file path {rel!r} is not a non-empty string; re-export the artifact")
    parts = rel.split("/")
    if (rel.startswith("/") or os.path.isabs(rel) or "\\" in rel or "\0" in rel or re.match(r"^[A-Za-z]:", rel)
            or any(p in ("", ".", "..") for p in parts)):
        raise ArtifactError(f"{where}: file {rel!r} points outside the artifact directory (or is not a plain "
                            "relative path); refusing to open or hash it. Re-export the artifact with cm.export(dir).")
    return rel


def check_tensor_spec(c: _Checker, spec, field: str, ranged: bool) -> None:
    c.dict(spec, field)
    c.str(c.key(spec, "name", field), f"{field}.name")
    shape = c.list(c.key(spec, "shape", field), f"{field}.shape")
    for k, d in enumerate(shape):
        c.int(d, f"{field}.shape[{k}]", low=0)
    dtype = c.key(spec, "dtype", field)
    if dtype not in DTYPES:
        c.fail(f"{field}.dtype", f"is {dtype!r}, not a dtype this runtime knows ({', '.join(sorted(DTYPES))})")
    if ranged and spec.get("range") is not None:
        r = c.list(spec["range"], f"{field}.range")
        if len(r) != 2:
            c.fail(f"{field}.range", f"must be [low, high], got {r!r}")
        lo, hi = (c.int(v, f"{field}.range") for v in r)
        if not 0 <= lo <= hi:
            c.fail(f"{field}.range", f"must satisfy 0 <= low <= high, got {r!r}")
        if not dtype.startswith(("int", "uint")):
            c.fail(f"{field}.range", f"is set on a {dtype} input; only integer (index) inputs have a range")


def check_backend_entry(c: _Checker, name: str, info, field: str, host: bool) -> None:
    c.dict(info, field)
    if host:
        check_rel_path(c.key(info, "host_program", field), c.where)
        return
    if name == "onnx":
        check_rel_path(c.key(info, "file", field), c.where)
    elif name == "tvm":
        check_rel_path(c.key(info, "library", field), c.where)
        if info.get("params") is not None:
            check_rel_path(info["params"], c.where)
        if info.get("device", "cpu") not in ("cpu", "cuda"):
            c.fail(f"{field}.device", f"must be 'cpu' or 'cuda', got {info.get('device')!r}")
        for k, p in enumerate(c.list(info.get("param_specs", []), f"{field}.param_specs")):
            check_tensor_spec(c, p, f"{field}.param_specs[{k}]", ranged=False)
        if info.get("target") is not None and not isinstance(info["target"], (str, dict)):
            c.fail(f"{field}.target", f"must be a string or an object, got {type(info['target']).__name__}")


def check_backends(c: _Checker, backends, field: str, host: bool) -> None:
    c.dict(backends, field)
    if not backends:
        c.fail(field, "is empty (an artifact needs at least one of 'onnx', 'tvm')")
    for name, info in backends.items():
        if name not in BACKENDS:
            c.fail(f"{field}", f"names unknown backend {name!r} (this runtime runs {', '.join(BACKENDS)})")
        check_backend_entry(c, name, info, f"{field}.{name}", host)


def validate_manifest(manifest: Any, where: str, current_version: int) -> dict[str, Any]:
    """Check ``manifest`` (parsed JSON) against the schema; returns it. ``where`` names the file."""
    c = _Checker(where)
    c.dict(manifest, "the manifest")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        c.fail("format_version", f"must be a positive integer, got {version!r}")
    if version > current_version:
        raise ArtifactError(
            f"{where} has format_version {version!r}, newer than this runtime understands ({current_version}); "
            "upgrade fxpress on this machine or export with the fxpress version installed here")
    files = c.dict(c.key(manifest, "files", "manifest"), "files")
    for rel, digest in files.items():
        check_rel_path(rel, where)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            c.fail(f"files[{rel!r}]", f"must be a sha256 hex digest, got {digest!r}")
    inputs = c.list(c.key(manifest, "inputs", "manifest"), "inputs")
    if not inputs:
        c.fail("inputs", "is empty (a model takes at least one input)")
    for i, spec in enumerate(inputs):
        check_tensor_spec(c, spec, f"inputs[{i}]", ranged=True)
    for i, spec in enumerate(c.list(c.key(manifest, "outputs", "manifest"), "outputs")):
        check_tensor_spec(c, spec, f"outputs[{i}]", ranged=False)
    if manifest.get("target") is not None and not isinstance(manifest["target"], str):
        c.fail("target", f"must be a string, got {manifest['target']!r}")
    host = manifest.get("host_program")
    check_backends(c, c.key(manifest, "backends", "manifest"), "backends", host=host is not None)
    if host is not None:
        c.dict(host, "host_program")
        check_rel_path(c.key(host, "file", "host_program"), where)
        regions = c.dict(c.key(host, "regions", "host_program"), "host_program.regions")
        for rname, region in regions.items():
            c.dict(region, f"host_program.regions.{rname}")
            check_backends(c, c.key(region, "backends", f"host_program.regions.{rname}"),
                           f"host_program.regions.{rname}.backends", host=False)
    return manifest
