"""Semantics fuzzing, CI sample (issue #17): integer dtypes, NaN/Inf inputs, and index ops with ids in
range and out of range, compiled to llvm and onnx, against eager PyTorch (see tests/fuzz_semantics.py).
The dedicated job runs >= 1,000 of these (tests/test_fuzz_big.py, scripts/fuzz.sh)."""
import pytest
from hypothesis import HealthCheck, Phase, given, settings

from fuzz_semantics import check_semantics, semantics_cases

CI = settings(deadline=None, database=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False, max_examples=25)


@pytest.mark.parametrize("target", ["llvm", "onnx"])
@CI
@given(case=semantics_cases())
def test_semantics_match_eager(target, case):
    outcome = check_semantics(case, target)
    assert not outcome.bugs, str(outcome)
