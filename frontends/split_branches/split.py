"""Cut a model's forward into branch-free regions and a host program: the front end's driver.

After DyCL (Chen et al., ISSTA'23). ``split_model`` runs the steps in order:

1. ``reader.analyze``: the forward's source (and that of the dynamic callees it reaches) becomes a
   structured program: straight-line statements plus the dynamic nodes the host program must run.
2. ``regions.Builder``: every maximal run of straight-line statements becomes a region; a dynamic
   test becomes an assignment ``_sb_cN = <test>`` at the end of the region before it, so a
   condition is always a region output. Loops are rotated (the test is computed before the loop
   and again at the end of the body) when the body has no ``continue``.
3. ``liveness``: a control-flow graph of the host program (networkx) and a backward liveness
   analysis give each region its inputs and outputs.
4. ``explorer.Explorer``: runs the program eagerly on the example inputs, taking *both* sides of every
   branch and every loop body once, so every region gets example inputs (for tracing and for
   lowering with fixed shapes). Where a variable has a different shape, dtype or kind on the two
   sides of a branch and is still needed after it, the code after the branch is duplicated into
   both sides (``duplication``; each copy is traced with its own shapes) and the exploration starts again.
5. ``region_module.RegionModule``: a region as an nn.Module that shares the model's submodules,
   ready for fxpress's tracer, passes and lowering.

Values that cross a region boundary are tensors, (lists/tuples of) tensors, Python numbers that
differ by path (the host carries them; regions take them as 0-d tensors), or compile-time
constants (a name assigned once from shapes and attributes: baked into the regions that read it).

``eager_decisions(model, inputs, program)`` gives the decision trace of eager PyTorch, for comparing.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from fxpress.errors import TraceError

from . import ir
from .duplication import duplicate_continuation, hoist_regions, merge_adjacent
from .explorer import Explorer
from .liveness import liveness, uses_defs
from .options import SplitOptions, split_options
from .program import Analysis
from .reader import analyze
from .region_module import RegionModule, flat_input_names, flat_output_names, region_module
from .regions import Builder, RegionDef
from .semantics import HELPERS
from .taint import Taint

MAX_DUPLICATION_ROUNDS = 16


@dataclass
class RegionBuild:
    """One branch-free region, ready for the pass manager and lowering."""

    name: str
    module: RegionModule
    example_inputs: tuple
    reference: list[torch.Tensor]
    sig: ir.RegionSig
    code: str
    source: str


@dataclass
class SplitProgram:
    host: ir.HostProgram
    regions: dict[str, RegionBuild]
    analysis: Analysis
    notes: list[str] = field(default_factory=list)
    duplications: int = 0
    cfg: Any = None  # networkx.DiGraph of the host program (vertices carry kind/uses/defs), from liveness

    @property
    def markers(self) -> set[str]:
        return program_markers(self.host)

    def text(self) -> str:
        return ir.render(self.host)


def program_markers(host: ir.HostProgram) -> set[str]:
    out = set()
    for n in host.nodes():
        for attr in ("then_line", "else_line", "body_line", "line"):
            v = getattr(n, attr, None)
            if v:
                out.add(v)
    return out


def split_model(model: nn.Module, example_inputs: Sequence[torch.Tensor],
                options: SplitOptions | dict[str, Any] | None = None, out_spec=None, batch: str = "uniform",
                analysis: Analysis | None = None) -> SplitProgram:
    """Cut ``model``'s forward into branch-free regions and a host program (see module docstring).
    ``analysis``: the reader's result when the caller already has it (``analyze(model, options)``)."""
    options = split_options(options)
    analysis = analysis if analysis is not None else analyze(model, options, len(example_inputs), example_inputs)
    if len(analysis.params) != len(example_inputs):
        raise TraceError(f"split_branches: {analysis.root_fn.qualname} takes {len(analysis.params)} input(s) "
                         f"({', '.join(analysis.params)}), got {len(example_inputs)} example input(s)")
    builder = Builder(analysis)
    body = builder.build()
    regions = builder.regions
    notes = list(analysis.notes)
    taint = Taint(data=set(analysis.data), varying=set(analysis.varying))
    namespace = analysis.namespace()
    namespace.update(HELPERS)
    fresh_region = lambda: f"r{next(builder._regions)}"  # noqa: E731, SLF001
    fresh_id = lambda: next(builder._ids)  # noqa: E731, SLF001
    inputs = dict(zip(analysis.params, example_inputs))
    duplications = 0
    if hoist_regions(body, regions):
        notes.append("moved region(s) that do not depend on the preceding branch before it")
    for _ in range(MAX_DUPLICATION_ROUNDS):
        merge_adjacent(body, regions)
        live = _assign_liveness(body, regions, analysis.params)
        explorer = Explorer(body, regions, analysis, live, namespace, taint, out_spec, notes)
        explorer.run(inputs)
        if not explorer.duplicate:
            break
        seen = set()
        for node in explorer.duplicate:
            if id(node) in seen:
                continue
            seen.add(id(node))
            note = duplicate_continuation(body, node, regions, fresh_region, fresh_id)
            duplications += 1
            if note not in notes:
                notes.append(note)
    else:
        raise TraceError(f"split_branches: shapes still differ after {MAX_DUPLICATION_ROUNDS} rounds of duplicating "
                         "code after branches; make the two sides of each branch produce the same shapes")
    split = _finalize(model, body, regions, explorer, analysis, notes, duplications, batch)
    split.cfg = live.graph
    return split


def _assign_liveness(body: list, regions: dict[str, RegionDef], params: list[str]):
    progvars = set(params)
    reachable = {n.region for n in ir.walk(body) if isinstance(n, ir.Call)}
    for name in reachable:
        r = regions[name]
        r.uses, r.defs, r.maybe = uses_defs(r.stmts)
        progvars.update(r.maybe)
    for n in ir.walk(body):
        if isinstance(n, ir.ForRange) and n.index:
            progvars.add(n.index)
    for name in reachable:
        r = regions[name]
        r.uses = [u for u in r.uses if u in progvars]
    live = liveness(body, regions, params)
    for n in ir.walk(body):
        if isinstance(n, ir.Call):
            r = regions[n.region]
            out = live.live_out[live.vertex_of[id(n)]]
            r.inputs = list(r.uses)
            r.outputs = [m for m in r.maybe if m in out]
    return live


def _finalize(model, body, regions, explorer: Explorer, analysis, notes, duplications, batch) -> SplitProgram:
    # Calls that produce no tensor become constant assignments (or vanish); never-visited code goes.
    def rewrite(nodes: list) -> list:
        out = []
        for n in nodes:
            if isinstance(n, ir.Call):
                r = regions[n.region]
                if r.name not in explorer.visited:
                    notes.append(f"region at {r.source} is unreachable; dropped")
                    continue
                if not r.out_layout:
                    if r.consts:
                        out.append(ir.Set(values=dict(r.consts)))
                    continue
                n.consts = dict(r.consts)
            elif isinstance(n, ir.Return):
                n.values = explorer.returns.get(id(n), n.values)
            for sub in ir.children(n):
                sub[:] = rewrite(sub)
            out.append(n)
        return out

    body = rewrite(body)
    # Name regions r0, r1, ... in program order.
    order = [n for n in ir.walk(body) if isinstance(n, ir.Call)]
    rename = {}
    for n in order:
        if n.region not in rename:
            rename[n.region] = f"r{len(rename)}"
        n.region = rename[n.region]
    builds: dict[str, RegionBuild] = {}
    sigs: dict[str, ir.RegionSig] = {}
    for old, new in rename.items():
        r = regions[old]
        r.name = new
        fn = explorer.fns[old]
        module = region_module(model, r, fn)
        in_names = flat_input_names(r.in_layout)
        dtypes = []
        for (name, kind, extra) in r.in_layout:
            if kind == "tensor":
                dtypes.append(None)
            elif kind == "scalar":
                dtypes.append(extra)
            elif kind == "tree":
                dtypes += [None] * extra.num_leaves
        dtypes = [d if d is not None else str(t.dtype).replace("torch.", "")
                  for d, t in zip(dtypes, r.example_inputs)]
        sig = ir.RegionSig(name=new, inputs=in_names, input_dtypes=dtypes, outputs=flat_output_names(r.out_layout),
                           source=r.source)
        sigs[new] = sig
        builds[new] = RegionBuild(new, module, tuple(r.example_inputs), list(r.example_outputs), sig, r.code(),
                                  r.source)
    host = ir.HostProgram(inputs=list(analysis.params), regions=sigs, body=body, batch=batch)
    return SplitProgram(host=host, regions=builds, analysis=analysis, notes=notes, duplications=duplications)


# ----------------------------------------------------------------------------- eager decisions

def eager_decisions(model: nn.Module, inputs: Sequence[torch.Tensor], program: SplitProgram):
    """Run the eager model and return (outputs, decision trace): the marker lines ("file:line") of the
    branch bodies, loop iterations and returns it executed, in order, as the host program records them."""
    markers = program.markers
    codes = set(program.analysis.code_objects)
    seen: list[str] = []

    def local(frame, event, arg):
        if event == "line":
            key = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            if key in markers:
                seen.append(key)
        return local

    def global_trace(frame, event, arg):
        return local if frame.f_code in codes else None

    old = sys.gettrace()
    sys.settrace(global_trace)
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        sys.settrace(old)
    return out, seen
