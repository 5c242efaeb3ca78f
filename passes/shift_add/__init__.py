"""The ``shift_add`` family: weights rounded to signed powers of two (docs/passes/shift_add.md).

ops.py defines the ``fxpress::shift_*`` ops (the code format itself is fxpress/shift_codes.py, shared
with the kernels); attention.py the binarized-attention matcher and rewrite; driver.py the pass,
which registers itself on import.
"""
from .driver import ShiftAddPass

__all__ = ["ShiftAddPass"]
