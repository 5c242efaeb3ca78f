"""Executors for an exported graph: the TVM Relax VM and ONNX Runtime. Torch-free.

Each takes numpy arrays in the manifest's input order and returns a list of numpy arrays. On CPU the TVM
executor avoids copies where safe (see TVMExecutor): outputs may be views of TVM tensors, owned by the caller.
"""
from __future__ import annotations

import bisect
import ctypes
import os
import re
from typing import Any

import numpy as np

from fxpress.errors import ArtifactError, InputError, TargetUnavailableError

# ONNX Runtime's own gather bounds checks (Gather, GatherElements, GatherND)
_ORT_INDEX_ERRORS = ("out of data bounds", "invalid index found", "Out of range value in index")
_INDEX_CHECK = "fxpress index check:"  # prefix of the message of a compiled index check (lowering/index_checks.py)

from . import blas


# Bytes. TVM allocates every tensor at this alignment (kAllocAlignment), and the kernels it generates assume
# their buffer arguments are 64-byte aligned (llvm.assume "align" 64, vector loads marked align 64), but
# nothing checks it at the call: tvm.runtime.from_dlpack refuses a misaligned array, while
# tvm_ffi.from_dlpack(require_alignment=0) and the compiled function's argument checks (shape, dtype,
# strides) accept it. The kernel may then crash: a ReLU on a float32 input 16 bytes off a 64-byte boundary
# (where malloc puts large numpy arrays) dies with SIGSEGV on an AVX2 machine. So an input passed without a
# copy must be aligned; one that is not is copied.
_ALIGN = 64
_KDL_CPU = 1  # DLDeviceType kDLCPU


class TVMExecutor:
    """Runs a Relax VM library exported by fxpress; parameters come from an .npz beside it.

    On a CPU device ``run`` passes inputs and returns outputs without copying where that is safe:

    - an input that is C-contiguous, 64-byte aligned and of a dtype DLPack carries goes to TVM as a view
      (DLPack); others (non-contiguous, misaligned views, big-endian...) are copied into an aligned buffer.
      Read-only arrays go as views too: TVM never writes a Relax function's arguments (fxpress builds pure
      functions: every call_tir writes only buffers the VM allocates, and the build runs no in-place pass).
    - an output comes back as a numpy view of the tensor the VM allocated for this call; the view keeps that
      tensor alive, so a later call cannot reuse its memory. An output the VM did not allocate for this call
      alone is copied: a parameter or a folded constant returned as is (the VM returns the same tensor on
      every call), a reshape view of a parameter, an input passed through, a second reference to an earlier
      output.

    ``run(inputs, copy=True)`` (and any CUDA device) takes the copying path: each input copied into a new
    TVM tensor, each output copied out with ``.numpy()``.
    """

    def __init__(self, library: str, params: str | None, device: str = "cpu"):
        import tvm
        from tvm import relax

        self._tvm = tvm
        self.device = _tvm_device(tvm, device)
        blas.preload()  # the GEMM shim in the library binds a CBLAS sgemm by name (runtime/blas.py)
        lib = tvm.runtime.load_module(library)
        self.vm = relax.VirtualMachine(lib, self.device)
        self.params = []
        sizes = []
        if params:
            with np.load(params, allow_pickle=False) as data:
                # Keys are p0, p1, ... in the function's parameter order.
                for i in range(len(data.files)):
                    p = data[f"p{i}"]
                    self.params.append(tvm.runtime.tensor(p, self.device))
                    sizes.append(p.nbytes)
        self._setup(sizes)

    @classmethod
    def from_built(cls, executable, params: list[np.ndarray], device: str = "cpu") -> "TVMExecutor":
        """Wrap a freshly built executable (in-process, before export)."""
        import tvm
        from tvm import relax

        self = cls.__new__(cls)
        self._tvm = tvm
        self.device = _tvm_device(tvm, device)
        self.vm = relax.VirtualMachine(executable, self.device)
        arrays = [np.asarray(p, order="C") for p in params]
        on_cpu = self.device.dlpack_device_type() == _KDL_CPU
        self.params = [(on_cpu and cpu_tensor_view(p)) or tvm.runtime.tensor(p, self.device) for p in arrays]
        self._setup([p.nbytes for p in arrays])
        return self

    def _setup(self, param_nbytes: list[int]) -> None:
        import tvm_ffi

        self._from_dlpack = tvm_ffi.from_dlpack
        self._main = self.vm["main"]
        self._zero_copy = self.device.dlpack_device_type() == _KDL_CPU
        # The parameters' address ranges, sorted: an output inside one is a view of a parameter.
        ranges = sorted((p.data_ptr(), p.data_ptr() + n) for p, n in zip(self.params, param_nbytes) if n)
        self._param_starts = [lo for lo, _ in ranges]
        self._param_ends = [hi for _, hi in ranges]

    def run(self, inputs: list[np.ndarray], *, copy: bool = False) -> list[np.ndarray]:
        if copy or not self._zero_copy:
            return self._run_copying(inputs)
        shared: list[tuple[int, int]] = []  # address ranges of the caller's arrays handed over without a copy
        args = [self._input(x, shared) for x in inputs]
        out = self._call(args)
        flat: list[np.ndarray] = []
        if hasattr(out, "numpy"):
            flat.append(self._output(out, 1, shared))
        else:
            self._outputs(out, shared, flat)
        return flat

    def _run_copying(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """The copying path: every input into a new TVM tensor, every output out with ``.numpy()``."""
        tvm = self._tvm
        args = [tvm.runtime.tensor(np.asarray(x, order="C"), self.device) for x in inputs]  # keeps 0-d arrays 0-d
        out = self._call(args)
        return _flatten_tvm(out)

    def _call(self, args):
        try:
            return self._main(*args, *self.params)
        except Exception as e:  # noqa: BLE001 - only the compiled index checks' failure is the caller's input
            text = str(e)
            if _INDEX_CHECK in text:
                raise InputError(text[text.index(_INDEX_CHECK) + len(_INDEX_CHECK):].strip().splitlines()[0]) from None
            raise

    def _input(self, x, shared: list[tuple[int, int]]):
        a = np.asarray(x)  # keeps 0-d arrays 0-d; no copy for an ndarray
        if a.flags.c_contiguous:
            try:
                # numpy's unversioned DLPack export refuses read-only arrays; the versioned one marks them
                # read-only (a flag tvm_ffi does not act on: see the class docstring for why that is safe).
                t = self._from_dlpack(a if a.flags.writeable else a.__dlpack__(max_version=(1, 0)))
            except (BufferError, TypeError, ValueError, RuntimeError):
                t = None  # a dtype DLPack cannot carry (or numpy cannot export): copy below
            if t is not None:
                ptr = t.data_ptr()
                if ptr % _ALIGN == 0:
                    shared.append((ptr, ptr + a.nbytes))
                    return t
        return self._copy_in(a)

    def _copy_in(self, a: np.ndarray):
        """An aligned, contiguous, native-byte-order private copy of ``a`` as a TVM tensor."""
        dtype = a.dtype if a.dtype.isnative else a.dtype.newbyteorder("=")
        buf = np.empty(a.nbytes + _ALIGN, dtype=np.uint8)
        start = -self._from_dlpack(buf).data_ptr() % _ALIGN  # (faster than buf.ctypes.data)
        c = buf[start:start + a.nbytes].view(dtype).reshape(a.shape)
        c[...] = a
        try:
            return self._from_dlpack(c)
        except (BufferError, TypeError, ValueError, RuntimeError):
            return self._tvm.runtime.tensor(np.asarray(a, order="C"), self.device)

    def _outputs(self, out, shared: list[tuple[int, int]], flat: list[np.ndarray]) -> None:
        for item in out:
            if hasattr(item, "numpy"):
                # Held by the container and by `item`: 2 strong references when nothing else holds it.
                flat.append(self._output(item, 2, shared))
            else:
                self._outputs(item, shared, flat)

    def _output(self, t, owners: int, shared: list[tuple[int, int]]) -> np.ndarray:
        """A numpy view of output tensor ``t`` when the VM allocated it for this call alone, else a copy.

        ``owners`` is the number of strong references ``t`` has if only the returned value and the Python
        wrapper ``t`` hold it. More means someone else holds the same tensor too: the VM's constant pool (a
        folded constant), ``self.params`` (a parameter returned as is), the argument list (an input passed
        through), or the container twice (the same output returned twice)."""
        exclusive = _strong_refs(t) <= owners
        try:
            a = np.from_dlpack(t)
        except (BufferError, TypeError, ValueError, RuntimeError):
            return t.numpy()  # a dtype numpy's DLPack import lacks (bfloat16, float8, int4, vector lanes)
        n = a.nbytes
        if not n:
            return a
        lo = t.data_ptr()
        hi = lo + n
        if not exclusive:
            return a.copy()
        # A view (reshape) of a parameter or of a caller's input is a tensor object of its own: check the
        # memory, too, against the parameters, the inputs passed without a copy and the earlier outputs.
        i = bisect.bisect_right(self._param_starts, hi - 1) - 1
        if i >= 0 and self._param_ends[i] > lo:
            return a.copy()
        for s, e in shared:
            if s < hi and lo < e:
                return a.copy()
        shared.append((lo, hi))
        return a


def _strong_refs(t) -> int:
    """How many strong references the FFI object ``t`` has: the low 32 bits of the first field of every
    tvm_ffi object, ``TVMFFIObject.combined_ref_count`` (its layout is part of tvm_ffi's C ABI:
    tvm_ffi/include/tvm/ffi/c_api.h). An unknown handle counts as shared (so the output is copied)."""
    handle = t.__chandle__() if hasattr(t, "__chandle__") else 0
    if not handle:
        return 1 << 32
    return ctypes.c_uint64.from_address(handle).value & 0xFFFFFFFF


def _tvm_device(tvm, device: str):
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    if device == "cuda" and not dev.exist:
        raise TargetUnavailableError(
            "this artifact was compiled for CUDA but this machine has no CUDA GPU; run it on a GPU machine, "
            "load it with backend='onnx', or recompile with target='llvm'")
    return dev


def _flatten_tvm(out) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    flat: list[np.ndarray] = []
    for item in out:
        flat.extend(_flatten_tvm(item))
    return flat


class ORTExecutor:
    """Runs an ONNX model with ONNX Runtime (CUDA provider when asked and present, else CPU)."""

    def __init__(self, model: str | bytes, device: str = "cpu", threads: int | None = None):
        """``model`` is a file path or the serialized model bytes."""
        import onnxruntime as ort

        if isinstance(model, str) and not os.path.isfile(model):
            raise ArtifactError(f"ONNX model {model} is missing")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise TargetUnavailableError("ONNX Runtime has no CUDA provider on this machine; use device='cpu'")
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feed: dict[str, Any] = {n: np.asarray(x, order="C") for n, x in zip(self.input_names, inputs)}
        try:
            return list(self.session.run(None, feed))
        except Exception as e:  # noqa: BLE001 - only an out-of-range index is the caller's input; the rest re-raises
            text = str(e)
            if any(p in text for p in _ORT_INDEX_ERRORS):
                node = re.search(r"Name:'([^']+)'", text)
                status = text.split("Status Message:")[-1].strip().splitlines()[0]
                raise InputError(
                    f"an index given to {node.group(1) if node else 'a gather'} is out of range ({status.split(': ')[-1]}). "
                    "Check the ids fed to the model (eager PyTorch raises IndexError here too)") from None
            raise


def cpu_tensor_view(a: np.ndarray):
    """A TVM CPU tensor over ``a``'s memory (no copy), or None when TVM cannot take it as is (not
    contiguous, not 64-byte aligned, or a dtype DLPack cannot carry). The compiler hands weights from
    stage to stage this way, so a compile holds one copy of them, not one per stage. Read-only arrays
    are passed through the versioned DLPack export (the kernels never write parameters)."""
    import tvm_ffi

    a = np.asarray(a)
    if not a.flags.c_contiguous or not a.dtype.isnative or a.ctypes.data % _ALIGN:
        return None
    try:
        return tvm_ffi.from_dlpack(a if a.flags.writeable else a.__dlpack__(max_version=(1, 0)))
    except (BufferError, TypeError, ValueError, RuntimeError):
        return None


def tvm_tensor_as_numpy(t) -> np.ndarray:
    """A numpy view of CPU tensor ``t`` (keeps ``t`` alive), or a copy for dtypes numpy's DLPack lacks."""
    try:
        return np.from_dlpack(t)
    except (BufferError, TypeError, ValueError, RuntimeError):
        return t.numpy()
