"""fxpress.codegen: Relax module → built library on llvm (run here) and cuda (compiled here, run on a GPU)."""
import os
import shutil
import struct

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax, te
from tvm.relax.frontend import detach_params
from tvm.relax.frontend.torch import from_exported_program
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from fxpress.codegen import build, device_for, gpu_available, resolve_target, target_kind
from fxpress.codegen.cuda import compile_source
from fxpress.codegen.schedule import is_contraction
from fxpress.errors import BuildError

from helpers import rel_err

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)
        self.bn.running_mean.uniform_(-1, 1)  # so batch norm is not the identity
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


class Attention(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        return self.out(a @ v)


class Case:
    """A Relax module, its numpy inputs (params included) and eager torch's answer."""

    def __init__(self, model, x, keep_params_as_input):
        model.eval()
        with torch.no_grad():
            self.reference = model(x).numpy()
        mod = from_exported_program(torch.export.export(model, (x,)),
                                    keep_params_as_input=keep_params_as_input,
                                    unwrap_unit_return_tuple=True)
        self.mod, params = detach_params(mod)
        self.inputs = [x.numpy()] + [p.numpy() for p in params.get("main", [])]

    def run(self, executable, target, built=None):
        """``built``: the BuiltModule, whose transform_params (weight work lifted out) the params go through."""
        dev = device_for(target)
        vm = relax.VirtualMachine(executable, dev)
        inputs = self.inputs if built is None else [self.inputs[0], *built.transform_params(self.inputs[1:])]
        return vm["main"](*[tvm.runtime.tensor(a, dev) for a in inputs]).numpy()


@pytest.fixture(scope="module")
def cases():
    torch.manual_seed(0)
    # Parameters as inputs is how fxpress.lowering hands modules over; constants are the other form.
    return {"conv": Case(ConvNet(), torch.randn(2, 3, 16, 16), keep_params_as_input=True),
            "attention": Case(Attention(), torch.randn(2, 8, 32), keep_params_as_input=False)}


@pytest.fixture(scope="module")
def llvm_builds(cases):
    return {name: build(case.mod, "llvm") for name, case in cases.items()}


def test_targets(monkeypatch):
    for var in ("FXPRESS_CUDA_ARCH", "FXPRESS_PORTABLE", "FXPRESS_LLVM_MCPU"):  # this machine's own target
        monkeypatch.delenv(var, raising=False)
    cpu = resolve_target("llvm")
    assert cpu.kind.name == "llvm"
    assert cpu.attrs["mcpu"] == tvm.target.codegen.llvm_get_system_cpu()
    assert int(cpu.attrs["num-cores"]) == os.cpu_count()
    assert resolve_target("cuda").attrs["arch"] == "sm_90"
    monkeypatch.setenv("FXPRESS_CUDA_ARCH", "sm_80")
    gpu = resolve_target("cuda")
    assert gpu.attrs["arch"] == "sm_80" and gpu.host.kind.name == "llvm"
    assert resolve_target(gpu) is gpu
    assert [target_kind(t) for t in ("llvm", gpu)] == ["llvm", "cuda"]
    assert device_for("cuda").dlpack_device_type() == tvm.cuda(0).dlpack_device_type()
    assert device_for(cpu).dlpack_device_type() == tvm.cpu(0).dlpack_device_type()
    with pytest.raises(ValueError, match="'llvm', 'cuda'"):
        resolve_target("rocm")
    assert isinstance(gpu_available(), bool)


def test_small_kernels_run_on_one_core(cases, monkeypatch):
    """Below the work threshold, the small_serial stage makes the scheduled parallel loops serial
    again (codegen/parallel_threshold.py); the numbers do not change."""
    monkeypatch.setenv("FXPRESS_PARALLEL_MIN_WORK", str(1 << 40))
    built = build(cases["conv"].mod, "llvm")
    assert "T.parallel(" in built.ir_after["tir.scheduled"]
    assert "T.parallel(" not in built.ir_after["tir.small_serial"]
    assert rel_err(cases["conv"].run(built.executable, "llvm", built), cases["conv"].reference) <= 1e-4


def test_parallel_work_counts_the_whole_nest():
    from tvm.script import tirx as T

    from fxpress.codegen.parallel_threshold import iterations, serialize_small_loops

    @T.prim_func
    def add(a: T.Buffer((64, 32), "float32"), b: T.Buffer((64, 32), "float32")):
        for i in T.parallel(64):
            for j in T.serial(32):
                b[i, j] = a[i, j] + T.float32(1)

    loop = add.body
    assert isinstance(loop, tvm.tirx.For) and iterations(loop) == 64 * 32
    assert serialize_small_loops(add, threshold=64 * 32 + 1).body.kind == tvm.tirx.ForKind.SERIAL
    assert serialize_small_loops(add, threshold=64 * 32).same_as(add)


def test_large_kernels_stay_parallel(monkeypatch):
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Big:
        @R.function
        def main(a: R.Tensor((256, 512), "float32"), b: R.Tensor((512, 256), "float32")):
            with R.dataflow():
                out = R.nn.relu(R.matmul(a, b))
                R.output(out)
            return out

    monkeypatch.setenv("FXPRESS_BLAS", "0")  # TVM's own matmul schedule, not the BLAS call
    built = build(Big, "llvm")
    assert "T.parallel(" in built.ir_after["tir.small_serial"]
    monkeypatch.delenv("FXPRESS_BLAS")
    from fxpress.codegen import blas

    if blas.available() and (os.cpu_count() or 1) > 1:
        # The BLAS route's kernel: one extern call per worker in a 2-iteration parallel loop. Its work
        # is in the call, so the loop must stay parallel.
        routed = build(Big, "llvm").ir_after["tir.small_serial"]
        assert blas.SYMBOL in routed and "T.parallel(" in routed


@pytest.mark.parametrize("name", ["conv", "attention"])
def test_llvm_matches_eager(cases, llvm_builds, name):
    built = llvm_builds[name]
    assert list(built.ir_after) == ["relax.decomposed", "relax.lifted", "relax.legalized", "relax.fused",
                                    "tir.kernels", "tir.scheduled", "tir.small_serial"]
    assert "R.nn.batch_norm" not in built.ir_after["relax.decomposed"]
    assert "call_tir" in built.ir_after["relax.fused"] and built.seconds > 0
    assert rel_err(cases[name].run(built.executable, "llvm", built), cases[name].reference) <= 1e-4


class GeluMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 16)
        self.bn = torch.nn.BatchNorm1d(64)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.bn(self.fc1(x))) + torch.erf(x).sum())


def test_weight_work_is_lifted_and_gelu_is_fast():
    """With num_input, the weight transposes run once (transform_params), and
    GELU/erf use the vectorizable fast_erf, still within fp32 tolerance of eager."""
    torch.manual_seed(0)
    model, x = GeluMLP().eval(), torch.randn(4, 32) * 3
    model.bn.running_var.uniform_(0.5, 2.0)
    case = Case(model, x, keep_params_as_input=True)
    mod = case.mod
    mod["main"] = mod["main"].with_attr("num_input", 1)
    built = build(mod, "llvm")
    assert built.param_transform is not None
    lifted = built.ir_after["relax.lifted"]
    assert "permute_dims" not in lifted  # the Linear weights' transposes now run in main_transform_params
    decomposed = built.ir_after["relax.decomposed"]
    assert "T_fast_erf" in decomposed and "R.erf(" not in decomposed and "R.nn.gelu(" not in decomposed
    params = built.transform_params(case.inputs[1:])
    vm = relax.VirtualMachine(built.executable, tvm.cpu(0))
    out = vm["main"](*[tvm.runtime.tensor(a) for a in [case.inputs[0], *params]]).numpy()
    assert rel_err(out, case.reference) <= 1e-5
    assert sum(p.nbytes for p in params) <= sum(p.nbytes for p in case.inputs[1:])
    # the build's own copy: weights returned as they are (biases) are copied, never views of the inputs
    assert not any(np.shares_memory(p, a) for p in params for a in case.inputs[1:])


def test_recurrent_net_weight_transposes_are_lifted_once():
    """A 2-layer GRU unrolled over 10 steps transposes each recurrent weight at every step; after
    common-subexpression elimination each transpose is computed once, at compile time (the lift
    tolerates the few hundred bytes of constants folded with the biases), and outputs match eager."""
    import fxpress
    from fxpress.models import corpus

    spec = corpus.get_corpus("gru_head")  # (fxpress.models.corpus: seeded, built in code)
    m, (x,) = spec.build().eval(), spec.example_inputs(1)
    cm = fxpress.compile(m, (x,), passes="none", target="llvm")
    with torch.no_grad():
        assert rel_err(cm(x), m(x)) <= 1e-5
    built = cm._lowered.built
    assert built.param_transform is not None
    main = built.ir_after["relax.lifted"].split("def main", 1)[1]
    assert "permute_dims(p_" not in main  # (the activations' batch-first permutes stay)


def test_lifting_is_skipped_when_weights_would_grow():
    """int8 weight codes decoded to fp32 once would make the artifact 4x larger: not lifted."""
    from tvm.script import relax as R

    @tvm.script.ir_module
    class WeightOnly:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), w: R.Tensor((8, 8), "int8")) -> R.Tensor((2, 8), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                wf = R.astype(w, "float32")
                y = R.matmul(x, wf)
                R.output(y)
            return y

    built = build(WeightOnly, "llvm")
    assert built.param_transform is None
    x, w = np.ones((2, 8), "float32"), np.arange(64, dtype="int8").reshape(8, 8)
    vm = relax.VirtualMachine(built.executable, tvm.cpu(0))
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy(),
                               x @ w.astype("float32"))


def test_llvm_without_dlight_and_with_pass_timings(cases):
    built = build(cases["conv"].mod, "llvm", dlight=False, instrument=True)
    assert "tir.scheduled" not in built.ir_after
    assert "FuseOps" in built.pass_timings and "LegalizeOps" in built.pass_timings
    assert rel_err(cases["conv"].run(built.executable, "llvm", built), cases["conv"].reference) <= 1e-4


def test_export_load_llvm(cases, llvm_builds, tmp_path):
    path = tmp_path / "conv.so"
    llvm_builds["conv"].export_library(path)
    loaded = tvm.runtime.load_module(str(path))
    case = cases["conv"]
    np.testing.assert_array_equal(case.run(loaded, "llvm", llvm_builds["conv"]),
                                  case.run(llvm_builds["conv"].executable, "llvm", llvm_builds["conv"]))


def test_dlight_cpu_skips_contractions():
    a = te.placeholder((8, 16), name="a")
    b = te.placeholder((16, 4), name="b")
    k = te.reduce_axis((0, 16), name="k")
    matmul = te.compute((8, 4), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k))
    row_sum = te.compute((8,), lambda i: te.sum(a[i, k] * a[i, k], axis=k))  # one buffer: a norm
    assert is_contraction(te.create_prim_func([a, b, matmul]))
    assert not is_contraction(te.create_prim_func([a, row_sum]))


@I.ir_module
class HandWritten:
    @T.prim_func(s_tir=True)
    def add_one(x: T.Buffer((4, 8), "float32"), y: T.Buffer((4, 8), "float32")):
        for i, j in T.grid(4, 8):
            with T.sblock("add"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = x[vi, vj] + T.float32(1)

    @R.function
    def main(x: R.Tensor((4, 8), "float32")):
        cls = HandWritten
        with R.dataflow():
            y = R.call_tir(cls.add_one, (x,), out_ty=R.Tensor((4, 8), "float32"))
            z = R.nn.relu(y)
            R.output(z)
        return z


def test_handwritten_kernel_then_elementwise():
    # What build() works around: TVM's own "zero" pipeline tries to fuse the kernel with relu.
    with pytest.raises(Exception, match="Inconsistent buffers"):
        relax.get_pipeline("zero")(HandWritten)
    built = build(HandWritten, "llvm")
    assert "fxpress.kernel" in built.ir_after["relax.fused"]
    x = np.random.default_rng(0).standard_normal((4, 8)).astype("float32")
    y = relax.VirtualMachine(built.executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(y, np.maximum(x + 1, 0), rtol=1e-6)


def _cuda_elf_archs(library: bytes) -> list[int]:
    """sm versions of the CUDA ELF images inside the fatbins embedded in a library."""
    archs, at = [], library.find(b"\x50\xed\x55\xba")  # fatbin magic 0xBA55ED50
    while at >= 0:
        elf = library.find(b"\x7fELF", at)
        if elf >= 0 and struct.unpack_from("<H", library, elf + 18)[0] == 190:  # EM_CUDA
            archs.append((struct.unpack_from("<I", library, elf + 48)[0] >> 8) & 0xFF)
        at = library.find(b"\x50\xed\x55\xba", at + 4)
    return archs


@needs_nvcc
@pytest.mark.parametrize("module", ["conv", "attention", "handwritten"])
def test_cuda_build_embeds_device_binary(cases, module, tmp_path):
    mod = HandWritten if module == "handwritten" else cases[module].mod
    built = build(mod, "cuda")
    assert "__global__" in built.ir_after["cuda.source"]
    path = tmp_path / "lib.so"
    built.export_library(path)
    library = path.read_bytes()
    assert _cuda_elf_archs(library) == [int(built.target.attrs["arch"].removeprefix("sm_"))]
    assert b"__global__" not in library  # binary only: no nvcc needed where it is loaded


@needs_nvcc
def test_cuda_compile_error_names_the_kernel():
    source = ('extern "C" __global__ void __launch_bounds__(32) good_kernel(float* x) {\n  x[0] = 1;\n}\n'
              'extern "C" __global__ void __launch_bounds__(32) bad_kernel(float* x) {\n  x[0] = y;\n}\n')
    with pytest.raises(BuildError, match=r"(?s)bad_kernel\..*kernels\.cu.*identifier \"y\" is undefined"):
        compile_source(source, resolve_target("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU")
def test_cuda_runs_on_gpu(cases, tmp_path):
    case = cases["conv"]
    built = build(case.mod, "cuda")
    assert rel_err(case.run(built.executable, "cuda", built), case.reference) <= 1e-4
    built.export_library(tmp_path / "conv.so")
    loaded = tvm.runtime.load_module(str(tmp_path / "conv.so"))
    assert rel_err(case.run(loaded, "cuda", built), case.reference) <= 1e-4
