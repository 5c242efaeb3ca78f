"""Where fxpress's own ops (torch.library custom ops in namespace ``fxpress``) say how they lower.

Each pass family registers, for each of its ops:
- a Relax converter ``fn(node, importer) -> relax.Expr`` (TVM's from_exported_program calls it with
  the fx node of the exported program and the importer, whose ``env`` maps nodes to Relax values);
- an ONNX translation: an onnxscript function for ``torch.onnx.export(custom_translation_table=...)``
  that decomposes the op into standard ONNX ops.

The families' modules in this folder (``<family>_lowering.py``, listed in fxpress/families.py) are
imported on first use (``ensure_registered``).
"""
from __future__ import annotations

from typing import Any, Callable

from fxpress import families

_RELAX: dict[str, Callable] = {}
_ONNX: dict[Any, Callable] = {}
_loaded = False


def _op_key(op) -> str:
    """TVM's importer keys its convert map by ``target.__name__`` (e.g. 'shift_linear.default')."""
    return op if isinstance(op, str) else op.__name__


def register_relax_converter(op) -> Callable:
    """Decorator: ``@register_relax_converter(torch.ops.fxpress.my_op.default)``."""

    def deco(fn: Callable) -> Callable:
        _RELAX[_op_key(op)] = fn
        return fn

    return deco


def register_onnx_translation(op) -> Callable:
    """Decorator: ``@register_onnx_translation(torch.ops.fxpress.my_op.default)`` on an onnxscript function."""

    def deco(fn: Callable) -> Callable:
        _ONNX[op] = fn
        return fn

    return deco


def ensure_registered() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    families.import_modules("lowering")


def relax_converters() -> dict[str, Callable]:
    ensure_registered()
    return dict(_RELAX)


def onnx_translations() -> dict[Any, Callable]:
    ensure_registered()
    return dict(_ONNX)
