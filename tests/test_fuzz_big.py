"""The dedicated fuzz job (issue #10): >= 1,000 random models through every pass and every lowering.

Run with ``scripts/fuzz.sh`` (``pytest -m fuzz tests/test_fuzz_big.py``); CI runs the small sample in
tests/test_fuzz.py instead. Unlike the CI sample it does not stop at the first bug: it runs every model,
counts what it finds and writes a JSON summary (every finding with the spec that rebuilds the model),
then fails if any silent mismatch or crash was found.

Environment:
  FXPRESS_FUZZ_EXAMPLES  number of models (default 1000)
  FXPRESS_FUZZ_SEED      hypothesis seed (default: random; the summary records it)
  FXPRESS_FUZZ_REPORT    summary path (default .cache/fuzz/summary.json)
  FXPRESS_FUZZ_TARGETS   lowering targets (default "onnx,llvm"; "torch" is the pass check itself)
"""
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

import fxpress

from fuzz_check import check_case
from fuzz_models import fuzz_cases

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[1]


def test_fuzz_big():
    n = int(os.environ.get("FXPRESS_FUZZ_EXAMPLES", "1000"))
    run_seed = int(os.environ.get("FXPRESS_FUZZ_SEED", str(random.randrange(2**31))))
    report = Path(os.environ.get("FXPRESS_FUZZ_REPORT", ROOT / ".cache" / "fuzz" / "summary.json"))
    targets = tuple(t for t in os.environ.get("FXPRESS_FUZZ_TARGETS", "onnx,llvm").split(",") if t)
    passes = fxpress.available_passes()
    report.parent.mkdir(parents=True, exist_ok=True)

    counts: Counter = Counter()
    stages: Counter = Counter()
    ops: Counter = Counter()
    findings: list[dict] = []
    t0 = time.time()

    def save(done: bool) -> None:
        summary = {
            "seed": run_seed, "finished": done, "models": counts["models"], "seconds": round(time.time() - t0),
            "passes": passes, "targets": list(targets), "findings_by_kind": {k: counts[k] for k in
                                                                           ("mismatch", "crash", "refusal")},
            "stages_checked": dict(stages), "op_kinds": dict(ops), "findings": findings,
        }
        tmp = report.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, report)

    @seed(run_seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=fuzz_cases(max_ops=10))
    def body(case):
        k = counts["models"]
        # Lower the final graph of every model; every other model also lowers its traced graph.
        outcome = check_case(case, passes=passes, targets=targets, lower_trace_graph=bool(k % 2),
                             tolerance=(0.005, 0.02, 0.1)[k % 3])
        counts["models"] += 1
        ops.update(case.op_kinds)
        stages.update(s.split("(")[0] for s in outcome.stages)
        for f in outcome.findings:
            counts[f.kind] += 1
            findings.append({"kind": f.kind, "stage": f.stage, "message": f.message[:1500], "case": f.case})
        if counts["models"] % 25 == 0:
            save(False)
            print(f"[fuzz] {counts['models']}/{n} models, {counts['mismatch']} mismatches, {counts['crash']} "
                  f"crashes, {counts['refusal']} refusals, {time.time() - t0:.0f}s", file=sys.stderr, flush=True)

    body()
    save(True)
    print(f"[fuzz] seed {run_seed}: {counts['models']} models, {dict(stages)} stages checked; "
          f"{counts['mismatch']} mismatches, {counts['crash']} crashes, {counts['refusal']} refusals -> {report}",
          file=sys.stderr)
    bugs = [f for f in findings if f["kind"] != "refusal"]
    assert counts["models"] >= min(n, 1000) * 0.95, "hypothesis generated fewer models than asked"
    assert not bugs, f"{len(bugs)} bug(s); first:\n" + "\n".join(
        f"[{f['kind']}] {f['stage']}: {f['message'][:800]}\n  {f['case']}" for f in bugs[:3])


def test_fuzz_semantics_big():
    """>= 1,000 semantics cases (integer dtypes, NaN/Inf, index ops in and out of range) on llvm and onnx.
    FXPRESS_FUZZ_SEMANTICS_EXAMPLES (default 1000) models, each checked on every target."""
    from fuzz_semantics import check_semantics, semantics_cases

    n = int(os.environ.get("FXPRESS_FUZZ_SEMANTICS_EXAMPLES", "1000"))
    run_seed = int(os.environ.get("FXPRESS_FUZZ_SEED", str(random.randrange(2**31))))
    targets = [t for t in os.environ.get("FXPRESS_FUZZ_TARGETS", "onnx,llvm").split(",") if t]
    report = Path(os.environ.get("FXPRESS_FUZZ_REPORT", ROOT / ".cache" / "fuzz" / "summary.json"))
    report = report.with_name(report.stem + "-semantics.json")
    report.parent.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    findings: list[dict] = []

    @seed(run_seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=semantics_cases())
    def body(case):
        counts["models"] += 1
        counts[f"kind:{case.spec['kind']}"] += 1
        for target in targets:
            for kind, message in check_semantics(case, target).findings:
                counts[kind] += 1
                findings.append({"kind": kind, "target": target, "message": message, "case": repr(case)})
        if counts["models"] % 50 == 0:
            print(f"[fuzz-semantics] {counts['models']}/{n}: {counts['mismatch']} mismatches, "
                  f"{counts['crash']} crashes, {counts['refusal']} refusals", file=sys.stderr, flush=True)

    body()
    report.write_text(json.dumps({"seed": run_seed, "counts": dict(counts), "findings": findings}, indent=1))
    bugs = [f for f in findings if f["kind"] != "refusal"]
    assert counts["models"] >= min(n, 1000) * 0.95, "hypothesis generated fewer models than asked"
    assert not bugs, f"{len(bugs)} bug(s); first:\n" + "\n".join(
        f"[{f['kind']}] {f['target']}: {f['message'][:500]}\n  {f['case']}" for f in bugs[:3])
