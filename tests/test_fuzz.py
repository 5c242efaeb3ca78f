"""Fuzzing, CI sample (issue #10): random models through every registered pass and every lowering.

The strategies live in tests/fuzz_models.py, the oracle in tests/fuzz_check.py; the dedicated job (>= 1,000 models,
``scripts/fuzz.sh``) is tests/test_fuzz_big.py. Here a small derandomized sample keeps CI fast and
reproducible. A failure prints the model's spec: ``FuzzCase(<spec>)`` rebuilds it.

Contract checked (see ``check_case``): lossless passes match eager within 1e-4 relative on the example
inputs and on fresh ones; a lossy pass's reported ``max_rel_error`` equals what we measure against
eager; torch / ONNX / TVM llvm lowerings match the final FX graph within 1e-4 relative; compile never
mutates the model; anything else is a clear fxpress error (a refusal), never a crash.
"""
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

import fxpress
from fxpress.passes import trace
from fxpress.passes.graph import flatten_outputs

from fuzz_check import check_case
from fuzz_models import fuzz_cases

PASSES = fxpress.available_passes()  # whatever is registered when the suite is collected

CI = settings(deadline=None, database=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)


def _assert_no_bugs(outcome):
    assert not outcome.bugs, "\n\n".join(map(str, outcome.bugs))


@settings(CI, max_examples=20)
@given(fuzz_cases())
def test_generated_models_are_valid(case):
    """The generator's own contract: the model runs, its shapes are the spec's, tracing reproduces it."""
    model, x = case.build(), case.inputs()
    with torch.no_grad():
        eager = flatten_outputs(model(*x))
    assert [list(t.shape) for t in eager] == [case.spec["shapes"][i] for i in case.spec["outputs"]]
    assert all(torch.isfinite(t).all() for t in eager)
    traced = trace(model, x)
    assert traced.method == ("torch.export" if "branch" in case.op_kinds else "symbolic_trace")
    with torch.no_grad():
        again = flatten_outputs(traced.gm(*x))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(eager, again))


@pytest.mark.skipif(not PASSES, reason="no passes registered")
@pytest.mark.parametrize("name", PASSES)
@settings(CI, max_examples=8)
@given(case=fuzz_cases(max_ops=6))
def test_each_pass_on_random_models(name, case):
    _assert_no_bugs(check_case(case, passes=[name], pipeline=False, targets=()))


@pytest.mark.skipif(len(PASSES) < 2, reason="fewer than two passes registered")
@settings(CI, max_examples=6)
@given(case=fuzz_cases(max_ops=6))
def test_all_passes_together_on_random_models(case):
    # Also under the tolerance guard: whatever the lossy passes do, the final graph stays within it.
    _assert_no_bugs(check_case(case, passes=PASSES, single=False, targets=(), tolerance=0.02))


@pytest.mark.parametrize("target, passes, examples", [
    ("onnx", "none", 4), ("onnx", "all", 3),
    ("llvm", "none", 3), ("llvm", "all", 2),  # a TVM build costs ~1-3 s even for small models
])
def test_lowering_matches_final_graph(target, passes, examples):
    @settings(CI, max_examples=examples)
    @given(case=fuzz_cases(max_ops=6))
    def run(case):
        _assert_no_bugs(check_case(case, passes=[] if passes == "none" else PASSES, single=False,
                                   targets=(target,)))

    run()
