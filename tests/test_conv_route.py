"""Convolutions through the GEMM shim (codegen/conv_route.py, issue #18).

Numerics and routing decisions only: nothing here depends on the CPU's ISA or speed. The routing
rule is checked on geometries; numerics are checked with ``FXPRESS_CONV_GEMM=all`` so that every
eligible conv goes through im2col + GEMM whatever the rule would pick.
"""
import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax

import fxpress
from fxpress.codegen import blas, build, conv_route, gemm_route
from fxpress.codegen.targets import resolve_target

from helpers import rel_err

needs_shim = pytest.mark.skipif(not blas.available(), reason="no C compiler: the GEMM shim is not built")


def _conv_module(x_shape, w_shape, *, stride=1, padding=0, dilation=1, groups=1, dtype="float32"):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(x_shape), dtype))
    w = relax.Var("w", relax.TensorType(list(w_shape), dtype))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, w, strides=stride, padding=padding, dilation=dilation,
                                                    groups=groups))
        bb.emit_func_output(out)
    return bb.get()


def _rewrite(mod):
    with resolve_target("llvm"):
        return conv_route.RouteConvToGemm()(mod)


def _rewritten(before, after) -> bool:
    return not tvm_ffi.structural_equal(before, after)


def _geometry(cin, cout, k, stride, pad, size, batch=1):
    out = (size + 2 * pad - k) // stride + 1
    return {"n": batch, "c": cin, "h": size, "w": size, "o": cout, "kh": k, "kw": k, "pad": [pad] * 4,
            "stride": (stride, stride), "dilation": (1, 1), "oh": out, "ow": out}


def test_rule_routes_strided_and_narrow_convs_only(monkeypatch):
    route = conv_route.route_conv
    # ResNet-18's convs at 224: the strided ones with small maps and the 7x7-map stage are routed
    assert route(_geometry(64, 128, 3, 2, 1, 56)) and route(_geometry(256, 512, 1, 2, 0, 14))
    assert route(_geometry(512, 512, 3, 1, 1, 7))
    # stride-1 convs on wide maps stay TVM's; the 112x112 stem is routed (MAX_STRIDED_PIXELS), unless
    # the measurement switch restores the old limit
    assert not route(_geometry(64, 64, 3, 1, 1, 56)) and not route(_geometry(256, 256, 3, 1, 1, 14))
    assert route(_geometry(3, 64, 7, 2, 3, 224))
    monkeypatch.setenv("FXPRESS_CONV_STRIDED_MAX", "1024")
    assert not route(_geometry(3, 64, 7, 2, 3, 224)) and route(_geometry(64, 128, 3, 2, 1, 56))
    # below MIN_FLOPS nothing is routed, even with "all"
    tiny = _geometry(4, 4, 3, 2, 1, 8)
    assert conv_route.conv_flops(tiny) < conv_route.MIN_FLOPS
    assert not route(tiny) and not route(tiny, "all")
    assert route(_geometry(64, 64, 3, 1, 1, 56), "all")


@needs_shim
def test_rewrite_fires_on_standard_conv_and_not_on_grouped_depthwise_small_or_fp16(monkeypatch):
    standard = _conv_module((1, 64, 28, 28), (128, 64, 3, 3), stride=2, padding=1)
    after = _rewrite(standard)
    assert _rewritten(standard, after)
    text = after.script()
    assert "R.nn.conv2d" not in text and conv_route.KERNEL_NAME in text and gemm_route.KERNEL_NAME not in text
    assert "R.matmul" in text  # left for RouteGemmToBlas

    monkeypatch.setenv("FXPRESS_CONV_GEMM", "all")
    unchanged = [_conv_module((1, 64, 28, 28), (64, 16, 3, 3), padding=1, groups=4),     # grouped
                 _conv_module((1, 64, 28, 28), (64, 1, 3, 3), padding=1, groups=64),     # depthwise
                 _conv_module((1, 4, 8, 8), (4, 4, 3, 3), padding=1),                    # below MIN_FLOPS
                 _conv_module((1, 64, 28, 28), (128, 64, 3, 3), padding=1, dtype="float16")]
    for mod in unchanged:
        assert not _rewritten(mod, _rewrite(mod))


@needs_shim
def test_dynamic_shapes_are_not_rewritten(monkeypatch):
    monkeypatch.setenv("FXPRESS_CONV_GEMM", "all")
    mod = _conv_module((tvm.tirx.Var("n", "int64"), 64, 28, 28), (128, 64, 3, 3), stride=2, padding=1)
    assert not _rewritten(mod, _rewrite(mod))


@needs_shim
@pytest.mark.parametrize("cpu", [None, "znver3", "cascadelake"])
def test_routed_conv_matches_numpy_for_any_isa(monkeypatch, cpu):
    """The same routed conv built for a generic x86 (no AVX), an AVX2 and an AVX-512 target; each runs
    here only if this host has that ISA (the im2col kernel's vector width follows the target)."""
    from fxpress.codegen import isa

    target = {"kind": "llvm", **({"mcpu": cpu} if cpu else {})}
    want, host = isa.features(tvm.target.Target(target)), isa.features(resolve_target("llvm"))
    if (want.avx512f and not host.avx512f) or (want.avx2 and not host.avx2) or (want.fma and not host.fma):
        pytest.skip(f"this host cannot run {cpu} code")
    monkeypatch.setenv("FXPRESS_CONV_GEMM", "all")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 13, 11), dtype=np.float32)
    w = rng.standard_normal((24, 8, 3, 3), dtype=np.float32)
    built = build(_conv_module(x.shape, w.shape, stride=2, padding=1), tvm.target.Target(target))
    assert conv_route.KERNEL_NAME in built.ir_after["relax.decomposed"]
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), stride=2, padding=1)
    assert rel_err(y, ref) <= 1e-5


@needs_shim
def test_pointwise_conv_needs_no_im2col(monkeypatch):
    monkeypatch.setenv("FXPRESS_CONV_GEMM", "all")
    mod = _conv_module((2, 64, 14, 14), (96, 64, 1, 1))
    text = _rewrite(mod).script()
    assert "R.matmul" in text and conv_route.KERNEL_NAME not in text


def test_switched_off_or_without_shim_module_is_unchanged(monkeypatch):
    mod = _conv_module((1, 64, 28, 28), (128, 64, 3, 3), stride=2, padding=1)
    monkeypatch.setenv("FXPRESS_CONV_GEMM", "0")
    assert not _rewritten(mod, _rewrite(mod))
    monkeypatch.delenv("FXPRESS_CONV_GEMM")
    monkeypatch.setenv("FXPRESS_BLAS", "0")  # the GEMM route's switch turns this one off too
    assert not _rewritten(mod, _rewrite(mod))
    monkeypatch.delenv("FXPRESS_BLAS")
    monkeypatch.setattr(blas, "available", lambda: False)  # no C compiler
    assert not _rewritten(mod, _rewrite(mod))
    assert not _rewritten(mod, conv_route.RouteConvToGemm()(mod))  # no llvm target in scope


class ConvBlock(torch.nn.Module):
    """conv → BN → ReLU, then conv2 (a second routed conv) + residual → ReLU."""

    def __init__(self, cin, cout, k, stride, pad, dilation, bias):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, bias=bias)
        self.bn = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=bias)
        with torch.no_grad():  # non-trivial batch-norm statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return torch.relu(self.conv2(y) + y)


# (cin, cout, kernel, stride, padding, dilation, bias, input shape)
CONV_CASES = [
    (16, 32, 3, 1, 1, 1, True, (1, 16, 20, 20)),
    (16, 32, 3, 2, 1, 1, False, (3, 16, 21, 19)),   # stride 2, odd sizes, batch 3
    (16, 24, 1, 1, 0, 1, True, (3, 16, 12, 12)),    # pointwise: a reshape, no im2col
    (32, 48, 1, 2, 0, 1, False, (1, 32, 40, 40)),   # 1x1 stride 2: im2col subsamples
    (3, 16, 7, 2, 3, 1, False, (1, 3, 40, 40)),     # ResNet's stem
    (16, 16, 3, 1, 2, 2, True, (1, 16, 18, 18)),    # dilation 2
    (8, 16, (3, 5), 1, (1, 2), 1, True, (2, 8, 15, 17)),  # non-square kernel and padding
]


@needs_shim
@pytest.mark.parametrize("cin,cout,k,stride,pad,dilation,bias,shape", CONV_CASES)
def test_routed_convs_match_torch(monkeypatch, cin, cout, k, stride, pad, dilation, bias, shape):
    monkeypatch.setenv("FXPRESS_CONV_GEMM", "all")
    torch.manual_seed(0)
    model = ConvBlock(cin, cout, k, stride, pad, dilation, bias).eval()
    x = torch.randn(*shape)
    cm = fxpress.compile(model, (x,), passes="none", target="llvm")
    built = cm._lowered.built
    assert "R.nn.conv2d" not in built.ir_after["relax.decomposed"]
    assert built.ir_after["relax.decomposed"].count(f"cls.{gemm_route.KERNEL_NAME}") == 2
    with torch.no_grad():
        assert rel_err(np.asarray(cm(x)), model(x)) <= 1e-5


@needs_shim
def test_epilogue_fuses_after_the_gemm_and_weight_reshape_is_lifted(monkeypatch):
    monkeypatch.setenv("FXPRESS_CONV_GEMM", "all")
    monkeypatch.setenv("FXPRESS_WINOGRAD", "0")  # the block's stride-1 3x3 conv would go Winograd first
    torch.manual_seed(0)
    model = ConvBlock(16, 32, 3, 2, 1, 1, True).eval()
    x = torch.randn(1, 16, 20, 20)
    built = fxpress.compile(model, (x,), passes="none", target="llvm")._lowered.built
    fused = built.ir_after["relax.fused"]
    main = fused[fused.index("def main("):]
    # per conv: im2col, the GEMM, one elementwise kernel (reshape + bias + BN + ReLU [+ residual])
    assert main.count("R.call_tir(") == 6
    assert main.count(f"cls.{conv_route.KERNEL_NAME}") == 2 and main.count(f"cls.{gemm_route.KERNEL_NAME}") == 2
    # the weights' reshapes to [O, C*KH*KW] ran at compile time: main takes the 2-D weights
    assert built.param_transform is not None
    assert "R.Tensor((32, 144)" in main and "R.Tensor((32, 288)" in main
    assert "R.reshape" not in built.ir_after["relax.lifted"].split("def main(")[1].split("cls.im2col")[0]


@needs_shim
@pytest.mark.parametrize("mode", ["1", "all"])
def test_resnet_small_matches_eager(monkeypatch, mode):
    from fxpress.models import registry

    monkeypatch.setenv("FXPRESS_CONV_GEMM", mode)

    spec = registry.get("resnet18", "small")
    torch.manual_seed(0)
    model = spec.build().eval()
    (x,) = spec.example_inputs()
    with torch.no_grad():
        ref = model(x)
    cm = fxpress.compile(model, (x,), passes="none", target="llvm")
    assert f"cls.{gemm_route.KERNEL_NAME}" in cm._lowered.built.ir_after["relax.fused"]
    assert rel_err(np.asarray(cm(x)), ref) <= 1e-5


@needs_shim
def test_exported_conv_artifact_runs_torch_free(tmp_path):
    import subprocess
    import sys

    from test_cpu_kernels import TORCH_FREE

    torch.manual_seed(0)
    model = ConvBlock(16, 32, 3, 2, 1, 1, True).eval()  # strided: routed by the default rule
    x = torch.randn(2, 16, 20, 20)
    cm = fxpress.compile(model, (x,), passes="none", target="llvm")
    assert conv_route.KERNEL_NAME in cm._lowered.built.ir_after["relax.decomposed"]
    path = cm.export(str(tmp_path / "conv"), backends=("tvm",))
    inp, out = tmp_path / "in.npy", tmp_path / "out.npy"
    np.save(inp, x.numpy())
    r = subprocess.run([sys.executable, "-c", TORCH_FREE, path, str(inp), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        assert rel_err(np.load(out), model(x)) <= 1e-5
