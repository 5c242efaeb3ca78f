"""Shift/add codes and TIR kernels: exact packing, kernels equal to the reference ops, llvm and CUDA builds."""
import shutil

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from fxpress.codegen import build, gpu_available, resolve_target
from fxpress.codegen import shift_add_kernels as K
from fxpress.passes.shift_add import ops as S

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
CPU = resolve_target("llvm")


def _run(func, arrays, out_shape, target=CPU, dev=None):
    dev = dev or tvm.cpu()
    ex = tvm.compile(tvm.IRModule({"main": func}), target=target)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"), dev)
    ex["main"](*args, out)
    return out.numpy()


# ----------------------------------------------------------------------------- codes


def test_every_code_round_trips():
    codes = torch.arange(32, dtype=torch.uint8)
    sign, exp = S.unpack_codes(codes)
    repacked = S.pack_codes(sign, exp)
    # All 32 codes round-trip except the negative zero (sign 1, exp 15), which packs to +0.
    assert torch.equal(repacked[codes != (S.SIGN_BIT | S.ZERO_EXP)], codes[codes != (S.SIGN_BIT | S.ZERO_EXP)])
    assert int(repacked[S.SIGN_BIT | S.ZERO_EXP]) == S.ZERO_EXP
    vals = S._pow2_values(codes)
    assert vals[S.ZERO_EXP] == 0 and vals[3] == 2.0**-3 and vals[S.SIGN_BIT | 3] == -(2.0**-3)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("terms", [1, 2])
def test_encode_decode_round_trip_exactly(seed, terms):
    g = torch.Generator().manual_seed(seed)
    out, k = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
    w = torch.randn(out, k, generator=g) * float(torch.rand(1, generator=g) * 3 + 0.01)
    w[0, : k // 2] = 0.0  # zeros stay zeros
    codes, scale = S.encode_pow2(w, terms)
    assert codes.dtype == torch.uint8 and codes.shape == (terms, out, k) and int(codes.max()) < 32
    wq = S.decode_pow2(codes, scale)
    # Decoded weights are exactly representable: encoding them again with the same scale gives the same
    # codes (1 term) or the same values bit for bit (2 terms may split a value differently).
    codes2 = S.encode_with_scale(wq, scale, terms)
    assert torch.equal(S.decode_pow2(codes2, scale), wq)
    if terms == 1:
        assert torch.equal(codes2, codes)
    assert bool((wq[0, : k // 2] == 0).all())
    # Power-of-two rounding error bounds: one term is within 1/3 of each weight's magnitude (nearest
    # power of two) before the scale refit; two terms do much better on the whole matrix.
    rel = float((wq - w).norm() / w.norm())
    assert rel < (0.3 if terms == 1 else 0.08)
    # Kernel layouts are permutations of the same codes.
    assert torch.equal(S.linear_weight(S.linear_codes(codes)) * scale, wq.T)
    # Dense 5-bit storage stream round-trips.
    stream, n = S.pack_bitstream(codes)
    assert stream.numel() == (n * 5 + 7) // 8
    assert torch.equal(S.unpack_bitstream(stream, n).reshape(codes.shape), codes)


def test_conv_layout_round_trip():
    w = torch.randn(6, 4, 3, 2)
    codes, scale = S.encode_pow2(w, 2)
    cc = S.conv_codes(codes, w.shape)
    assert cc.shape == (2, 4, 3, 2, 6)
    assert torch.equal(S.conv_weight(cc) * scale[:, None, None, None], S.decode_pow2(codes, scale).reshape(w.shape))


def test_two_terms_beat_one():
    w = torch.randn(64, 256) * 0.05
    errs = [float((S.decode_pow2(*S.encode_pow2(w, t)) - w).norm() / w.norm()) for t in (1, 2)]
    assert errs[1] < errs[0] / 3


# ----------------------------------------------------------------------------- kernels vs reference ops


def _linear_case(seed, terms, frac_bits, zero_bias):
    g = torch.Generator().manual_seed(seed)
    m, k, n = (int(v) for v in torch.randint(1, 48, (3,), generator=g))
    w = torch.randn(n, k, generator=g)
    codes, scale = S.encode_pow2(w, terms)
    lc = S.linear_codes(codes)
    bias = torch.zeros(n) if zero_bias else torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g) * 3
    ref = S.shift_linear(x, lc, scale, bias, frac_bits).numpy()
    return (m, k, n), [x.numpy(), lc.numpy(), scale.numpy(), bias.numpy()], ref


@pytest.mark.parametrize("seed,terms,scheduled", [(0, 1, False), (1, 2, True), (2, 1, True), (3, 2, False)])
def test_linear_int_path_bit_exact(seed, terms, scheduled):
    (m, k, n), arrays, ref = _linear_case(seed, terms, frac_bits=17, zero_bias=True)
    f = K.shift_linear_func(m, k, n, terms, 17)
    y = _run(K.schedule_cpu(f) if scheduled else f, arrays, (m, n))
    # y = float(int32 acc) * (scale * 2^-F): one rounding, so equal outputs mean equal accumulators.
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("seed,terms,frac_bits", [(4, 1, -1), (5, 2, -1), (6, 2, 12)])
def test_linear_with_bias_matches_reference(seed, terms, frac_bits):
    (m, k, n), arrays, ref = _linear_case(seed, terms, frac_bits, zero_bias=False)
    y = _run(K.schedule_cpu(K.shift_linear_func(m, k, n, terms, frac_bits)), arrays, (m, n))
    scale = np.abs(ref).max()
    # Float path: same exact products, different summation order. Int path: a fused multiply-add may
    # round the bias add once instead of twice (1 ulp).
    assert np.abs(y - ref).max() <= 1e-5 * scale


CONV_CASES = [  # x shape, (oc, icg, kh, kw), stride, padding, dilation, groups
    ((2, 8, 9, 9), (16, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 6, 10, 8), (6, 1, 3, 3), (2, 2), (1, 1), (1, 1), 6),     # depthwise, stride 2
    ((2, 4, 7, 7), (8, 2, 1, 1), (1, 1), (0, 0), (1, 1), 2),      # grouped 1x1
    ((1, 3, 11, 11), (5, 3, 3, 2), (1, 2), (2, 0), (2, 1), 1),    # dilated, asymmetric
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_int_path_bit_exact_and_float_close(case):
    xs, ws, st, pd, dl, gr = CONV_CASES[case]
    g = torch.Generator().manual_seed(10 + case)
    w = torch.randn(*ws, generator=g)
    codes, scale = S.encode_pow2(w, 1 + case % 2)
    cc = S.conv_codes(codes, w.shape)
    x = torch.randn(*xs, generator=g)
    zero = torch.zeros(ws[0])
    for frac_bits in (18, -1):
        ref = S.shift_conv2d(x, cc, scale, zero, list(st), list(pd), list(dl), gr, frac_bits).numpy()
        f = K.shift_conv2d_func(xs, tuple(cc.shape), st, pd, dl, gr, frac_bits)
        y = _run(K.schedule_cpu(f) if case % 2 else f, [x.numpy(), cc.numpy(), scale.numpy(), zero.numpy()],
                 ref.shape)
        if frac_bits >= 0:
            np.testing.assert_array_equal(y, ref)
        else:
            assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_float_path_flushes_underflow_and_keeps_signs():
    # x * 2^-e below the smallest normal float becomes 0 in the kernel; everything else is exact.
    x = np.array([[1.5, -3.0, 1e-38, 0.0, -0.0, 2.0**-120]], dtype="float32")
    codes = S.pack_codes(torch.tensor([0, 1, 0, 1, 0, 0]), torch.tensor([1, 2, 3, 0, 5, 14])).reshape(1, 6, 1)
    y = _run(K.shift_linear_func(1, 6, 1, 1, -1), [x, codes.numpy(), np.ones(1, "float32"), np.zeros(1, "float32")],
             (1, 1))
    assert y[0, 0] == np.float32(0.75 + 0.75 + 0.0 + 0.0 + 0.0 + 0.0)


def test_binary_attention_kernel_matches_reference():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(6, 7, 8, generator=g), torch.randn(6, 7, 8, generator=g), torch.randn(6, 7, 5, generator=g)
    ref = S.binary_attention(q, k, v).numpy()
    f = K.binary_attention_func(6, 7, 8, 5)
    for func in (f, K.schedule_cpu(f)):
        y = _run(func, [q.numpy(), k.numpy(), v.numpy()], ref.shape)
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    # It is softmax-free linear attention over sign matches: check against the direct formula.
    qb, kb = torch.where(q >= 0, 1.0, -1.0), torch.where(k >= 0, 1.0, -1.0)
    a = (8 + qb @ kb.transpose(-2, -1)) / 2
    torch.testing.assert_close(torch.from_numpy(ref), (a @ v) / a.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_kernels_have_no_float_multiply_by_weight():
    """The shift matmul's reduction reads the uint8 codes and contains no float multiply."""
    f = K.shift_linear_func(4, 16, 8, 2, -1)
    body = f.script().split('with T.sblock("shift_acc")')[1].split("T.sblock(")[0]
    assert "codes[" in body and " * " not in body
    fi = K.shift_linear_func(4, 16, 8, 1, 10)
    body = fi.script().split('with T.sblock("shift_acc")')[1].split("T.sblock(")[0]
    assert ">>" in body and " * " not in body


# ----------------------------------------------------------------------------- builds


def _relax_module(te_fn, specs, *attrs, relu=True):
    """A Relax main(specs...) that calls one shift/add kernel the way the converters emit it."""
    from fxpress.lowering.shift_add_lowering import _emit

    bb = relax.BlockBuilder()
    args = [relax.Var(name, relax.TensorType(list(shape), dtype)) for name, shape, dtype in specs]
    with bb.function("main", args):
        with bb.dataflow():
            y = _emit(bb, te_fn, *args, *attrs, name=te_fn.__name__.replace("_te", ""))
            if relu:
                y = bb.emit(relax.op.nn.relu(y))  # an elementwise op after the kernel (the FuseTIR crash case)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _relax_linear_module(frac_bits, rows=4, k=24, n=16, terms=2):
    specs = [("x", (rows, k), "float32"), ("codes", (terms, k, n), "uint8"), ("scale", (n,), "float32"),
             ("bias", (n,), "float32")]
    return _relax_module(K.shift_linear_te, specs, frac_bits)


def test_llvm_build_of_kernel_runs_through_codegen():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 24, generator=g)
    codes, scale = S.encode_pow2(w, 2)
    lc = S.linear_codes(codes)
    x = torch.randn(4, 24, generator=g)
    bias = torch.randn(16, generator=g)
    for frac_bits in (16, -1):
        ref = torch.relu(S.shift_linear(x, lc, scale, bias, frac_bits)).numpy()
        built = build(_relax_linear_module(frac_bits), "llvm")
        # codegen gives the kernel its hand schedule (build → apply_default_schedules).
        assert '"tirx.is_scheduled": True' in built.ir_after["tir.kernels"]
        assert "T.parallel" in built.ir_after["tir.kernels"] and "T.vectorized" in built.ir_after["tir.kernels"]
        vm = relax.VirtualMachine(built.executable, tvm.cpu())
        y = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in (x, lc, scale, bias)]).numpy()
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_schedule_failure_leaves_kernel_unscheduled(monkeypatch):
    """A shape the hand schedule cannot handle must not break the build: the kernel stays as written."""
    monkeypatch.setattr(K, "schedule_cpu", lambda f: (_ for _ in ()).throw(RuntimeError("boom")))
    mod = K.apply_default_schedules(_relax_linear_module(-1), CPU)
    assert "tirx.is_scheduled" not in mod["shift_linear"].attrs


def _cuda_build_ok(mod):
    built = build(mod, "cuda")
    src = built.ir_after["cuda.source"]
    assert "__global__" in src and "threadIdx.x" in src
    if not gpu_available():
        assert built._device_payloads  # the CUDA C was compiled by nvcc here, into a fatbin
        assert all(b"fatbin" in p for p in built._device_payloads.values())
    return src


@needs_nvcc
@pytest.mark.parametrize("frac_bits", [-1, 16])
def test_cuda_codegen_of_shift_linear_compiles_with_nvcc(frac_bits):
    src = _cuda_build_ok(_relax_linear_module(frac_bits))
    assert "shift_linear" in src


@needs_nvcc
def test_cuda_codegen_of_conv_and_attention_compiles_with_nvcc():
    conv = _relax_module(K.shift_conv2d_te, [("x", (1, 8, 9, 9), "float32"), ("codes", (1, 4, 3, 3, 8), "uint8"),
                                             ("scale", (8,), "float32"), ("bias", (8,), "float32")],
                         [1, 1], [1, 1], [1, 1], 2, 15)
    attn = _relax_module(K.binary_attention_te, [("q", (4, 8, 16), "float32"), ("k", (4, 8, 16), "float32"),
                                                 ("v", (4, 8, 16), "float32")])
    assert "shift_conv2d" in _cuda_build_ok(conv)
    assert "binary_attention" in _cuda_build_ok(attn)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("frac_bits", [-1, 16])
def test_cuda_kernel_matches_reference_on_gpu(frac_bits):
    (m, k, n), arrays, ref = _linear_case(11, 2, frac_bits, zero_bias=True)
    cuda = resolve_target("cuda")
    from fxpress.codegen import cuda as cuda_mod

    cuda_mod.install_compiler()
    with cuda:
        y = _run(K.schedule_cuda(K.shift_linear_func(m, k, n, 2, frac_bits)), arrays, (m, n), target=cuda,
                 dev=tvm.cuda(0))
    if frac_bits >= 0:
        np.testing.assert_array_equal(y, ref)
    else:
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
