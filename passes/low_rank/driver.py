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

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxpress.errors import PassError

from . import ops  # noqa: F401 - registers fxpress::lowrank_* and their costs
from ..base import Option, Pass, PassContext, PassResult, register_pass, runs_with_batch_of_one
from ..graph import cosine, finalize, flatten_outputs, unique_name
from .factor import METHODS, Factorization, LayerStats, factorize
from .ranks import (LayerChoice, State, candidate_ranks, select_budget, select_target_error,
                            snap_up)
from ..measure import output_error
from ..stats import count_params, graph_costs, node_cost, shape_of
from ..trace import annotate_shapes
from ..weight_ops import (CONV, CONV_T, EMBEDDING, LINEAR, WeightOp, as_conv2d, find_weight_ops, replace_weight_op,
                         stems_and_heads)

_LINEAR_OP = torch.ops.fxpress.lowrank_linear.default
_CONV_OP = torch.ops.fxpress.lowrank_conv2d.default


@dataclass
class _Layer:
    """One eligible module (all call sites of it share the factors)."""

    key: str  # module path in gm
    module: nn.Module
    nodes: list[fx.Node]
    kind: str  # "linear" | "conv2d"
    out: int
    d: int
    conv: dict[str, Any] = field(default_factory=dict)  # stride, padding, dilation, kernel
    conv1d: bool = False  # a Conv1d handled as a 1 x k Conv2d (input unsqueezed at dim 2, output squeezed)
    stats: LayerStats | None = None
    fact: Factorization | None = None
    candidates: list[int] = field(default_factory=list)

    @property
    def weight_params(self) -> int:
        return self.out * self.d

    @property
    def bias_params(self) -> int:
        b = getattr(self.module, "bias", None)
        return b.numel() if b is not None else 0


def _lowrank_apply(layer: _Layer, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor):
    """The op the rewritten graph will run, on this layer's own factors (used for trial runs)."""
    if layer.kind == "linear":
        return torch.ops.fxpress.lowrank_linear(x, A, B, bias)
    c = layer.conv
    if layer.conv1d:
        x = x.unsqueeze(2)
    y = torch.ops.fxpress.lowrank_conv2d(x, A, B, bias, list(c["stride"]), list(c["padding"]), list(c["dilation"]))
    return y.squeeze(2) if layer.conv1d else y


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

        layers = self._find_layers(gm, opt, result)
        if not layers:
            result.notes.append("no eligible Linear/Conv layer")
            self._count(result, {})
            return finalize(gm), result

        self._collect_activations(gm, layers, ctx, opt)
        if not ctx.calibration and opt["method"] != "svd":
            result.notes.append(f"method {opt['method']!r} calibrated on the example inputs only; pass "
                                "compile(calibration=[...]) with representative batches for better factors")
        if opt["method"] == "fisher":
            self._collect_fisher(gm, layers, ctx, opt)
        for L in layers:
            try:
                L.fact = factorize(self._weight_matrix(L), L.stats, opt["method"], whitening=opt["whitening"],
                                   damping=opt["damping"], alpha=opt["alpha"], fisher_floor=opt["fisher_floor"],
                                   shrink=opt["shrinkage"])
            except (ValueError, torch.linalg.LinAlgError) as e:
                raise PassError(f"low_rank: cannot factor layer '{L.key}' with method {opt['method']!r}: {e}") from e
            for n in L.fact.notes:
                result.notes.append(f"{L.key}: {n}")
            L.candidates = candidate_ranks(L.out, L.d, L.fact.full_rank, opt["snap"], opt["min_saving"])

        ranks = self._select(gm, layers, ctx, opt, result)
        rows = {L.key: _rows(L) for L in layers}  # from the original nodes' shapes, before they go

        for L in layers:
            r = ranks.get(L.key)
            if r is None:
                continue
            self._rewrite(gm, L, r, result)
        finalize(gm)
        self._count(result, ranks)

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
            max_rows=int(o("max_rows", 65536)))
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

    # ------------------------------------------------------------------ eligibility
    def _find_layers(self, gm: fx.GraphModule, opt: dict, result: PassResult) -> list[_Layer]:
        scan = find_weight_ops(gm)
        for name, reason in scan.near_misses:
            result.skip(name, reason)
        self._ops = [w for w in scan.ops if w.kind in (LINEAR, CONV, CONV_T)]
        self._wops = {w.node: w for w in scan.ops}
        self._stems_heads = stems_and_heads(gm, scan.ops)
        self._nothing = None if self._ops else scan.nothing_found()
        by_key: dict[str, _Layer] = {}
        rejected: set[str] = set()
        for w in scan.ops:
            if w.kind == EMBEDDING:
                result.skip(w.node, f"{w.label}: embedding (a lookup table, not factored)")
                continue
            key = w.key
            if key in rejected:
                continue
            if key in by_key:
                by_key[key].nodes.append(w.node)
                continue
            reason = self._reject_reason(w, opt)
            if reason:
                rejected.add(key)
                result.skip(w.node, f"{w.label}: {reason}")
                continue
            if w.kind == LINEAR:
                L = _Layer(key, w.module, [w.node], "linear", w.weight.shape[0], w.weight.shape[1])
            else:
                weight, g = as_conv2d(w)
                kh, kw = g["kernel"]
                L = _Layer(key, w.module, [w.node], "conv2d", weight.shape[0], weight.shape[1] * kh * kw,
                           conv=dict(stride=tuple(g["stride"]), padding=tuple(g["padding"]),
                                     dilation=tuple(g["dilation"]), kernel=(kh, kw)), conv1d=w.conv.dims == 1)
            by_key[key] = L
        return list(by_key.values())

    def _count(self, result: PassResult, ranks: dict) -> None:
        stems, heads = self._stems_heads
        done = {c for r in result.rewrites for c in r.consumed}
        body = [w for w in self._ops if w.node.name not in stems | heads]
        result.count_layers(len(self._ops), len(done), len(body), sum(1 for w in body if w.node.name in done),
                            nothing=self._nothing, layer_nodes=[w.node.name for w in self._ops])
        result.metrics["layer_weight_params"] = sum(w.weight_params for w in self._ops)  # every Linear/Conv found
        result.metrics["body_weight_params_before"] = sum(w.weight_params for w in body)
        after = 0
        for w in body:
            r = ranks.get(w.key)
            if r is None or w.node.name not in done:
                after += w.weight_params
            else:
                out = w.weight.shape[0]
                after += r * (out + w.weight_params // out)
        result.metrics["body_weight_params_after"] = after

    @staticmethod
    def _reject_reason(w: WeightOp, opt: dict) -> str | None:
        if w.module is None:
            return f"{w.form} could not be lifted to a module"
        if any(fnmatch.fnmatchcase(w.label, p) or fnmatch.fnmatchcase(w.key, p) for p in opt["exclude"]):
            return "excluded by the 'exclude' option"
        wt = w.weight
        if not wt.is_floating_point() or wt.dtype not in (torch.float32, torch.float64):
            return f"weight dtype {wt.dtype} (only float32/float64 layers are factored)"
        if w.kind == CONV_T:
            return f"{w.describe()}: transposed convolutions are not factored"
        if w.kind == CONV:
            if w.conv.dims == 3:
                return f"{w.describe()}: 3-D convolutions are not factored"
            if w.conv.groups != 1:
                return f"grouped/depthwise conv (groups={w.conv.groups}) has no useful low-rank form"
            if as_conv2d(w) is None:
                return f"padding={w.conv.padding!r} is not symmetric"
        if wt.numel() < opt["min_layer_size"]:
            return f"{wt.numel()} weight values < min_layer_size {opt['min_layer_size']}"
        return None

    @staticmethod
    def _weight_matrix(L: _Layer) -> torch.Tensor:
        return L.module.weight.detach().reshape(L.out, L.d)

    # ------------------------------------------------------------------ calibration statistics
    def _collect_activations(self, gm: fx.GraphModule, layers: list[_Layer], ctx: PassContext, opt: dict) -> None:
        for L in layers:
            L.stats = LayerStats(L.d)

        def hook_for(L: _Layer):
            def hook(_mod, args):
                x = args[0]
                if L.stats.n >= opt["max_rows"]:
                    return None
                if L.kind == "linear":
                    rows = x.reshape(-1, L.d)
                else:
                    c = L.conv
                    x = x.unsqueeze(2) if L.conv1d else x
                    patches = F.unfold(x, c["kernel"], dilation=c["dilation"], padding=c["padding"], stride=c["stride"])
                    rows = patches.transpose(1, 2).reshape(-1, L.d)
                L.stats.add(rows[: opt["max_rows"] - L.stats.n])
                return None

            return hook

        handles = [L.module.register_forward_pre_hook(hook_for(L)) for L in layers]
        try:
            with torch.no_grad():
                for batch in ctx.calibration_batches(gm=gm):
                    gm(*batch)
        finally:
            for h in handles:
                h.remove()

    def _collect_fisher(self, gm: fx.GraphModule, layers: list[_Layer], ctx: PassContext, opt: dict) -> None:
        """Σ over calibration samples of (∂loss/∂W)², one backward per sample (FWSVD's empirical Fisher)."""
        loss_fn, labels = opt["loss_fn"], opt["labels"]
        batches = ctx.calibration_batches(gm=gm)
        if labels is not None and len(labels) != len(batches):
            raise PassError(f"low_rank: 'labels' has {len(labels)} entries; give one per calibration batch "
                            f"({len(batches)})")
        weights = [L.module.weight for L in layers]
        saved = [w.requires_grad for w in weights]
        others = [p for p in gm.parameters() if all(p is not w for w in weights)]
        saved_others = [p.requires_grad for p in others]
        for p in others:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for L in layers:
            L.stats.grad_sq = torch.zeros(L.out, L.d, dtype=torch.float64)
        seen = 0
        try:
            with torch.enable_grad():
                per_sample = runs_with_batch_of_one(gm, batches[0])
                for b, batch in enumerate(batches):
                    n = batch[0].shape[0] if per_sample else 1
                    for i in range(n):
                        if seen >= opt["fisher_samples"]:
                            break
                        # a graph with its batch size baked in takes whole batches: Fisher per batch then
                        xs = tuple(t[i:i + 1] for t in batch) if per_sample else batch
                        out = gm(*xs)
                        lab = (labels[b][i:i + 1] if per_sample else labels[b]) if labels is not None else None
                        loss = self._loss(out, xs, lab, loss_fn)
                        grads = torch.autograd.grad(loss, weights, allow_unused=True)
                        for L, g in zip(layers, grads):
                            if g is not None:
                                L.stats.grad_sq += g.detach().double().reshape(L.out, L.d).square()
                        seen += 1
        finally:
            for w, s in zip(weights, saved):
                w.requires_grad_(s)
            for p, s in zip(others, saved_others):
                p.requires_grad_(s)

    @staticmethod
    def _loss(out, xs, lab, loss_fn) -> torch.Tensor:
        if loss_fn is not None:
            loss = loss_fn(out, xs, lab) if lab is not None else loss_fn(out, xs)
        else:
            leaves = flatten_outputs(out)
            logits = leaves[0]
            if logits.dim() != 2 or not logits.is_floating_point():
                raise PassError("low_rank method 'fisher' needs a loss: pass options loss_fn=fn(output, inputs) "
                                "(the model output is not [batch, classes] logits, so no default applies)")
            target = lab if lab is not None else logits.detach().argmax(1)  # pseudo-labels: the model's own
            loss = F.cross_entropy(logits, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise PassError("low_rank: loss_fn must return a scalar tensor")
        return loss.reshape(())

    # ------------------------------------------------------------------ rank selection
    def _select(self, gm: fx.GraphModule, layers: list[_Layer], ctx: PassContext, opt: dict,
                result: PassResult) -> dict[str, int | None]:
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

        choices = self._choices(gm, usable, ctx, opt)
        if mode == "budget":
            frac = float(opt["budget"])
            on = opt["budget_on"]
            if on == "macs":
                for c, L in zip(choices, usable):
                    c.scale = _rows(L)
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
            trial = _Trial(gm, usable)
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

    def _choices(self, gm: fx.GraphModule, layers: list[_Layer], ctx: PassContext, opt: dict) -> list[LayerChoice]:
        if opt["sensitivity"] == "layer":
            return [LayerChoice(L.key, L.out, L.d, L.candidates,
                                {r: L.fact.rel_error(r) ** 2 for r in L.candidates}) for L in layers]
        # "model": the model's squared relative output error with only this layer truncated, measured at up
        # to 8 candidate ranks per layer and interpolated between them.
        trial = _Trial(gm, layers)
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

    # ------------------------------------------------------------------ rewriting
    def _rewrite(self, gm: fx.GraphModule, L: _Layer, rank: int, result: PassResult) -> None:
        A, B, bias = _factors(L, rank)
        base = L.key.replace(".", "_")
        names = []
        for suffix, t in (("lr_U", A), ("lr_V", B), ("lr_bias", bias)):
            name = unique_name(gm, f"{base}_{suffix}")
            gm.register_parameter(name, nn.Parameter(t.contiguous(), requires_grad=False))
            names.append(name)
        macs_before = macs_after = 0
        produced = []
        c = L.conv

        def build(g: fx.Graph, x: fx.Node) -> fx.Node:
            u, v, b = (g.get_attr(n) for n in names)
            if L.kind == "linear":
                return g.call_function(_LINEAR_OP, (x, u, v, b))
            return g.call_function(_CONV_OP, (x, u, v, b, list(c["stride"]), list(c["padding"]), list(c["dilation"])))

        for node in L.nodes:
            mb, _ = node_cost(node, gm)
            macs_before += mb
            out_numel = math.prod(shape_of(node) or (0,))
            macs_after += (out_numel // L.out) * rank * (L.d + L.out)
            produced.append(replace_weight_op(gm, self._wops[node], build))
        err = L.fact.rel_error(rank)
        shape = [L.out, L.d] if L.kind == "linear" else [L.out, L.d // math.prod(L.conv["kernel"]), *L.conv["kernel"]]
        row = dict(layer=L.key, op=L.kind, weight_shape=shape, rank=rank, full_rank=L.fact.full_rank,
                   params_before=L.weight_params + L.bias_params,
                   params_after=rank * (L.out + L.d) + L.out,
                   macs_before=macs_before, macs_after=macs_after,
                   output_error=round(err, 6), energy=round(L.fact.energy(rank), 6), method=L.fact.method)
        result.layers.append(row)
        result.rewrite("low_rank", L.nodes, produced, layer=L.key, rank=rank, error=round(err, 5))


def _rows(L: _Layer) -> int:
    """How many rows (tokens, or output pixels of a conv) the layer's weight is applied to, all calls."""
    return max(1, sum(math.prod(shape_of(n) or (0,)) // L.out for n in L.nodes))


def _factors(L: _Layer, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's (U, V, bias) for this layer at ``rank``, in the layer's dtype."""
    left, right = L.fact.factors(rank)  # left [out, r], right [r, d]: W_r = left @ right
    dt = L.module.weight.dtype
    b = L.module.bias
    bias = b.detach().clone() if b is not None else torch.zeros(L.out, dtype=dt)
    if L.kind == "linear":
        return right.T.to(dt), left.T.to(dt), bias.to(dt)  # y = (x @ Rᵀ) @ Lᵀ
    kh, kw = L.conv["kernel"]
    U = right.reshape(rank, L.d // (kh * kw), kh, kw).to(dt)
    return U, left.to(dt), bias.to(dt)


class _Trial:
    """Runs gm with some layers swapped for their low-rank op (forward hooks; gm is not edited)."""

    def __init__(self, gm: fx.GraphModule, layers: list[_Layer]):
        self.gm = gm
        self.layers = {L.key: L for L in layers}
        self._cache: dict[tuple[str, int], tuple] = {}

    def _get(self, L: _Layer, r: int):
        k = (L.key, r)
        if k not in self._cache:
            self._cache[k] = _factors(L, r)
        return self._cache[k]

    def outputs(self, state: State, inputs: tuple) -> list[torch.Tensor]:
        # Shadow each truncated module's forward with the op (an instance attribute wins over the
        # class method), so the dense layer is not computed as well; deleted again afterwards.
        swapped = []
        try:
            for key, r in state.items():
                if r is None:
                    continue
                L = self.layers[key]
                A, B, bias = self._get(L, r)
                L.module.forward = lambda x, L=L, A=A, B=B, bias=bias: _lowrank_apply(L, x, A, B, bias)
                swapped.append(L.module)
            with torch.no_grad():
                return [t.detach() for t in flatten_outputs(self.gm(*inputs))]
        finally:
            for mod in swapped:
                del mod.forward
