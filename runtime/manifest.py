"""The artifact directory's manifest: what is in it, how to call it, and a sha256 of every file.

Torch-free. Loading checks the manifest against its schema (``schema.py``: types, required keys,
dtypes, shapes, format version, every path inside the artifact), then verifies every listed hash,
before any backend opens any file.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from fxpress.errors import ArtifactError

from .schema import check_rel_path, validate_manifest

FORMAT = "fxpress-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: str) -> dict[str, str]:
    """sha256 of every file below root (relative POSIX paths), manifest excluded."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel != MANIFEST:
                out[rel] = sha256_file(full)
    return dict(sorted(out.items()))


def write_manifest(root: str, content: dict[str, Any]) -> dict[str, Any]:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **content, "files": hash_tree(root)}
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    return manifest


def read_manifest(root: str, verify: bool = True) -> dict[str, Any]:
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise ArtifactError(f"artifact directory {root!r} does not exist; export one with cm.export(dir)")
    if not os.path.isfile(path):
        raise ArtifactError(f"{path} is missing: {root!r} is not an fxpress artifact directory "
                            "(export one with cm.export(dir) or `fxpress export`)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-export the artifact") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{path} is not an fxpress manifest (format={found!r})")
    validate_manifest(manifest, path, FORMAT_VERSION)
    if verify:
        verify_files(root, manifest)
    return manifest


def inside(root: str, rel: Any) -> str:
    """The real path of ``rel`` below ``root``; ArtifactError if the text or a symlink leads outside."""
    check_rel_path(rel, os.path.join(root, MANIFEST))
    base = os.path.realpath(root)
    full = os.path.realpath(os.path.join(base, rel))
    if os.path.commonpath([full, base]) != base:
        raise ArtifactError(f"artifact file {rel!r} points outside the artifact directory {root!r} (through a "
                            "symbolic link); refusing to open or hash it. Re-export the artifact with cm.export(dir).")
    return full


def verify_files(root: str, manifest: dict[str, Any]) -> None:
    files = manifest.get("files") or {}
    for rel in files:  # every path is checked before any file is hashed
        inside(root, rel)
    for rel, digest in files.items():
        full = inside(root, rel)
        if not os.path.isfile(full):
            raise ArtifactError(f"artifact file {full} listed in the manifest is missing; re-export the artifact")
        actual = sha256_file(full)
        if actual != digest:
            raise ArtifactError(
                f"artifact file {full} has sha256 {actual[:16]}…, the manifest says {digest[:16]}…: the file was "
                "altered or corrupted. Refusing to load it (a library file is native code); re-export it.")


def artifact_file(root: str, manifest: dict[str, Any], rel: Any) -> str:
    """The full path of a file the manifest lists (so ``read_manifest`` checked its sha256).

    Backends open files only through this: a file the manifest does not list has no hash to check,
    and a path outside the artifact directory is never opened.
    """
    files = manifest.get("files") or {}
    if not isinstance(rel, str) or rel not in files:
        raise ArtifactError(
            f"artifact file {rel!r} in {os.path.join(root, MANIFEST)} is not listed in the manifest's files, so "
            "it has no sha256 to check; refusing to load it. Re-export the artifact with cm.export(dir).")
    return inside(root, rel)
