"""The ``low_rank`` pass: replace Linear / Conv2d layers whose weights are well approximated at low
rank by two thinner layers (an fxpress op each), only where that lowers parameters and MACs.

Options (``compile(options={"low_rank": {...}})`` or ``get_pass("low_rank", **options)``):

method         "svd" | "activation_aware" | "fisher"                               (default "svd")
whitening      activation_aware only: "cholesky" (SVD-LLM) | "scale" (ASVD)        (default "cholesky")
damping        ridge added to the activation second moment, × its mean diagonal    (default 1e-2)
shrinkage      Ledoit–Wolf shrinkage of the second moment towards μI (few rows)   (default True)
alpha          exponent of the ASVD activation scaling                             (default 0.5)
loss_fn        fisher: ``loss_fn(output, inputs)`` (or ``(output, inputs, labels)`` with ``labels``)
labels         fisher: one label tensor per calibration batch (cross-entropy when no loss_fn)
fisher_samples fisher: at most this many calibration samples, one backward each     (default 256)
fisher_floor   fisher: weight floor of a row, relative to the mean row importance  (default 1e-2)
rank           fixed rank: an int for every layer, or {module name: rank}; skips selection
budget         keep this fraction of the eligible layers' weight parameters (e.g. 0.6)
budget_scope   "layers" (fraction of the eligible layers) | "model" (of all model parameters)
budget_on      what the budget counts: "params" | "macs"                            (default "params")
target_error   keep the model's relative output error (the manager's measure) within this
energy         keep this fraction of each layer's spectral energy                  (default 0.99)
sensitivity    how the budget / target_error search weighs layers: "layer" (each layer's own
               output error, exact and free) | "model" (model output error with only that layer cut)
snap           ranks are multiples of this                                         (default 8)
min_layer_size layers with fewer weight values are left alone                     (default 1024)
min_saving     a layer is replaced only if this fraction of its params/MACs goes   (default 0.1)
exclude        module names (fnmatch patterns) never to touch
max_rows       calibration rows per layer used for the activation statistics       (default 65536)

Selection precedence: rank > budget > target_error > energy (given explicitly) > the context's
tolerance (used as target_error × 0.9, so the manager's guard will not roll the pass back) > energy 0.99.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fxpress.errors import PassError

from ..base import Option, Pass, PassContext, PassResult, register_pass
from ..graph import cosine, finalize, flatten_outputs
from ..layer_scan import LayerScan
from ..measure import output_error
from ..stats import count_params, graph_costs
from ..trace import annotate_shapes
from .calibrate import collect_activations, collect_fisher
from .factor import METHODS, factorize
from .layers import count, find_layers, layer_rows, weight_matrix
from .ranks import candidate_ranks
from .rewrite import rewrite
from .select import select_ranks


@register_pass("low_rank", default=False)
class LowRankPass(Pass):
    lossy = True

    # ------------------------------------------------------------------ entry point
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassResult]:
        result = PassResult()
        opt = self._options(ctx)
        params_before, _ = count_params(gm)
        macs_before, _ = graph_costs(gm)
        with torch.no_grad():
            before_outs = [flatten_outputs(gm(*b)) for b in self._eval_batches(ctx, gm)]

        scan = LayerScan.of(gm, result)
        layers = find_layers(scan, opt, result)
        if not layers:
            result.notes.append("no eligible Linear/Conv layer")
            count(scan, result, {})
            return finalize(gm), result

        collect_activations(gm, layers, ctx, opt)
        if not ctx.calibration and opt["method"] != "svd":
            result.notes.append(f"method {opt['method']!r} calibrated on the example inputs only; pass "
                                "compile(calibration=[...]) with representative batches for better factors")
        if opt["method"] == "fisher":
            collect_fisher(gm, layers, ctx, opt)
        for L in layers:
            try:
                L.fact = factorize(weight_matrix(L), L.stats, opt["method"], whitening=opt["whitening"],
                                   damping=opt["damping"], alpha=opt["alpha"], fisher_floor=opt["fisher_floor"],
                                   shrink=opt["shrinkage"])
            except (ValueError, torch.linalg.LinAlgError) as e:
                raise PassError(f"low_rank: cannot factor layer '{L.key}' with method {opt['method']!r}: {e}") from e
            for n in L.fact.notes:
                result.notes.append(f"{L.key}: {n}")
            L.candidates = candidate_ranks(L.out, L.d, L.fact.full_rank, opt["snap"], opt["min_saving"])

        ranks = select_ranks(gm, layers, ctx, opt, result)
        rows = {L.key: layer_rows(L) for L in layers}  # from the original nodes' shapes, before they go

        for L in layers:
            r = ranks.get(L.key)
            if r is None:
                continue
            rewrite(gm, L, r, scan, result, as_linears=L.key in opt["as_linears"])
        finalize(gm)
        count(scan, result, ranks)

        # ---- numbers for the report
        annotate_shapes(gm, ctx.example_inputs)
        params_after, _ = count_params(gm)
        macs_after, _ = graph_costs(gm)
        with torch.no_grad():
            after_outs = [flatten_outputs(gm(*b)) for b in self._eval_batches(ctx, gm)]
        cos = min(cosine(a, b) for ao, bo in zip(after_outs, before_outs) for a, b in zip(ao, bo))
        rel = max(output_error(ao, bo)[1] for ao, bo in zip(after_outs, before_outs))
        eligible = sum(L.weight_params for L in layers)
        chosen = sum(L.weight_params if ranks.get(L.key) is None else ranks[L.key] * (L.out + L.d) for L in layers)
        eligible_macs = sum(L.weight_params * rows[L.key] for L in layers)
        chosen_macs = sum((L.weight_params if ranks.get(L.key) is None else ranks[L.key] * (L.out + L.d)) * rows[L.key]
                          for L in layers)
        result.metrics.update(
            method=opt["method"], selection=opt["selection"], layers_replaced=len(result.rewrites),
            params_before=params_before, params_after=params_after, macs_before=macs_before, macs_after=macs_after,
            params_ratio=params_after / max(params_before, 1), macs_ratio=macs_after / max(macs_before, 1),
            eligible_weight_params_before=eligible, eligible_weight_params_after=chosen,
            eligible_macs_before=eligible_macs, eligible_macs_after=chosen_macs,
            output_cosine=cos, output_rel_error=rel)
        if ctx.reference_outputs is not None:
            with torch.no_grad():
                result.metrics["rel_error_vs_original"] = output_error(
                    flatten_outputs(gm(*ctx.example_inputs)), ctx.reference_outputs)[1]
        return gm, result

    # ------------------------------------------------------------------ options
    OPTIONS = {
        "method": Option((str,), "svd", choices=tuple(METHODS)),
        "whitening": Option((str,), "cholesky", choices=("cholesky", "scale")),
        "damping": Option((int, float), 1e-2, low=0),
        "shrinkage": Option((bool,), True),
        "alpha": Option((int, float), 0.5, low=0),
        "loss_fn": Option((object,), None),
        "labels": Option((list, tuple, type(None)), None),
        "fisher_samples": Option((int,), 256, low=1),
        "fisher_floor": Option((int, float), 1e-2, low=0),
        "rank": Option((int, dict, type(None)), None, low=1, doc="an int for every layer, or {layer: rank}"),
        "budget": Option((int, float, type(None)), None, low=0, high=1, open_low=True,
                         doc="fraction of the eligible layers' weights to keep"),
        "budget_scope": Option((str,), "layers", choices=("layers", "model")),
        "budget_on": Option((str,), "params", choices=("params", "macs")),
        "target_error": Option((int, float, type(None)), None, low=0, open_low=True),
        "energy": Option((int, float, type(None)), None, low=0, high=1, open_low=True),
        "sensitivity": Option((str,), "layer", choices=("layer", "model")),
        "snap": Option((int,), 8, low=1),
        "min_layer_size": Option((int,), 1024, low=0),
        "min_saving": Option((int, float), 0.1, low=0, high=1, open_high=True),
        "exclude": Option((list, tuple, str, type(None)), None),
        "max_rows": Option((int,), 65536, low=1),
        "as_linears": Option((list, tuple, type(None)), None,
                             doc="Linear layers (keys) written as two F.linear calls, for a later quantize pass"),
    }

    def _options(self, ctx: PassContext) -> dict[str, Any]:
        o = lambda k, d=None: self.option(ctx, k, d)  # noqa: E731
        method = o("method", "svd")
        if method not in METHODS:
            raise PassError(f"low_rank: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        opt = dict(
            method=method, whitening=o("whitening", "cholesky"), damping=float(o("damping", 1e-2)),
            alpha=float(o("alpha", 0.5)), shrinkage=bool(o("shrinkage", True)), loss_fn=o("loss_fn"), labels=o("labels"),
            fisher_samples=int(o("fisher_samples", 256)), fisher_floor=float(o("fisher_floor", 1e-2)), rank=o("rank"), budget=o("budget"),
            budget_scope=o("budget_scope", "layers"), budget_on=o("budget_on", "params"),
            target_error=o("target_error"), energy=o("energy"),
            sensitivity=o("sensitivity", "layer"), snap=int(o("snap", 8)), min_layer_size=int(o("min_layer_size", 1024)),
            min_saving=float(o("min_saving", 0.1)),
            exclude=[o("exclude")] if isinstance(o("exclude"), str) else list(o("exclude", []) or []),
            max_rows=int(o("max_rows", 65536)), as_linears=set(o("as_linears", []) or []))
        if opt["whitening"] not in ("cholesky", "scale"):
            raise PassError(f"low_rank: unknown whitening {opt['whitening']!r}; choose 'cholesky' or 'scale'")
        if opt["budget"] is not None and not 0 < float(opt["budget"]) <= 1:
            raise PassError(f"low_rank: budget must be a fraction in (0, 1], got {opt['budget']!r}")
        if opt["budget_scope"] not in ("layers", "model"):
            raise PassError(f"low_rank: budget_scope must be 'layers' or 'model', got {opt['budget_scope']!r}")
        if opt["budget_on"] not in ("params", "macs"):
            raise PassError(f"low_rank: budget_on must be 'params' or 'macs', got {opt['budget_on']!r}")
        if opt["sensitivity"] not in ("layer", "model"):
            raise PassError(f"low_rank: sensitivity must be 'layer' or 'model', got {opt['sensitivity']!r}")
        if opt["energy"] is not None and not 0 < float(opt["energy"]) <= 1:
            raise PassError(f"low_rank: energy must be in (0, 1], got {opt['energy']!r}")
        if isinstance(opt["rank"], dict):
            bad = {k: v for k, v in opt["rank"].items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
            if bad:
                raise PassError(f"low_rank: option rank gives {bad}; every rank must be an int >= 1")
        if opt["rank"] is not None:
            opt["selection"] = "rank"
        elif opt["budget"] is not None:
            opt["selection"] = "budget"
        elif opt["target_error"] is not None:
            opt["selection"] = "target_error"
        elif opt["energy"] is not None:
            opt["selection"] = "energy"
        elif ctx.tolerance is not None:
            opt["selection"] = "target_error"
            opt["target_error"] = 0.9 * ctx.tolerance
        else:
            opt["selection"] = "energy"
        if opt["energy"] is None:
            opt["energy"] = 0.99
        return opt

    @staticmethod
    def _eval_batches(ctx: PassContext, gm: fx.GraphModule) -> list[tuple]:
        batches = [ctx.example_inputs]
        if ctx.calibration:
            batches += ctx.calibration_batches(4, gm)
        return batches
