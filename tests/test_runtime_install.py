"""The runtime-only install (docs/deploy.md) in a virtual environment that really has no torch.

The runtime wheel is built, a venv is created without pip or system site-packages, and the packages the
runtime extras need (numpy, onnxruntime, tvm and their own dependencies: nothing else, no torch) are made
visible to it by linking the already-installed copies into one directory named by a .pth file: so the
test needs no network and no big downloads. Then the documented one command, ``pip install
"<wheel>[onnx-gpu,tvm]"``, runs with --no-index: pip resolves the extras against those packages and
installs the wheel. An ONNX artifact and a TVM artifact exported here are loaded and run there, and
the outputs compared with this process's. About 30 s.
"""
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxpress

ROOT = Path(__file__).resolve().parents[1]
ORT_DIST = "onnxruntime-gpu"  # what this project installs (see pyproject.toml); the [onnx-gpu] extra

RUN = """
import sys, json, numpy as np
try:
    import torch
    raise SystemExit("torch is importable in the runtime-only venv")
except ImportError:
    pass
import fxpress.runtime as rt_mod
arts = json.loads(sys.argv[1])
out = {}
for name, (art, backend, inp) in arts.items():
    rt = rt_mod.load(art, backend=backend)
    y = rt(np.load(inp))
    np.save(inp + ".out.npy", y)
    out[name] = rt.backend
try:
    import fxpress
    fxpress.compile
    raise SystemExit("fxpress.compile resolved in the runtime-only venv")
except ImportError as e:
    assert "needs the full fxpress package with torch" in str(e), e
print(json.dumps(out))
"""


def _closure(names: list[str]) -> list[md.Distribution]:
    """The installed distributions ``names`` need at run time (their non-extra requirements, recursively)."""
    from packaging.requirements import Requirement

    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _link_site(dists: list[md.Distribution], dst: Path) -> None:
    """Symlink each distribution's top-level entries (packages, .libs, dist-info) into ``dst``."""
    dst.mkdir()
    for dist in dists:
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = base / top
            if src.exists() and not (dst / top).exists():
                (dst / top).symlink_to(src)


def _have(dist: str) -> bool:
    try:
        md.distribution(dist)
        return True
    except md.PackageNotFoundError:
        return False


def test_runtime_only_install_runs_onnx_and_tvm_artifacts_without_torch(tmp_path):
    if not _have(ORT_DIST):
        pytest.skip(f"{ORT_DIST} is not installed here")
    with_tvm = _have("apache-tvm")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from build_runtime_wheel import build
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    wheel = build(str(tmp_path / "dist"))

    # artifacts: an ONNX export and (where tvm is installed) an llvm export of a small model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    expected = model(x).detach().numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    arts = {"onnx": [fxpress.compile(model, (x,), passes="none", target="onnx").export(
        str(tmp_path / "onnx_art"), backends="onnx"), "auto", str(tmp_path / "x.npy")]}
    if with_tvm:
        arts["tvm"] = [fxpress.compile(model, (x,), passes="none", target="llvm").export(
            str(tmp_path / "tvm_art"), backends="tvm"), "auto", str(tmp_path / "x2.npy")]
        np.save(tmp_path / "x2.npy", x.numpy())

    # a venv without torch: no system site-packages, only the runtime's dependencies linked in
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = _closure(["numpy", ORT_DIST] + (["apache-tvm", "apache-tvm-ffi"] if with_tvm else []))
    assert not any(d.metadata["Name"].lower() == "torch" for d in deps)
    _link_site(deps, tmp_path / "deps")
    (site / "deps.pth").write_text(str(tmp_path / "deps") + "\n")

    # the documented one command (offline: every requirement is already there)
    extras = "onnx-gpu,tvm" if with_tvm else "onnx-gpu"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", "-q",
                        f"{wheel}[{extras}]"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    r = subprocess.run([py, "-I", "-c", RUN, json.dumps(arts)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    chosen = json.loads(r.stdout.strip().splitlines()[-1])
    assert chosen == ({"onnx": "onnx", "tvm": "tvm"} if with_tvm else {"onnx": "onnx"})
    for name, (_, _, inp) in arts.items():
        np.testing.assert_allclose(np.load(inp + ".out.npy"), expected, rtol=1e-4, atol=1e-5, err_msg=name)
    # the installed package is the wheel, not this checkout
    r = subprocess.run([py, "-I", "-c", "import fxpress.runtime as r; print(r.__file__)"], capture_output=True,
                       text=True, env=env)
    assert str(site) in r.stdout, r.stdout + r.stderr
