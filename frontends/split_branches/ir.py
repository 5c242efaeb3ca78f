"""The host program of a split dynamic model: plain, JSON-able dataclasses (no pickled Python).

``split_branches`` cuts a model's forward into branch-free regions (each its own fx.GraphModule)
and this small program says how to run them. The torch-free interpreter in
``fxpress.runtime.host_program`` reads the JSON form (``HostProgram.to_json()``), which is the
contract between the two sides:

    {"format": "fxpress-host-program", "version": 1,
     "inputs": ["x"],                     # env names of the model inputs, in order
     "batch": "uniform" | "per_sample",   # see docs/passes/split_branches.md
     "regions": {"r0": {"inputs": [...], "input_dtypes": [...], "outputs": [...], "source": "f.py:3-9"}},
     "body": [node, ...]}

Nodes (``"op"`` picks the kind); every name is a key of the environment, a dict of arrays and
scalars that starts as {inputs}:

    call      {"region", "consts"}                 run region; bind its outputs (and the constant
                                                   Python scalars it produced) in the environment
    set       {"values"}                           bind constants
    if        {"id", "cond", "then", "else", "loc", "then_line", "else_line"}
    while     {"id", "cond_body", "cond", "body", "max_iter", "on_exceed", "loc", "body_line"}
                                                   loop: run cond_body; stop unless cond; run body
    for       {"id", "count", "index", "index_dtype", "body", "max_iter", "on_exceed", "loc", "body_line"}
                                                   count (a name or an int) iterations, index bound
    unrolled  {"id", "iterations", "loc", "body_line"}   a static loop: one body per iteration
    break / continue {"loc"}                       leave / restart the innermost loop
    return    {"values", "loc", "line"}            the model's flattened outputs

A condition is true when its value (a one-element array or a Python scalar) is non-zero. ``loc``
is "file:line" of the statement; ``*_line`` markers are "file:line" of the first statement the
branch or loop body runs: the interpreter records them, in order, as the decision trace that tests
compare with the lines eager PyTorch executes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Union

HOST_FORMAT = "fxpress-host-program"
HOST_VERSION = 1
BATCH_MODES = ("uniform", "per_sample")

Scalar = Union[bool, int, float, None]


@dataclass
class RegionSig:
    """A region's calling convention: which environment names go in and come out."""

    name: str
    inputs: list[str] = field(default_factory=list)
    input_dtypes: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"inputs": list(self.inputs), "input_dtypes": list(self.input_dtypes),
                "outputs": list(self.outputs), "source": self.source}


@dataclass
class Call:
    region: str
    consts: dict[str, Scalar] = field(default_factory=dict)
    op: str = "call"


@dataclass
class Set:
    values: dict[str, Scalar] = field(default_factory=dict)
    op: str = "set"


@dataclass
class If:
    id: int
    cond: str
    then: list = field(default_factory=list)
    orelse: list = field(default_factory=list)
    loc: str = ""
    then_line: str | None = None
    else_line: str | None = None
    op: str = "if"


@dataclass
class While:
    id: int
    cond: str
    cond_body: list = field(default_factory=list)
    body: list = field(default_factory=list)
    max_iter: int = 0
    on_exceed: str = "error"
    loc: str = ""
    body_line: str | None = None
    op: str = "while"


@dataclass
class ForRange:
    id: int
    count: str | int
    index: str | None = None
    index_dtype: str = "int64"
    body: list = field(default_factory=list)
    max_iter: int = 0
    on_exceed: str = "error"
    loc: str = ""
    body_line: str | None = None
    op: str = "for"


@dataclass
class Unrolled:
    id: int
    iterations: list = field(default_factory=list)  # list of bodies (lists of nodes)
    loc: str = ""
    body_line: str | None = None
    op: str = "unrolled"


@dataclass
class Break:
    loc: str = ""
    op: str = "break"


@dataclass
class Continue:
    loc: str = ""
    op: str = "continue"


@dataclass
class Return:
    values: list[str] = field(default_factory=list)
    loc: str = ""
    line: str | None = None
    op: str = "return"


_BY_OP = {"call": Call, "set": Set, "if": If, "while": While, "for": ForRange, "unrolled": Unrolled,
          "break": Break, "continue": Continue, "return": Return}
# JSON key ↔ dataclass field where they differ ("else" is a Python keyword).
_RENAME = {"orelse": "else"}


def node_to_json(node) -> dict[str, Any]:
    out: dict[str, Any] = {"op": node.op}
    for f in dataclasses.fields(node):
        if f.name == "op":
            continue
        v = getattr(node, f.name)
        if f.name in ("then", "orelse", "body", "cond_body"):
            v = [node_to_json(n) for n in v]
        elif f.name == "iterations":
            v = [[node_to_json(n) for n in body] for body in v]
        elif isinstance(v, dict):
            v = dict(v)
        elif isinstance(v, list):
            v = list(v)
        out[_RENAME.get(f.name, f.name)] = v
    return out


def node_from_json(d: dict[str, Any]):
    cls = _BY_OP[d["op"]]
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name == "op":
            continue
        key = _RENAME.get(f.name, f.name)
        if key not in d:
            continue
        v = d[key]
        if f.name in ("then", "orelse", "body", "cond_body"):
            v = [node_from_json(n) for n in v]
        elif f.name == "iterations":
            v = [[node_from_json(n) for n in body] for body in v]
        kwargs[f.name] = v
    return cls(**kwargs)


@dataclass
class HostProgram:
    inputs: list[str]
    regions: dict[str, RegionSig]
    body: list
    batch: str = "uniform"

    def to_json(self) -> dict[str, Any]:
        return {"format": HOST_FORMAT, "version": HOST_VERSION, "inputs": list(self.inputs),
                "batch": self.batch, "regions": {k: r.to_json() for k, r in self.regions.items()},
                "body": [node_to_json(n) for n in self.body]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "HostProgram":
        regions = {k: RegionSig(name=k, **v) for k, v in d["regions"].items()}
        return cls(inputs=list(d["inputs"]), regions=regions, body=[node_from_json(n) for n in d["body"]],
                   batch=d.get("batch", "uniform"))

    # ------------------------------------------------------------------ walking
    def nodes(self):
        """Every node, depth first."""
        yield from walk(self.body)

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes():
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts


def children(node) -> list[list]:
    if isinstance(node, If):
        return [node.then, node.orelse]
    if isinstance(node, While):
        return [node.cond_body, node.body]
    if isinstance(node, ForRange):
        return [node.body]
    if isinstance(node, Unrolled):
        return list(node.iterations)
    return []


def walk(body: list):
    for n in body:
        yield n
        for sub in children(n):
            yield from walk(sub)


def render(program: HostProgram) -> str:
    """A readable listing of the host program (for reports and docs)."""
    lines: list[str] = []

    def emit(body, depth):
        pad = "  " * depth
        for n in body:
            if isinstance(n, Call):
                sig = program.regions[n.region]
                consts = f"  consts {n.consts}" if n.consts else ""
                lines.append(f"{pad}{', '.join(sig.outputs) or '()'} = {n.region}({', '.join(sig.inputs)})"
                             f"    # {sig.source}{consts}")
            elif isinstance(n, Set):
                lines.append(f"{pad}set {n.values}")
            elif isinstance(n, If):
                lines.append(f"{pad}if {n.cond}:    # {n.loc}")
                emit(n.then, depth + 1)
                if n.orelse:
                    lines.append(f"{pad}else:")
                    emit(n.orelse, depth + 1)
            elif isinstance(n, While):
                lines.append(f"{pad}loop (at most {n.max_iter}, on_exceed={n.on_exceed}):    # {n.loc}")
                emit(n.cond_body, depth + 1)
                lines.append(f"{pad}  if not {n.cond}: break")
                emit(n.body, depth + 1)
            elif isinstance(n, ForRange):
                idx = n.index or "_"
                lines.append(f"{pad}for {idx} in range({n.count}) (at most {n.max_iter}):    # {n.loc}")
                emit(n.body, depth + 1)
            elif isinstance(n, Unrolled):
                lines.append(f"{pad}unrolled loop, {len(n.iterations)} iterations:    # {n.loc}")
                for k, it in enumerate(n.iterations):
                    lines.append(f"{pad}  iteration {k}:")
                    emit(it, depth + 2)
            elif isinstance(n, Break):
                lines.append(f"{pad}break")
            elif isinstance(n, Continue):
                lines.append(f"{pad}continue")
            elif isinstance(n, Return):
                lines.append(f"{pad}return {', '.join(n.values)}    # {n.loc}")

    emit(program.body, 0)
    return "\n".join(lines)
