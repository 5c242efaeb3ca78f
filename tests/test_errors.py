"""Bad input gets a clear error naming the thing at fault and what to do."""
import pytest
import torch

import fxpress
from fxpress import models
from fxpress.errors import InputError, LoweringError, TraceError, UnknownPassError


class UsesBessel(torch.nn.Module):
    """torch.special.bessel_j0 has no Relax converter in TVM 0.27."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.special.bessel_j0(self.lin(x))


def test_unsupported_op_names_node_op_and_line():
    with pytest.raises(LoweringError) as e:
        fxpress.compile(UsesBessel(), (torch.randn(2, 4),), passes="none", target="llvm")
    msg = str(e.value)
    assert "special_bessel_j0" in msg  # the op
    assert "node 'special_bessel_j0'" in msg  # the node
    assert "test_errors.py:" in msg and "return torch.special.bessel_j0(self.lin(x))" in msg  # the line
    assert "target='onnx'" in msg  # what to do


def test_wrong_input_shape_at_call_time():
    spec = models.get("digits_cnn")
    cm = fxpress.compile(spec.build(), spec.example_inputs(), passes="none", target="onnx")
    # onnx compiles one symbolic batch (dim 0); the other dims are fixed
    with pytest.raises(InputError, match=r"input 0 \('input_0'\): expected shape \(8, 1, 8, 8\) \(dim 0 may take any "
                                         r"size\) dtype float32, got shape \(2, 1, 4, 4\)"):
        cm(torch.randn(2, 1, 4, 4))
    with pytest.raises(InputError, match="expected shape .* dtype float32, got shape .* dtype float64"):
        cm(torch.randn(8, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(InputError, match="takes 1 input"):
        cm(torch.randn(8, 1, 8, 8), torch.randn(1))


def test_not_a_module():
    with pytest.raises(InputError, match="model must be a torch.nn.Module, got function"):
        fxpress.compile(lambda x: x, (torch.randn(1),))


def test_unknown_pass_lists_known_ones():
    with pytest.raises(UnknownPassError, match=r"unknown pass 'fusee'.*Known passes:"):
        fxpress.compile(torch.nn.ReLU(), (torch.randn(1),), passes=["fusee"])


def test_unknown_target():
    with pytest.raises(InputError, match="unknown target 'tpu'"):
        fxpress.compile(torch.nn.ReLU(), (torch.randn(1),), target="tpu")


def test_calibration_of_wrong_shape():
    with pytest.raises(InputError, match=r"calibration\[1\]\[0\] has shape \(4, 3\).*expected \[N, 5\]"):
        fxpress.compile(torch.nn.Linear(5, 2), (torch.randn(2, 5),), passes="none", target="torch",
                        calibration=[(torch.randn(3, 5),), (torch.randn(4, 3),)])


def test_data_dependent_control_flow_names_the_line():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x - 1

    with pytest.raises(TraceError) as e:
        fxpress.compile(Branchy(), (torch.randn(3),), passes="none", target="torch")
    assert "if x.sum() > 0:" in str(e.value) and "test_errors.py" in str(e.value)
