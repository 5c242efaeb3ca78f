"""Build the torch-free runtime wheel, ``fxpress-runtime``: fxpress.runtime + fxpress.errors, nothing else.

    python scripts/build_runtime_wheel.py [OUT_DIR]          (default: dist/)

The wheel installs the same ``fxpress.runtime`` package the full fxpress ships (the same source files,
copied from runtime/), with numpy as its only hard dependency; the backends are extras:

    pip install "fxpress_runtime-<version>-py3-none-any.whl[onnx]"        ONNX artifacts (onnxruntime)
    pip install "fxpress_runtime-<version>-py3-none-any.whl[onnx,tvm]"    + TVM libraries (apache-tvm)

``[onnx-gpu]`` takes onnxruntime-gpu instead of onnxruntime (never install both). Install either this
wheel or the full fxpress in one environment, not both: they share the ``fxpress`` package. Needs only
setuptools and pip on the building machine (no network: --no-build-isolation).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "packaging", "runtime", "pyproject.toml")


def version() -> str:
    with open(os.path.join(ROOT, "fxpress", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def stage(dst: str) -> None:
    """The runtime package tree: fxpress/{__init__,errors}.py and fxpress/runtime/*.py."""
    pkg = os.path.join(dst, "fxpress")
    os.makedirs(os.path.join(pkg, "runtime"))
    for name in ("__init__.py", "errors.py"):
        shutil.copy(os.path.join(ROOT, "fxpress", name), pkg)
    for name in sorted(os.listdir(os.path.join(ROOT, "runtime"))):
        if name.endswith(".py"):
            shutil.copy(os.path.join(ROOT, "runtime", name), os.path.join(pkg, "runtime"))
    with open(PYPROJECT) as f:
        text = f.read().replace("@VERSION@", version())
    with open(os.path.join(dst, "pyproject.toml"), "w") as f:
        f.write(text)
    shutil.copy(os.path.join(ROOT, "docs", "deploy.md"), os.path.join(dst, "README.md"))


def build(out_dir: str) -> str:
    """Build the wheel into ``out_dir``; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fxpress-runtime-") as tmp:
        src = os.path.join(tmp, "src")
        stage(src)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", out_dir, src], check=True)
    wheel = os.path.join(out_dir, f"fxpress_runtime-{version()}-py3-none-any.whl")
    if not os.path.isfile(wheel):
        raise SystemExit(f"build did not produce {wheel}")
    return wheel


if __name__ == "__main__":
    print(build(os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "dist"))))
