"""Rank selection of the low_rank pass, by the mode its options chose: fixed ranks, spectral energy,
a parameter / MAC budget, or a target output error (ranks.py holds the searches themselves)."""
from __future__ import annotations

import torch
from torch import fx

from fxpress.errors import PassError

from ..base import PassContext, PassResult
from ..graph import flatten_outputs
from ..measure import output_error
from ..stats import count_params, graph_costs
from .layers import Layer, layer_rows
from .ranks import LayerChoice, State, select_budget, select_target_error, snap_up
from .rewrite import Trial


def select_ranks(gm: fx.GraphModule, layers: list[Layer], ctx: PassContext, opt: dict,
                 result: PassResult) -> dict[str, int | None]:
    """The rank of each layer (None: left dense), by ``opt["selection"]``; the layers left dense become skips."""
    mode = opt["selection"]
    ranks: dict[str, int | None] = {}
    if mode == "rank":
        spec = opt["rank"]
        for L in layers:
            r = spec if isinstance(spec, int) else (spec.get(L.key) if isinstance(spec, dict) else None)
            if r is None:
                result.skip(L.key, "no rank given for this layer in the 'rank' option")
                continue
            r = max(1, min(int(r), L.fact.full_rank))
            if (L.out + L.d) * r > (1 - opt["min_saving"]) * L.weight_params:
                result.skip(L.key, f"rank {r} would not reduce cost enough (break-even rank "
                                        f"{L.weight_params / (L.out + L.d):.1f}, min_saving {opt['min_saving']:g})")
                continue
            ranks[L.key] = r
        return ranks

    usable = []
    for L in layers:
        if not L.candidates:
            result.skip(L.key, f"low rank would not reduce cost: break-even rank "
                                    f"{L.weight_params / (L.out + L.d):.1f} (full rank {L.fact.full_rank}); no "
                                    f"multiple of snap={opt['snap']} saves {opt['min_saving']:.0%}")
        else:
            usable.append(L)

    if mode == "energy":
        for L in usable:
            need = L.fact.rank_for_energy(float(opt["energy"]))
            r = snap_up(need, opt["snap"])
            if r in L.candidates:
                ranks[L.key] = r
            else:
                result.skip(L.key, f"rank {r} for {float(opt['energy']):.2%} energy would not reduce cost "
                                        f"(largest useful rank {L.candidates[-1]})")
        return ranks

    choices = _choices(gm, usable, ctx, opt)
    if mode == "budget":
        frac = float(opt["budget"])
        on = opt["budget_on"]
        if on == "macs":
            for c, L in zip(choices, usable):
                c.scale = layer_rows(L)
        eligible = sum(c.dense_params for c in choices)
        if opt["budget_scope"] == "model":
            total = count_params(gm)[0] if on == "params" else graph_costs(gm)[0]
            fixed = total - eligible
            target = frac * total - fixed
            if target <= 0:
                raise PassError(f"low_rank: budget {frac:g} of the model's {total} {on} is unreachable: "
                                f"{fixed} {on} are outside the factorable layers. Use a larger budget or "
                                "budget_scope='layers'.")
        else:
            target = frac * eligible
        state, reached = select_budget(choices, target)
        result.metrics[f"budget_target_{on}"] = int(target)
        if not reached:
            result.notes.append(f"budget {frac:g} of {on} ({opt['budget_scope']}) not reachable with ranks ≥ "
                                f"snap={opt['snap']}; every layer is at its smallest useful rank")
        result.metrics["budget_reached"] = reached
    else:  # target_error
        target = float(opt["target_error"])
        trial = Trial(gm, usable)
        reference = ctx.reference_outputs
        if reference is None:
            with torch.no_grad():
                reference = flatten_outputs(gm(*ctx.example_inputs))

        def measure(s: State) -> float:
            return output_error(trial.outputs(s, ctx.example_inputs), reference)[1]

        state, err, calls = select_target_error(choices, target, measure)
        result.metrics.update(target_error=target, target_error_measured=err, target_error_trials=calls)
    for L in usable:
        if state.get(L.key) is None:
            result.skip(L.key, f"left dense by the {mode} search")
        ranks[L.key] = state.get(L.key)
    return ranks


def _choices(gm: fx.GraphModule, layers: list[Layer], ctx: PassContext, opt: dict) -> list[LayerChoice]:
    if opt["sensitivity"] == "layer":
        return [LayerChoice(L.key, L.out, L.d, L.candidates,
                            {r: L.fact.rel_error(r) ** 2 for r in L.candidates}) for L in layers]
    # "model": the model's squared relative output error with only this layer truncated, measured at up
    # to 8 candidate ranks per layer and interpolated between them.
    trial = Trial(gm, layers)
    batch = ctx.calibration_batches(1, gm)[0]
    with torch.no_grad():
        ref = flatten_outputs(gm(*batch))
    out = []
    for L in layers:
        cs = L.candidates
        probe = sorted({cs[round(i * (len(cs) - 1) / 7)] for i in range(8)}) if len(cs) > 8 else cs
        measured = {}
        for r in probe:
            y = trial.outputs({L.key: r}, batch)
            measured[r] = sum(float((a - b).double().square().sum()) / max(float(b.double().square().sum()), 1e-30)
                              for a, b in zip(y, ref))
        err = {}
        for r in cs:
            lo = max((p for p in probe if p <= r), default=probe[0])
            hi = min((p for p in probe if p >= r), default=probe[-1])
            t = 0.0 if hi == lo else (r - lo) / (hi - lo)
            err[r] = (1 - t) * measured[lo] + t * measured[hi]
        out.append(LayerChoice(L.key, L.out, L.d, cs, err))
    return out
