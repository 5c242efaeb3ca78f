"""fxpress.bench: every peer runs in one process on the digits model and returns sane numbers.

No timing assertions (the CI machine is shared): only that each number exists and is plausible.
"""
import json
import math
import shutil

import pytest
import torch

from fxpress import models
from fxpress.bench import MAXRSS, VMHWM, BenchResult, PeakRSS, bench_model

ALL = {"eager", "torch.compile", "onnxruntime", "fxpress:llvm", "fxpress:onnx"}


@pytest.fixture(scope="module")
def digits_bench() -> BenchResult:
    spec = models.get("digits_cnn")
    _, _, x_test, y_test = models.digits_data()
    labels = (x_test[:44], y_test[:44])  # 6 batches of 8, the last one padded
    # positional arguments exactly as `fxpress bench` calls it
    return bench_model(spec.build(), spec.example_inputs(), ["llvm", "onnx"], "none", 3, labels=labels,
                       name="digits_cnn")


def test_all_peers_run(digits_bench):
    r = digits_bench
    assert {p.peer for p in r.peers} == ALL
    must_work = {"eager", "onnxruntime", "fxpress:llvm", "fxpress:onnx"}
    if shutil.which("c++") or shutil.which("g++"):
        must_work.add("torch.compile")  # Inductor needs a C++ compiler on CPU
    for p in r.peers:
        if p.peer in must_work:
            assert p.ok, f"{p.peer} failed: {p.error}"
        else:
            assert p.ok or p.error, f"{p.peer} neither ran nor says why"


def test_numbers_are_sane(digits_bench):
    eager = digits_bench.peer("eager")
    for p in digits_bench.peers:
        if not p.ok:
            continue
        assert p.runs == 3
        assert 0 < p.min_ms <= p.median_ms <= p.p90_ms + 1e-9 and math.isfinite(p.median_ms)
        assert p.compile_s is not None and p.compile_s >= 0
        assert p.peak_mem_run_bytes >= 0 and p.peak_mem_compile_bytes >= 0
        assert p.size_bytes > 100_000  # ~150 KiB of fp32 weights (the ONNX file a bit more)
        assert abs(p.params - 38_474) <= 16  # lowering stages also count BN's num_batches_tracked
        assert p.macs > 2_000_000
        assert p.max_rel_error < 1e-4, (p.peer, p.max_rel_error)  # all fp32, no lossy pass
        assert p.accuracy == pytest.approx(eager.accuracy), p.peer
    assert eager.max_rel_error == 0.0 and eager.compile_s < 1.0
    assert 0.8 < eager.accuracy <= 1.0
    llvm = digits_bench.peer("fxpress:llvm")
    assert [s["name"] for s in llvm.stages] == ["trace", "lower:llvm"]
    assert digits_bench.memory_method in (VMHWM, MAXRSS)


def test_table_and_dict(digits_bench):
    table = digits_bench.table()
    for name in ALL:
        assert f"| {name} |" in table
    assert "median ms" in table and "vs eager" in table and "1.00×" in table
    d = json.loads(json.dumps(digits_bench.to_dict()))
    assert d["model"] == "digits_cnn" and d["passes"] == "none" and d["repeat"] == 3
    assert {p["peer"] for p in d["peers"]} == ALL
    assert d["inputs"] == [{"shape": [8, 1, 8, 8], "dtype": "float32"}]
    assert "compiled" not in d["peers"][0]


def test_failure_is_a_row_not_a_crash():
    spec = models.get("digits_cnn")
    r = bench_model(spec.build(), spec.example_inputs(), targets=["torch"], passes=["no_such_pass"], repeat=2,
                    peers=[])
    bad = r.peer("fxpress:torch")
    assert not bad.ok and "no_such_pass" in bad.error and bad.median_ms is None
    assert "| fxpress:torch | no_such_pass | failed |" in r.table()


def test_peak_rss_sees_an_allocation():
    with PeakRSS() as m:
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        x.add_(1)
        del x
    if m.method == VMHWM:
        assert m.bytes >= 48 << 20
    else:
        assert m.bytes >= 0


def test_run_all_renders_markdown_and_plots(digits_bench, tmp_path):
    """benchmarks/run_all.py --render-only: JSON → Markdown + the two plots (no measuring)."""
    import importlib.util
    import os

    from dataclasses import asdict

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "run_all.py")
    spec = importlib.util.spec_from_file_location("run_all", path)
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)

    rows = [asdict(p) for p in digits_bench.peers]
    model = {"model": "digits_cnn", "size": "small", "description": "digits", "has_labels": True,
             "inputs": digits_bench.inputs, "original": {"params": 38474, "size_bytes": 153896, "macs": 2700288},
             "threads": {}, "peers": [r for r in rows if not r["peer"].startswith("fxpress")],
             "fxpress": [r for r in rows if r["peer"].startswith("fxpress")],
             "skipped": [{"passes": "fuse+shift_add", "reason": "skipped: pass(es) shift_add not registered yet"}]}
    meta = {"tag": "t", "date": "2026-01-01T00:00:00Z", "commit": "abc", "command": "run_all.py --quick",
            "repeat": 3, "targets": ["llvm", "onnx"], "load_start": 1.0, "load_end": 1.0,
            "machine": {"cpu": "test cpu", "cpu_flags": "avx2", "usable_cores": 2, "logical_cores": 2,
                        "memory_bytes": 1 << 30, "os": "linux", "python": "3.11", "versions": {"torch": "x"}},
            "models": [model]}
    (tmp_path / "t.json").write_text(json.dumps(meta))
    assert run_all.main(["--render-only", "--out", str(tmp_path), "--tag", "t"]) == 0
    md = (tmp_path / "t.md").read_text()
    assert "test cpu" in md and "commit: abc" in md and "| digits_cnn |" in md
    assert "| fxpress:llvm | none |" in md and "shift_add not registered yet" in md
    for png in ("t-accuracy_vs_size.png", "t-latency_vs_passes.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def test_time_blocks_alternates_whole_blocks():
    """Each callable runs warm-up + timed calls as one block, the callables take turns block by block,
    and every timed call is returned (in ms, per block)."""
    from fxpress.bench import time_blocks

    order = []
    fns = {"a": lambda x: order.append("a"), "b": lambda x: order.append("b")}
    times = time_blocks(fns, (torch.zeros(1),), blocks=2, per_block=3, warmup=1)
    assert order == ["a"] * 4 + ["b"] * 4 + ["a"] * 4 + ["b"] * 4
    assert [len(b) for b in times["a"]] == [3, 3] and [len(b) for b in times["b"]] == [3, 3]
    assert all(t >= 0 for blocks in times.values() for b in blocks for t in b)
