"""Relax IRModule → built, runnable library.

The pipeline, with the text of the module after each stage kept in ``BuiltModule.ir_after``:

  relax.decomposed  DispatchSampling/DispatchSortScan (target-specific sort, scan, sampling),
                    DecomposeOpsForInference (batch_norm, layer_norm... → arithmetic),
                    FastMath (vectorizable GELU/erf/exp/tanh/sigmoid, row softmax; relax_prep.py),
                    WinogradConv (llvm: 3x3 stride-1 convs → Winograd F(4x4,3x3); winograd_route.py),
                    RouteConvToGemm (llvm: strided / narrow convs → im2col + matmul; conv_route.py),
                    PrepackQuantizedWeights (int8 GEMMs and convs on their fast kernels; quantize_prepack.py),
                    RouteGemmToBlas (llvm: fp32 matmuls → the BLAS GEMM shim; gemm_route.py)
  relax.lifted      weight-only work moved to main_transform_params, run once at compile time
                    (BuiltModule.transform_params; only when main has num_input; relax_prep.py)
  relax.legalized   LegalizeOps: every remaining Relax op becomes a TIR PrimFunc behind call_tir
  relax.fused       AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR (what the "zero"
                    pipeline does, run pass by pass so each stage can be kept)
  tir.scheduled     dlight default schedules (schedule.py: GPU rules on cuda, the CPU
                    reduction rule on llvm)
  cuda.source       cuda only: the generated CUDA C, compiled to a fatbin (cuda.py)

then ``tvm.compile`` with the "default_build" Relax pipeline, which only lowers to VM code. (For
a GPU target ``tvm.compile``'s "default" would run LegalizeOps..FuseTIR and dlight a second time.)

Hand-written kernels. Every PrimFunc already in the input module was written by hand (the
torch frontend emits none; fxpress converters add them through ``R.call_tir`` or ``emit_te``).
build() marks each one ``fxpress.kernel = 1`` and ``op_pattern = kOpaque`` before
AnnotateTIROpPattern, so FuseOps never fuses a kernel with its neighbours. Without that,
FuseTIR fails on a TVMScript kernel followed by an elementwise op ("Inconsistent buffers y and
y mapped to the same relax var"): TVMScript writes the kernel's buffer shapes with int32 dims,
LegalizeOps writes int64 dims, and FuseTIR cannot merge the two buffer types. Opaque kernels also keep any hand schedule.
dlight still schedules kernels (a CUDA kernel needs thread bindings) unless the kernel sets
``tirx.is_scheduled``, which is dlight's own "leave this alone" mark.
"""
from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import tempfile
import time
from dataclasses import dataclass, field

import tvm
from tvm import relax, tirx

from .. import families
from ..errors import BuildError
from . import blas, cuda
from .conv_route import RouteConvToGemm
from .gemm_route import RouteGemmToBlas
from .kernel_families import KERNEL_ATTR, OP_PATTERN_OPAQUE
from .quantize_prepack import PrepackQuantizedWeights
from .relax_prep import TRANSFORM_FUNC, FastMath, lift_param_transforms
from .winograd_route import WinogradConv
from .parallel_threshold import serialize_small_kernels
from .schedule import schedule_cpu, schedule_gpu
from .targets import resolve_target, target_kind



@dataclass
class BuiltModule:
    """What build() returns: the executable plus what the build saw and how long it took."""

    executable: relax.VMExecutable  # run with relax.VirtualMachine(executable, device_for(target))
    target: tvm.target.Target
    ir_after: dict[str, str]
    seconds: float
    pass_timings: str | None = None  # PassTimingInstrument report, when build(instrument=True)
    # cuda without a driver: serialized source module → the same module holding a fatbin
    _device_payloads: dict[bytes, bytes] = field(default_factory=dict, repr=False)
    # main_transform_params (relax_prep.lift_param_transforms), built for the CPU; None: params as they are
    param_transform: relax.VMExecutable | None = None
    # object files the exported library must link (the GEMM shim, codegen/blas.py), when kernels call it
    extern_objects: list[str] = field(default_factory=list)

    def transform_params(self, params: list) -> list:
        """The parameters ``main`` of this build takes, from the model's original ones (numpy in, numpy out).

        The result is the build's own copy of the weights: it never shares memory with ``params``, which
        may be views of the caller's torch tensors (to_relax hands them over without a copy). A weight the
        transform changes is its new output; one it returns as it is (or as a view) is copied once, here.
        Nothing else is copied, so a compile holds the model's weights plus one runtime copy (issue #19).
        """
        import numpy as np

        from fxpress.runtime.backends import cpu_tensor_view, tvm_tensor_as_numpy

        dev = tvm.cpu(0)
        arrays = [np.ascontiguousarray(p) for p in params]
        if self.param_transform is None:
            return [_own_copy(a, dev) for a in arrays]
        # "naive": outputs freed later go back to the system; the VM's default pool would keep them
        vm = relax.VirtualMachine(self.param_transform, dev, memory_cfg="naive")
        out = vm[TRANSFORM_FUNC]([cpu_tensor_view(a) or tvm.runtime.tensor(a, dev) for a in arrays])
        shared = _Ranges(arrays)
        result = []
        for t in out:
            a = tvm_tensor_as_numpy(t)
            result.append(_own_copy(a, dev) if shared.overlaps(a) else a)
        return result

    def export_library(self, path: str | os.PathLike) -> None:
        """Write a shared library that ``tvm.runtime.load_module`` loads (host compiler: g++)."""
        options = {"fpack_imports": cuda.packer(self._device_payloads)} if self._device_payloads else {}
        if self.extern_objects:
            options["addons"] = list(self.extern_objects)
        self.executable.export_library(os.fspath(path), **options)


def build(mod: tvm.IRModule, target: str | tvm.target.Target, *, instrument: bool = False,
          dlight: bool = True) -> BuiltModule:
    """Compile a Relax module for ``"llvm"`` (this CPU) or ``"cuda"``.

    ``instrument=True`` records per-pass wall time in ``BuiltModule.pass_timings``.
    ``dlight=False`` (llvm only) skips the dlight CPU schedules, for comparisons.
    """
    start = time.perf_counter()
    target = resolve_target(target)
    on_gpu = target_kind(target) == "cuda"
    if on_gpu and not dlight:
        raise ValueError("dlight=False is llvm-only: CUDA kernels need the thread bindings "
                         "the dlight GPU rules add")
    if on_gpu:
        cuda.install_compiler()
    timing = tvm.ir.instrument.PassTimingInstrument() if instrument else None
    ir_after: dict[str, str] = {}

    def stage(name: str, passes: list, mod: tvm.IRModule) -> tvm.IRModule:
        with _blame(name, mod, target):
            for p in passes:
                mod = p(mod)
        ir_after[name] = mod.script()
        return mod

    context = tvm.transform.PassContext(instruments=[timing]) if timing else contextlib.nullcontext()
    lifted: dict = {}
    with context, target:
        mod = _mark_kernels(mod)
        for name, passes in front_stages(lifted):
            mod = stage(name, passes, mod)
        # fxpress's own kernels get their hand schedules first; dlight then skips them.
        mod = stage("tir.kernels", [lambda m: apply_kernel_schedules(m, target)], mod)
        if on_gpu:
            mod = stage("tir.scheduled", [lambda m: schedule_gpu(m, target)], mod)
        elif dlight:
            mod = stage("tir.scheduled", [lambda m: schedule_cpu(m, target)], mod)
        if not on_gpu:
            mod = stage("tir.small_serial", [serialize_small_kernels], mod)
        with _blame("tvm.compile", mod, target):
            executable = tvm.compile(mod, target=target,
                                     relax_pipeline=relax.get_pipeline("default_build"))
            payloads = cuda.compile_placeholders(executable, target) if on_gpu else {}
        timings = timing.render() if timing else None
        param_transform = None
        if lifted.get("transform") is not None:
            with _blame("relax.transform_params", lifted["transform"], target):
                # weight-only work runs once, at compile time, on this machine's CPU
                param_transform = tvm.compile(lifted["transform"], target=resolve_target("llvm"))
    calls_shim = any(sym in text for text in ir_after.values() for sym in (blas.SYMBOL, blas.INT8_SYMBOL))
    extern = [blas.object_file()] if calls_shim else []
    if on_gpu:
        ir_after["cuda.source"] = "\n".join(m.inspect_source("cuda")
                                             for m in cuda.device_modules(executable))
    return BuiltModule(executable=executable, target=target, ir_after=ir_after,
                       seconds=time.perf_counter() - start, pass_timings=timings,
                       _device_payloads=payloads, param_transform=param_transform,
                       extern_objects=extern)


class _Ranges:
    """The memory address ranges of some arrays: does another array overlap any of them?"""

    def __init__(self, arrays: list):
        spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays if a.nbytes)
        self._starts = [lo for lo, _ in spans]
        self._ends = list(itertools.accumulate((hi for _, hi in spans), max))  # ends, running max

    def overlaps(self, a) -> bool:
        if not a.nbytes:
            return False
        lo, hi = a.ctypes.data, a.ctypes.data + a.nbytes
        i = bisect.bisect_left(self._starts, hi) - 1  # the last range starting below hi
        return i >= 0 and self._ends[i] > lo


def _own_copy(a, dev):
    """A copy of numpy array ``a`` in a new TVM tensor (64-byte aligned, as kernels assume), seen as numpy."""
    from fxpress.runtime.backends import tvm_tensor_as_numpy

    return tvm_tensor_as_numpy(tvm.runtime.tensor(a, dev))


def front_stages(lifted: dict) -> list[tuple[str, list]]:
    """The Relax stages before scheduling, in order; shared with tune.py's task extraction so a
    tuned kernel is looked up under the same key build() produces. The lifting stage leaves the
    weight-transform module in ``lifted["transform"]`` (None when nothing was lifted)."""
    def lift(m):
        m, lifted["transform"] = lift_param_transforms(m)
        return m

    return [("relax.decomposed", [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan(),
                                  relax.transform.DecomposeOpsForInference(), FastMath(),
                                  relax.transform.EliminateCommonSubexpr(),
                                  WinogradConv(), RouteConvToGemm(), RouteGemmToBlas(), PrepackQuantizedWeights()]),
            ("relax.lifted", [lift]),
            ("relax.legalized", [relax.transform.LegalizeOps()]),
            ("relax.fused", [relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
                             relax.transform.FuseOps(), relax.transform.FuseTIR()])]


def apply_kernel_schedules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Run the ``apply_default_schedules(mod, target)`` of every family with hand-written TIR kernels
    (``codegen/<family>_kernels.py``, listed in fxpress/families.py)."""
    for kernels in families.import_modules("kernels"):
        mod = kernels.apply_default_schedules(mod, target)
    return mod


@contextlib.contextmanager
def _blame(stage: str, mod: tvm.IRModule, target: tvm.target.Target):
    """Re-raise a TVM failure as BuildError naming the stage, with its input IR saved to a file."""
    try:
        yield
    except BuildError:
        raise
    except Exception as err:  # noqa: BLE001 - TVM raises many types; all mean "build failed"
        path = os.path.join(tempfile.mkdtemp(prefix="fxpress-build-"), f"{stage}.py")
        with open(path, "w") as f:
            f.write(mod.script())
        raise BuildError(f"{stage} failed for target {target.kind.name}: {err}\n"
                         f"The module entering {stage} is saved at {path}") from err


def _mark_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    marked = mod.clone()
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            marked.update_func(gv, func.with_attrs({KERNEL_ATTR: 1, "op_pattern": OP_PATTERN_OPAQUE}))
    return marked
