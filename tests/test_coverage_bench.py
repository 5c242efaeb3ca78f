"""The coverage benchmark's CI slice (issue #14): benchmarks/coverage.py --quick on real architectures
(transformers BERT and GPT-2 from small configs, seeded; a depthwise CNN) writes its table, every run
compiles or fails with a clear error, no lossless pass set mismatches eager, and quantize rewrites the
transformers models' layers. Timings in it are not checked (they are benchmark output, not a test)."""
import importlib.util
import json
import os

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _coverage_module():
    spec = importlib.util.spec_from_file_location("coverage_bench", os.path.join(ROOT, "benchmarks", "coverage.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_coverage_quick_slice(tmp_path):
    out = str(tmp_path / "coverage")
    assert _coverage_module().main(["--quick", "--repeat", "3", "--out", out]) == 0
    data = json.load(open(out + ".json"))
    assert data["summary"]["silent_lossless_mismatches"] == 0
    assert data["meta"]["machine"]["cpu"] and data["meta"]["commit"] is not None
    rows = {(r["model"], r["pass_set"]): r for r in data["rows"]}
    assert len(rows) == 6
    for r in rows.values():
        assert r["ok"], r.get("error")
    for model in ("hf_bert", "hf_gpt2"):
        q = next(p for p in rows[model, "fuse+quantize"]["passes"] if p["pass"] == "quantize")
        assert q["status"] == "applied" and q["found"] and q["rewritten"] / q["found"] >= 0.9, q
    md = open(out + ".md").read()
    assert "silent lossless mismatches" in md and "hf_gpt2" in md
