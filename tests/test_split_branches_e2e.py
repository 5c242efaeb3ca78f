"""split_branches end to end: every dynamic reference model compiled to llvm (TVM) and to ONNX Runtime.

The DyCL acceptance bar: over 100 random inputs that exercise every path, the compiled model's outputs
match eager PyTorch within 1e-4 (relative) and the decisions it takes (which branch, which exit, how many
iterations: the trace of branch bodies, loop iterations and returns executed) are identical. Then
export → reload in a process where importing torch fails, and the torch.cond (native) lowering.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree

import fxpress
from fxpress.models.registry import dynamic_names, get_dynamic

from helpers import rel_err

TARGETS = ("llvm", "onnx")
N_INPUTS = 100
# Every path the random inputs must take (seeds 0..99): keys of fxpress.runtime.host_program.Trace.
PATHS = {
    "early_exit": 3,     # exit 1, 2, 3
    "gated_skip": 4,     # each of 2 blocks run or skipped
    "blockdrop": 4,      # each of 2 blocks kept or dropped
    "refine_loop": 9,    # 0..8 iterations
    "shape_branch": 2,   # coarse or fine
    "greedy_decoder": 5,  # end token at step 1..4, or none
    "counter_loop": 5,   # 0..4 iterations (4: the counter's bound)
    "ranet": 2,          # small-resolution exit or full resolution
    "sample_gate": 4,    # each of 2 samples' block run or skipped
    "attn_decoder": 5,   # stop at step 1..4, or none
}

_CACHE: dict = {}


def compiled(name, target):
    """Compile each (model, target) once per session."""
    if (name, target) not in _CACHE:
        spec = get_dynamic(name)
        model = spec.build()
        cm = fxpress.compile(model, spec.example_inputs(), passes=["split_branches"], target=target,
                             options={"split_branches": dict(spec.options)})
        _CACHE[name, target] = (spec, model, cm)
    return _CACHE[name, target]


def leaves(y):
    return [t for t in pytree.tree_leaves(y)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", dynamic_names())
def test_acceptance_bar(name, target):
    spec, model, cm = compiled(name, target)
    assert cm.report[-1].max_rel_error < 1e-5
    paths: dict[str, int] = {}
    worst = 0.0
    for seed in range(N_INPUTS):
        x = spec.sample(seed)
        y, trace = cm.run_with_trace(*x)
        y_ref, markers = cm.eager_trace(model, *x)
        for a, b in zip(leaves(y), leaves(y_ref)):
            assert a.shape == b.shape and a.dtype == b.dtype
            worst = max(worst, rel_err(a, b) if b.is_floating_point() else float((a != b).any()))
        assert trace.markers == markers, f"seed {seed}: host took {trace.key()}, eager executed {markers}"
        paths[trace.key()] = paths.get(trace.key(), 0) + 1
    assert worst <= 1e-4, worst
    assert len(paths) == PATHS[name], paths


# ----------------------------------------------------------------------------- export, torch-free reload

TORCH_FREE = textwrap.dedent("""
    import sys, json, importlib.abc
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch imported in the torch-free runtime: " + name)
    sys.meta_path.insert(0, NoTorch())
    import numpy as np
    import fxpress.runtime
    from fxpress.runtime.host_program import Trace
    jobs = json.load(open(sys.argv[1]))
    out = {}
    for job in jobs:
        rt = fxpress.runtime.load(job["artifact"], backend=job["backend"])
        data = np.load(job["inputs"])
        ys, keys = [], []
        for i in range(len(data.files)):
            trace = Trace()
            ys.append([y.tolist() for y in rt.run([data[f"x{i}"]], trace)])
            keys.append(trace.key())
        out[job["artifact"] + ":" + job["backend"]] = {"outputs": ys, "paths": keys, "repr": repr(rt)}
    assert "torch" not in sys.modules
    json.dump(out, open(sys.argv[2], "w"))
""")


def test_export_and_torch_free_reload(tmp_path):
    jobs, expected = [], {}
    # early exits in a loop, a bounded while, a duplicated join through TVM (the llvm build is reused);
    # one through ONNX Runtime (re-exported per region)
    plan = [("early_exit", "llvm", "tvm"), ("refine_loop", "llvm", "tvm"), ("shape_branch", "llvm", "tvm"),
            ("refine_loop", "onnx", "onnx"),
            # the issue #15 families: lists grown up to a break, int counters, RaNet, batch-1 slices
            ("greedy_decoder", "onnx", "onnx"), ("counter_loop", "llvm", "tvm"), ("ranet", "llvm", "tvm"),
            ("sample_gate", "llvm", "tvm"), ("attn_decoder", "onnx", "onnx")]
    for name, target, backend in plan:
        spec, model, cm = compiled(name, target)
        art = cm.export(str(tmp_path / f"{name}-{backend}"), backends=(backend,))
        manifest = json.load(open(os.path.join(art, "manifest.json")))
        assert manifest["host_program"]["regions"].keys() == cm.regions.keys()
        assert all(f in manifest["files"] for f in ("host_program.json", "regions/r0/" + (
            "tvm/model.so" if backend == "tvm" else "model.onnx")))
        xs = [spec.sample(1000 + s) for s in range(8)]
        np.savez(tmp_path / f"{name}-{backend}.npz", **{f"x{i}": x[0].numpy() for i, x in enumerate(xs)})
        jobs.append({"artifact": art, "backend": backend, "inputs": str(tmp_path / f"{name}-{backend}.npz")})
        runs = [cm.run_with_trace(*x) for x in xs]
        expected[f"{art}:{backend}"] = ([leaves(y) for y, _ in runs], [t.key() for _, t in runs],
                                        [leaves(cm.eager_trace(model, *x)[0]) for x in xs])
    script = tmp_path / "torch_free.py"
    script.write_text(TORCH_FREE)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "jobs.json"), str(result)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.load(open(result))
    for key, (ys, keys, eager) in expected.items():
        assert got[key]["paths"] == keys, key  # same decisions as in-process
        for y_rt, y_cm, y_eager in zip(got[key]["outputs"], ys, eager):
            for a, b, c in zip(y_rt, y_cm, y_eager):
                np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-5, atol=1e-6)
                assert rel_err(torch.as_tensor(np.asarray(a)), c) <= 1e-4
        assert "HostProgramRuntime" in got[key]["repr"]


def test_tampered_region_is_refused(tmp_path):
    from fxpress.errors import ArtifactError

    spec, model, cm = compiled("early_exit", "llvm")
    art = cm.export(str(tmp_path / "ee"), backends=("tvm",))
    with open(os.path.join(art, "host_program.json"), "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="host_program.json"):
        fxpress.runtime.load(art)


def test_per_sample_artifact_any_batch(tmp_path):
    # refine_loop with per_sample: each sample of a batch runs its own number of iterations
    spec = get_dynamic("refine_loop")
    model = spec.build()
    x = torch.cat([spec.sample(s)[0] for s in range(4)])
    cm = fxpress.compile(model, (x,), passes=["split_branches"], target="llvm",
                         options={"split_branches": {"per_sample": True}})
    rt = fxpress.runtime.load(cm.export(str(tmp_path / "rl"), backends=("tvm",)))
    xb = torch.cat([spec.sample(50 + s)[0] for s in range(7)])  # another batch size
    (y_ref, steps_ref), markers = cm.eager_trace(model, xb)
    y, steps = rt(xb.numpy())
    assert rt.last_trace.markers == markers
    assert rel_err(torch.from_numpy(y), y_ref) <= 1e-4
    assert steps.tolist() == steps_ref.tolist() and len(set(steps.tolist())) >= 3


# ----------------------------------------------------------------------------- native torch.cond lowering

@pytest.mark.parametrize("target", TARGETS)
def test_native_cond_lowering_matches_split(target):
    spec = get_dynamic("early_exit")
    model = spec.build()
    native = fxpress.compile(model, spec.example_inputs(), passes=["split_branches"], target=target,
                             options={"split_branches": {"lowering": "native"}})
    assert native.native is not None and not native.regions
    graph = native.graph()
    assert any("cond" in str(n.target) for n in graph.graph.nodes if n.op == "call_function")
    if target == "llvm":
        assert "if " in native.native.report[-1].ir  # relax.If in the Relax IR
    else:
        assert "If" in native.native.report[-1].ir  # an ONNX If node
    split = compiled("early_exit", target)[2]
    for seed in range(20):
        x = spec.sample(seed)
        y_native, y_split, y_ref = native(*x), split(*x), model(*x)
        assert rel_err(y_native, y_ref) <= 1e-4 and rel_err(y_native, y_split) <= 1e-4
