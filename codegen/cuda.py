"""CUDA device code: compile it with nvcc and ship it as a fatbin inside the exported library.

How TVM 0.27 turns CUDA C into device code (read from the wheel; docs/tvm-0.27-codegen.md):

* ``target.build.cuda`` emits CUDA C and passes it to the factory ``ffi.Module.create.cuda`` in
  ``libtvm_runtime_cuda.so``, which compiles it through the Python global
  ``tvm_callback_cuda_compile``. That global exists only once ``tvm.support.nvcc`` is imported,
  and it uses NVRTC (needs the ``cuda-bindings`` package) unless ``TVM_CUDA_COMPILE_MODE=nvcc``.
* ``libtvm_runtime_cuda.so`` links the driver (``libcuda.so.1``). Where there is no driver (CI),
  it does not load, the factory is missing, and codegen returns a placeholder module that holds
  the CUDA *source*; exported as is, the library would need nvcc on the GPU machine at load time.

So: with a driver we install our own ``tvm_callback_cuda_compile`` (nvcc → fatbin, readable
errors); without one we compile the placeholder's source ourselves and, at export, replace its
serialized payload (``[fmt][function table][code]``, byte-identical to the real CUDA module's)
by the fatbin, so the library loads on a GPU machine without a CUDA compiler.
"""
from __future__ import annotations

import contextlib
import os
import re
import struct
import tempfile

import tvm
import tvm_ffi
from tvm.runtime import _ffi_api as runtime_api

from ..errors import BuildError

_installed = False


def install_compiler() -> None:
    """Route every CUDA compile in this process through nvcc (idempotent)."""
    global _installed
    if _installed:
        return
    # For TVM's other compile paths (external kernels in TIR): NVRTC needs the cuda-bindings
    # package, which is not installed; nvcc is on CI and on the GPU machines.
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    import tvm.support.nvcc  # noqa: F401 - registers TVM's callback; ours replaces it below

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _callback, override=True)
    _installed = True


def _callback(code: str) -> bytes:
    return compile_source(code, tvm.target.Target.current(allow_none=True))


def compile_source(code: str, target: tvm.target.Target | None) -> bytes:
    """CUDA C → fatbin for the target's arch; BuildError naming the failing kernels."""
    from tvm.support import nvcc

    # No target when TVM's loader compiles a source module at load time: nvcc then targets the GPU.
    try:
        with target if target is not None else contextlib.nullcontext():
            return bytes(nvcc.compile_cuda(code, target_format="fatbin", compiler="nvcc"))
    except RuntimeError as err:
        raise BuildError(_explain(code, str(err), target)) from None


_KERNEL_DEF = re.compile(r'__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(.*\{\s*$')


def _explain(code: str, message: str, target: tvm.target.Target | None) -> str:
    output = message.split("\nCompilation error:\n", 1)[-1].strip()
    errors = [block for block in output.split("\n\n") if "error" in block]  # drop the warnings
    output = "\n\n".join(errors) or output
    starts = [(i + 1, m.group(1)) for i, line in enumerate(code.splitlines())
              if (m := _KERNEL_DEF.search(line))]
    kernels = set(re.findall(r"Entry function '(\w+)'", output))  # ptxas resource errors
    for line in map(int, re.findall(r"\.cu\((\d+)\): error", output)):
        kernels.update([name for start, name in starts if start <= line][-1:])  # enclosing kernel
    path = os.path.join(tempfile.mkdtemp(prefix="fxpress-cuda-"), "kernels.cu")
    with open(path, "w") as f:
        f.write(code)
    arch = target.attrs.get("arch", "?") if target is not None else "<your GPU's sm_XX>"
    names = ", ".join(sorted(kernels)) or "unknown (see the nvcc output)"
    return (f"nvcc could not compile the generated CUDA code; failing kernel(s): {names}.\n"
            "Kernels are named <PrimFunc>_kernel after the TIR function they came from.\n"
            f"Source saved at {path}; reproduce with: nvcc --fatbin -O3 -arch={arch} {path}\n"
            "(TVM_KERNEL_DUMP=<dir> keeps TVM's own intermediate files and adds -lineinfo.)\n"
            f"nvcc output:\n{output}")


# --- the serialized import tree ---------------------------------------------------------
# runtime.ModulePackImportsToTensor → u64 total size, two u64 arrays (the import tree), then
# per module: kind string and, except for the host library ("_lib"), its SaveToBytes payload.
# Strings and payloads are u64 length + bytes.

def _read(buf: bytes, off: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("<Q", buf, off)
    return buf[off + 8: off + 8 + n], off + 8 + n


def _bytes(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _unpack(blob: bytes) -> tuple[bytes, list[tuple[bytes, bytes | None]]]:
    off = 8
    for _ in range(2):
        (n,) = struct.unpack_from("<Q", blob, off)
        off += 8 + 8 * n
    tree, entries = blob[8:off], []
    while off < len(blob):
        kind, off = _read(blob, off)
        payload = None
        if kind != b"_lib":
            payload, off = _read(blob, off)
        entries.append((kind, payload))
    return tree, entries


def _pack(tree: bytes, entries: list[tuple[bytes, bytes | None]]) -> bytes:
    body = tree + b"".join(_bytes(k) + (b"" if p is None else _bytes(p)) for k, p in entries)
    return struct.pack("<Q", len(body)) + body


def _modules(mod) -> list:
    found, stack = [], [mod]
    while stack:
        m = stack.pop()
        found.append(m)
        stack.extend(m.imports)
    return found


def device_modules(executable) -> list:
    """The CUDA modules in an executable's import tree (their CUDA C: ``inspect_source("cuda")``)."""
    return [m for m in _modules(executable.mod) if m.kind == "cuda"]


def compile_placeholders(executable, target: tvm.target.Target) -> dict[bytes, bytes]:
    """Compile every CUDA module that still holds source; returns {old payload: new payload}.

    Empty when TVM already compiled the kernels (a machine with the CUDA driver).
    """
    swaps = {}
    for m in device_modules(executable):
        payload = _unpack(runtime_api.ModulePackImportsToTensor(m).numpy().tobytes())[1][0][1]
        fmt, _ = _read(payload, 0)
        if fmt != b"cuda":
            continue
        source = m.inspect_source("cuda").encode()
        if not payload.endswith(_bytes(source)):
            raise BuildError("TVM's CUDA module layout is not [fmt][function table][source]; "
                             "this fxpress only knows apache-tvm 0.27 (see codegen/cuda.py)")
        table = payload[8 + len(fmt): len(payload) - 8 - len(source)]
        fatbin = compile_source(source.decode(), target)
        swaps[payload] = _bytes(b"fatbin") + table + _bytes(fatbin)
    return swaps


def packer(swaps: dict[bytes, bytes]):
    """An ``fpack_imports`` for ``export_library`` that embeds the compiled payloads."""

    def pack(mod, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        tree, entries = _unpack(runtime_api.ModulePackImportsToTensor(mod).numpy().tobytes())
        if sum(p in swaps for _, p in entries) != len(swaps):
            raise BuildError("export_library: the CUDA module differs from the one build() "
                             "compiled; export the BuiltModule that build() returned")
        blob = _pack(tree, [(k, swaps.get(p, p)) for k, p in entries])
        host = next(m for m in _modules(mod) if m.kind == "llvm")
        llvm_target = host.get_function("_get_target_string")()
        obj = tvm.get_global_func("codegen.codegen_blob")(blob, is_system_lib, llvm_target, prefix)
        path = os.path.join(workspace_dir, f"{prefix}devc.o")
        obj.write_to_file(path)
        return path

    return pack
