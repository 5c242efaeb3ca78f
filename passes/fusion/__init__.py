"""The ``fuse`` family: lossless graph fusion (docs/passes/fusion.md).

driver.py runs the steps to a fixed point and registers the pass; each step is a module of its own:
cleanup.py (no-ops, constant folding), bn.py (BatchNorm folding), linear.py (Linear merging, scalar
scales), act.py (activations next to their layer, fused regions); common.py holds what they share.
"""
from .driver import FusePass

__all__ = ["FusePass"]
