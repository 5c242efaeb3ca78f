"""The per-layer search: greedy by estimated error per unit of gain, confirmed with the user's evaluate.

1. A *path* of configurations from all-fp32 upward: each step takes the move (one layer to a candidate
   with more gain than its current one) with the smallest increase of estimated error per unit of gain
   (multiple-choice knapsack, greedy on the convex hull). Estimated error = the sum of single-layer
   squared relative output errors (sensitivity.py); gain = cost saved on the objective (bytes or seconds).
2. A binary search along the path with ``evaluate`` finds the furthest configuration within ``max_drop``
   (about log2(path length) evaluations).
3. While evaluations and time remain, the moves after that point are tried one at a time on top of the
   accepted configuration (a move that breaks the budget is dropped), so one over-sensitive layer does not
   stop the others from being compressed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from .candidates import FP32, Candidate, Layer


@dataclass
class Tried:
    config: dict[str, Candidate]
    metric: float
    drop: float
    accepted: bool
    est_error: float
    cost: float            # the objective's cost estimate (bytes or seconds summed over layers)
    size_bytes: int
    latency_s: float | None
    phase: str


@dataclass
class SearchOutcome:
    best: dict[str, Candidate]
    tried: list[Tried] = field(default_factory=list)
    path_length: int = 0
    stopped: str = ""       # why the search stopped early ("" when it ran to the end)


class Costs:
    """Per-layer numbers the search reads: estimated error and the objective's cost of each candidate."""

    def __init__(self, layers: list[Layer], errors: dict[str, dict[str, float]], cost: dict[str, dict[str, float]],
                 sizes: dict[str, dict[str, int]], base_size: int, latency: dict[str, dict[str, float]] | None,
                 max_error: float, min_gain: float = 0.0):
        self.layers, self.errors, self.cost = layers, errors, cost
        self.sizes, self.base_size, self.latency = sizes, base_size, latency
        # Candidates whose estimate is useless (the pass failed) or hopeless are not moves at all, nor are
        # those that save less than ``min_gain`` of the layer's cost (within timing noise, for latency).
        self.allowed = {L.key: [c for c in L.candidates if c == FP32 or (
            math.isfinite(errors[L.key].get(c.name, math.inf)) and errors[L.key][c.name] <= max_error
            and math.isfinite(cost[L.key].get(c.name, math.inf))
            and cost[L.key][c.name] < (1 - min_gain) * cost[L.key][FP32.name])] for L in layers}

    def gain(self, key: str, c: Candidate) -> float:
        return self.cost[key][FP32.name] - self.cost[key][c.name]

    def total_error(self, config: dict[str, Candidate]) -> float:
        return sum(self.errors[k][c.name] for k, c in config.items() if c != FP32)

    def total_cost(self, config: dict[str, Candidate]) -> float:
        return sum(self.cost[L.key][config.get(L.key, FP32).name] for L in self.layers)

    def size(self, config: dict[str, Candidate]) -> int:
        return self.base_size + sum(self.sizes[k][c.name] - self.base_size for k, c in config.items() if c != FP32)

    def latency_s(self, config: dict[str, Candidate]) -> float | None:
        if self.latency is None:
            return None
        return sum(self.latency[L.key][config.get(L.key, FP32).name] for L in self.layers)


def greedy_path(costs: Costs) -> list[tuple[str, Candidate]]:
    """The moves, in order; applying the first k gives the k-th configuration of the path."""
    current = {L.key: FP32 for L in costs.layers}
    moves: list[tuple[str, Candidate]] = []
    while True:
        best, best_key = None, None
        for L in costs.layers:
            cur = current[L.key]
            for c in costs.allowed[L.key]:
                dg = costs.gain(L.key, c) - costs.gain(L.key, cur)
                if dg <= 0:
                    continue
                de = costs.errors[L.key][c.name] - costs.errors[L.key][cur.name]
                key = (de / dg, -dg)
                if best_key is None or key < best_key:
                    best, best_key = (L.key, c), key
        if best is None:
            return moves
        current[best[0]] = best[1]
        moves.append(best)


def apply_moves(moves: list[tuple[str, Candidate]], layers: list[Layer]) -> dict[str, Candidate]:
    config = {L.key: FP32 for L in layers}
    for k, c in moves:
        config[k] = c
    return config


def search(costs: Costs, judge: Callable[[dict[str, Candidate], str], Tried], max_evaluations: int,
           deadline: float, progress: Callable[[str], None]) -> SearchOutcome:
    """``judge(config, phase)`` evaluates one configuration (and counts the call)."""
    moves = greedy_path(costs)
    out = SearchOutcome(best=apply_moves([], costs.layers), path_length=len(moves))
    progress(f"search: path of {len(moves)} moves; binary search with evaluate")
    evals = 0

    def budget_left(phase: str) -> bool:
        if evals >= max_evaluations:
            out.stopped = out.stopped or f"max_evaluations={max_evaluations} reached during {phase}"
            return False
        if time.monotonic() > deadline:
            out.stopped = out.stopped or f"time_s ran out during {phase}"
            return False
        return True

    lo, hi = 0, len(moves) + 1  # path[lo] is within budget (all fp32); path[hi] is assumed not to be
    first = True
    while hi - lo > 1 and budget_left("the binary search"):
        mid = len(moves) if first else (lo + hi) // 2  # try the whole path first: it may just fit
        first = False
        t = judge(apply_moves(moves[:mid], costs.layers), "path")
        evals += 1
        out.tried.append(t)
        if t.accepted:
            lo = mid
        else:
            hi = mid
    best_moves = list(moves[:lo])
    out.best = apply_moves(best_moves, costs.layers)
    # Refinement: the move that broke the budget is dropped; the later moves are tried one by one.
    for k, c in moves[lo + 1:] if hi <= len(moves) else []:
        if not budget_left("refinement"):
            break
        trial = dict(out.best)
        if costs.gain(k, c) <= costs.gain(k, trial[k]):
            continue
        trial[k] = c
        t = judge(trial, "refine")
        evals += 1
        out.tried.append(t)
        if t.accepted:
            out.best = trial
    return out


def pareto_front(tried: list[Tried]) -> list[Tried]:
    """Configurations no other one beats on metric, latency (when measured) and size at once."""
    def dominates(a: Tried, b: Tried) -> bool:
        la = a.latency_s if a.latency_s is not None else 0.0
        lb = b.latency_s if b.latency_s is not None else 0.0
        no_worse = a.metric >= b.metric and la <= lb and a.size_bytes <= b.size_bytes
        better = a.metric > b.metric or la < lb or a.size_bytes < b.size_bytes
        return no_worse and better

    unique: dict[tuple, Tried] = {}
    for t in tried:
        unique.setdefault(tuple(sorted((k, c.name) for k, c in t.config.items())), t)
    pts = list(unique.values())
    return sorted([p for p in pts if not any(dominates(q, p) for q in pts)], key=lambda t: t.cost)
