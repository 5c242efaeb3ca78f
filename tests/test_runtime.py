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
from fxpress.runtime import TVMExecutor, load

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


# ----------------------------------------------------------------------------- zero-copy TVM executor
# On CPU, TVMExecutor.run hands aligned contiguous inputs to TVM without a copy (DLPack) and returns numpy
# views of the output tensors the VM allocated for the call; run(..., copy=True) is the old copying path.

class _ReluFirst(torch.nn.Module):
    """The first kernel reads the input with 64-byte-aligned vector loads: a misaligned input passed to
    TVM as is crashes the process (SIGSEGV on AVX2 at a 16-byte offset)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(torch.relu(x))


class _Passthrough(torch.nn.Module):
    """Outputs of every kind: fresh, a folded constant, a parameter, a buffer (a constant too), a view of a
    parameter, an input, a view of an input, a 0-d input."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(1)))
        self.register_buffer("b", torch.arange(4.0))

    def forward(self, x, s):
        return (torch.relu(x) * s, torch.ones(2, 3), self.w, self.b, self.w.reshape(2, 2), x, x.reshape(-1), s)


def _aligned(a: np.ndarray, offset: int = 0) -> np.ndarray:
    """A copy of ``a`` whose data starts ``offset`` bytes past a 64-byte boundary."""
    buf = np.empty(a.nbytes + 128, dtype=np.uint8)
    start = -buf.ctypes.data % 64 + offset
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 64 == offset
    return out


@pytest.fixture(scope="module")
def tvm_models(exported):
    """name → (TVMExecutor, inputs as numpy arrays)."""
    gen = torch.Generator().manual_seed(0)
    cases = {}
    for name, model, inputs in [
        ("relu_first", _ReluFirst(), (torch.randn(64, 64, generator=gen),)),
        ("passthrough", _Passthrough(), (torch.randn(1, 4, generator=gen), torch.tensor(2.5))),
        ("digits_cnn", models.get("digits_cnn", "small").build(), models.get("digits_cnn", "small").example_inputs()),
        ("bert_small", models.get("bert_small", "small").build(), models.get("bert_small", "small").example_inputs()),
    ]:
        cm = fxpress.compile(model, inputs, passes="none", target="llvm")
        cases[name] = (cm._executor, [x.numpy() for x in inputs])
    rt = load(exported[0])  # resnet18 (default passes), through the artifact loader
    cases["resnet18"] = (rt.executor, [exported[1][0].numpy()])
    return cases


def _fresh_copies(inputs):
    return [np.array(x, copy=True) for x in inputs]


@pytest.mark.parametrize("name", ["relu_first", "passthrough", "digits_cnn", "bert_small", "resnet18"])
@pytest.mark.parametrize("layout", ["aligned", "misaligned"])
def test_zero_copy_matches_copying_path(tvm_models, name, layout):
    ex, inputs = tvm_models[name]
    xs = [_aligned(x, 0 if layout == "aligned" else 16) for x in inputs]
    before = _fresh_copies(xs)
    new = ex.run(xs)
    old = ex.run(_fresh_copies(inputs), copy=True)
    assert len(new) == len(old)
    for a, b in zip(new, old):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    for x, x0 in zip(xs, before):  # the caller's arrays are never written
        np.testing.assert_array_equal(x, x0)


def test_zero_copy_happens(tvm_models, monkeypatch):
    ex, (x,) = tvm_models["relu_first"]
    copies = []
    real = ex._copy_in
    monkeypatch.setattr(ex, "_copy_in", lambda a: copies.append(a.shape) or real(a))
    y = ex.run([_aligned(x)])[0]
    assert copies == []  # the aligned contiguous input went to TVM as is
    assert not y.flags.owndata and y.flags.writeable  # a view of the VM's output tensor
    ex.run([_aligned(x, 16)])
    assert copies == [(64, 64)]


def test_unusual_inputs(tvm_models, tmp_path, monkeypatch):
    ex, (x,) = tvm_models["relu_first"]
    ref = ex.run([x.copy()], copy=True)[0]
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")  # read-only pages: a write would crash
    wide = _aligned(np.repeat(x, 2, axis=1))
    cases = {
        # name: (array, copied?)
        "misaligned 16 B": (_aligned(x, 16), True),
        "misaligned 4 B": (_aligned(x, 4), True),
        "non-contiguous": (wide[:, ::2], True),
        "fortran order": (np.asfortranarray(x), True),
        "big-endian": (x.astype(">f4"), True),
        "read-only mmap": (mapped, False),  # .npy headers are padded to 64 bytes: the data is aligned
        "read-only aligned": (_aligned(x), False),
    }
    cases["read-only aligned"][0].flags.writeable = False
    assert not mapped.flags.writeable and mapped.ctypes.data % 64 == 0
    copies = []
    real = ex._copy_in
    monkeypatch.setattr(ex, "_copy_in", lambda a: copies.append(1) or real(a))
    for label, (arr, copied) in cases.items():
        before = np.array(arr, copy=True)
        n = len(copies)
        y = ex.run([arr])[0]
        np.testing.assert_array_equal(y, ref, err_msg=label)
        np.testing.assert_array_equal(arr, before, err_msg=label)
        assert (len(copies) > n) == copied, label
        assert not np.shares_memory(y, arr), label


def test_zero_d_input_stays_zero_d(tvm_models):
    ex, (x, s) = tvm_models["passthrough"]
    assert s.ndim == 0
    ref = ex.run([x.copy(), s.copy()], copy=True)
    # A 0-d array (aligned or not), a numpy scalar: the VM checks the argument's shape, so a 0-d
    # parameter given a (1,) tensor would fail.
    for scalar in (_aligned(s), np.asarray(np.float32(2.5)), np.float32(2.5)):
        out = ex.run([_aligned(x), scalar])
        assert out[-1].shape == () and out[-1] == np.float32(2.5)
        for a, b in zip(out, ref):
            np.testing.assert_array_equal(a, b)


def test_results_survive_later_calls(tvm_models):
    # The VM must not reuse an output's memory while the caller holds the previous result.
    for name in ("relu_first", "digits_cnn", "resnet18"):
        ex, inputs = tvm_models[name]
        gen = np.random.default_rng(1)
        batches = [[_aligned(gen.standard_normal(x.shape).astype(x.dtype)) for x in inputs] for _ in range(6)]
        expected = [ex.run(b, copy=True) for b in batches]
        held = [ex.run(b) for b in batches]  # all kept alive at once
        assert not held[0][0].flags.owndata
        for outs, exp in zip(held, expected):
            for a, b in zip(outs, exp):
                np.testing.assert_array_equal(a, b)
        # ...and two results never share memory.
        assert not np.shares_memory(held[0][0], held[1][0])


def test_outputs_never_alias_params_constants_or_inputs(tvm_models):
    ex, (x, s) = tvm_models["passthrough"]
    xs = [_aligned(x), _aligned(s)]
    first = ex.run(xs)
    expected = ex.run(_fresh_copies(xs), copy=True)
    params = [np.from_dlpack(p) for p in ex.params]
    assert len(params) == 1  # w; the buffer b became a folded constant
    assert not first[0].flags.owndata  # the one fresh output is a view...
    for i, y in enumerate(first[1:], 1):  # ...every other one a private copy
        assert y.flags.owndata, i
    for y in first:
        assert not any(np.shares_memory(y, p) for p in params)
        assert not any(np.shares_memory(y, a) for a in xs)
    for y in first:  # the caller scribbles over everything it got
        y[...] = 42
    np.testing.assert_array_equal(np.from_dlpack(ex.params[0]), expected[2])
    second = ex.run(_fresh_copies(xs))
    for a, b in zip(second, expected):
        np.testing.assert_array_equal(a, b)


def test_split_branches_regions_zero_copy():
    from fxpress.models.registry import get_dynamic

    spec = get_dynamic("early_exit")
    cm = fxpress.compile(spec.build(), spec.example_inputs(), passes=["split_branches"], target="llvm",
                         options={"split_branches": dict(spec.options)})
    executors = list(cm._interp.executors.values())
    assert len(executors) > 1 and all(isinstance(ex, TVMExecutor) and ex._zero_copy for ex in executors)
    samples = [spec.sample(seed) for seed in range(12)]
    new = [cm(*x) for x in samples]
    for ex in executors:
        ex._zero_copy = False  # the copying path
    try:
        old = [cm(*x) for x in samples]
    finally:
        for ex in executors:
            ex._zero_copy = True
    for a, b in zip(new, old):
        for ya, yb in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
            assert torch.equal(ya, yb)
