"""Quantized graphs lowered to ONNX Runtime and TVM: int8 kernels run, and match the FX reference."""
import numpy as np
import pytest
import torch

import fxpress
from fxpress import models

from helpers import rel_err

OPS = torch.ops.fxpress


@pytest.fixture(scope="module")
def digits():
    xtr, _, xte, yte = models.digits_data()
    model = models.trained_digits_cnn()
    calib = [(xtr[i:i + 128],) for i in range(0, 384, 128)]
    return model, calib, xte, yte


def _quantized(model, x, calib, **opts):
    return fxpress.compile(model, x, passes=["quantize"], target="torch", calibration=calib,
                           options={"quantize": opts}).gm


@pytest.fixture(scope="module")
def digits_q(digits):
    model, calib, xte, _ = digits
    return _quantized(model, (xte[:8],), calib)


@pytest.fixture(scope="module")
def bert():
    spec = models.get("bert_small")
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randint(0, 1000, (4, 16), generator=g),) for _ in range(3)]
    return spec.build(), spec.example_inputs(), calib


@pytest.fixture(scope="module")
def bert_q(bert):
    model, x, calib = bert
    return _quantized(model, x, calib)


@pytest.fixture(scope="module")
def bert_q_split(bert):
    model, x, calib = bert
    return _quantized(model, x, calib, splitquant=True)


def _ort_ops(gm, x, tmp_path):
    """Op types of the graph ONNX Runtime actually runs (its optimized-model dump), and its output."""
    import onnx
    import onnxruntime as ort

    from fxpress.lowering import to_onnx

    path = to_onnx(gm, x, str(tmp_path / "model.onnx")).path  # runs onnx.checker (full_check)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    y = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), x)})[0]
    return ops, torch.from_numpy(y)


def test_compile_onnx_digits_int8_kernels_exact(digits, tmp_path):
    model, calib, xte, yte = digits
    x = (xte,)  # the whole test split as one batch: the compiled model has fixed shapes
    cm = fxpress.compile(model, x, passes=["quantize"], target="onnx", calibration=calib)
    # ORT's output equals the FX reference bit for bit (integer GEMM/conv, same float epilogue)
    y = cm(*x)
    assert rel_err(y, cm.gm(*x)) == 0.0
    assert models.accuracy(lambda b: y, xte, yte, batch_size=len(xte)) >= models.accuracy(model, xte, yte) - 0.01
    assert cm.report["lower:onnx"].max_rel_error < 0.05
    ir = cm.report["lower:onnx"].ir  # the exported graph: explicit QuantizeLinear / integer ops
    assert "QuantizeLinear" in ir and "ConvInteger" in ir
    ops, _ = _ort_ops(cm.gm, x, tmp_path)
    assert ops.count("ConvInteger") == 2 and ops.count("QGemm") == 2, ops
    assert "Conv" not in ops and "Gemm" not in ops and "MatMul" not in ops  # no fp32 compute left


def test_onnx_bert_int8_kernels(bert, bert_q, tmp_path):
    model, x, _ = bert
    ops, y = _ort_ops(bert_q, x, tmp_path)
    assert ops.count("QGemm") == 14, ops
    assert ops.count("MatMulIntegerToFloat") + ops.count("QLinearMatMul") == 4
    assert "MatMul" not in ops and "Gemm" not in ops
    # ORT may fold a following QuantizeLinear into the attention matmul (QLinearMatMul), which rounds once
    # instead of twice: a rare 1-step difference; everything else is exact
    assert rel_err(y, bert_q(*x)) < 1e-3
    assert torch.nn.functional.cosine_similarity(y.flatten(), model(*x).detach().flatten(), dim=0) > 0.999


def test_onnx_splitquant_one_gemm_per_layer(bert, bert_q_split, tmp_path):
    _, x, _ = bert
    ops, y = _ort_ops(bert_q_split, x, tmp_path)
    assert ops.count("QGemm") == 14, ops  # three clusters, one GEMM per layer
    assert rel_err(y, bert_q_split(*x)) < 1e-3


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_onnx_dynamic_and_weight_only(digits, mode, tmp_path):
    model, calib, xte, _ = digits
    x = (xte[:8],)
    gm = _quantized(model, x, calib, mode=mode, bits=8 if mode == "dynamic" else 4)
    ops, y = _ort_ops(gm, x, tmp_path)
    assert rel_err(y, gm(*x)) < 1e-5
    if mode == "dynamic":
        assert ops.count("DynamicQuantizeMatMul") + ops.count("MatMulIntegerToFloat") + ops.count("MatMulInteger") == 2, ops
    else:
        assert ops.count("DequantizeLinear") >= 4  # int weights in the file, dequantized by ORT


@pytest.mark.parametrize("w_max", [127, 7])
def test_ort_qgemm_matches_reference_bit_for_bit(tmp_path, w_max):
    """The op's definition is ORT's QGemm arithmetic: int8 codes go out as uint8 (+128) — ORT's AVX2
    u8×s8 kernel saturates int16 pair sums — and as int8 when ``w_max`` rules saturation out (int4)."""
    g = torch.Generator().manual_seed(0)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            w = torch.randint(-w_max, w_max + 1, (1, 48, 96), dtype=torch.int8, generator=g)
            w[0, :, :4] = w_max  # worst case for pairwise int16 sums
            self.w = torch.nn.Parameter(w, requires_grad=False)
            self.ws = torch.nn.Parameter(torch.rand(1, 48, generator=g) * 0.01, requires_grad=False)
            self.bq = torch.nn.Parameter(torch.randint(-9999, 9999, (1, 48), dtype=torch.int32, generator=g),
                                         requires_grad=False)

        def forward(self, x):
            xq = OPS.quantize(x, 0.02, 3, 0, 255)
            return OPS.qlinear(xq, 0.02, 3, self.w, self.ws, self.bq, w_max)

    m = M().eval()
    x = torch.rand(32, 96, generator=g) * 5  # saturates to 255 often
    ops, y = _ort_ops(m, (x,), tmp_path)
    assert "QGemm" in ops
    assert torch.equal(y, m(x))
    import onnx

    wtypes = {onnx.TensorProto.DataType.Name(i.data_type) for i in onnx.load(str(tmp_path / "optimized.onnx")).graph.initializer
              if len(i.dims) == 2}
    assert ("INT8" if w_max <= 64 else "UINT8") in wtypes


# ----------------------------------------------------------------------------- TVM

def test_compile_llvm_matches_reference(digits):
    model, calib, xte, _ = digits
    x = (xte[:8],)
    cm = fxpress.compile(model, x, passes=["quantize"], target="llvm", calibration=calib,
                         options={"quantize": {"splitquant": True, "bits": 4}})
    assert rel_err(cm(*x), cm.gm(*x)) < 1e-6
    ir = cm.report["lower:llvm"].ir
    assert "fxpress_qconv2d" in ir and "fxpress_qlinear" in ir and "uint8" in ir


def _tvm_scheduled(gm, x):
    from fxpress.codegen import build
    from fxpress.codegen.quantize_kernels import apply_default_schedules
    from fxpress.lowering import to_relax
    from fxpress.runtime.backends import TVMExecutor

    rm = to_relax(gm, x)
    mod = apply_default_schedules(rm.mod, "llvm")
    built = build(mod, "llvm")
    ex = TVMExecutor.from_built(built.executable, rm.params, "cpu")
    return ex.run([t.numpy() for t in x])[0], built


def test_tvm_avx2_kernels_match_reference(digits, digits_q, bert, bert_q_split):
    from fxpress.codegen import resolve_target
    from fxpress.codegen.quantize_kernels import has_avx2

    if not has_avx2(resolve_target("llvm")):
        pytest.skip("no AVX2 on this CPU")
    x = (digits[2][:8],)
    y, built = _tvm_scheduled(digits_q, x)
    assert rel_err(y, digits_q(*x)) == 0.0
    asm = built.executable.mod.inspect_source("asm") if hasattr(built.executable.mod, "inspect_source") else ""
    if asm:
        assert "vpmaddwd" in asm  # the int8 products run on the integer multiply-add instruction
    _, bx, _ = bert
    y, _ = _tvm_scheduled(bert_q_split, bx)
    assert rel_err(y, bert_q_split(*bx)) < 1e-6


@pytest.mark.parametrize("shape", [(16, 64, 1, 32), (7, 33, 3, 10), (1, 5, 1, 3)])
def test_qlinear_kernels_against_op(shape):
    import tvm

    from fxpress.codegen import quantize_kernels as qk
    from fxpress.codegen import resolve_target

    M, K, C, N = shape
    g = torch.Generator().manual_seed(M * K)
    xq = torch.randint(0, 256, (M, K), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (C, N, K), dtype=torch.int8, generator=g)
    ws = torch.rand(C, N, generator=g) * 0.01
    bq = torch.randint(-1000, 1000, (C, N), dtype=torch.int32, generator=g)
    ref = OPS.qlinear(xq, 0.03125, 7, w, ws, bq).numpy()
    target = resolve_target("llvm")
    funcs = [qk.qlinear_func(M, K, C, N, 0.03125, 7)]
    if qk.has_avx2(target):
        funcs.append(qk.qlinear_avx2_func(M, K, C, N, 0.03125, 7))
    for f in funcs:
        lib = tvm.compile(tvm.IRModule({"main": f}), target=target)
        dev = tvm.cpu()
        args = [tvm.runtime.tensor(a.numpy(), dev) for a in (xq, w, ws, bq)]
        out = tvm.runtime.tensor(np.zeros((M, N), np.float32), dev)
        lib(*args, out)
        # exact integers; only the float summation of clusters may contract into an FMA
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_qmatmul_kernels_against_op():
    import tvm

    from fxpress.codegen import quantize_kernels as qk
    from fxpress.codegen import resolve_target

    target = resolve_target("llvm")
    g = torch.Generator().manual_seed(3)
    G, M, K, N = 3, 7, 5, 9
    a = torch.randint(0, 256, (G, M, K), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (G, K, N), dtype=torch.uint8, generator=g)
    ref = OPS.qmatmul(a, 0.01, 3, b, 0.02, 130).numpy()
    funcs = [qk.qmatmul_func(G, M, K, N, 0.01, 3, 0.02, 130)]
    if qk.has_avx2(target):
        funcs.append(qk.qmatmul_avx2_func(G, M, K, N, 0.01, 3, 0.02, 130))
    for f in funcs:
        lib = tvm.compile(tvm.IRModule({"main": f}), target=target)
        dev = tvm.cpu()
        out = tvm.runtime.tensor(np.zeros((G, M, N), np.float32), dev)
        lib(tvm.runtime.tensor(a.numpy(), dev), tvm.runtime.tensor(b.numpy(), dev), out)
        np.testing.assert_array_equal(out.numpy(), ref)


def test_qconv2d_avx2_kernel_strided_dilated():
    import tvm

    from fxpress.codegen import quantize_kernels as qk
    from fxpress.codegen import resolve_target

    target = resolve_target("llvm")
    if not qk.has_avx2(target):
        pytest.skip("no AVX2 on this CPU")
    g = torch.Generator().manual_seed(1)
    xq = torch.randint(0, 256, (2, 5, 9, 11), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (3, 6, 5, 3, 3), dtype=torch.int8, generator=g)
    ws = torch.rand(3, 6, generator=g) * 0.01
    bq = torch.randint(-1000, 1000, (3, 6), dtype=torch.int32, generator=g)
    args = dict(stride=[2, 1], padding=[1, 2], dilation=[1, 2], groups=1)
    ref = OPS.qconv2d(xq, 0.02, 11, w, ws, bq, **args).numpy()
    f = qk.qconv2d_avx2_func(list(xq.shape), list(w.shape), 0.02, 11, **args)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=target)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(ref.shape, np.float32), dev)
    lib(*[tvm.runtime.tensor(a.numpy(), dev) for a in (xq, w, ws, bq)], out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_dynamic_and_weight_only_on_llvm(digits):
    model, calib, xte, _ = digits
    x = (xte[:8],)
    for opts in ({"mode": "dynamic"}, {"mode": "weight_only", "bits": 4}):
        cm = fxpress.compile(model, x, passes=["quantize"], target="llvm", options={"quantize": opts})
        assert rel_err(cm(*x), cm.gm(*x)) < 1e-5, opts


@pytest.mark.gpu
def test_cuda_matches_reference(digits):
    model, calib, xte, _ = digits
    x = (xte[:8],)
    for opts in ({}, {"splitquant": True, "bits": 4}, {"mode": "dynamic"}):
        cm = fxpress.compile(model, x, passes=["quantize"], target="cuda", calibration=calib,
                             options={"quantize": opts})
        assert rel_err(cm(*x), cm.gm(*x)) < 1e-5, opts
