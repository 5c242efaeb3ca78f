"""Does this CPU have the instruction-set features a TVM library was compiled for? Torch-free, tvm-free.

A TVM library built for one CPU (``-mcpu=znver4``: AVX-512, VNNI...) dies with SIGILL on a CPU without
those features. The exporter records the vector/bit-manipulation features LLVM enabled (``isa`` in the
manifest's tvm entry); the loader compares them with what the kernel reports in /proc/cpuinfo.
"""
from __future__ import annotations

import platform

# LLVM feature name -> /proc/cpuinfo flag, for the features generated code actually uses. Features
# not listed here (tuning hints such as "fast-bextr", "macrofusion") cannot fault and are not checked.
LLVM_TO_CPUINFO = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "sse4a": "sse4a",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "popcnt": "popcnt", "lzcnt": "abm", "movbe": "movbe", "aes": "aes", "pclmul": "pclmulqdq",
    "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2",
    "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq", "avx512fp16": "avx512_fp16",
    "avxvnni": "avx_vnni", "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
}


def checked_features(llvm_features) -> list[str]:
    """The subset of LLVM's feature names that this module checks at load time, sorted."""
    return sorted(f for f in llvm_features if f in LLVM_TO_CPUINFO)


def host_flags() -> set[str] | None:
    """The CPU flags the kernel reports (Linux x86), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def missing_features(isa: list[str]) -> list[str]:
    """The features in ``isa`` (LLVM names) this CPU lacks; [] when all are present or unknowable."""
    if not isa or not is_x86():
        return []
    flags = host_flags()
    if flags is None:
        return []
    return [f for f in isa if f in LLVM_TO_CPUINFO and LLVM_TO_CPUINFO[f] not in flags]
