"""The ``quantize`` pass: post-training integer quantization of Conv2d / Linear / MatMul.

Modes (``options={"quantize": {"mode": ...}}``):

* ``static`` (default) — int8 activations (per tensor, asymmetric uint8, range from calibration
  observers) × int``bits`` weights (per output channel, symmetric), integer accumulation, float
  epilogue. Activation×activation matmuls (attention) are quantized too (``matmul=True``).
* ``dynamic`` — Linear only; the activation scale is computed from each input at run time.
* ``weight_only`` — Linear/Conv weights stored as int``bits``, dequantized for float compute.

Calibration (static): every batch of ``calibration=`` (or the example inputs) runs through the graph,
observers (``observer="minmax" | "percentile" | "mse"``) record each quantized layer's input, a tqdm
bar shows progress on a terminal. Weights: ``weight_clip="minmax" | "mse"`` (default: minmax at 8
bits, mse below), ``per_channel=True``.

SplitQuant (``splitquant=True``): each layer's weights are split by 1-D k-means into lower / middle /
upper clusters with their own scales (splitquant.py); the op holds the three clusters and
lowers to one kernel.

Sensitivity: with a tolerance (``compile(tolerance=...)`` or the ``tolerance`` option) the pass
measures the output error of the quantized graph on the example inputs against the original model
(exactly what the pass manager's guard measures); while it is above the tolerance, the layer whose
quantization alone hurts the output most is put back to fp32.

Graph form: ``x → fxpress.quantize → (uint8) → fxpress.qlinear / qconv2d / qmatmul → float32``; one
quantize node per quantized tensor, shared by all its consumers. See docs/passes/quantize.md.
"""
from __future__ import annotations

import logging
import math
import sys
from typing import Any

import torch
from torch import fx

from fxpress.errors import PassError

from ..base import Option, Pass, PassContext, PassResult, register_pass
from ..fusion.bn import fold_into_producers
from ..graph import finalize, flatten_outputs
from ..layer_scan import LayerScan
from ..measure import output_error
from .observers import ACT_OBSERVERS, WEIGHT_CLIPS, Observer, Tap, quantize_weight, weight_clip
from .ops import qmax_for_bits
from .report import report
from .rewrite import apply, fresh
from .sites import Site, find_sites
from .splitquant import cluster_masks

log = logging.getLogger("fxpress.passes.quantize")

MODES = ("static", "dynamic", "weight_only")
INT32_MAX = 2**31 - 1


@register_pass("quantize", default=False)
class QuantizePass(Pass):
    lossy = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassResult]:
        result = PassResult()
        opts = self._options(ctx)
        if opts["fold_bn"]:
            fold_into_producers(gm, result)  # the fuse pass's BN folding, so the folded layer is quantized
        scan = LayerScan.of(gm, result)
        sites = find_sites(gm, scan, opts, result)
        if not sites:
            result.notes.append("no Conv / Linear / MatMul to quantize")
            return finalize(gm), result

        if opts["mode"] == "static":
            batches = ctx.calibration_batches(opts["max_calibration_batches"], gm)
            observers = self._calibrate(gm, sites, batches, opts)
            result.metrics["calibration_batches"] = len(batches)
        else:
            observers = {}
            batches = ctx.calibration_batches(1, gm)
            _collect_samples(gm, sites, batches[0])
        for s in list(sites):
            reason = self._plan(s, observers, opts)
            if reason:
                result.skip(s.name, reason)
                sites.remove(s)
        if not sites:
            _count(scan, result, [])
            return finalize(gm), result

        reference = ctx.reference_outputs
        if reference is None:
            with torch.no_grad():
                reference = [t.detach() for t in flatten_outputs(gm(*ctx.example_inputs))]
        tolerance = opts["tolerance"]
        chosen = [s for s in sites]
        qgm = apply(gm, chosen, opts)
        err = _output_error(qgm, ctx.example_inputs, reference)
        sensitivity: dict[str, float] = {}
        if tolerance is not None and err > tolerance:
            for s in sites:
                sensitivity[s.name] = _output_error(apply(gm, [s], opts), ctx.example_inputs, reference)
            for s in sorted(sites, key=lambda s: -sensitivity[s.name]):
                if err <= tolerance:
                    break
                chosen.remove(s)
                s.plan["status"] = "fp32 (sensitivity)"
                result.skip(s.name, f"kept in fp32: quantizing it alone gives output error {sensitivity[s.name]:.3g}, "
                                    f"the largest left, and the model was at {err:.3g} > tolerance {tolerance:g}")
                qgm = apply(gm, chosen, opts) if chosen else fresh(gm)
                err = _output_error(qgm, ctx.example_inputs, reference)

        report(sites, chosen, sensitivity, opts, err, result)
        _count(scan, result, chosen)
        for s in chosen:
            produced = [n.name for n in qgm.graph.nodes if n.meta.get("fxpress_quantize_site") == s.name]
            result.rewrite(f"quantize_{s.kind}", [s.name], produced, bits=s.plan["bits"],
                           clusters=s.plan["clusters"], mode=opts["mode"])
        return finalize(qgm), result

    # ------------------------------------------------------------------ options
    OPTIONS = {
        "mode": Option((str,), "static", choices=MODES, doc="static | dynamic | weight_only"),
        "bits": Option((int,), 8, low=2, high=8, doc="weight bits"),
        "observer": Option((str,), "minmax", choices=tuple(ACT_OBSERVERS)),
        "weight_clip": Option((str, type(None)), None, choices=tuple(WEIGHT_CLIPS)),
        "percentile": Option((int, float), 99.99, low=0, high=100, open_low=True),
        "per_channel": Option((bool,), True),
        "splitquant": Option((bool,), False),
        "matmul": Option((bool,), True, doc="quantize activation x activation matmuls (static mode)"),
        "conv": Option((bool,), True),
        "fold_bn": Option((bool,), True),
        "skip": Option((list, tuple, set, str, type(None)), None, doc="layer labels / node names kept in fp32"),
        "max_calibration_batches": Option((int, type(None)), None, low=1),
        "progress": Option((bool, type(None)), None),
        "tolerance": Option((int, float, type(None)), None, low=0, open_low=True),
    }

    def _options(self, ctx: PassContext) -> dict[str, Any]:
        mode = self.option(ctx, "mode", "static")
        if mode not in MODES:
            raise PassError(f"quantize: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        bits = int(self.option(ctx, "bits", 8))
        if bits not in (2, 3, 4, 5, 6, 7, 8):
            raise PassError(f"quantize: weight bits must be 2..8, got {bits}")
        observer = self.option(ctx, "observer", "minmax")
        if observer not in ACT_OBSERVERS:
            raise PassError(f"quantize: unknown observer {observer!r}; choose one of {', '.join(ACT_OBSERVERS)}")
        wclip = self.option(ctx, "weight_clip", None) or ("minmax" if bits == 8 else "mse")
        if wclip not in WEIGHT_CLIPS:
            raise PassError(f"quantize: unknown weight_clip {wclip!r}; choose one of {', '.join(WEIGHT_CLIPS)}")
        tol = self.option(ctx, "tolerance", None)
        return {
            "mode": mode, "bits": bits, "observer": observer, "weight_clip": wclip,
            "percentile": float(self.option(ctx, "percentile", 99.99)),
            "per_channel": bool(self.option(ctx, "per_channel", True)),
            "splitquant": bool(self.option(ctx, "splitquant", False)),
            "matmul": bool(self.option(ctx, "matmul", True)),
            "conv": bool(self.option(ctx, "conv", True)),
            "fold_bn": bool(self.option(ctx, "fold_bn", True)),
            "skip": _as_set(self.option(ctx, "skip", ())),
            "max_calibration_batches": self.option(ctx, "max_calibration_batches", None),
            "progress": self.option(ctx, "progress", None),
            "tolerance": float(tol) if tol is not None else ctx.tolerance,
        }

    # ------------------------------------------------------------------ calibration
    def _calibrate(self, gm: fx.GraphModule, sites: list[Site], batches: list[tuple], opts: dict) -> dict[str, Observer]:
        observers = {src: Observer(opts["observer"], opts["percentile"]) for s in sites for src in s.inputs}
        want = {src for s in sites for src in s.inputs}
        first: dict[str, torch.Tensor] = {}
        tap = Tap(gm, observers, want, first)
        show = opts["progress"] if opts["progress"] is not None else sys.stderr.isatty()
        from tqdm.auto import tqdm

        with torch.no_grad():
            for i, batch in enumerate(tqdm(batches, desc="quantize: calibrating", unit="batch", disable=not show,
                                           leave=False)):
                tap.keep = i == 0
                tap.run(*batch)
        for s in sites:
            s.sample = [first[src] for src in s.inputs if src in first]
        return observers

    # ------------------------------------------------------------------ planning one layer
    def _plan(self, s: Site, observers: dict[str, Observer], opts: dict) -> str | None:
        mode, bits = opts["mode"], opts["bits"]
        qmax = qmax_for_bits(bits)
        plan = s.plan
        plan.update(bits=bits, clusters=1, status="int" if mode != "weight_only" else "weight-only")
        if mode == "static":
            plan["act"] = []
            for src in s.inputs:
                ob = observers[src]
                if not ob.seen:
                    return "its input was never reached during calibration"
                scale, zp, (lo, hi) = ob.qparams()
                plan["act"].append({"src": src, "scale": scale, "zp": zp, "clip": (lo, hi),
                                    "range": (min(ob.lo, 0.0), max(ob.hi, 0.0))})
        if s.kind == "matmul":
            plan["bits"] = 8
            return None
        w = s.weight.detach().float()
        masks = cluster_masks(w) if opts["splitquant"] else [None]
        plan["clusters"] = len(masks)
        qs, scales, ratios = [], [], []
        one_sided = len(masks) > 1  # SplitQuant: outer clusters use every code on their side
        for m in masks:
            if opts["per_channel"]:
                clip = weight_clip(w, qmax, opts["weight_clip"], m, one_sided=one_sided)
            else:
                flat = w.reshape(1, -1)
                clip = weight_clip(flat, qmax, opts["weight_clip"], m.reshape(1, -1) if m is not None else None,
                                   one_sided=one_sided)
                clip = clip.expand(w.shape[0]).clone()
            q, sc = quantize_weight(w, clip, qmax, m, one_sided=one_sided)
            amax = (w.abs() if m is None else torch.where(m, w.abs(), torch.zeros_like(w))).reshape(w.shape[0], -1).amax(1)
            ratios.append(float((clip[amax > 0] / amax[amax > 0]).mean()) if (amax > 0).any() else 1.0)
            qs.append(q)
            scales.append(sc)
        wq = torch.stack(qs)
        ws = torch.stack(scales).float()
        plan.update(w=wq, w_scale=ws, clip_ratio=sum(ratios) / len(ratios), qmax=qmax, w_max=int(wq.abs().max()))
        bias = s.bias.detach().float() if s.bias is not None else torch.zeros(w.shape[0])
        if mode == "static":
            xs = plan["act"][0]["scale"]
            mult = ws * torch.tensor(xs, dtype=torch.float32)  # float32 product, as every backend forms it
            # the bias goes to one cluster per channel: the middle one when it has weights, else the widest
            pick = torch.full((w.shape[0],), (len(masks) - 1) // 2, dtype=torch.long)
            if len(masks) > 1:
                has = torch.stack([(q.reshape(q.shape[0], -1) != 0).any(1) for q in qs])
                widest = ws.argmax(0)
                pick = torch.where(has[pick, torch.arange(w.shape[0])], pick, widest)
            bq = torch.zeros_like(ws, dtype=torch.float64)
            sel = mult[pick, torch.arange(w.shape[0])].double()
            bq[pick, torch.arange(w.shape[0])] = torch.round(bias.double() / sel)
            k = math.prod(w.shape[1:])
            bound = k * 255 * int(wq.abs().max()) + float(bq.abs().max())
            if bound > INT32_MAX:
                return f"int32 accumulator could overflow (bound {bound:.3g} > 2^31); kept in fp32"
            plan["bias_q"] = bq.to(torch.int32)
        else:
            plan["bias"] = bias
        return None


def _count(scan: LayerScan, result: PassResult, chosen: list[Site]) -> None:
    """Coverage: Linear/Conv layers found vs quantized (matmuls are not layers)."""
    scan.count(result, {s.name for s in chosen if s.kind != "matmul"})


def _as_set(v) -> set[str]:
    if v is None:
        return set()
    return {v} if isinstance(v, str) else set(v)


def _collect_samples(gm: fx.GraphModule, sites: list[Site], batch: tuple) -> None:
    want = {src for s in sites for src in s.inputs}
    first: dict[str, torch.Tensor] = {}
    tap = Tap(gm, {k: Observer() for k in want}, want, first)
    tap.keep = True
    with torch.no_grad():
        tap.run(*batch)
    for s in sites:
        s.sample = [first[src] for src in s.inputs if src in first]


def _output_error(gm: fx.GraphModule, inputs: tuple, reference: list[torch.Tensor]) -> float:
    """The relative output error of ``gm`` on ``inputs`` (measure.output_error, the manager's measure)."""
    with torch.no_grad():
        outs = [t.detach() for t in flatten_outputs(gm(*inputs))]
    return output_error(outs, reference)[1]
