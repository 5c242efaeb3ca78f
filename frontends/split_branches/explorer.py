"""Run the host program eagerly on the example inputs, both sides of every branch, so every region gets
example inputs; find where a value's shape differs between the sides of a branch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fxpress.errors import TraceError

from . import ir
from .liveness import Liveness
from .names import mutated_names
from .program import Analysis
from .regions import PREFIX, RegionDef
from .semantics import make_region_function
from .taint import Taint


def kind_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, (bool, int, float)) or value is None:
        return "scalar"
    if isinstance(value, (list, tuple, dict)):
        # An empty list is a tree too: `outs = []` before a loop that appends to it.
        if all(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(value)):
            return "tree"
    return "object"


def signature(kind: str, value) -> tuple:
    if kind == "tensor":
        return ("tensor", tuple(value.shape), value.dtype)
    if kind == "tree":
        leaves, spec = pytree.tree_flatten(value)
        return ("tree", str(spec), tuple((tuple(x.shape), x.dtype) for x in leaves))
    if kind == "scalar":
        if isinstance(value, (bool, int, float)):
            # A region takes a Python number as a 0-d tensor and hands back a 0-d tensor (`i += 1` on a
            # counter): both are the same value to the host and to the compiled regions.
            return ("tensor", (), _TORCH_DTYPES[scalar_dtype(value)])
        return ("scalar", type(value).__name__)
    if kind == "static":
        try:
            hash(value)
            return ("static", type(value).__name__, value)
        except TypeError:
            return ("static", type(value).__name__, id(value))
    return (kind, id(value))


def scalar_dtype(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, float):
        return "float64"
    raise TypeError(value)


_TORCH_DTYPES = {"bool": torch.bool, "int64": torch.int64, "float64": torch.float64}


@dataclass
class Slot:
    kind: str   # tensor | tree | scalar | static
    value: Any


def _merge(a: dict | None, b: dict | None, conflicts: set[str]) -> dict | None:
    if a is None:
        return None if b is None else dict(b)
    if b is None:
        return dict(a)
    out = {}
    for name in set(a) | set(b):
        if name in a and name in b:
            sa, sb = a[name], b[name]
            if signature(sa.kind, sa.value) == signature(sb.kind, sb.value):
                out[name] = sa
                continue
        conflicts.add(name)
    return out


@dataclass
class Outcome:
    fall: dict | None = None
    brk: dict | None = None
    cont: dict | None = None


class Explorer:
    """Runs the host program eagerly, both sides of every branch, to find every region's inputs."""

    def __init__(self, body: list, regions: dict[str, RegionDef], analysis: Analysis, live: Liveness,
                 namespace: dict[str, Any], taint: Taint, out_spec, notes: list[str]):
        self.body, self.regions, self.a, self.live = body, regions, analysis, live
        self.ns, self.taint, self.out_spec, self.notes = namespace, taint, out_spec, notes
        self.fns: dict[str, Any] = {}
        self.visited: set[str] = set()
        self.duplicate: list = []          # If nodes whose continuation must be duplicated
        self.returns: dict[int, list[str]] = {}  # id(Return) → flat output names
        self.static: dict[str, dict[str, Any]] = {}
        # Objects some region changes in place (`outs.append`) are values, never baked-in constants.
        self.mutated = {m for r in regions.values() for st in r.stmts for m in mutated_names(st)}

    # ------------------------------------------------------------------ driver
    def run(self, inputs: dict[str, torch.Tensor]) -> None:
        env = {k: Slot("tensor", v) for k, v in inputs.items()}
        with torch.no_grad():
            self.block(self.body, env)

    def live_after(self, node) -> set[str]:
        return self.live.live_in[self.live.follow_of[id(node)]]

    def block(self, nodes: list, env: dict | None) -> Outcome:
        out = Outcome()
        for n in nodes:
            if env is None:
                break
            if isinstance(n, ir.Call):
                env = self.call(n, env)
            elif isinstance(n, ir.If):
                env = self.branch(n, env, out)
            elif isinstance(n, ir.While):
                env = self.loop_while(n, env)
            elif isinstance(n, ir.ForRange):
                env = self.loop_for(n, env)
            elif isinstance(n, ir.Unrolled):
                env = self.unrolled(n, env)
            elif isinstance(n, ir.Break):
                out.brk = _merge(out.brk, env, set())
                env = None
            elif isinstance(n, ir.Continue):
                out.cont = _merge(out.cont, env, set())
                env = None
            elif isinstance(n, ir.Return):
                self.ret(n, env)
                env = None
        out.fall = env
        return out

    def _merge_checked(self, a, b, live: set[str], where: str, node=None) -> dict | None:
        conflicts: set[str] = set()
        env = _merge(a, b, conflicts)
        bad = sorted(conflicts & live)
        if bad:
            if node is not None:
                # Explore on with one side's values; this round's results are dropped after duplicating.
                self.duplicate.append(node)
                return dict(a) if a is not None else env
            details = []
            for name in bad:
                sa, sb = (a or {}).get(name), (b or {}).get(name)
                details.append(f"`{name}`: {_describe(sa)} vs {_describe(sb)}")
            raise TraceError(
                f"split_branches: {where}: after this loop a variable differs between the ways the loop can end "
                f"({'; '.join(details)}).\nWhat to do: give it the same shape, dtype and kind on every path (or "
                "assign it before the loop so every path defines it).")
        return env

    # ------------------------------------------------------------------ nodes
    def call(self, n: ir.Call, env: dict) -> dict:
        r = self.regions[n.region]
        if r.name not in self.fns:
            # Inputs are the live names this region reads that some path has defined by now.
            r.inputs = [u for u in r.inputs if u in env]
            self.fns[r.name] = make_region_function(r, self.a, self.ns, self.taint, self.notes)
        args, in_layout, flat = [], [], []
        for name in r.inputs:
            slot = env.get(name)
            if slot is None:
                raise TraceError(f"split_branches: {r.source}: `{name}` is read here but is not assigned on every "
                                 "path that reaches this code; assign it on every path (e.g. before the branch)")
            if slot.kind == "tensor":
                args.append(slot.value)
                flat.append(slot.value)
                in_layout.append((name, "tensor", None))
            elif slot.kind == "tree":
                leaves, spec = pytree.tree_flatten(slot.value)
                # Fresh containers: a region that appends to a list must not change the value other
                # explored paths hold.
                args.append(pytree.tree_unflatten(leaves, spec))
                flat.extend(leaves)
                in_layout.append((name, "tree", spec))
            elif slot.kind == "scalar":
                if slot.value is None:
                    raise TraceError(f"split_branches: {r.source}: `{name}` is None on some path into this code, "
                                     "where it is needed; give it a tensor or number value on every path")
                dt = scalar_dtype(slot.value)
                t = torch.tensor(slot.value, dtype=_TORCH_DTYPES[dt])
                args.append(t)
                flat.append(t)
                in_layout.append((name, "scalar", dt))
            else:  # a compile-time constant: baked into the region
                args.append(slot.value)
                in_layout.append((name, "static", slot.value))
        try:
            result = self.fns[r.name](*args)
        except TraceError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TraceError(f"split_branches: running region {r.name} ({r.source}) on the example inputs failed: "
                             f"{type(e).__name__}: {e}") from e
        env = dict(env)
        out_layout, flat_out, consts = [], [], {}
        for name in r.outputs:
            if name not in result:
                continue
            value = result[name]
            kind = kind_of(value)
            static_ok = (not name.startswith(PREFIX) and self.a.def_sites.get(name, 0) <= 1
                         and name not in self.a.data and name not in self.mutated)
            if kind == "tree" and static_ok and not pytree.tree_leaves(value):
                kind = "static"  # an empty container nobody fills: a constant
            if kind == "tensor":
                out_layout.append((name, "tensor", None))
                flat_out.append(value)
            elif kind == "tree":
                leaves, spec = pytree.tree_flatten(value)
                out_layout.append((name, "tree", spec))
                flat_out.extend(leaves)
            elif static_ok:
                kind = "static"
            elif kind == "scalar":
                consts[name] = value
            else:
                raise TraceError(
                    f"split_branches: {r.source}: `{name}` holds a {type(value).__name__}, is assigned at several "
                    "places and is needed after a data-dependent branch or loop; only tensors, lists/tuples of "
                    "tensors and numbers can cross one.\nWhat to do: assign it once, before the control flow.")
            env[name] = Slot(kind, value)
        if r.name not in self.visited:
            self.visited.add(r.name)
            r.in_layout, r.out_layout = in_layout, out_layout
            r.example_inputs = tuple(flat)
            r.example_outputs = [t.detach() for t in flat_out]
            r.consts = dict(consts)
        else:
            for name, value in consts.items():
                if r.consts.get(name, value) != value:
                    raise TraceError(f"split_branches: {r.source}: `{name}` took different constant values on "
                                     "different visits of this code")
                r.consts[name] = value
        return env

    def branch(self, n: ir.If, env: dict, out: Outcome) -> dict | None:
        self._check_cond(n.cond, env, n.loc)
        a = self.block(n.then, dict(env))
        b = self.block(n.orelse, dict(env))
        for k in ("brk", "cont"):
            setattr(out, k, _merge(_merge(getattr(out, k), getattr(a, k), set()), getattr(b, k), set()))
        return self._merge_checked(a.fall, b.fall, self.live_after(n), n.loc, node=n)

    def _check_cond(self, cond: str, env: dict, loc: str) -> None:
        slot = env.get(cond)
        if slot is None:
            raise TraceError(f"split_branches: {loc}: internal error: condition {cond} was not computed")
        if slot.kind == "tensor" and slot.value.numel() != 1:
            raise TraceError(
                f"split_branches: {loc}: the condition is a tensor of shape {tuple(slot.value.shape)}; a Python "
                "`if`/`while` needs a single value (eager PyTorch raises 'Boolean value of Tensor with more than one "
                "value is ambiguous').\nWhat to do: reduce it (.all(), .any(), .min() ...) so the decision is one per "
                "batch, or compile with options={'split_branches': {'per_sample': True}} to decide per sample.")
        if slot.kind in ("tree", "static") and not isinstance(slot.value, (bool, int, float)):
            raise TraceError(f"split_branches: {loc}: the condition is a {type(slot.value).__name__}; "
                             "fxpress needs a tensor or a number")

    def loop_while(self, n: ir.While, env: dict) -> dict | None:
        head = self.block(n.cond_body, dict(env)).fall
        self._check_cond(n.cond, head, n.loc)
        body = self.block(n.body, dict(head))
        again = _merge(body.fall, body.cont, set())
        if again is not None:
            if n.cond_body:
                again = self.block(n.cond_body, again).fall
            self._check_carried(head, again, n)
        return self._merge_checked(head, body.brk, self.live_after(n), n.loc)

    def loop_for(self, n: ir.ForRange, env: dict) -> dict | None:
        count = env.get(n.count) if isinstance(n.count, str) else Slot("scalar", n.count)
        if count is None or (count.kind == "tensor" and count.value.numel() != 1) or count.kind in ("tree",):
            raise TraceError(f"split_branches: {n.loc}: the trip count of this loop must be one integer")
        head = dict(env)
        if n.index:
            head[n.index] = Slot("tensor", torch.tensor(0, dtype=torch.int64))
        body = self.block(n.body, dict(head))
        again = _merge(body.fall, body.cont, set())
        if again is not None:
            self._check_carried(head, again, n)
        return self._merge_checked(env if not n.index else {**env, n.index: head[n.index]}, body.brk,
                                   self.live_after(n), n.loc)

    def _check_carried(self, before: dict, after: dict, n) -> None:
        head_live = self.live.live_in[self.live.vertex_of[id(n)]] if id(n) in self.live.vertex_of else set()
        for name in sorted(head_live):
            a, b = before.get(name), after.get(name)
            if a is None or b is None:
                continue
            if signature(a.kind, a.value) != signature(b.kind, b.value):
                raise TraceError(
                    f"split_branches: {n.loc}: `{name}` changes from {_describe(a)} to {_describe(b)} in one iteration "
                    "of this loop; a rolled loop needs the same shape, dtype and kind in every iteration.\n"
                    "What to do: keep its shape fixed inside the loop (or unroll a static loop: drop fxpress.bound).")

    def unrolled(self, n: ir.Unrolled, env: dict) -> dict | None:
        exits = None
        for it in n.iterations:
            if env is None:
                break
            res = self.block(it, dict(env))
            exits = _merge(exits, res.brk, set())
            env = _merge(res.fall, res.cont, set())
        # Exits that leave different shapes (a list grown up to the break) get their own copy of the
        # code after the loop (break_duplicate), like the two sides of a branch.
        return self._merge_checked(env, exits, self.live_after(n), n.loc, node=n) if exits is not None else env

    def ret(self, n: ir.Return, env: dict) -> None:
        values = []
        flat_names: list[str] = []
        for name in n.values:
            slot = env.get(name)
            if slot is None or slot.kind not in ("tensor", "tree"):
                raise TraceError(f"split_branches: {n.loc}: the model returns `{name}`, which is "
                                 f"{_describe(slot)}; fxpress compiles models whose outputs are tensors")
            values.append(slot.value)
            if slot.kind == "tensor":
                flat_names.append(name)
            else:
                flat_names += [f"{name}__{i}" for i in range(len(pytree.tree_leaves(slot.value)))]
        value = tuple(values) if getattr(n, "_tuple", False) else values[0]
        _, spec = pytree.tree_flatten(value)
        if self.out_spec is not None and spec != self.out_spec:
            raise TraceError(f"split_branches: {n.loc}: this return gives a {spec} structure, the model's output on "
                             f"the example inputs is {self.out_spec}; every return must give the same structure")
        self.returns[id(n)] = flat_names


def _describe(slot) -> str:
    if slot is None:
        return "undefined"
    if slot.kind == "tensor":
        return f"a tensor {tuple(slot.value.shape)} {str(slot.value.dtype).replace('torch.', '')}"
    if slot.kind == "tree":
        return f"a {type(slot.value).__name__} of {len(pytree.tree_leaves(slot.value))} tensors"
    return f"{slot.kind} {slot.value!r}"
