"""Rewrites of the host program skeleton: hoisting regions, merging neighbours, duplicating the code
after a branch into both sides."""
from __future__ import annotations

import copy
from typing import Any

from fxpress.errors import TraceError

from . import ir
from .liveness import uses_defs
from .regions import RegionDef


def find_parent(body: list, target) -> tuple[list, int, Any] | None:
    """(list holding target, index, the node owning that list or None)."""

    def search(nodes, owner):
        for i, n in enumerate(nodes):
            if n is target:
                return nodes, i, owner
            for sub in ir.children(n):
                found = search(sub, n)
                if found:
                    return found
        return None

    return search(body, None)


def clone_nodes(nodes: list, regions: dict[str, RegionDef], fresh_region, fresh_id) -> list:
    out = []
    for n in nodes:
        n2 = copy.copy(n)
        if isinstance(n, ir.Call):
            new = fresh_region()
            src = regions[n.region]
            regions[new] = RegionDef(new, copy.deepcopy(src.stmts), list(src.fns))
            n2.region = new
            n2.consts = {}
        if hasattr(n2, "id"):
            n2.id = fresh_id()
        if isinstance(n, ir.If):
            n2.then = clone_nodes(n.then, regions, fresh_region, fresh_id)
            n2.orelse = clone_nodes(n.orelse, regions, fresh_region, fresh_id)
        elif isinstance(n, ir.While):
            n2.cond_body = clone_nodes(n.cond_body, regions, fresh_region, fresh_id)
            n2.body = clone_nodes(n.body, regions, fresh_region, fresh_id)
        elif isinstance(n, ir.ForRange):
            n2.body = clone_nodes(n.body, regions, fresh_region, fresh_id)
        elif isinstance(n, ir.Unrolled):
            n2.iterations = [clone_nodes(it, regions, fresh_region, fresh_id) for it in n.iterations]
        out.append(n2)
    return out


def _block_effects(nodes: list, regions: dict[str, RegionDef]) -> tuple[set[str], set[str]]:
    """(names read, names maybe written) by a block of host nodes."""
    reads, writes = set(), set()
    for n in ir.walk(nodes):
        if isinstance(n, ir.Call):
            uses, _, maybe = uses_defs(regions[n.region].stmts)
            reads.update(uses)
            writes.update(maybe)
        elif isinstance(n, ir.If):
            reads.add(n.cond)
        elif isinstance(n, ir.While):
            reads.add(n.cond)
        elif isinstance(n, ir.ForRange):
            reads.update([n.count] if isinstance(n.count, str) else [])
            writes.update([n.index] if n.index else [])
        elif isinstance(n, ir.Return):
            reads.update(n.values)
    return reads, writes


def hoist_regions(body: list, regions: dict[str, RegionDef]) -> int:
    """Move a region that follows an ``if`` to before it when it neither reads what the branches write
    nor touches what they read (BlockDrop's ``keep[:, 1]`` test need not wait for block 0): it then
    merges with the region before the ``if``, one region fewer to compile and call. Returns moves."""
    moved = 0
    i = 2
    while i < len(body):
        n, prev, before = body[i], body[i - 1], body[i - 2]
        if isinstance(n, ir.Call) and isinstance(prev, ir.If) and isinstance(before, ir.Call) \
                and not any(isinstance(x, (ir.Return, ir.Break, ir.Continue)) for x in ir.walk([prev])):
            uses, _, maybe = uses_defs(regions[n.region].stmts)
            b_reads, b_writes = _block_effects([prev], regions)
            if not (set(uses) & b_writes) and not (set(maybe) & (b_reads | b_writes)):
                first = regions[before.region]
                first.stmts = first.stmts + regions[n.region].stmts
                first.fns = first.fns + regions[n.region].fns
                del body[i]
                moved += 1
                continue
        i += 1
    for n in body:
        for sub in ir.children(n):
            moved += hoist_regions(sub, regions)
    return moved


def merge_adjacent(body: list, regions: dict[str, RegionDef]) -> None:
    """Fuse consecutive region calls in the same block (tail duplication leaves such pairs)."""
    i = 0
    while i < len(body):
        n = body[i]
        if isinstance(n, ir.Call) and i + 1 < len(body) and isinstance(body[i + 1], ir.Call):
            first, second = regions[n.region], regions[body[i + 1].region]
            first.stmts = first.stmts + second.stmts
            first.fns = first.fns + second.fns
            del body[i + 1]
            continue
        for sub in ir.children(n):
            merge_adjacent(sub, regions)
        i += 1


def tail_duplicate(body: list, node: ir.If, regions: dict[str, RegionDef], fresh_region, fresh_id) -> str:
    """Move what follows ``node`` into both of its branches. Returns a note for the report."""
    found = find_parent(body, node)
    assert found is not None
    nodes, i, owner = found
    rest = nodes[i + 1:]
    if not rest:
        if isinstance(owner, ir.If):
            return tail_duplicate(body, owner, regions, fresh_region, fresh_id)
        raise TraceError(
            f"split_branches: {node.loc}: a variable has a different shape, dtype or kind on the two sides of this "
            "branch and the branch is the last statement of a loop body, so the code that reads it cannot be "
            "specialised per side.\nWhat to do: make both sides produce the same shape.")
    del nodes[i + 1:]
    node.then = node.then + clone_nodes(rest, regions, fresh_region, fresh_id)
    node.orelse = node.orelse + rest
    return f"{node.loc}: the two sides of this branch give different shapes; duplicated the code after it into both"


def _own_breaks(nodes: list):
    """(list, index) of every Break in ``nodes`` that leaves the loop owning ``nodes`` (not a nested one)."""
    for i, n in enumerate(nodes):
        if isinstance(n, ir.Break):
            yield nodes, i
        elif isinstance(n, ir.If):
            yield from _own_breaks(n.then)
            yield from _own_breaks(n.orelse)


def break_duplicate(body: list, node: ir.Unrolled, regions: dict[str, RegionDef], fresh_region, fresh_id) -> str:
    """Replace each ``break`` of an unrolled loop by a copy of the code after the loop, so each way out
    (a list of 1, 2, ... steps in a greedy decoder) runs code traced for its own shapes."""
    found = find_parent(body, node)
    assert found is not None
    nodes, i, owner = found
    rest = nodes[i + 1:]
    if owner is not None or not rest or not isinstance(rest[-1], ir.Return):
        raise TraceError(
            f"split_branches: {node.loc}: a variable has a different shape or length depending on the iteration "
            "this loop leaves at, and the loop is nested in other control flow, so the code after it cannot be "
            "specialised per exit.\nWhat to do: move the loop to the top level of forward, or keep the shapes "
            "fixed (e.g. write into a preallocated tensor instead of growing a list).")
    for it in node.iterations:
        for holder, j in reversed(list(_own_breaks(it))):
            holder[j:j + 1] = clone_nodes(rest, regions, fresh_region, fresh_id)
    return (f"{node.loc}: the ways out of this loop give different shapes; each break runs its own copy of the "
            "code after the loop")


def duplicate_continuation(body: list, node, regions: dict[str, RegionDef], fresh_region, fresh_id) -> str:
    if isinstance(node, ir.Unrolled):
        return break_duplicate(body, node, regions, fresh_region, fresh_id)
    return tail_duplicate(body, node, regions, fresh_region, fresh_id)
