"""``split_branches``: the front end for models with data-dependent Python control flow.

It runs ahead of tracing and the FX passes: it reads the forward's Python source (``ast``, not FX) and
cuts it into branch-free regions, each an nn.Module that the ordinary tracer, passes and lowering
handle, plus a small JSON host program that runs them (``ir``; interpreted by the torch-free
``fxpress.runtime.host_program``). ``fxpress.compile`` selects it by name: ``passes=[..., "split_branches",
...]`` and ``options={"split_branches": {...}}`` (``options.OPTIONS``); fxpress/dynamic.py compiles
the regions. See docs/passes/split_branches.md.

Modules, in the order they run: options → source, names, taint, counter_bound → reader (→ program)
→ regions → liveness → semantics, explorer → duplication → region_module; split drives them.
native builds the alternative one-graph (torch.cond) form of a split program.
"""
from . import ir
from .native import native_module
from .options import NAME, OPTIONS, SplitOptions, split_options
from .program import Analysis
from .reader import analyze
from .split import RegionBuild, SplitProgram, eager_decisions, program_markers, split_model

__all__ = ["NAME", "OPTIONS", "Analysis", "RegionBuild", "SplitOptions", "SplitProgram", "analyze",
           "eager_decisions", "ir", "native_module", "program_markers", "split_model", "split_options"]
