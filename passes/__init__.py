"""FX → FX rewrites (fxpress.passes): the pass protocol, registry, manager and graph utilities.

Built-in pass families are sub-packages (fusion/, low_rank/, shift_add/, quantize/), listed in
fxpress/families.py; each registers its pass by name when first looked up. (split_branches is a front end
ahead of the passes: fxpress.frontends.)
Modules here that every family uses: base.py (the pass contract, registry), layer_scan.py (the Linear /
Conv layers a lossy pass starts from), weight_ops*.py, graph.py, stats.py, measure.py, trace.py, manager.py.
"""
from fxpress.errors import PassError, TraceError, UnknownPassError

from .base import (CANONICAL_ORDER, FunctionPass, Pass, PassContext, PassResult, Rewrite, Skip,
                   available_passes, default_pipeline, get_pass, register_pass, resolve_passes)
from .graph import flatten_outputs, to_networkx
from .manager import PassManager, PipelineOutcome, StageRecord, output_error, run_graph, snapshot
from .stats import count_params, graph_costs, graph_table, register_cost
from .trace import Traced, annotate_shapes, copy_graph_module, trace

__all__ = [
    "CANONICAL_ORDER", "FunctionPass", "Pass", "PassContext", "PassError", "PassManager", "PassResult",
    "PipelineOutcome", "Rewrite", "Skip", "StageRecord", "TraceError", "Traced", "UnknownPassError",
    "annotate_shapes", "available_passes", "copy_graph_module", "count_params", "default_pipeline",
    "flatten_outputs", "get_pass", "graph_costs", "graph_table", "output_error", "register_cost",
    "register_pass", "resolve_passes", "run_graph", "snapshot", "to_networkx", "trace",
]
