"""Rank selection for the low_rank pass: energy, a global parameter budget, or a target output error.

Each eligible layer has candidate ranks (multiples of ``snap`` that cut its parameters and MACs by at
least ``min_saving``) and an error at each candidate (its own relative output error on the calibration
inputs, or, with ``sensitivity="model"``, the model's output error when only that layer is truncated).

The budget and target-error modes share one greedy path, as in ASVD's sensitivity search: starting
with every layer dense, repeatedly take the single move (one layer down to a lower candidate rank)
that adds the least squared error per parameter saved. The budget picks the first state on the path
that fits; the target error picks the last state whose measured model error stays within it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

State = dict[str, "int | None"]  # layer key → rank (None = left dense)


def snap_up(r: int, snap: int) -> int:
    snap = max(1, int(snap))
    return max(snap, math.ceil(r / snap) * snap)


def lowrank_weight_params(out: int, d: int, rank: int) -> int:
    return rank * (out + d)


def candidate_ranks(out: int, d: int, full_rank: int, snap: int, min_saving: float) -> list[int]:
    """Ranks (ascending, multiples of snap) whose factor pair stores ≤ (1 − min_saving) of the weight."""
    limit = (1.0 - min_saving) * out * d
    step = max(1, int(snap))
    return [r for r in range(step, full_rank, step) if lowrank_weight_params(out, d, r) <= limit]


@dataclass
class LayerChoice:
    """What the selector knows about one eligible layer."""

    key: str
    out: int
    d: int
    ranks: list[int]  # candidate ranks, ascending
    err: dict[int, float]  # squared relative error at each candidate rank (the selector's metric)
    # Cost of one weight value: 1 when the budget counts parameters, the rows it is applied to
    # (tokens, or N·OH·OW output pixels of a conv) when it counts MACs.
    scale: int = 1

    @property
    def dense_params(self) -> int:
        return self.out * self.d * self.scale

    def params(self, rank: int | None) -> int:
        """Cost (parameters, or MACs with ``scale``) of the layer at ``rank`` (None = dense)."""
        return self.dense_params if rank is None else lowrank_weight_params(self.out, self.d, rank) * self.scale

    def error(self, rank: int | None) -> float:
        return 0.0 if rank is None else self.err[rank]


@dataclass
class Path:
    states: list[State] = field(default_factory=list)
    params: list[int] = field(default_factory=list)  # total weight params of the chosen layers per state


def greedy_path(layers: list[LayerChoice]) -> Path:
    """Every layer dense → every layer at its smallest rank, cheapest error per saved parameter first."""
    state: State = {c.key: None for c in layers}
    path = Path([dict(state)], [sum(c.dense_params for c in layers)])
    while True:
        best = None
        for c in layers:
            cur = state[c.key]
            cur_p, cur_e = c.params(cur), c.error(cur)
            for r in c.ranks:
                if cur is not None and r >= cur:
                    break
                dp = cur_p - c.params(r)
                if dp <= 0:
                    continue
                ratio = max(c.err[r] - cur_e, 0.0) / dp
                # Ties (e.g. zero error) go to the larger saving.
                key = (ratio, -dp)
                if best is None or key < best[0]:
                    best = (key, c.key, r)
        if best is None:
            break
        state[best[1]] = best[2]
        path.states.append(dict(state))
        path.params.append(sum(c.params(state[c.key]) for c in layers))
    return path


def select_budget(layers: list[LayerChoice], target_params: float) -> tuple[State, bool]:
    """First state on the greedy path whose chosen layers hold ≤ target_params weights.

    Returns (state, reached); when the budget cannot be reached the smallest-rank state is returned.
    """
    path = greedy_path(layers)
    for s, p in zip(path.states, path.params):
        if p <= target_params:
            return _refill(layers, dict(s), target_params), True
    return path.states[-1], False


def _refill(layers: list[LayerChoice], state: State, target_params: float) -> State:
    """Spend what the last greedy move left of the budget: raise ranks (most error removed per
    parameter first) while the total stays within it. A greedy move may jump a layer several
    candidates down at once, overshooting the budget."""
    total = sum(c.params(state[c.key]) for c in layers)
    while True:
        best = None
        for c in layers:
            cur = state[c.key]
            if cur is None:
                continue
            for r in [x for x in c.ranks if x > cur] + [None]:
                dp = c.params(r) - c.params(cur)
                if dp <= 0 or total + dp > target_params:
                    continue
                gain = (c.error(cur) - c.error(r)) / dp
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, c.key, r, dp)
        if best is None:
            return state
        state[best[1]] = best[2]
        total += best[3]


def select_target_error(layers: list[LayerChoice], target: float,
                        measure: Callable[[State], float]) -> tuple[State, float, int]:
    """Last state on the greedy path whose measured model error is ≤ target (binary search).

    Returns (state, its error, number of measurements).
    """
    path = greedy_path(layers)
    lo, hi = 0, len(path.states) - 1  # path.states[0] is all-dense
    errs: dict[int, float] = {0: 0.0}
    calls = 0

    def err(i: int) -> float:
        nonlocal calls
        if i not in errs:
            errs[i] = measure(path.states[i])
            calls += 1
        return errs[i]

    if hi > 0 and err(hi) <= target:
        return path.states[hi], errs[hi], calls
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if err(mid) <= target:
            lo = mid
        else:
            hi = mid
    return path.states[lo], errs.get(lo, 0.0), calls
