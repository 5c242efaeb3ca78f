"""The llvm target's CPU kernels (issue #18): the BLAS GEMM shim, fast softmax/exp, ISA detection.

Numerics only: nothing here depends on the CPU's ISA or speed. Each routed kernel is checked against
numpy (float64) on odd shapes, batched and transposed operands, and the shim's no-BLAS fallback loop
is checked on its own in a subprocess that never loads a BLAS.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import fxpress
from fxpress.codegen import blas, build, gemm_route, isa
from fxpress.codegen.targets import resolve_target

from helpers import rel_err

needs_shim = pytest.mark.skipif(not blas.available(), reason="no C compiler: the GEMM shim is not built")


def _run_relax(fn_builder, inputs: list[np.ndarray]):
    """Build a one-function Relax module (``fn_builder(bb, *vars) -> expr``) for llvm and run it."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(list(a.shape), "float32")) for i, a in enumerate(inputs)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(fn_builder(bb, *params))
        bb.emit_func_output(out)
    built = build(bb.get(), "llvm")
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    y = vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()
    return y, built


def _routed(built) -> bool:
    return gemm_route.KERNEL_NAME in built.ir_after["relax.decomposed"]


# (a shape, b shape, transpose a's last two axes first, transpose b's) — odd sizes on purpose
GEMM_CASES = [
    ((67, 131), (131, 129), False, False),         # 2-D, nothing a multiple of 16
    ((3, 37, 131), (131, 67), False, False),       # batch folded into rows, shared weight
    ((3, 37, 131), (67, 131), False, True),        # Linear: x @ W.T, W as torch stores it
    ((5, 45, 33), (5, 33, 47), False, False),      # batched, odd batch count
    ((2, 5, 45, 33), (2, 5, 47, 33), False, True),  # attention's Q @ K.T, 4-D
    ((4, 33, 45), (33, 47), True, False),          # transposed left operand, shared right
    ((33, 45), (6, 33, 47), True, False),          # shared left operand, batched right
    ((1, 128, 384), (1536, 384), False, True),     # BERT FFN shape
    ((520, 300), (300, 49), False, False),         # M > 2N (a conv's weight x few pixels): rows split
    ((300, 520), (2, 300, 49), True, False),       # the same, transposed shared left operand, batched
    ((130, 72), (40, 72), False, True),            # few, awkward columns (a 7x7 map's 49), B transposed
    ((72, 130), (72, 40), True, False),            # the same with A transposed
]


@needs_shim
@pytest.mark.parametrize("sa,sb,ta,tb", GEMM_CASES)
def test_gemm_shim_matches_numpy(sa, sb, ta, tb):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(sa, dtype=np.float32)
    b = rng.standard_normal(sb, dtype=np.float32)

    def swap(bb, v, rank):
        return bb.emit(relax.op.permute_dims(v, list(range(rank - 2)) + [rank - 1, rank - 2]))

    def fn(bb, x, w):
        x = swap(bb, x, len(sa)) if ta else x
        w = swap(bb, w, len(sb)) if tb else w
        return relax.op.matmul(x, w)

    y, built = _run_relax(fn, [a, b])
    a64 = np.swapaxes(a, -1, -2).astype(np.float64) if ta else a.astype(np.float64)
    b64 = np.swapaxes(b, -1, -2).astype(np.float64) if tb else b.astype(np.float64)
    ref = np.matmul(a64, b64)
    assert _routed(built), "this matmul should go through the GEMM shim"
    assert blas.object_file() in built.extern_objects
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-5
    if ta or tb:  # the transposes were folded into the call, not computed
        assert "permute_dims" not in built.ir_after["relax.decomposed"]


def test_small_and_unsupported_matmuls_stay_tvm():
    rng = np.random.default_rng(1)
    # below MIN_FLOPS
    a, b = rng.standard_normal((4, 8), dtype=np.float32), rng.standard_normal((8, 5), dtype=np.float32)
    y, built = _run_relax(lambda bb, x, w: relax.op.matmul(x, w), [a, b])
    assert not _routed(built)
    np.testing.assert_allclose(y, a @ b, rtol=1e-5, atol=1e-5)
    # broadcasting batch dims (2,1) x (1,3): not routed, still right
    a = rng.standard_normal((2, 1, 64, 70), dtype=np.float32)
    b = rng.standard_normal((1, 3, 70, 66), dtype=np.float32)
    y, built = _run_relax(lambda bb, x, w: relax.op.matmul(x, w), [a, b])
    assert not _routed(built)
    np.testing.assert_allclose(y, np.matmul(a, b), rtol=1e-4, atol=1e-4)


def test_blas_off_switch(monkeypatch):
    monkeypatch.setenv("FXPRESS_BLAS", "0")
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((67, 131), dtype=np.float32), rng.standard_normal((131, 129), dtype=np.float32)
    y, built = _run_relax(lambda bb, x, w: relax.op.matmul(x, w), [a, b])
    assert not _routed(built) and built.extern_objects == []
    np.testing.assert_allclose(y, a @ b, rtol=1e-4, atol=1e-4)


FALLBACK = textwrap.dedent("""
    # No numpy, no BLAS: the shim alone, through ctypes; it must compute with its plain loop.
    import ctypes, random, sys
    lib = ctypes.CDLL(sys.argv[1])
    random.seed(0)
    def run(batch, M, N, K, ta, tb, parts):
        A = [random.uniform(-1, 1) for _ in range(batch * M * K)]
        B = [random.uniform(-1, 1) for _ in range(batch * K * N)]
        fa, fb, fc = (ctypes.c_float * len(A))(*A), (ctypes.c_float * len(B))(*B), (ctypes.c_float * (batch * M * N))()
        f = lib.fxpress_sgemm
        f.argtypes = [ctypes.c_int64] * 6 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32] * 2 + [ctypes.c_void_p, ctypes.c_int64]
        for p in range(parts):
            f(p, parts, batch, M, N, K, ctypes.addressof(fa), M * K, ta, ctypes.addressof(fb), K * N, tb,
              ctypes.addressof(fc), M * N)
        worst = 0.0
        for n in range(batch):
            for i in range(M):
                for j in range(N):
                    s = 0.0
                    for k in range(K):
                        av = fa[n * M * K + (k * M + i if ta else i * K + k)]
                        bv = fb[n * K * N + (j * K + k if tb else k * N + j)]
                        s += av * bv
                    worst = max(worst, abs(s - fc[n * M * N + i * N + j]))
        return worst
    errs = [run(3, 7, 37, 5, 0, 0, 2), run(1, 5, 33, 9, 1, 1, 3), run(4, 3, 17, 6, 0, 1, 2),
            run(1, 37, 5, 9, 0, 0, 2), run(1, 40, 7, 6, 1, 1, 3)]  # M > 2N: split by rows
    name = lib.fxpress_blas_name
    name.restype = ctypes.c_char_p
    print(name().decode(), max(errs))
""")


@needs_shim
def test_shim_without_blas_uses_its_loop():
    so = blas._compile()[1]
    r = subprocess.run([sys.executable, "-c", FALLBACK, so], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
    symbol, err = r.stdout.split()
    assert symbol == "none"
    assert "no CBLAS sgemm" in r.stderr
    assert float(err) < 1e-4


CHOICE = textwrap.dedent("""
    # Which BLAS the shim gets: every candidate timed, the fastest opened globally, numpy left as it was.
    import ctypes, json, numpy
    from fxpress.runtime import blas
    lib = next(p for p in blas.candidates() if "openblas" in p)
    get = getattr(ctypes.CDLL(lib), "scipy_openblas_get_num_threads64_", None)
    before = get() if get else None
    blas.preload()
    print(json.dumps({**blas.choice(), "candidates": blas.candidates(),
                      "threads": [before, get() if get else None]}))
""")


@needs_shim
def test_blas_library_is_the_fastest_candidate_and_numpy_keeps_its_threads():
    r = subprocess.run([sys.executable, "-c", CHOICE], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "FXPRESS_BLAS_LIB"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    if len(out["candidates"]) > 1:
        probes = out["probe_us"]
        assert len(probes) == len(out["candidates"])
        assert os.path.basename(out["library"]) == min(probes, key=probes.get)
    else:
        assert out["library"] == out["candidates"][0]
    assert out["threads"][0] == out["threads"][1]  # numpy's OpenBLAS thread count is the user's


def test_blas_library_from_the_environment_is_taken_as_it_is(monkeypatch):
    from fxpress.runtime import blas as runtime_blas

    monkeypatch.setenv("FXPRESS_BLAS_LIB", "/opt/my/libblas.so")
    assert runtime_blas.candidates() == ["/opt/my/libblas.so"]


class _Attention(torch.nn.Module):
    """Linear projections, Q @ K.T, softmax, @ V, GELU FFN: every path this issue touches."""

    def __init__(self, d=96, heads=3):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)
        self.ffn = torch.nn.Sequential(torch.nn.Linear(d, 4 * d + 5), torch.nn.GELU(), torch.nn.Linear(4 * d + 5, d))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.reshape(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        h = (att @ v).transpose(1, 2).reshape(b, s, d)
        h = self.out(h) + x
        return self.ffn(h) + torch.exp(-h.abs())


@pytest.fixture(scope="module")
def attention():
    torch.manual_seed(0)
    m = _Attention().eval()
    x = torch.randn(2, 67, 96)
    with torch.no_grad():
        ref = m(x)
    return m, x, ref


def test_attention_model_matches_eager(attention):
    m, x, ref = attention
    cm = fxpress.compile(m, (x,), passes="none", target="llvm")
    assert rel_err(cm(x), ref) <= 1e-4
    ir = cm._lowered.built.ir_after["relax.decomposed"]
    assert "R.nn.softmax" not in ir and "R.exp(" not in ir  # the fast (vectorizable) versions
    if blas.available():
        assert gemm_route.KERNEL_NAME in ir


TORCH_FREE = textwrap.dedent("""
    import sys, importlib.abc
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch imported in the torch-free runtime: " + name)
    sys.meta_path.insert(0, NoTorch())
    import numpy as np
    import fxpress.runtime
    art, inp, out = sys.argv[1:4]
    rt = fxpress.runtime.load(art, backend="tvm")
    np.save(out, rt(np.load(inp)))
    print("ok")
""")


def test_exported_artifact_runs_torch_free(attention, tmp_path):
    m, x, ref = attention
    cm = fxpress.compile(m, (x,), passes="none", target="llvm")
    path = cm.export(str(tmp_path / "att"), backends=("tvm",))
    inp, out = tmp_path / "in.npy", tmp_path / "out.npy"
    np.save(inp, x.numpy())
    # a fresh process: the library's shim must find numpy's BLAS through runtime/blas.py alone
    r = subprocess.run([sys.executable, "-c", TORCH_FREE, path, str(inp), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no CBLAS" not in r.stderr
    assert rel_err(np.load(out), ref) <= 1e-4


def test_isa_features_from_target():
    avx2 = isa.features(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}))
    assert avx2.lanes_fp32 == 8 and not avx2.avx512f and avx2.fma
    skx = isa.features(tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"}))
    assert skx.lanes_fp32 == 16 and skx.avx512f and skx.vnni
    generic = isa.features(tvm.target.Target({"kind": "llvm"}))
    assert generic.lanes_fp32 == 4 and not generic.fma
    assert avx2.key() != skx.key()
    # the same ISA under two CPU names has one key (tuning records are shared between them)
    assert isa.features(tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"})).key() == \
        isa.features(tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})).key()
    host = isa.features(resolve_target("llvm"))
    assert host.lanes_fp32 in (4, 8, 16)


def test_avx512_tile_rule_keeps_whole_vectors():
    from fxpress.codegen.cpu_schedules import tile_sizes

    assert tile_sizes(56, 64, 16) == (8, 8)     # 56 wide: 256-bit vectors, not 14-wide ones
    assert tile_sizes(112, 64, 16) == (16, 8)   # a multiple of 16 lanes keeps them
    assert tile_sizes(7, 128, 16) == (7, 8)     # nothing whole fits


def _host_has_avx2() -> bool:
    from fxpress.runtime import cpu

    return cpu.is_x86() and {"avx2", "fma"} <= (cpu.host_flags() or set())


@pytest.mark.skipif(not _host_has_avx2(), reason="runs AVX2 code: this CPU has no AVX2/FMA")
def test_avx2_code_for_another_mcpu(attention, monkeypatch):
    """FXPRESS_LLVM_MCPU=znver3 builds AVX2 code (it runs on any AVX2 machine, this one included)."""
    m, x, ref = attention
    monkeypatch.setenv("FXPRESS_LLVM_MCPU", "znver3")
    target = resolve_target("llvm")
    assert str(target.attrs["mcpu"]) == "znver3" and isa.features(target).lanes_fp32 == 8
    cm = fxpress.compile(m, (x,), passes="none", target="llvm")
    assert rel_err(cm(x), ref) <= 1e-4


@pytest.mark.parametrize("rows,width", [(128, 384), (37, 128), (5, 67)])
def test_row_reductions_layer_norm_and_softmax(rows, width):
    """LayerNorm and softmax rows (vectorized partial sums where the width allows) against numpy."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, rows, width), dtype=np.float32) * 3
    g = rng.standard_normal((width,), dtype=np.float32)
    b = rng.standard_normal((width,), dtype=np.float32)

    def fn(bb, xv, gv, bv):
        ln = bb.emit(relax.op.nn.layer_norm(xv, gv, bv, [2], 1e-5))
        return relax.op.add(ln, relax.op.nn.softmax(xv, -1))

    y, _ = _run_relax(fn, [x, g, b])
    x64 = x.astype(np.float64)
    ln = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * g + b
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    ref = ln + e / e.sum(-1, keepdims=True)
    assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.parametrize("rows,k", [(128, 576), (37, 100), (5, 7), (300, 48)])
def test_gemv_vectorizes_the_reduction(rows, k):
    """A matmul with one output column (below the BLAS route's size) is scheduled as a GEMV: the
    reduction split by the lane count and rfactored into vector partial sums (odd K included)."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((rows, k), dtype=np.float32)
    x = rng.standard_normal((1, k, 1), dtype=np.float32)
    y, built = _run_relax(lambda bb, av, xv: relax.op.matmul(av, xv), [a, x])
    assert "_rf" in built.ir_after["tir.scheduled"]  # the rfactored partial-sum buffer
    ref = a.astype(np.float64) @ x[0].astype(np.float64)
    assert np.abs(y[0] - ref).max() / np.abs(ref).max() <= 1e-5


def test_conv_onto_a_tiny_map_goes_through_the_gemv():
    """A 3x3 stride-2 conv onto a 1x1 map (ResNet's last stage at a 32x32 input): routed through
    im2col + the GEMV schedule at any size (TVM's direct kernel ran it scalar), matches torch."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 64, 2, 2)
    cm = fxpress.compile(m, (x,), passes="none", target="llvm")
    with torch.no_grad():
        ref = m(x)
    assert rel_err(cm(x), ref) <= 1e-5
    built = cm._lowered.built
    if blas.available():
        assert "im2col" in built.ir_after["relax.decomposed"] and "_rf" in built.ir_after["tir.scheduled"]


def test_fast_tanh_sigmoid_and_small_powers_match_torch():
    """tanh, sigmoid (GRU/LSTM gates, GPT-2's GELU) go to vectorizable approximations and x**2, x**3
    to multiplies (LegalizeOps called libm's tanhf/expf/powf per element: GPT-2's GELU kernel took 60 µs
    for 4096 elements). Values match torch to fp32 rounding; NaN and ±Inf land where torch puts them."""
    class Gates(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(x) + torch.sigmoid(x) * 2 + 0.01 * torch.pow(x, 3.0) + 0.1 * x ** 2

    x = torch.linspace(-30, 30, 4096).reshape(16, 256)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    m = Gates().eval()
    cm = fxpress.compile(m, (x,), passes="none", target="llvm")
    got, want = cm(x), m(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)])
    assert rel_err(got[finite], want[finite]) <= 1e-5
    decomposed = cm._lowered.built.ir_after["relax.decomposed"]
    assert "R.power" not in decomposed and "R.tanh" not in decomposed and "R.sigmoid" not in decomposed


@pytest.mark.parametrize("shape", [(2, 12, 16, 128), (3, 37, 100), (5, 7), (4, 17)])
def test_row_softmax_matches_torch_with_nan_inf_and_masked_rows(shape):
    """Softmax over the last axis (rowwise.softmax_rows where the row has a vector width, TVM's
    otherwise: 17 has no divisor from 4 to the lane count): values to fp32 rounding; masked (-inf)
    entries exactly 0; a row with a NaN, a +inf or only -inf entries all NaN, as torch gives."""
    torch.manual_seed(0)
    x = torch.randn(*shape) * 4
    rows = x.reshape(-1, shape[-1])
    rows[0, 1] = float("nan")
    rows[1, 2] = float("inf")
    rows[2, :] = -float("inf")
    rows[3, : shape[-1] // 2] = -float("inf")  # a causal/padding mask
    m = torch.nn.Softmax(dim=-1).eval()
    cm = fxpress.compile(m, (x,), passes="none", target="llvm")
    got, want = cm(x), m(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want).any()
    finite = ~torch.isnan(want)
    assert torch.equal(got[finite] == 0, want[finite] == 0)
    assert (got[finite] - want[finite]).abs().max() <= 1e-6
    routed = "softmax_rows" in cm._lowered.built.ir_after["relax.decomposed"]
    assert routed == (shape[-1] != 17)


@pytest.mark.parametrize("shape", [(2, 64, 384), (3, 100), (5, 7), (4, 17)])
def test_row_layer_norm_matches_torch_with_nan_and_inf(shape):
    """LayerNorm over the last axis (rowwise.layer_norm_rows where the row has a vector width):
    values to fp32 rounding; a row holding a NaN or an Inf comes out as torch's (all NaN)."""
    torch.manual_seed(0)
    m = torch.nn.LayerNorm(shape[-1]).eval()
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(*shape) * 3 + 1
    rows = x.reshape(-1, shape[-1])
    rows[0, 1] = float("nan")
    rows[1, 2] = float("inf")
    cm = fxpress.compile(m, (x,), passes="none", target="llvm")
    with torch.no_grad():
        want = m(x)
    got = cm(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want).any()
    ok = ~torch.isnan(want)
    assert rel_err(got[ok], want[ok]) <= 1e-5
    routed = "layer_norm_rows" in cm._lowered.built.ir_after["relax.decomposed"]
    assert routed == (shape[-1] != 17)


@pytest.mark.parametrize("sections", [32, [16, 48, 32]])
def test_bias_split_goes_through_to_each_section(sections):
    """A fused projection's output split into sections (Q, K, V): the bias add is pushed into each
    section (split(x + b) → x[s] + b[s]), so each fuses with its head transpose; values match eager."""
    torch.manual_seed(0)

    class QKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 96)

        def forward(self, x):
            q, k, v = self.proj(x).split(sections, dim=-1)
            heads = [t.reshape(1, 8, -1, t.shape[-1] // 4 if t.shape[-1] % 4 == 0 else 1).transpose(1, 2)
                     for t in (q, k, v)]
            return heads[0].sum(-1) + heads[1].mean(-1), heads[2]

    m, x = QKV().eval(), torch.randn(1, 8, 32)
    cm = fxpress.compile(m, (x,), passes="none", target="llvm")
    with torch.no_grad():
        want = m(x)
    got = cm(x)
    assert all(rel_err(g, w) <= 1e-5 for g, w in zip(got, want))
    decomposed = cm._lowered.built.ir_after["relax.decomposed"]
    assert "R.split" not in decomposed and decomposed.count("R.strided_slice") >= 6


@pytest.mark.parametrize("make", [
    lambda: torch.nn.MaxPool2d(3, 2, 1),                       # ResNet's stem pool
    lambda: torch.nn.MaxPool2d(2, 2),                          # no padding
    lambda: torch.nn.MaxPool2d(3, 1, 1),                       # stride 1
    lambda: torch.nn.MaxPool2d((2, 3), (1, 2), (1, 0)),        # unequal window, stride and padding
    lambda: torch.nn.MaxPool2d(3, 2, 1, dilation=2),           # dilated: taps two apart, odd output width
    lambda: torch.nn.AvgPool2d(3, 1, 1),                       # count_include_pad: a mean over 9 taps
    lambda: torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False),
], ids=["max3s2p1", "max2s2", "max3s1p1", "max2x3s1x2p1x0", "max3s2p1d2", "avg3s1p1", "avg3s2p1-exclude-pad"])
def test_pooling_is_scheduled_and_keeps_torch_semantics(make):
    """Pooling (max: pooling.max_pool2d_func, separable; avg: cpu_schedules.schedule_window_reduction;
    both parallel with the output row vectorized) matches eager, NaN and -inf included: a NaN anywhere
    in a window is that window's result and a window of -inf values gives -inf, as in torch (TOPI's max
    pool kept a NaN only when it came last in its window and started from the lowest finite float)."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64, 64)  # 32k outputs: enough for the parallel loop
    x[0, 0, 5, 7] = float("nan")  # inside windows, at a padded border, and first of its window
    x[0, 1, 0, 0] = float("nan")
    x[0, 2, 8, 8] = float("nan")
    x[1, 3, 0, 0] = float("-inf")
    x[1, 4, 10:14, 20:24] = float("-inf")  # whole windows of -inf: -inf, as in torch
    model = torch.nn.Sequential(make()).eval()
    cm = fxpress.compile(model, (x,), passes="none", target="llvm")
    scheduled = cm._lowered.built.ir_after["tir.scheduled"]
    assert "T.parallel" in scheduled and "T.vectorized" in scheduled
    y, ref = cm(x), model(x)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    finite = torch.isfinite(ref)
    assert torch.equal(y[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)])
    torch.testing.assert_close(y[finite], ref[finite], rtol=1e-5, atol=1e-6)


class _Extrema(torch.nn.Module):
    def forward(self, x):
        # (aten.min.dim and aten.amax have no Relax converter: a clear LoweringError, not covered here)
        return torch.max(x), torch.min(x), x.max(dim=1).values, x.max(dim=-1, keepdim=True).values


def test_max_and_min_reductions_keep_torch_nan_and_inf_semantics():
    """relax_prep._te_nan_extremum: a NaN anywhere in the reduced values gives NaN (TOPI's reducer lost it
    when it was not last: a full torch.max(x) returned a number), a slice of -inf gives -inf. Compiled on
    clean inputs, then called with NaN and -inf (the lowering check saw none of them)."""
    model = _Extrema().eval()
    torch.manual_seed(0)
    cm = fxpress.compile(model, (torch.randn(4, 8, 16),), passes="none", target="llvm")
    x = torch.randn(4, 8, 16)
    x[0, 1, 3] = float("nan")
    x[1, 2, :] = float("-inf")
    x[2, :, 5] = float("-inf")
    x[3, 4, 7] = float("inf")
    for got, want in zip(cm(x), model(x)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        ok = ~torch.isnan(want)
        assert torch.equal(got[ok], want[ok])
