"""Int8 kernels on packed weights (codegen/quantize_packed.py, quantize_conv.py): VNNI and AVX2 cores.

Code generation is checked for explicit CPUs (any host); numerics run only where the host can execute
the instructions. Exactness of the integer part: with ``w_scale·x_scale == 1`` the float epilogue only
converts int32 sums below 2²⁴, so the output must equal the reference op bit for bit."""
import os
import re

import numpy as np
import pytest
import torch

import fxpress
import fxpress.passes.quantize.ops  # noqa: F401 - registers torch.ops.fxpress.*

from helpers import rel_err

OPS = torch.ops.fxpress
VNNI_CPUS = ("znver4", "sapphirerapids")
AVX2_CPU = "haswell"  # AVX2 + FMA, no AVX-512, no VNNI


def _target(mcpu: str):
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 1})


def _host_isa():
    from fxpress.codegen import isa, resolve_target

    return isa.features(resolve_target("llvm"))


def _runnable(layout_name: str) -> bool:
    """Can this host run the kernels built below? (znver4 code: AVX-512 with VNNI; haswell code: AVX2)"""
    facts = _host_isa()
    return facts.avx2 and (layout_name == "avx2" or (facts.avx512f and facts.avx512bw and facts.vnni))


# the 256-bit VNNI core is run built for znver4 (EVEX vpdpbusd on ymm): alderlake code (VEX, AVX-VNNI)
# would not run on AVX-512 parts without AVX-VNNI such as Zen 4
LAYOUTS = [pytest.param("vnni", "znver4", id="vnni"), pytest.param("avx-vnni", "znver4", id="avx-vnni"),
           pytest.param("avx2", AVX2_CPU, id="avx2")]


def _named_layout(name: str):
    from fxpress.codegen import quantize_packed as qp

    return {"vnni": qp.VNNI, "avx-vnni": qp.AVX_VNNI, "avx2": qp.AVX2}[name]


def _compile(func, target):
    import tvm

    return tvm.compile(tvm.IRModule({"main": func}), target=target)


def _tvm(a):
    import tvm

    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def _run(lib, args, out_shape, dtype=np.float32):
    out = _tvm(np.zeros(out_shape, dtype))
    lib(*[_tvm(a) for a in args], out)
    return out.numpy()


def _prepacked(w, bq, zp, pack_func, packed_shape, target):
    """What main_transform_params computes at compile time: packed weights and the adjusted bias."""
    from fxpress.codegen import quantize_packed as qp

    wp = _run(_compile(pack_func(list(w.shape)), target), [w], packed_shape(list(w.shape)), np.int8)
    badj = _run(_compile(qp.bias_adjust_func(list(w.shape), zp), target), [w, bq], bq.shape, np.int32)
    return wp, badj


def _layout(mcpu: str):
    from fxpress.codegen import quantize_packed as qp

    return qp.layout_for(_target(mcpu))


def _asm(func, mcpu: str) -> str:
    return _compile(func, _target(mcpu)).mod.inspect_source("asm")


# ----------------------------------------------------------------------------- code generation

@pytest.mark.parametrize("mcpu", VNNI_CPUS)
def test_vnni_build_uses_vpdpbusd(mcpu):
    from fxpress.codegen import quantize_conv as qc
    from fxpress.codegen import quantize_packed as qp

    layout = _layout(mcpu)
    assert layout is qp.VNNI
    for f in (qp.qlinear_packed_func(8, 64, 1, 64, 0.1, 3, layout),
              qc.qconv2d_direct_func([1, 8, 6, 6], [1, 16, 8, 3, 3], 0.1, 3, [1, 1], [1, 1], [1, 1], layout),
              qp.qmatmul_vnni_func(2, 8, 16, 32, 0.1, 3, 0.2, 128)):
        asm = _asm(f, mcpu)
        assert "vpdpbusd" in asm and "vpmaddwd" not in asm


def test_avx2_build_has_no_vnni():
    from fxpress.codegen import quantize_conv as qc
    from fxpress.codegen import quantize_packed as qp

    layout = _layout(AVX2_CPU)
    assert layout is qp.AVX2
    for f in (qp.qlinear_packed_func(8, 64, 1, 64, 0.1, 3, layout),
              qc.qconv2d_direct_func([1, 8, 6, 6], [1, 16, 8, 3, 3], 0.1, 3, [1, 1], [1, 1], [1, 1], layout)):
        asm = _asm(f, AVX2_CPU)
        assert "vpmaddwd" in asm and "vpdpbusd" not in asm and "zmm" not in asm


def test_avx_vnni_build_uses_vex_vpdpbusd_on_ymm():
    from fxpress.codegen import quantize_packed as qp

    layout = _layout("alderlake")  # AVX-VNNI, no AVX-512
    assert layout is qp.AVX_VNNI
    asm = _asm(qp.qlinear_packed_func(8, 64, 1, 48, 0.1, 3, layout), "alderlake")
    assert "vpdpbusd" in asm and "zmm" not in asm


def test_no_packed_layout_without_avx2():
    assert _layout("x86-64") is None  # SSE2 only: the generic kernels stay


def test_vnni_kernel_refuses_signed_activations():
    from fxpress.codegen import quantize_packed as qp

    with pytest.raises(ValueError, match="uint8"):
        qp.qlinear_packed_func(4, 8, 1, 16, 0.1, 0, qp.VNNI, x_dtype="int8")


# ----------------------------------------------------------------------------- numerics against the ops

def _operands(shape_x, w_shape, seed, x_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    xq = torch.randint(0, 256, shape_x, dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, w_shape, dtype=torch.int8, generator=g)  # full range: -128 included
    C, N = w_shape[:2]
    ws_exact = torch.full((C, N), 1.0 / x_scale)  # w_scale·x_scale = 1: output = the integer sum
    ws_real = torch.rand(C, N, generator=g) * 0.01
    bq = torch.randint(-1000, 1000, (C, N), dtype=torch.int32, generator=g)
    return xq, w, ws_exact, ws_real, bq


@pytest.mark.parametrize("layout_name,mcpu", LAYOUTS)
@pytest.mark.parametrize("M,K,C,N,zp", [(16, 64, 1, 32, 7), (7, 33, 3, 10, 255), (1, 5, 1, 3, 0),
                                        (5, 130, 2, 70, 128), (9, 384, 1, 80, 17)])
def test_qlinear_packed_against_op(layout_name, mcpu, M, K, C, N, zp):
    from fxpress.codegen import quantize_packed as qp

    if not _runnable(layout_name):
        pytest.skip(f"this CPU cannot run the {layout_name} kernel")
    target, layout = _target(mcpu), _named_layout(layout_name)
    xq, w, ws_exact, ws_real, bq = _operands((M, K), (C, N, K), M * K + N)
    wp, badj = _prepacked(w.numpy(), bq.numpy(), zp, lambda s: qp.pack_weights_func(s, layout),
                          lambda s: qp.packed_shape(s, layout), target)
    lib = _compile(qp.qlinear_packed_func(M, K, C, N, 0.5, zp, layout), target)
    y = _run(lib, [xq.numpy(), wp, ws_exact.numpy(), badj], (M, N))
    np.testing.assert_array_equal(y, OPS.qlinear(xq, 0.5, zp, w, ws_exact, bq).numpy())
    y = _run(lib, [xq.numpy(), wp, ws_real.numpy(), badj], (M, N))
    ref = OPS.qlinear(xq, 0.5, zp, w, ws_real, bq).numpy()
    if C == 1:
        np.testing.assert_array_equal(y, ref)
    else:  # SplitQuant: the float sum of clusters may contract into an FMA
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


CONVS = [((2, 5, 9, 11), (3, 6, 5, 3, 3), dict(stride=[2, 1], padding=[1, 2], dilation=[1, 2])),
         ((1, 3, 17, 13), (1, 20, 3, 7, 7), dict(stride=[2, 2], padding=[3, 3], dilation=[1, 1])),
         ((1, 8, 7, 7), (1, 70, 8, 1, 1), dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1])),
         ((1, 16, 10, 10), (2, 33, 16, 3, 3), dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1]))]


@pytest.mark.parametrize("layout_name,mcpu", LAYOUTS)
@pytest.mark.parametrize("x_shape,w_shape,geom", CONVS)
def test_qconv2d_direct_against_op(layout_name, mcpu, x_shape, w_shape, geom):
    from fxpress.codegen import quantize_conv as qc

    if not _runnable(layout_name):
        pytest.skip(f"this CPU cannot run the {layout_name} kernel")
    target, layout = _target(mcpu), _named_layout(layout_name)
    zp = 11
    xq, w, ws_exact, ws_real, bq = _operands(x_shape, w_shape, sum(x_shape) + sum(w_shape))
    wp, badj = _prepacked(w.numpy(), bq.numpy(), zp, lambda s: qc.pack_conv_weights_func(s, layout),
                          lambda s: qc.conv_packed_shape(s, layout), target)
    lib = _compile(qc.qconv2d_direct_func(list(x_shape), list(w_shape), 0.5, zp, layout=layout, **geom), target)
    ref = OPS.qconv2d(xq, 0.5, zp, w, ws_exact, bq, groups=1, **geom).numpy()
    np.testing.assert_array_equal(_run(lib, [xq.numpy(), wp, ws_exact.numpy(), badj], ref.shape), ref)
    ref = OPS.qconv2d(xq, 0.5, zp, w, ws_real, bq, groups=1, **geom).numpy()
    # clusters summed in float may contract into an FMA: a few ulps of the largest term
    np.testing.assert_allclose(_run(lib, [xq.numpy(), wp, ws_real.numpy(), badj], ref.shape), ref,
                               rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    # the ReLU folded into the epilogue (quantize_conv.fold_relu_into_conv)
    lib = _compile(qc.qconv2d_direct_func(list(x_shape), list(w_shape), 0.5, zp, layout=layout, relu=True, **geom),
                   target)
    np.testing.assert_allclose(_run(lib, [xq.numpy(), wp, ws_real.numpy(), badj], ref.shape), np.maximum(ref, 0),
                               rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("G,M,K,N,a_zp,b_zp", [(3, 7, 5, 9, 3, 130), (2, 5, 33, 70, 0, 255),
                                               (2, 16, 32, 20, 130, 0), (1, 9, 128, 32, 0, 128)])
def test_qmatmul_vnni_against_op(G, M, K, N, a_zp, b_zp):
    from fxpress.codegen import quantize_packed as qp

    if not _runnable("vnni"):
        pytest.skip("this CPU cannot run the VNNI kernel")
    g = torch.Generator().manual_seed(G * M * K)
    a = torch.randint(0, 256, (G, M, K), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (G, K, N), dtype=torch.uint8, generator=g)
    lib = _compile(qp.qmatmul_vnni_func(G, M, K, N, 0.01, a_zp, 0.02, b_zp), _target("znver4"))
    ref = OPS.qmatmul(a, 0.01, a_zp, b, 0.02, b_zp).numpy()
    np.testing.assert_array_equal(_run(lib, [a.numpy(), b.numpy()], (G, M, N)), ref)


# ----------------------------------------------------------------------------- end to end

class _SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 12, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(12)
        self.c2 = torch.nn.Conv2d(12, 20, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(20 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.c2(x)).flatten(1))


class _SmallTransformer(torch.nn.Module):
    def __init__(self, d=48, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.ff1, self.ff2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        self.n1, self.n2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (D // self.heads) ** 0.5, dim=-1)
        x = self.n1(x + self.out((att @ v).transpose(1, 2).reshape(B, T, D)))
        return self.n2(x + self.ff2(torch.relu(self.ff1(x))))


def _compile_int8(model, x, prepack: bool, monkeypatch, blas: bool = False):
    monkeypatch.setenv("FXPRESS_INT8_PREPACK", "1" if prepack else "0")
    monkeypatch.setenv("FXPRESS_INT8_BLAS", "1" if blas else "0")  # the packed kernels, unless asked
    return fxpress.compile(model, x, passes=["fuse", "quantize"], target="llvm")


def test_int8_gemm_shim_is_exact():
    """The shim's int8 GEMM, whatever it bound (MKL's cblas_gemm_s8u8s32 after its exactness probe, or
    its own loop), against numpy's int64 product: extremes included (255 x -128 saturates int16 pairs)."""
    import ctypes

    from fxpress.codegen import blas

    if not blas.available():
        pytest.skip("no C compiler: the shim is not built")
    f = blas._state["lib"].fxpress_gemm_u8s8
    f.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 3
    rng = np.random.default_rng(0)
    # column shares (M <= 2N) and row shares (M > 2N, a conv's pixels), uneven sizes
    for M, N, K, parts in [(5, 37, 300, 2), (64, 48, 1024, 3), (1, 16, 4, 1), (33, 100, 129, 2), (200, 30, 77, 2),
                           (1000, 16, 64, 3)]:
        a = rng.integers(0, 256, (M, K)).astype(np.uint8)
        b = rng.integers(-128, 128, (N, K)).astype(np.int8)
        a[0, :] = 255
        b[:, : K // 2] = -128
        want = a.astype(np.int64) @ b.astype(np.int64).T
        c = np.full((M, N), 7, np.int32)
        for part in range(parts):
            assert f(part, parts, M, N, K, a.ctypes.data, b.ctypes.data, c.ctypes.data) == 0
        np.testing.assert_array_equal(c, want)


def test_qlinear_through_the_int8_blas_matches_the_packed_kernel(monkeypatch, tmp_path):
    """Where MKL's int8 GEMM is bound and exact and the target has VNNI, qlinear runs as that GEMM plus
    an elementwise epilogue (activation and residual fused in); same integers, same epilogue expression."""
    from fxpress.codegen import resolve_target
    from fxpress.codegen.quantize_blas import int8_blas_routable
    from fxpress.codegen.quantize_packed import layout_for

    if not int8_blas_routable(layout_for(resolve_target("llvm"))):
        pytest.skip("needs a VNNI target and MKL's exact int8 GEMM in this process")
    torch.manual_seed(0)
    model, x = _SmallTransformer().eval(), (torch.randn(1, 24, 48),)
    packed = _compile_int8(model, x, True, monkeypatch)
    routed = _compile_int8(model, x, True, monkeypatch, blas=True)
    fused = routed._lowered.built.ir_after["relax.fused"]
    assert len(set(re.findall(r"cls\.fxpress_qgemm_blas\d*\b", fused))) == 4
    assert re.search(r"fused_fxpress_qlinear_out\d*_relu", fused)  # FFN1's ReLU runs in its epilogue
    assert re.search(r"fused_fxpress_qlinear_out\d*_reshape\d*_add", fused)  # and the residual adds
    y_packed, y = np.asarray(packed(*x)), np.asarray(routed(*x))
    np.testing.assert_allclose(y, y_packed, rtol=1e-5, atol=1e-5 * np.abs(y_packed).max())
    from fxpress.runtime import load

    rt = load(routed.export(str(tmp_path / "m"), backends=("tvm",)), backend="tvm")
    np.testing.assert_array_equal(np.asarray(rt.run([t.numpy() for t in x])[0]), y)


def test_int8_conv_rule_routes_narrow_inputs_or_every_conv_with_a_matrix_engine():
    from fxpress.codegen.quantize_blas import route_int8_conv

    conv = lambda cin: {"groups": 1, "x_dtype": "uint8", "w_shape": [1, 64, cin, 3, 3], "x_shape": [1, cin, 56, 56]}  # noqa: E731
    assert route_int8_conv(conv(3), "rule", False) and not route_int8_conv(conv(64), "rule", False)
    assert route_int8_conv(conv(64), "rule", True)  # AMX: every groups-1 conv
    assert route_int8_conv(conv(64), "all", False) and not route_int8_conv(conv(3), "0", True)
    assert not route_int8_conv({**conv(3), "groups": 3}, "all", True)
    assert not route_int8_conv({**conv(3), "x_dtype": "int8"}, "rule", True)




@pytest.mark.parametrize("B,C,H,W,KH,KW,stride,padding,dilation", [
    (2, 3, 9, 11, 3, 3, (1, 1), (1, 1), (1, 1)),  # the stem's narrow taps, batch 2
    (1, 20, 8, 8, 3, 3, (2, 2), (1, 1), (1, 1)),  # strided, C >= 16 not a multiple of 16
    (1, 16, 7, 7, 1, 1, (2, 2), (0, 0), (1, 1)),  # a 1x1 downsample
    (1, 5, 10, 10, 3, 3, (1, 1), (2, 2), (2, 2)),  # dilated: taps not contiguous
    (1, 32, 6, 5, 2, 3, (2, 1), (1, 0), (1, 1)),  # unequal kernel, stride and padding
])
def test_int8_im2col_matches_a_numpy_reference(B, C, H, W, KH, KW, stride, padding, dilation):
    """The BLAS route's u8 im2col: row = output pixel, column = (kh, kw, c), padding = the zero point."""
    import tvm

    from fxpress.codegen.quantize_blas import int8_im2col_func

    zp = 37
    func = int8_im2col_func([B, C, H, W], [1, 8, C, KH, KW], stride, padding, dilation, zp)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    x = np.random.default_rng(0).integers(0, 256, (B, C, H, W)).astype(np.uint8)
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2), constant_values=zp)
    OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    want = np.empty((B * OH * OW, KH * KW * C), np.uint8)
    for b in range(B):
        for i in range(OH):
            for j in range(OW):
                patch = xp[b, :, i * stride[0]: i * stride[0] + dilation[0] * (KH - 1) + 1: dilation[0],
                           j * stride[1]: j * stride[1] + dilation[1] * (KW - 1) + 1: dilation[1]]
                want[(b * OH + i) * OW + j] = patch.transpose(1, 2, 0).reshape(-1)
    got = tvm.runtime.tensor(np.zeros_like(want))
    lib["main"](tvm.runtime.tensor(x), got)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("shape", [(1, 128, 28, 28), (3, 5, 7), (13,), (2, 9)])
def test_flat_quantize_and_dequantize_kernels_match_the_reference_op(shape):
    """The CPU quantize / dequantize kernels run flat (8 lanes + a serial tail): the reference op's numbers
    (``torch.ops.fxpress.quantize``: round half to even, then + zp, clamped), exact ties included, on
    shapes whose rows do not fill a vector."""
    import tvm

    from fxpress.codegen.quantize_kernels import cpu_kernel, dequantize_func, quantize_func

    target = tvm.target.Target({"kind": "llvm"})
    scale, zp = 0.05, 3
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 8
    x.view(-1)[0] = 2.5 * torch.tensor(scale, dtype=torch.float32)  # an exact tie: x / scale = 2.5 → 2
    want_q = torch.ops.fxpress.quantize(x, scale, zp, 0, 255).numpy()
    assert want_q.reshape(-1)[0] == 2 + zp
    q = cpu_kernel(quantize_func(list(shape), scale, zp, 0, 255), target).with_attr("global_symbol", "main")
    dq = cpu_kernel(dequantize_func(list(shape), scale, zp, "uint8"), target).with_attr("global_symbol", "main")
    got_q = tvm.runtime.tensor(np.zeros(shape, np.uint8))
    tvm.compile(tvm.IRModule({"main": q}), target=target)["main"](tvm.runtime.tensor(x.numpy()), got_q)
    np.testing.assert_array_equal(got_q.numpy(), want_q)
    got_x = tvm.runtime.tensor(np.zeros(shape, np.float32))
    tvm.compile(tvm.IRModule({"main": dq}), target=target)["main"](got_q, got_x)
    np.testing.assert_array_equal(got_x.numpy(), (want_q.astype(np.float32) - zp) * np.float32(scale))


class _DownsampleCNN(torch.nn.Module):
    """A ResNet-like stack: 16- and 32-channel convs, a strided one, a 1x1 stride-2 downsample, a dilated one."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.down = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.skip = torch.nn.Conv2d(16, 32, 1, stride=2)
        self.dil = torch.nn.Conv2d(32, 32, 3, padding=2, dilation=2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.down(x)) + self.skip(x)
        return torch.relu(self.dil(y)) + y


@pytest.mark.parametrize("make,shape,mode,geometries", [
    (_SmallCNN, (2, 3, 16, 16), "1", 2),         # the rule (on any host: the 3-channel stem at least)
    (_SmallCNN, (2, 3, 16, 16), "all", 2),
    (_DownsampleCNN, (2, 3, 14, 14), "all", 4),  # strided, 1x1 downsample, dilated, 16/32 channels
], ids=["small-rule", "small-all", "downsample-all"])
def test_int8_convs_through_im2col_and_the_int8_blas_match_the_direct_kernel(make, shape, mode, geometries,
                                                                               monkeypatch):
    """Convs on the BLAS route (NHWC u8 im2col padded with the zero point, the BLAS's int32 product, the
    epilogue writing NCHW) give the direct VNNI kernels' numbers."""
    from fxpress.codegen import resolve_target
    from fxpress.codegen.quantize_blas import int8_blas_routable
    from fxpress.codegen.quantize_packed import layout_for

    if not int8_blas_routable(layout_for(resolve_target("llvm"))):
        pytest.skip("needs a VNNI target and MKL's exact int8 GEMM in this process")
    torch.manual_seed(0)
    model, x = make().eval(), (torch.randn(*shape),)
    monkeypatch.setenv("FXPRESS_INT8_CONV_BLAS", "0")
    direct = _compile_int8(model, x, True, monkeypatch, blas=True)
    monkeypatch.setenv("FXPRESS_INT8_CONV_BLAS", mode)
    routed = _compile_int8(model, x, True, monkeypatch, blas=True)
    fused = routed._lowered.built.ir_after["relax.fused"]
    assert len(set(re.findall(r"cls\.fxpress_qim2col\d*\b", fused))) == geometries
    y_direct, y = np.asarray(direct(*x)), np.asarray(routed(*x))
    np.testing.assert_allclose(y, y_direct, rtol=1e-5, atol=1e-5 * np.abs(y_direct).max())
    assert rel_err(torch.from_numpy(y), model(*x)) < 0.1  # and int8 is still near fp32


def test_int8_convs_of_a_transformers_resnet_through_the_int8_blas_match_the_direct_kernel(monkeypatch):
    """A real architecture (transformers ResNetModel from a small seeded config, nothing downloaded; traced
    by torch.export to ATen): its int8 convs (stem, strided, 1x1 shortcut) on the BLAS route give the
    direct VNNI kernels' numbers, and the int8 model stays near eager."""
    from fxpress.codegen import resolve_target
    from fxpress.codegen.quantize_blas import int8_blas_routable
    from fxpress.codegen.quantize_packed import layout_for
    pytest.importorskip("transformers")
    from fxpress.models.corpus import get_corpus

    if not int8_blas_routable(layout_for(resolve_target("llvm"))):
        pytest.skip("needs a VNNI target and MKL's exact int8 GEMM in this process")
    spec = get_corpus("hf_resnet")
    model, x = spec.build(), spec.example_inputs(2)
    monkeypatch.setenv("FXPRESS_INT8_CONV_BLAS", "0")
    direct = _compile_int8(model, x, True, monkeypatch, blas=True)
    monkeypatch.setenv("FXPRESS_INT8_CONV_BLAS", "all")
    routed = _compile_int8(model, x, True, monkeypatch, blas=True)
    assert "fxpress_qim2col" in routed._lowered.built.ir_after["relax.fused"]

    def first(y):
        return torch.as_tensor(np.asarray(y[0] if isinstance(y, (tuple, list)) else
                                          getattr(y, "last_hidden_state", y)))

    y_direct, y = first(direct(*x)), first(routed(*x))
    torch.testing.assert_close(y, y_direct, rtol=1e-5, atol=1e-5 * float(y_direct.abs().max()))
    with torch.no_grad():
        want = first(model(*x))
    assert y.shape == want.shape and float(want.abs().max()) > 0
    assert rel_err(y, want) < 0.1
