"""What the report keeps of each stage: ``Stage`` while it runs, ``StageRecord`` once it is done.

A stage (the trace, a pass, a lowering) is run between the ``before`` and ``after`` hooks of the
instruments (passes/instruments.py). The instruments write what they observe into the ``Stage``;
``Stage.record()`` then turns it into the one typed ``StageRecord`` the report shows. No other code
fills a record's fields by hand.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx

from .base import PassResult
from .graph import flatten_outputs
from .trace import clone_inputs


@dataclass
class StageRecord:
    """Snapshot of the model after one stage (trace, a pass, a lowering)."""

    name: str
    kind: str  # "trace" | "pass" | "lowering"
    status: str  # "applied" | "unchanged" | "rolled back" | "failed" | "ok" | "unchecked"
    params: int = 0
    param_bytes: int = 0
    macs: int = 0
    multiplies: int = 0
    nodes: int = 0
    max_abs_error: float | None = 0.0
    max_rel_error: float | None = 0.0
    seconds: float = 0.0
    note: str = ""
    code: str = ""
    table: list[dict[str, Any]] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    result: PassResult | None = None
    ir: str | None = None  # lowering stages: the Relax IR / ONNX graph text
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The scalar fields (what the report table and JSON show)."""
        return {k: getattr(self, k) for k in (
            "name", "kind", "status", "params", "param_bytes", "macs", "multiplies", "nodes",
            "max_abs_error", "max_rel_error", "seconds", "note")}

    def to_dict(self) -> dict[str, Any]:
        d = self.summary()
        d.update(code=self.code, table=self.table, ops=self.ops, ir=self.ir, extra=self.extra,
                 result=self.result.to_dict() if self.result else None)
        return d


# The fields instruments measure (everything in a StageRecord that is not the stage's own account).
MEASURED = ("params", "param_bytes", "macs", "multiplies", "nodes", "max_abs_error", "max_rel_error",
            "code", "table", "ops")


def run_graph(gm: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():  # on copies: a graph may update an input in place (``x.add_(1)`` in forward)
        return [t.detach() for t in flatten_outputs(gm(*clone_inputs(inputs)))]


@dataclass
class Stage:
    """One stage as the instruments see it.

    ``before`` is the graph the stage started from (None for the trace), ``graph`` the one it made
    (for a lowering: the graph it lowered). A guard that rejects the stage sets ``kept`` to the graph
    that goes on instead; ``final`` is whichever goes on, and what the record describes.
    """

    name: str
    kind: str  # "trace" | "pass" | "lowering"
    example_inputs: tuple
    reference: list[torch.Tensor]
    before: fx.GraphModule | None = None
    graph: fx.GraphModule | None = None
    kept: fx.GraphModule | None = None
    lossy: bool = True  # a lossless stage (fuse) must compute what ``before`` did
    status: str = "ok"
    note: str = ""
    seconds: float = 0.0
    result: PassResult | None = None
    ir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # A lowering's outputs come from its executor, not from running the graph; None for "not run here".
    run_outputs: Callable[[], list[torch.Tensor]] | None = None
    checked: bool = True  # False: the stage's outputs cannot be computed here (CUDA without a GPU)
    measured: dict[str, Any] = field(default_factory=dict)
    # outputs already computed in this pipeline: id(graph or runner) -> (weak reference to it, outputs)
    cache: dict[int, tuple[Any, list[torch.Tensor]]] = field(default_factory=dict)

    @property
    def final(self) -> fx.GraphModule | None:
        return self.kept if self.kept is not None else self.graph

    @property
    def rolled_back(self) -> bool:
        return self.kept is not None

    def graph_outputs(self, gm: fx.GraphModule) -> list[torch.Tensor]:
        """``gm``'s outputs on the example inputs, run once per graph."""
        return self._cached(gm, lambda: run_graph(gm, self.example_inputs))

    def outputs(self) -> list[torch.Tensor]:
        """What the stage computes on the example inputs: its executor's outputs, or its final graph's."""
        if self.run_outputs is not None:
            return self._cached(self.run_outputs, self.run_outputs)
        return self.graph_outputs(self.final)

    def _cached(self, key_obj: Any, compute: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        # A weak reference: the cache must not keep a rolled-back graph (and its weights) alive; it also
        # tells a reused id apart from the object that was measured.
        hit = self.cache.get(id(key_obj))
        if hit is None or hit[0]() is not key_obj:
            hit = self.cache[id(key_obj)] = (weakref.ref(key_obj), compute())
        return hit[1]

    def roll_back(self, note: str, attempted: dict[str, Any]) -> None:
        """Keep the graph from before this stage; ``attempted`` says what the rejected graph measured."""
        self.kept = self.before
        self.status = "rolled back"
        self.note = note
        self.extra["attempted"] = attempted

    def record(self) -> StageRecord:
        """The stage's record: the one place a StageRecord is assembled from a stage."""
        return StageRecord(name=self.name, kind=self.kind, status=self.status, seconds=self.seconds,
                           note=self.note, result=self.result, ir=self.ir, extra=self.extra,
                           **{k: v for k, v in self.measured.items() if k in MEASURED})
