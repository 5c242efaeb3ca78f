"""The ``quantize`` family: post-training integer quantization (docs/passes/quantize.md).

ops.py defines the ``fxpress::q*`` ops exactly; observers.py the calibration observers and weight
clipping; splitquant.py SplitQuant's k-means clusters; driver.py the pass, which registers itself
on import.
"""
from .driver import QuantizePass

__all__ = ["QuantizePass"]
