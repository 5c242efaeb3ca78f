"""The ``low_rank`` family: Linear / Conv layers replaced by two thinner ones (docs/passes/low_rank.md).

ops.py defines the ``fxpress::lowrank_*`` ops; factor.py the (weighted) SVD and its exact error at
every rank; ranks.py the rank searches; driver.py the pass, which registers itself on import.
"""
from .driver import LowRankPass

__all__ = ["LowRankPass"]
