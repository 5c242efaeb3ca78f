"""GPU tests (``@pytest.mark.gpu``; conftest skips them where TVM sees no CUDA device).

Reference models compiled with target="cuda" (dlight default schedules, then MetaSchedule
tuning with a few trials) against eager PyTorch on the same inputs. Eager runs on the GPU when
torch has CUDA, else on the CPU (the CPU wheel of torch is what the project installs).
"""
import numpy as np
import pytest
import torch

import fxpress
from fxpress.models import get

pytestmark = pytest.mark.gpu

MODELS = ["resnet18", "bert_small", "vit_tiny", "mobilenet_v2"]


def _reference(model, inputs):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.no_grad():
        out = model.to(dev)(*[x.to(dev) for x in inputs])
    model.cpu()
    return out.cpu().numpy()


def _rel_err(y, ref):
    return float(np.abs(np.asarray(y) - ref).max() / max(np.abs(ref).max(), 1e-12))


@pytest.mark.parametrize("name", MODELS)
def test_cuda_default_schedules_match_eager(name):
    spec = get(name, "small")
    model, inputs = spec.build(), spec.example_inputs()
    ref = _reference(model, inputs)
    cm = fxpress.compile(model, inputs, passes="none", target="cuda")
    y = cm(*inputs)
    assert _rel_err(y.numpy() if hasattr(y, "numpy") else y, ref) < 1e-4


@pytest.mark.parametrize("name", ["resnet18", "bert_small"])
def test_cuda_tuned_matches_eager_and_reuses_database(name, tmp_path):
    spec = get(name, "small")
    model, inputs = spec.build(), spec.example_inputs()
    ref = _reference(model, inputs)
    options = {"tune": {"database_dir": str(tmp_path), "progress": False}}
    cm = fxpress.compile(model, inputs, passes="none", target="cuda", tune=4, options=options)
    y = cm(*inputs)
    assert _rel_err(y.numpy() if hasattr(y, "numpy") else y, ref) < 1e-4
    summary = cm._lowered.built.tuning
    assert summary.tuned and summary.trials > 0
    again = fxpress.compile(model, inputs, passes="none", target="cuda", tune=4, options=options)
    assert again._lowered.built.tuning.tuned == []
    y2 = again(*inputs)
    assert _rel_err(y2.numpy() if hasattr(y2, "numpy") else y2, ref) < 1e-4


def test_cuda_tuned_kernel_runs_on_device(tmp_path):
    """A tuned matmul built for cuda runs on the GPU through the Relax VM."""
    import tvm
    from tvm import relax

    from fxpress.codegen import tune

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((128, 256), "float32"))
    w = relax.Var("w", relax.TensorType((256, 192), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(x, w)))
        bb.emit_func_output(out)
    built = tune(bb.get(), "cuda", 8, database_dir=tmp_path, progress=False)
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((128, 256), dtype=np.float32)
    b = rng.standard_normal((256, 192), dtype=np.float32)
    vm = relax.VirtualMachine(built.executable, dev)
    y = vm["main"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev)).numpy()
    np.testing.assert_allclose(y, a @ b, rtol=1e-4, atol=1e-3)
