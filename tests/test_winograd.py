"""Winograd convolutions (codegen/winograd_route.py, winograd_transforms.py; issue #18).

Numerics, NaN/Inf semantics and the rewrite's decisions only: nothing here depends on the CPU's ISA
or speed. The models are single convs built here with seeded random weights, and ResNet-18 from
fxpress.models (seeded, built in code, nothing downloaded).
"""
import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax

import fxpress
from fxpress.codegen import blas, build, winograd_route, winograd_transforms
from fxpress.codegen.targets import resolve_target

from helpers import rel_err

needs_shim = pytest.mark.skipif(not blas.available(), reason="no C compiler: the GEMM shim is not built")


def _conv_module(x_shape, w_shape, padding=1, stride=1):
    """conv2d with the weight as a parameter after ``num_input`` (so that its transform is lifted)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(x_shape), "float32"))
    w = relax.Var("w", relax.TensorType(list(w_shape), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, w, strides=stride, padding=padding))
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("num_input", 1)
    return mod


def _run(x, w, padding=1):
    built = build(_conv_module(x.shape, w.shape, padding), resolve_target("llvm"))
    params = [tvm.runtime.tensor(p) for p in built.transform_params([w])]
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    return built, vm["main"](tvm.runtime.tensor(x), *params).numpy()


def _geometry(cin, cout, size, k=3, stride=1, pad=1, batch=1):
    out = (size + 2 * pad - k) // stride + 1
    return {"n": batch, "c": cin, "h": size, "w": size, "o": cout, "kh": k, "kw": k, "pad": [pad] * 4,
            "stride": (stride, stride), "dilation": (1, 1), "oh": out, "ow": out}


def test_transform_matrices_are_exact():
    """Aᵀ[(G g) * (Bᵀ d)] is the 1-D correlation, and ``back`` recovers g from G g, for both tile sizes."""
    rng = np.random.default_rng(0)
    for m, var in winograd_transforms.VARIANTS.items():
        bt, g, at, back = (np.array(var.bt, float), np.array(var.g, float), np.array(var.at, float),
                           np.array(var.back, float))
        kernel, d = rng.standard_normal(3), rng.standard_normal(m + 2)
        direct = np.array([kernel @ d[i:i + 3] for i in range(m)])
        assert np.abs(at @ ((g @ kernel) * (bt @ d)) - direct).max() < 1e-12
        assert np.abs(back @ g - np.eye(3)).max() < 1e-12


def test_rule_takes_3x3_stride_1_convs_on_maps_of_8_and_more():
    eligible, tile = winograd_route.eligible, winograd_route.tile_size
    assert eligible(_geometry(64, 64, 56)) and tile(_geometry(64, 64, 56)) == 4
    assert eligible(_geometry(128, 128, 28)) and tile(_geometry(128, 128, 28)) == 4
    assert eligible(_geometry(256, 256, 14)) and tile(_geometry(256, 256, 14)) == 2
    assert not eligible(_geometry(512, 512, 7))                        # 7x7 maps: the GEMM route
    assert not eligible(_geometry(64, 128, 56, stride=2))              # strided
    assert not eligible(_geometry(64, 64, 56, k=1, pad=0))             # 1x1
    assert not eligible(_geometry(8, 64, 56)) and not eligible(_geometry(64, 8, 56))  # few channels
    assert not eligible(_geometry(16, 32, 8)) and eligible(_geometry(32, 32, 8))  # MIN_CHANNELS = 32


@needs_shim
@pytest.mark.parametrize("batch,cin,cout,size,padding", [
    (1, 32, 48, 24, 1),   # F(4x4), exact tiling
    (2, 32, 40, 17, 1),   # F(4x4), batch 2, a map not a multiple of 4 (cropped tiles)
    (1, 32, 32, 13, 2),   # F(2x2), padding 2
    (1, 40, 32, 10, 0),   # F(2x2), no padding, 8x8 output
])
def test_conv_matches_torch(batch, cin, cout, size, padding):
    rng = np.random.default_rng(batch + cin + size)
    x = rng.standard_normal((batch, cin, size, size), dtype=np.float32)
    w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
    built, y = _run(x, w, padding)
    assert "winograd_input" in built.ir_after["relax.decomposed"]
    assert built.param_transform is not None, "the weight transform must be lifted to compile time"
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), padding=padding)
    # F(4x4)'s constants (up to 8 and 1/24) cost a few fp32 ulps per product; the bar stays fp32's 1e-4
    assert rel_err(y, ref) <= 5e-5


@needs_shim
def test_lifted_weights_are_the_winograd_domain_kernel():
    """main takes U[36, O, C] after lifting: the growth the lifting rule allows for it and nothing more."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 32, 3, 3), dtype=np.float32)
    built = build(_conv_module((1, 32, 20, 20), w.shape), resolve_target("llvm"))
    (u,) = built.transform_params([w])
    coeffs = np.array(winograd_transforms.weight_coefficients(4))
    expected = np.einsum("et,oct->eoc", coeffs, w.reshape(40, 32, 9).astype(np.float64))
    assert u.shape == (36, 40, 32) and np.abs(u - expected).max() <= 1e-5 * np.abs(expected).max()


@needs_shim
@pytest.mark.parametrize("size", [16, 10])  # F(4x4) and F(2x2)
def test_nan_and_inf_stay_where_torch_puts_them(size):
    """One NaN or Inf input spreads over whole tiles in the Winograd domain; those outputs are recomputed
    directly, so the NaN/Inf positions and the Inf signs are torch's and the finite outputs unchanged."""
    rng = np.random.default_rng(size)
    x = rng.standard_normal((1, 32, size, size), dtype=np.float32)
    w = (rng.standard_normal((32, 32, 3, 3)) / 17).astype(np.float32)
    x[0, 3, 5, 6], x[0, 5, 2, 2], x[0, 1, size - 1, size - 1], x[0, 2, 0, size - 2] = np.inf, np.nan, -np.inf, np.inf
    built, y = _run(x, w)
    assert "winograd_input" in built.ir_after["relax.decomposed"]
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()
    assert np.array_equal(np.isnan(y), np.isnan(ref)) and np.isnan(ref).any()
    assert np.array_equal(np.isinf(y), np.isinf(ref)) and np.array_equal(y[np.isinf(ref)], ref[np.isinf(ref)])
    finite = np.isfinite(ref)
    assert np.abs(y[finite] - ref[finite]).max() <= 5e-5 * np.abs(ref[finite]).max()


@needs_shim
def test_a_kernel_computed_from_the_inputs_is_left_to_the_direct_conv():
    """Its Winograd transform could not be lifted: it would run on every call."""
    mod = _conv_module((1, 32, 28, 28), (32, 32, 3, 3))
    mod["main"] = mod["main"].with_attr("num_input", 2)  # the kernel is an input now
    with resolve_target("llvm"):
        assert tvm_ffi.structural_equal(mod, winograd_route.WinogradConv()(mod))


def test_off_switch_and_other_targets_leave_the_module_alone(monkeypatch):
    mod = _conv_module((1, 32, 28, 28), (32, 32, 3, 3))
    with resolve_target("llvm"):
        monkeypatch.setenv("FXPRESS_WINOGRAD", "0")
        assert tvm_ffi.structural_equal(mod, winograd_route.WinogradConv()(mod))
    monkeypatch.delenv("FXPRESS_WINOGRAD")
    assert tvm_ffi.structural_equal(mod, winograd_route.WinogradConv()(mod))  # no llvm target in scope


@needs_shim
def test_resnet18_compiles_through_winograd_within_fp32_tolerance():
    """ResNet-18 (fxpress.models, seeded, built in code) at 64x64: its stride-1 3x3 convs on 16x16 and
    8x8 maps take F(4x4) and F(2x2); the lowering still matches eager."""
    from fxpress.models.resnet import resnet18

    torch.manual_seed(0)
    model = resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    cm = fxpress.compile(model, x, target="llvm", passes="none")
    text = cm._lowered.built.ir_after["relax.decomposed"]
    assert text.count("cls.winograd_input") >= 5
    with torch.no_grad():
        ref = model(x)
    assert rel_err(cm(x), ref) <= 1e-4


@needs_shim
def test_transformers_resnet_compiles_through_winograd_within_fp32_tolerance():
    """transformers ResNetModel, basic blocks, hidden sizes 32 and 64 at 64x64 (built here from a config,
    seeded, nothing downloaded; the corpus's hf_resnet has 16 channels, below MIN_CHANNELS): its stride-1
    3x3 convs on 16x16 and 8x8 maps take the Winograd route; the lowering matches eager."""
    transformers = pytest.importorskip("transformers")

    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1],
                                    layer_type="basic")
    torch.manual_seed(0)
    model = transformers.ResNetModel(cfg).eval()
    inputs = (torch.randn(1, 3, 64, 64),)
    cm = fxpress.compile(model, inputs, target="llvm")
    assert cm._lowered.built.ir_after["relax.decomposed"].count("cls.winograd_input") >= 2
    with torch.no_grad():
        ref = model(*inputs)
    got, want = torch.utils._pytree.tree_leaves(cm(*inputs)), torch.utils._pytree.tree_leaves(ref)
    assert len(got) == len(want) and all(rel_err(g, w) <= 1e-4 for g, w in zip(got, want))


@needs_shim
@pytest.mark.parametrize("residual,relu", [(False, False), (False, True), (True, True), (True, False)])
def test_bias_residual_and_relu_fold_into_the_output_kernel(residual, relu):
    """conv + bias [+ residual] [+ ReLU] is one output kernel (its epilogue runs per plane); NaN and
    Inf inputs (in x and in the residual) give torch's NaN/Inf positions, ReLU keeps NaN as torch's."""
    torch.manual_seed(1)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(32, 32, 3, padding=1)

        def forward(self, x, r):
            y = self.conv(x)
            y = y + r if residual else y
            return torch.relu(y) if relu else y

    m = Block().eval()
    x, r = torch.randn(1, 32, 20, 20), torch.randn(1, 32, 20, 20)
    x[0, 3, 5, 6], x[0, 5, 2, 2], r[0, 7, 9, 9], r[0, 1, 0, 0] = float("inf"), float("nan"), float("-inf"), float("nan")
    cm = fxpress.compile(m, (x, r), target="llvm", passes="none")
    flags = "_bias" + ("_res" if residual else "") + ("_relu" if relu else "")
    main = cm._lowered.built.ir_after["relax.fused"].split("def main", 1)[1]
    assert f"winograd_output_epilogue{flags}," in main
    with torch.no_grad():
        want = m(x, r)
    got = cm(x, r)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want).any()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[torch.isinf(want)], want[torch.isinf(want)])
    finite = torch.isfinite(want)
    assert rel_err(got[finite], want[finite]) <= 1e-4
