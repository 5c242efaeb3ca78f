"""The table of pass families: which module of each layer belongs to which family.

The pass registry (passes/base.py), the lowering registry (lowering/registry.py) and the kernel
schedules (codegen/build.py) all read this one table, so adding a family is one row here plus its
modules. Plain data and the standard library only, like errors.py: every layer imports it, the torch-free
codegen included.

The row order is the canonical pass order (``available_passes()`` and ``passes="default"`` follow it):
fusion before factorisation, quantization last. (split_branches is a front end ahead of every pass, not
a family: fxpress.frontends.)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Family:
    name: str                    # the pass name users write: passes=["low_rank"]
    passes: str                  # module under fxpress.passes whose import registers the pass
    lowering: str | None = None  # module under fxpress.lowering: Relax converters + ONNX translations of its ops
    kernels: str | None = None   # module under fxpress.codegen: hand-written TIR kernels, apply_default_schedules


FAMILIES: tuple[Family, ...] = (
    Family("fuse", passes="fusion"),
    Family("low_rank", passes="low_rank", lowering="low_rank_lowering", kernels="low_rank_kernels"),
    Family("shift_add", passes="shift_add", lowering="shift_add_lowering", kernels="shift_add_kernels"),
    Family("quantize", passes="quantize", lowering="quantize_lowering", kernels="quantize_kernels"),
)

CANONICAL_ORDER: list[str] = [f.name for f in FAMILIES]

LAYERS = ("passes", "lowering", "kernels")
_PACKAGE = {"passes": "fxpress.passes", "lowering": "fxpress.lowering", "kernels": "fxpress.codegen"}


def module_names(layer: str) -> list[str]:
    """Full module names of the families' modules in ``layer`` ("passes" | "lowering" | "kernels")."""
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; one of {', '.join(LAYERS)}")
    return [f"{_PACKAGE[layer]}.{getattr(f, layer)}" for f in FAMILIES if getattr(f, layer)]


def import_modules(layer: str) -> list[ModuleType]:
    """Import every family's module of ``layer`` (each registers what it defines). Every module the
    table names exists, so a failing import is a real error and is not hidden."""
    return [importlib.import_module(name) for name in module_names(layer)]
