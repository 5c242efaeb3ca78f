"""fxpress.compile with passes='none' matches eager on every reference model and target."""
import pytest
import torch

import fxpress
from fxpress import models

from helpers import rel_err

MODELS = models.names()


@pytest.fixture(scope="module", params=MODELS)
def model_and_inputs(request):
    spec = models.get(request.param, size="small")
    return request.param, spec.build(), spec.example_inputs()


@pytest.mark.parametrize("target", ["torch", "onnx", "llvm"])
def test_passes_none_matches_eager(model_and_inputs, target):
    name, model, x = model_and_inputs
    cm = fxpress.compile(model, x, passes="none", target=target)
    with torch.no_grad():
        ref = model(*x)
    y = cm(*x)
    assert isinstance(y, torch.Tensor) and y.shape == ref.shape
    assert rel_err(y, ref) <= 1e-4, f"{name} on {target}"
    # The report's own measurement of the lowered model agrees.
    assert cm.report[f"lower:{target}"].max_rel_error <= 1e-4


def test_report_has_one_record_per_stage():
    spec = models.get("digits_cnn")
    cm = fxpress.compile(spec.build(), spec.example_inputs(), passes="none", target="torch")
    assert cm.report.names() == ["trace", "lower:torch"]
    r = cm.report["trace"]
    for field in ("params", "param_bytes", "macs", "multiplies", "max_abs_error", "max_rel_error", "seconds", "code", "table"):
        assert hasattr(r, field)
    assert r.params > 30_000 and r.macs > 1_000_000 and r.multiplies >= r.macs
    assert r.max_rel_error == 0.0
    assert "def forward" in r.code
    row = next(t for t in r.table if t["op"] == "call_module" and "Conv2d" in t["target"])
    assert row["shape"] == [8, 16, 8, 8] and row["dtype"] == "float32" and row["macs"] == 8 * 16 * 64 * 9
    text = str(cm.report)
    assert "trace" in text and "max rel err" in text
    assert cm.graph("trace") is not None and cm.graph("final") is cm.gm


def test_relax_ir_is_in_report():
    spec = models.get("digits_cnn")
    cm = fxpress.compile(spec.build(), spec.example_inputs(), passes="none", target="llvm")
    r = cm.report["lower:llvm"]
    assert r.ir and "R.function" in r.ir and "conv2d" in r.ir


def test_multiple_outputs_keep_structure():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 3)
            self.b = torch.nn.Linear(4, 2)

        def forward(self, x):
            return {"a": self.a(x), "b": torch.relu(self.b(x))}

    m, x = TwoHeads(), torch.randn(5, 4)
    for target in ("torch", "onnx", "llvm"):
        out = fxpress.compile(m, (x,), passes="none", target=target)(x)
        assert set(out) == {"a", "b"}
        assert rel_err(out["a"], m(x)["a"]) < 1e-5 and rel_err(out["b"], m(x)["b"]) < 1e-5


def test_compile_never_mutates_the_model():
    spec = models.get("resnet18")
    m, x = spec.build(), spec.example_inputs()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fxpress.compile(m, x, passes="default", target="torch")
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_export_fallback_traces_what_symbolic_trace_cannot():
    class ShapeDependent(torch.nn.Module):
        def forward(self, x):
            # symbolic_trace cannot iterate over a Proxy; torch.export handles static shapes.
            n = 0
            for _ in range(x.shape[0]):
                n += 1
            return x * n

    x = torch.randn(3, 2)
    cm = fxpress.compile(ShapeDependent(), (x,), passes="none", target="torch")
    assert cm.trace_method == "torch.export"
    assert rel_err(cm(x), x * 3) == 0


def test_zero_dim_output_on_llvm():
    """A 0-d output (a branch condition of split_branches) builds: CPU schedules skip 0-d kernels."""

    class Condition(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x, 1).max(1).values.min() > 0.5

    x = torch.randn(1, 10)
    cm = fxpress.compile(Condition(), (x,), passes="none", target="llvm")
    assert cm(x).shape == () and bool(cm(x)) == bool(Condition()(x))


def test_lowering_record_counts_params_like_the_trace():
    """BatchNorm's num_batches_tracked (an int counter) is not a weight: with no pass changing the
    model, the lowering stage reports exactly the trace's params and bytes."""
    spec = models.get("resnet18")  # has BatchNorm
    cm = fxpress.compile(spec.build(), spec.example_inputs(), passes="none", target="torch")
    trace, low = cm.report["trace"], cm.report["lower:torch"]
    assert (low.params, low.param_bytes) == (trace.params, trace.param_bytes)


def test_every_kind_of_input_gives_the_same_answer():
    """The call's fast path (CPU tensors of exactly the compiled shape and dtype) and the checked path
    (numpy, non-contiguous, requires_grad) agree; a wrong shape or dtype still gets the clear error."""
    from fxpress.errors import InputError

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Tanh()).eval()
    x = torch.randn(3, 12)
    cm = fxpress.compile(m, (x,), passes="none", target="llvm")
    want = cm(x)
    wide = torch.randn(3, 24)[:, ::2]
    wide.copy_(x)  # same values, strided
    for given in (x.numpy(), wide, x.clone().requires_grad_(True), torch.nn.Parameter(x.clone())):
        assert torch.equal(cm(given), want)
    with pytest.raises(InputError, match="expected shape"):
        cm(torch.randn(4, 12))
    with pytest.raises(InputError, match="dtype"):
        cm(x.double())
