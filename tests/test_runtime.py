"""Export → load in a fresh torch-free process → same outputs; damaged artifacts are refused."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fxpress
from fxpress import models
from fxpress.errors import ArtifactError
from fxpress.runtime import load

from helpers import rel_err

# Runs in a subprocess where any attempt to import torch fails loudly.
TORCH_FREE = textwrap.dedent("""
    import sys, importlib.abc
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch imported in the torch-free runtime: " + name)
    sys.meta_path.insert(0, NoTorch())
    import numpy as np
    import fxpress.runtime
    art, backend, inp, out = sys.argv[1:5]
    rt = fxpress.runtime.load(art, backend=backend)
    data = np.load(inp)
    y = rt(*[data[k] for k in sorted(data.files)])
    np.save(out, y)
    assert "torch" not in sys.modules
    print("ok", rt.backend)
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    spec = models.get("resnet18")
    m, x = spec.build(), spec.example_inputs()
    cm = fxpress.compile(m, x, passes="default", target="llvm")
    path = cm.export(str(tmp_path_factory.mktemp("art") / "resnet"))
    with torch.no_grad():
        ref = m(*x)
    return path, x, ref


def test_artifact_layout(exported):
    path, _, _ = exported
    assert sorted(os.listdir(path)) == ["manifest.json", "model.onnx", "report.json", "tvm"]
    assert sorted(os.listdir(os.path.join(path, "tvm"))) == ["model.so", "params.npz"]
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["inputs"] == [{"name": "input_0", "shape": [2, 3, 32, 32], "dtype": "float32"}]
    assert manifest["outputs"][0]["shape"] == [2, 10]
    assert set(manifest["files"]) == {"model.onnx", "report.json", "tvm/model.so", "tvm/params.npz"}
    assert {"fxpress", "torch", "tvm", "onnx"} <= set(manifest["versions"])
    # No half-written siblings remain beside the artifact.
    assert [d for d in os.listdir(os.path.dirname(path)) if ".tmp-" in d] == []


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_torch_free_reload(exported, backend, tmp_path):
    path, x, ref = exported
    inp, out = tmp_path / "in.npz", tmp_path / "out.npy"
    np.savez(inp, a=x[0].numpy())
    r = subprocess.run([sys.executable, "-c", TORCH_FREE, path, backend, str(inp), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"ok {backend}" in r.stdout
    assert rel_err(np.load(out), ref) <= 1e-4


def test_in_process_load_matches(exported):
    path, x, ref = exported
    rt = load(path)
    assert rt.backend == "tvm"
    assert rel_err(rt(x[0].numpy()), ref) <= 1e-4


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return str(dst)


def test_missing_file_is_named(exported, tmp_path):
    art = _copy(exported[0], tmp_path)
    os.remove(os.path.join(art, "tvm", "params.npz"))
    with pytest.raises(ArtifactError, match=r"tvm/params.npz listed in the manifest is missing"):
        load(art)


def test_tampered_file_is_refused(exported, tmp_path):
    art = _copy(exported[0], tmp_path)
    with open(os.path.join(art, "tvm", "model.so"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match=r"model.so has sha256 .* the manifest says .*Refusing to load"):
        load(art)


def test_newer_format_is_refused(exported, tmp_path):
    art = _copy(exported[0], tmp_path)
    mpath = os.path.join(art, "manifest.json")
    manifest = json.load(open(mpath))
    manifest["format_version"] = 99
    json.dump(manifest, open(mpath, "w"))
    with pytest.raises(ArtifactError, match="format_version 99, newer than this runtime understands"):
        load(art)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load(str(tmp_path))


def test_export_replaces_previous_atomically(exported, tmp_path):
    spec = models.get("digits_cnn")
    cm = fxpress.compile(spec.build(), spec.example_inputs(), passes="none", target="onnx")
    target = str(tmp_path / "art")
    cm.export(target, backends=("onnx",))
    first = open(os.path.join(target, "manifest.json")).read()
    cm.export(target, backends=("onnx",))
    assert os.listdir(tmp_path) == ["art"]
    assert json.load(open(os.path.join(target, "manifest.json")))["inputs"] == json.loads(first)["inputs"]
