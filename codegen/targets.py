"""The two targets fxpress builds for, and the devices that run them.

TVM 0.27 rejects target strings with options ("llvm -mcpu=...") and silently turns
``"mcpu": "native"`` into a generic CPU without AVX, so targets are built from dicts and the
host CPU name is asked from LLVM.
"""
from __future__ import annotations

import os

import tvm
from tvm.target import codegen

TARGET_KINDS = ("llvm", "cuda")
DEFAULT_CUDA_ARCH = "sm_90"  # H100; override with FXPRESS_CUDA_ARCH (e.g. sm_80 for A100)


def resolve_target(target: str | tvm.target.Target) -> tvm.target.Target:
    """``"llvm"`` → this machine's CPU (``$FXPRESS_LLVM_MCPU`` overrides its name); ``"cuda"`` → ``$FXPRESS_CUDA_ARCH`` (default sm_90).

    A ``Target`` of either kind is returned unchanged.
    """
    if isinstance(target, tvm.target.Target):
        target_kind(target)  # validates
        return target
    if target == "llvm":
        if portable_requested():
            return portable_llvm_target()
        # FXPRESS_LLVM_MCPU: generate code for another CPU of the same family (e.g. znver3 for an
        # AVX2-only part on an AVX-512 machine), to check and time what such a CPU would get
        mcpu = os.environ.get("FXPRESS_LLVM_MCPU") or codegen.llvm_get_system_cpu()
        return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": os.cpu_count() or 1})
    if target == "cuda":
        arch = os.environ.get("FXPRESS_CUDA_ARCH", DEFAULT_CUDA_ARCH)
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    raise ValueError(f"unknown target {target!r}: expected one of {TARGET_KINDS} "
                     "or a tvm.target.Target of one of those kinds")


def portable_requested() -> bool:
    """``FXPRESS_PORTABLE=1`` (``fxpress compile --portable``): build "llvm" for any CPU of this
    architecture instead of this machine's, so an exported library runs on other machines."""
    return os.environ.get("FXPRESS_PORTABLE", "0") not in ("", "0")


def portable_llvm_target() -> tvm.target.Target:
    """A generic CPU of this machine's architecture (x86-64: SSE2 only, no AVX); slower, runs anywhere."""
    triple = codegen.llvm_get_system_triple()
    mcpu = "x86-64" if triple.startswith(("x86_64", "amd64")) else "generic"
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": os.cpu_count() or 1})


def target_kind(target: str | tvm.target.Target) -> str:
    """``"llvm"`` or ``"cuda"``; ValueError for anything else."""
    kind = target.kind.name if isinstance(target, tvm.target.Target) else target
    if kind not in TARGET_KINDS:
        raise ValueError(f"unsupported target kind {kind!r}: expected one of {TARGET_KINDS}")
    return kind


def device_for(target: str | tvm.target.Target) -> tvm.runtime.Device:
    """The device a module built for ``target`` runs on (device 0)."""
    return tvm.cuda(0) if target_kind(target) == "cuda" else tvm.cpu(0)


def gpu_available() -> bool:
    """True only if TVM can see a real CUDA device.

    On a machine without the CUDA driver, TVM's CUDA runtime library does not load and
    ``tvm.cuda(0).exist`` is False (CUDA code can still be compiled, see ``build``).
    """
    try:
        return bool(tvm.cuda(0).exist)
    except RuntimeError:  # TVM errors derive from RuntimeError: driver present but unusable
        return False


def pool_workers(target: tvm.target.Target) -> int:
    """How many shares a parallel kernel is cut into: one per core TVM's pool will run on."""
    cores = target.attrs.get("num-cores") if target.attrs is not None else None
    cores = max(1, int(cores) if cores else (os.cpu_count() or 1))
    # A pool held to fewer threads (TVM_NUM_THREADS) runs the shares one after another, and each share
    # re-packs its operand: cut no more shares than the pool has workers.
    pool = os.environ.get("TVM_NUM_THREADS", "")
    return min(cores, int(pool)) if pool.isdigit() and int(pool) > 0 else cores
