"""Issue #17 items 1, 5, 8, 9 and #16's loader points: export never deletes what it did not write, the
manifest is validated (schema, paths, params, ranges) before anything is opened, load(backend="auto")
follows the export and falls back in one line, the library's ISA is checked, the tuning DB skips bad files."""
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxpress
from fxpress.errors import ArtifactError, TargetUnavailableError
from fxpress.runtime import cpu, executors, load
from fxpress.runtime import manifest as manifest_mod
from fxpress.runtime.manifest import read_manifest, sha256_file

X = (torch.randn(2, 4, generator=torch.Generator().manual_seed(1)),)


def _tiny(out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out)).eval()


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, ids):
        return self.fc(self.emb(ids))


IDS = (torch.tensor([[1, 2, 3], [4, 5, 9]]),)


@pytest.fixture(scope="module")
def cm_torch():
    return fxpress.compile(_tiny(), X, passes="none", target="torch")


@pytest.fixture(scope="module")
def onnx_art(cm_torch, tmp_path_factory):
    return cm_torch.export(str(tmp_path_factory.mktemp("onnx") / "art"), backends=("onnx",))


@pytest.fixture(scope="module")
def tvm_art(tmp_path_factory):
    """An llvm export with both backends of an embedding model (a ranged input, a table parameter)."""
    cm = fxpress.compile(_Embed().eval(), IDS, passes="none", target="llvm")
    return cm.export(str(tmp_path_factory.mktemp("tvm") / "art"))


def _copy(art, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(art, dst)
    return dst


def _edit(art: str, fn) -> None:
    path = os.path.join(art, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    fn(m)
    with open(path, "w") as f:
        json.dump(m, f)


# ============================================================================ export never deletes foreign data


def test_export_refuses_a_directory_that_is_not_an_artifact(cm_torch, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "thesis.txt").write_text("four years of work")
    with pytest.raises(ArtifactError, match=r"refusing to export to .*proj: it is a directory that is not an "
                                            r"fxpress artifact \(it holds no manifest.json\).*1 entries"):
        cm_torch.export(str(proj), backends=("onnx",))
    assert (proj / "thesis.txt").read_text() == "four years of work"
    assert sorted(os.listdir(tmp_path)) == ["proj"]  # no temp dir left behind


def test_export_refuses_a_directory_with_a_foreign_or_corrupt_manifest(cm_torch, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "manifest.json").write_text('{"format": "someone-else"}')
    (d / "data.bin").write_bytes(b"keep")
    with pytest.raises(ArtifactError, match="its manifest is not one this fxpress can read"):
        cm_torch.export(str(d), backends=("onnx",))
    assert (d / "data.bin").read_bytes() == b"keep"


@pytest.mark.parametrize("where", ["", ".", "/", "home", "./"])
def test_export_refuses_cwd_root_and_home_outright(cm_torch, tmp_path, monkeypatch, where):
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    target = str(home) if where == "home" else where
    with pytest.raises(ArtifactError, match=r"(is empty; name a new directory|refusing to export to .*: it is "
                                            r"(the file system root|the current directory|your home directory))"):
        cm_torch.export(target, backends=("onnx",))
    assert os.listdir(work) == ["notes.txt"]
    assert os.listdir(home) == []


def test_export_into_an_empty_directory_and_over_an_artifact(cm_torch, tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    cm_torch.export(str(d), backends=("onnx",))
    assert read_manifest(str(d))["outputs"][0]["shape"] == [2, 3]
    fxpress.compile(_tiny(5), X, passes="none", target="torch").export(str(d), backends=("onnx",))
    assert read_manifest(str(d))["outputs"][0]["shape"] == [2, 5]


def test_exported_directory_follows_the_umask(cm_torch, tmp_path):
    old = os.umask(0o022)
    try:
        path = cm_torch.export(str(tmp_path / "a"), backends=("onnx",))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755


def test_export_backends_argument(cm_torch, tmp_path):
    with pytest.raises(ArtifactError, match=r"backends is empty: an artifact needs at least one of 'onnx', 'tvm'"):
        cm_torch.export(str(tmp_path / "none"), backends=())
    with pytest.raises(ArtifactError, match=r"unknown export backend\(s\) \['tflite'\]"):
        cm_torch.export(str(tmp_path / "bad"), backends="tflite")
    with pytest.raises(ArtifactError, match="backends must be 'onnx', 'tvm' or a tuple of them, got 5"):
        cm_torch.export(str(tmp_path / "int"), backends=5)
    assert os.listdir(tmp_path) == []
    path = cm_torch.export(str(tmp_path / "one"), backends="onnx")  # a single name, not its letters
    assert list(read_manifest(path)["backends"]) == ["onnx"]


# ============================================================================ manifest schema


BAD_MANIFESTS = [
    ("inputs missing", lambda m: m.pop("inputs"), r"inputs is missing"),
    ("files as a list", lambda m: m.__setitem__("files", list(m["files"])), r"files must be a JSON object, got list"),
    ("unknown dtype", lambda m: m["inputs"][0].__setitem__("dtype", "float33"), r"inputs\[0\]\.dtype is 'float33', not a dtype"),
    ("negative shape", lambda m: m["inputs"][0].__setitem__("shape", [2, -4]), r"inputs\[0\]\.shape\[1\] must be an integer >= 0, got -4"),
    ("format_version -5", lambda m: m.__setitem__("format_version", -5), r"format_version must be a positive integer, got -5"),
    ("format_version str", lambda m: m.__setitem__("format_version", "1"), r"format_version must be a positive integer, got '1'"),
    ("manifest a list", None, r"is not an fxpress manifest"),
    ("backends empty", lambda m: m.__setitem__("backends", {}), r"backends is empty"),
    ("backend unknown", lambda m: m["backends"].__setitem__("tflite", {}), r"names unknown backend 'tflite'"),
    ("onnx file missing key", lambda m: m["backends"]["onnx"].pop("file"), r"backends\.onnx\.file is missing"),
    ("bad digest", lambda m: m["files"].__setitem__("model.onnx", 5), r"files\['model.onnx'\] must be a sha256 hex digest"),
    ("range on a float", lambda m: m["inputs"][0].__setitem__("range", [0, 3]), r"only integer \(index\) inputs have a range"),
    ("outputs a dict", lambda m: m.__setitem__("outputs", {}), r"outputs must be a JSON list, got dict"),
]


@pytest.mark.parametrize("name, edit, pattern", BAD_MANIFESTS, ids=[b[0] for b in BAD_MANIFESTS])
def test_malformed_manifest_is_a_clear_error(onnx_art, tmp_path, name, edit, pattern):
    art = _copy(onnx_art, tmp_path)
    if edit is None:
        with open(os.path.join(art, "manifest.json"), "w") as f:
            json.dump([1, 2], f)
    else:
        _edit(art, edit)
    with pytest.raises(ArtifactError, match=pattern):
        load(art)


@pytest.mark.parametrize("rel", ["/etc/shadow", "../outside.txt", "a/../../outside.txt", "./model.onnx", "C:/x"])
def test_paths_outside_the_artifact_are_refused_before_any_hashing(onnx_art, tmp_path, monkeypatch, rel):
    art = _copy(onnx_art, tmp_path)
    _edit(art, lambda m: m["files"].__setitem__(rel, "0" * 64))
    hashed = []
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: hashed.append(p) or "0" * 64)
    with pytest.raises(ArtifactError, match="points outside the artifact directory") as e:
        load(art)
    assert "sha256" not in str(e.value) and hashed == []


def test_symlink_leading_outside_is_refused(onnx_art, tmp_path):
    art = _copy(onnx_art, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    os.symlink(secret, os.path.join(art, "link.txt"))
    _edit(art, lambda m: m["files"].__setitem__("link.txt", sha256_file(str(secret))))
    with pytest.raises(ArtifactError, match="points outside the artifact directory .*through a symbolic link"):
        load(art)


# ============================================================================ params and ranges at load


def _rewrite_params(art: str, fn) -> None:
    path = os.path.join(art, "tvm", "params.npz")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    fn(arrays)
    np.savez(path, **arrays)
    _edit(art, lambda m: m["files"].__setitem__("tvm/params.npz", sha256_file(path)))  # hashes match: only the content disagrees


def test_params_disagreeing_with_the_manifest_fail_at_load(tvm_art, tmp_path):
    pytest.importorskip("tvm")
    art = _copy(tvm_art, tmp_path)
    _rewrite_params(art, lambda a: a.__setitem__("p0", np.zeros((3, 3), np.float32)))
    with pytest.raises(ArtifactError, match=r"parameter p0 has shape \(3, 3\) dtype float32, the manifest says shape"):
        load(art, backend="tvm")
    art2 = str(tmp_path / "two")
    shutil.copytree(tvm_art, art2)
    _rewrite_params(art2, lambda a: a.__setitem__("p99", np.zeros(1, np.float32)))
    with pytest.raises(ArtifactError, match="the parameters do not belong to this library"):
        load(art2, backend="tvm")


def test_widened_index_range_is_refused_at_load(tvm_art, tmp_path):
    pytest.importorskip("tvm")
    spec = read_manifest(tvm_art)["inputs"][0]
    assert spec["range"] == [0, 9] and spec["table_param"].startswith("p")
    assert load(tvm_art, backend="tvm")(IDS[0].numpy()).shape == (2, 3, 2)
    art = _copy(tvm_art, tmp_path)
    _edit(art, lambda m: m["inputs"][0].__setitem__("range", [0, 100000000]))
    with pytest.raises(ArtifactError, match=r"declares index range \[0, 100000000\], but its table p\d+ has 10 rows"):
        load(art, backend="tvm")


# ============================================================================ backend="auto", ISA


def test_auto_follows_what_the_export_was_made_for(tmp_path, tvm_art):
    pytest.importorskip("tvm")
    onnx_made = fxpress.compile(_tiny(), X, passes="none", target="onnx").export(str(tmp_path / "o"))
    assert set(read_manifest(onnx_made)["backends"]) == {"onnx", "tvm"}
    assert load(onnx_made).backend == "onnx"
    assert load(tvm_art).backend == "tvm"


def _no_tvm(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tvm" else real(name, *a))


def test_auto_falls_back_when_tvm_is_missing_and_says_so(tvm_art, monkeypatch, caplog):
    _no_tvm(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fxpress.runtime"):
        rt = load(tvm_art)
    assert rt.backend == "onnx"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "fxpress.runtime"]
    assert "\n" not in line and "running art with onnx: tvm skipped, the 'tvm' package is not installed" in line
    with pytest.raises(TargetUnavailableError, match=r"backend='tvm': the 'tvm' package is not installed "
                                                     r"\(pip install apache-tvm.*or load it with backend='onnx'"):
        load(tvm_art, backend="tvm")


def test_manifest_records_the_tvm_target(tvm_art):
    info = read_manifest(tvm_art)["backends"]["tvm"]
    assert info["mcpu"] and isinstance(info["isa"], list) and info["portable"] is False
    assert info["mcpu"] in info["target"]
    assert set(info["isa"]) <= set(cpu.LLVM_TO_CPUINFO)


def test_cpu_lacking_the_library_features_is_a_clear_error(tvm_art, tmp_path, monkeypatch, caplog):
    art = _copy(tvm_art, tmp_path)
    _edit(art, lambda m: m["backends"]["tvm"].update(isa=["avx2", "avx512f", "sse4.1"], mcpu="bigcpu"))
    monkeypatch.setattr(cpu, "is_x86", lambda: True)
    monkeypatch.setattr(cpu, "host_flags", lambda: {"sse2", "sse4_1"})
    with pytest.raises(TargetUnavailableError, match=r"compiled for CPU 'bigcpu' and this CPU lacks avx2, avx512f "
                                                     r"\(running it would crash with an illegal instruction\).*--portable"):
        load(art, backend="tvm")
    with caplog.at_level(logging.WARNING, logger="fxpress.runtime"):
        assert load(art).backend == "onnx"
    assert any("lacks avx2, avx512f" in r.getMessage() for r in caplog.records)


def test_portable_build_needs_no_extended_isa(tmp_path, monkeypatch):
    pytest.importorskip("tvm")
    from fxpress.codegen.targets import resolve_target
    from tvm.target import codegen

    monkeypatch.setenv("FXPRESS_PORTABLE", "1")
    t = resolve_target("llvm")
    if not codegen.llvm_get_system_triple().startswith("x86_64"):
        pytest.skip("the portable target is x86-64 specific")
    assert t.attrs["mcpu"] == "x86-64"
    path = fxpress.compile(_tiny(), X, passes="none", target="llvm").export(str(tmp_path / "p"), backends="tvm")
    info = read_manifest(path)["backends"]["tvm"]
    assert info["portable"] is True and info["mcpu"] == "x86-64" and info["isa"] == []
    monkeypatch.setattr(cpu, "host_flags", lambda: {"sse2"})  # the oldest x86-64: still runs
    np.testing.assert_allclose(load(path)(X[0].numpy()), _tiny()(X[0]).detach().numpy(), rtol=1e-4, atol=1e-5)


# ============================================================================ tuning database


def test_tuning_db_skips_and_logs_files_of_the_wrong_shape(tmp_path, caplog):
    pytest.importorskip("tvm")
    from fxpress.codegen.targets import resolve_target
    from fxpress.codegen.tuning_db import TuningDatabase

    db = TuningDatabase(resolve_target("llvm"), tmp_path, shipped=False)
    bad = {"list.json": [], "workload_int.json": {"workload": 3},
           "records_str.json": {"workload": ["1", {}], "records": "x"},
           "trials_str.json": {"workload": ["1", {}], "records": [], "trials": "many"}}
    for name, content in bad.items():
        with open(os.path.join(db.dir, name), "w") as f:
            json.dump(content, f)
    with open(os.path.join(db.dir, "mixed.json"), "w") as f:  # one good record, one malformed
        json.dump({"workload": ["1", {}], "records": [[["trace"], [0.001], {}, []], "junk"], "trials": 4}, f)
    with caplog.at_level(logging.WARNING, logger="fxpress.codegen.tuning"):
        entries = db.entries()
        db.ms_database()  # the bad workload is skipped with a warning, not a TypeError
    assert set(entries) == {"mixed"} and len(entries["mixed"]["records"]) == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    for name in bad:
        assert f"ignoring {os.path.join(db.dir, name)}" in text
    assert "dropping 1 malformed record(s)" in text
    # a later commit of that workload replaces the bad file instead of failing on it
    merged = db.commit(["1", {}], [[["t2"], [0.002], {}, []]], trials=3)
    assert merged["trials"] == 3


def test_tuning_with_a_bad_db_file_still_compiles(tmp_path, monkeypatch):
    pytest.importorskip("tvm")
    from fxpress.codegen.targets import resolve_target
    from fxpress.codegen.tuning_db import TuningDatabase, target_key

    monkeypatch.setenv("FXPRESS_CACHE_DIR", str(tmp_path))
    db = TuningDatabase(resolve_target("llvm"))
    for name, content in {"a.json": [1, 2], "b.json": {"workload": {"x": 1}}, "c.json": "text"}.items():
        with open(os.path.join(db.dir, name), "w") as f:
            json.dump(content, f)
    assert target_key(db.target) in db.dir
    cm = fxpress.compile(_tiny(), X, passes="none", target="llvm", tune=2)
    np.testing.assert_allclose(cm(X[0]).numpy(), _tiny()(X[0]).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_security_doc_says_what_load_opens_and_checks():
    text = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    assert "## What `load()` opens and checks, in order" in text
    for point in ("Schema", "Paths.", "sha256.", "this CPU lacks an ISA feature", "param_specs", "table_param",
                  "never deletes what it did not write"):
        assert point in text, point


CONCURRENT_CHILD = """
import os, sys, time
import torch
import fxpress
from fxpress import export as ex

target, go, out = sys.argv[1], sys.argv[2], int(sys.argv[3])

def write_onnx(cm, root):  # the export machinery is under test, not the ONNX exporter
    with open(os.path.join(root, "model.onnx"), "wb") as f:
        f.write(bytes([out]) * 4096)
    return {"file": "model.onnx", "opset": 18, "input_names": ["input_0"], "output_names": ["output_0"]}

ex._write_onnx = write_onnx
cm = fxpress.compile(torch.nn.Linear(4, out), (torch.randn(2, 4),), passes="none", target="torch")
open(go + f".ready{out}", "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
cm.export(target, backends=("onnx",))
"""


def test_concurrent_exporters_to_one_new_directory_all_succeed(tmp_path):
    import subprocess
    import sys

    target, go = tmp_path / "art", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_CHILD, str(target), str(go), str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (3, 4, 5)]
    import time
    deadline = time.time() + 240
    while not all((tmp_path / f"go.ready{n}").exists() for n in (3, 4, 5)):  # all compiled: release them together
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a child failed before exporting"
        time.sleep(0.05)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    m = read_manifest(str(target))  # one complete artifact, whichever finished last
    assert m["outputs"][0]["shape"][1] in (3, 4, 5)
    assert sorted(e for e in os.listdir(tmp_path) if not e.startswith("go")) == ["art"]  # no temp dirs left


def test_export_race_with_a_first_exporter_replaces_its_artifact(cm_torch, tmp_path, monkeypatch):
    """The path did not exist when checked, but another exporter renamed its artifact there first."""
    from fxpress import export as ex

    target = tmp_path / "art"
    cm_torch.export(str(target), backends=("onnx",))  # "the other exporter's" artifact
    real_exists = os.path.exists
    monkeypatch.setattr(ex.os.path, "exists", lambda p: False if p == str(target) else real_exists(p))
    fxpress.compile(_tiny(5), X, passes="none", target="torch").export(str(target), backends=("onnx",))
    monkeypatch.undo()
    assert read_manifest(str(target))["outputs"][0]["shape"] == [2, 5]


def test_export_refuses_to_write_what_load_would_refuse(tmp_path):
    cm = fxpress.compile(_tiny(), X, passes="none", target="torch")
    cm.output_specs[0]["dtype"] = "float8_e4m3fnuz"  # as if the model returned a dtype the runtime lacks
    with pytest.raises(ArtifactError, match=r"outputs\[0\]\.dtype is 'float8_e4m3fnuz', not a dtype this runtime knows"):
        cm.export(str(tmp_path / "c"), backends=("onnx",))
    assert os.listdir(tmp_path) == []


def test_cuda_library_on_a_machine_without_gpu_falls_back(tvm_art, tmp_path, caplog):
    pytest.importorskip("tvm")
    if executors._cuda_present():
        pytest.skip("this machine has a CUDA GPU")
    art = _copy(tvm_art, tmp_path)
    _edit(art, lambda m: m["backends"]["tvm"].update(device="cuda"))
    with caplog.at_level(logging.WARNING, logger="fxpress.runtime"):
        assert load(art).backend == "onnx"
    assert any("tvm skipped, its TVM library is for CUDA and this machine has no CUDA GPU" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(TargetUnavailableError, match="is for CUDA and this machine has no CUDA GPU.*backend='onnx'"):
        load(art, backend="tvm")
