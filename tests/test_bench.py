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
