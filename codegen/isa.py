"""The vector ISA an llvm target has, read from its features (never assumed from the host or the name).

Kernel choices (vector lanes, int8 dot-product instructions) and tuning-record keys depend on these
few facts, not on the CPU model: two CPUs with the same ISA level run the same code and can share
tuning records; ``llvm_get_vector_width`` is not used because it reports 512 bits for znver3, an
AVX2-only part.
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm


@dataclass(frozen=True)
class ISA:
    avx2: bool
    fma: bool
    avx512f: bool
    avx512bw: bool
    vnni: bool  # avx512vnni (vpdpbusd on 512-bit vectors) or avxvnni (256-bit)

    @property
    def lanes_fp32(self) -> int:
        """fp32 lanes of the widest vector register the target really has (4: SSE/NEON baseline)."""
        return 16 if self.avx512f else 8 if self.avx2 else 4

    def key(self) -> str:
        """A short name of the ISA level, e.g. ``avx512-vnni``, ``avx2-fma``, ``base``."""
        if self.avx512f:
            return "avx512" + ("-bw" if self.avx512bw else "") + ("-vnni" if self.vnni else "")
        if self.avx2:
            return "avx2" + ("-fma" if self.fma else "") + ("-vnni" if self.vnni else "")
        return "base"


def _has(feature: str, target: tvm.target.Target) -> bool:
    from tvm.target.codegen import target_has_features

    try:
        return bool(target_has_features(feature, target))
    except Exception:  # noqa: BLE001 - non-x86 LLVM targets, or a feature LLVM does not know
        return False


def features(target: tvm.target.Target) -> ISA:
    """The ISA facts of an llvm ``target`` (its ``mcpu``/``mattr``), as LLVM resolves them."""
    if target.kind.name != "llvm":
        raise ValueError(f"isa.features needs an llvm target, got {target.kind.name}")
    avx512f = _has("avx512f", target)
    return ISA(avx2=_has("avx2", target), fma=_has("fma", target), avx512f=avx512f,
               avx512bw=_has("avx512bw", target),
               vnni=_has("avx512vnni", target) if avx512f else _has("avxvnni", target))
