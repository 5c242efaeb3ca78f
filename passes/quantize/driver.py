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

import copy
import logging
import math
import operator
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxpress.errors import PassError

from ..base import Option, Pass, PassContext, PassResult, register_pass
from ..graph import eliminate_dead_code, finalize, flatten_outputs, unique_name
from ..fusion.bn import fold_into_producers
from ..layer_scan import LayerScan
from ..measure import output_error
from ..weight_ops import CONV_T, EMBEDDING, LINEAR, WeightOp, as_conv2d
from .observers import (ACT_OBSERVERS, WEIGHT_CLIPS, Observer, Tap, mutated_sources, quantize_weight,
                                 weight_clip)
from .ops import qmax_for_bits
from .splitquant import cluster_masks

log = logging.getLogger("fxpress.passes.quantize")

OPS = torch.ops.fxpress
MODES = ("static", "dynamic", "weight_only")
_MATMUL_FNS = {torch.matmul, operator.matmul, torch.bmm, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}
INT32_MAX = 2**31 - 1


@dataclass
class Site:
    """One layer the pass may quantize."""

    name: str                     # node name in the graph
    label: str                    # module path or node name, for the report
    kind: str                     # "linear" | "conv2d" | "matmul"
    inputs: list[str]             # names of the activation nodes it reads (1, or 2 for matmul)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    conv: dict[str, Any] = field(default_factory=dict)  # stride, padding, dilation, groups
    conv1d: bool = False          # a Conv1d run as a 1 x k Conv2d (input unsqueezed at dim 2, output squeezed)
    plan: dict[str, Any] = field(default_factory=dict)  # quantized tensors and report numbers
    sample: list[torch.Tensor] | None = None             # inputs of one calibration batch


@register_pass("quantize", default=False)
class QuantizePass(Pass):
    lossy = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassResult]:
        result = PassResult()
        opts = self._options(ctx)
        if opts["fold_bn"]:
            fold_into_producers(gm, result)  # the fuse pass's BN folding, so the folded layer is quantized
        sites = self._find_sites(gm, opts, result)
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
            self._count(result, [])
            return finalize(gm), result

        reference = ctx.reference_outputs
        if reference is None:
            with torch.no_grad():
                reference = [t.detach() for t in flatten_outputs(gm(*ctx.example_inputs))]
        tolerance = opts["tolerance"]
        chosen = [s for s in sites]
        qgm = _apply(gm, chosen, opts)
        err = _output_error(qgm, ctx.example_inputs, reference)
        sensitivity: dict[str, float] = {}
        if tolerance is not None and err > tolerance:
            for s in sites:
                sensitivity[s.name] = _output_error(_apply(gm, [s], opts), ctx.example_inputs, reference)
            for s in sorted(sites, key=lambda s: -sensitivity[s.name]):
                if err <= tolerance:
                    break
                chosen.remove(s)
                s.plan["status"] = "fp32 (sensitivity)"
                result.skip(s.name, f"kept in fp32: quantizing it alone gives output error {sensitivity[s.name]:.3g}, "
                                    f"the largest left, and the model was at {err:.3g} > tolerance {tolerance:g}")
                qgm = _apply(gm, chosen, opts) if chosen else _fresh(gm)
                err = _output_error(qgm, ctx.example_inputs, reference)

        self._report(gm, sites, chosen, sensitivity, opts, err, result)
        self._count(result, chosen)
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

    # ------------------------------------------------------------------ finding layers
    def _find_sites(self, gm: fx.GraphModule, opts: dict, result: PassResult) -> list[Site]:
        self._scan = LayerScan.of(gm, result)
        by_node = self._scan.by_node
        sites: list[Site] = []
        for n in gm.graph.nodes:
            site = _site_of_weight_op(by_node[n]) if n in by_node else _matmul_site(gm, n)
            if site is None:
                continue
            if isinstance(site, str):
                result.skip(n, site)
                continue
            if site.name in opts["skip"] or site.label in opts["skip"]:
                result.skip(n, "listed in the 'skip' option: kept in fp32")
                continue
            if site.kind == "matmul" and (opts["mode"] != "static" or not opts["matmul"]):
                result.skip(n, "activation x activation matmul: quantized only in static mode (matmul=True)")
                continue
            if site.kind == "conv2d" and (opts["mode"] == "dynamic" or not opts["conv"]):
                result.skip(n, "conv: dynamic mode quantizes Linear only (as ONNX Runtime's quantize_dynamic)"
                            if opts["mode"] == "dynamic" else "conv quantization turned off (conv=False)")
                continue
            dt = [_dtype(gm, i) for i in site.inputs]
            if any(d is not None and d != torch.float32 for d in dt):
                result.skip(n, f"input dtype {dt} is not float32")
                continue
            sites.append(site)
        return sites

    def _count(self, result: PassResult, chosen: list[Site]) -> None:
        """Coverage: Linear/Conv layers found vs quantized (matmuls are not layers); body = not stem/head."""
        self._scan.count(result, {s.name for s in chosen if s.kind != "matmul"})

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

    # ------------------------------------------------------------------ report
    def _report(self, gm, sites, chosen, sensitivity, opts, err, result: PassResult) -> None:
        chosen_names = {s.name for s in chosen}
        fp_bytes = q_bytes = packed_bytes = 0
        for s in sites:
            row: dict[str, Any] = {"layer": s.label, "node": s.name, "kind": s.kind, "mode": opts["mode"]}
            p = s.plan
            on = s.name in chosen_names
            row["status"] = "quantized" if on else p.get("status", "fp32")
            row["bits"] = p["bits"] if on else 32
            row["act_bits"] = 8 if (on and opts["mode"] == "static") else (8 if on and opts["mode"] == "dynamic" else 32)
            row["clusters"] = p.get("clusters", 1)
            if "act" in p:
                row["act_scale"] = [a["scale"] for a in p["act"]]
                row["act_zero_point"] = [a["zp"] for a in p["act"]]
                row["act_range"] = [tuple(round(v, 6) for v in a["range"]) for a in p["act"]]
                row["act_clip"] = [tuple(round(v, 6) for v in a["clip"]) for a in p["act"]]
                row["observer"] = opts["observer"]
            if "w" in p:
                ws = p["w_scale"]
                row["w_scale_min"], row["w_scale_max"] = float(ws.min()), float(ws.max())
                row["weight_clip"] = opts["weight_clip"]
                row["clip_ratio"] = round(p["clip_ratio"], 4)
                row["weight_sqnr_db"] = _weight_sqnr(s.weight, p["w"], ws)
                n_w = s.weight.numel()
                if on:
                    fp_bytes += n_w * 4
                    q_bytes += p["w"].numel()
                    packed_bytes += math.ceil(n_w * (p["bits"] + (2 if p["clusters"] > 1 else 0)) / 8)
            le = _layer_error(s, opts) if s.sample else None
            if le is not None:
                row["layer_rel_error"] = le
                row["layer_sqnr_db"] = -20 * math.log10(le) if le > 0 else math.inf
            if s.name in sensitivity:
                row["sensitivity"] = sensitivity[s.name]
            result.layers.append(row)
        result.metrics.update({
            "mode": opts["mode"], "weight_bits": opts["bits"], "splitquant": opts["splitquant"],
            "observer": opts["observer"], "weight_clip": opts["weight_clip"], "per_channel": opts["per_channel"],
            "quantized_layers": len(chosen), "fp32_layers": len(sites) - len(chosen),
            "output_rel_error": err, "weight_bytes_fp32": fp_bytes, "weight_bytes_stored": q_bytes,
            "weight_bytes_packed": packed_bytes,
        })
        if opts["tolerance"] is not None:
            result.metrics["tolerance"] = opts["tolerance"]


# ----------------------------------------------------------------------------- finding layers

def _dtype(gm: fx.GraphModule, name: str) -> torch.dtype | None:
    n = next((m for m in gm.graph.nodes if m.name == name), None)
    tm = n.meta.get("tensor_meta") if n is not None else None
    return getattr(tm, "dtype", None)


def _as_set(v) -> set[str]:
    if v is None:
        return set()
    return {v} if isinstance(v, str) else set(v)


def _site_of_weight_op(w: WeightOp) -> Site | str | None:
    """A Site for a Linear / Conv1d / Conv2d (any spelling, see weight_ops), or why it is left alone."""
    if w.kind == EMBEDDING:
        return "embedding: kept in fp32 (quantize converts Linear / Conv / MatMul)"
    if w.x is None:
        return "layer without a graph input"
    if w.kind == LINEAR:
        return Site(w.node.name, w.label, "linear", [w.x.name], w.weight, w.bias)
    if w.kind == CONV_T:
        return f"{w.describe()}: transposed convolution is not quantized (Conv1d/Conv2d, Linear and MatMul are)"
    geo = as_conv2d(w)
    if geo is None:
        return (f"{w.describe()}: conv{w.conv.dims}d is not quantized (Conv1d/Conv2d are)" if w.conv.dims == 3
                else f"{w.describe()}: asymmetric 'same' padding")
    weight, g = geo
    return Site(w.node.name, w.label, "conv2d", [w.x.name], weight, w.bias,
                conv={"stride": g["stride"], "padding": g["padding"], "dilation": g["dilation"], "groups": g["groups"]},
                conv1d=w.conv.dims == 1)


def _matmul_site(gm: fx.GraphModule, n: fx.Node) -> Site | str | None:
    """Activation x activation matmuls (attention) for static quantization."""
    if n.op == "call_method":
        if n.target == "matmul" and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args):
            return Site(n.name, n.name, "matmul", [n.args[0].name, n.args[1].name])
        return None
    if n.op == "call_function" and n.target in _MATMUL_FNS:
        if len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args) and not n.kwargs:
            ranks = [len(getattr(a.meta.get("tensor_meta"), "shape", ())) for a in n.args]
            if min(ranks) < 2:
                return "matmul with a 1-D operand is not quantized"
            return Site(n.name, n.name, "matmul", [n.args[0].name, n.args[1].name])
    return None


# ----------------------------------------------------------------------------- calibration

def _collect_samples(gm: fx.GraphModule, sites: list[Site], batch: tuple) -> None:
    want = {src for s in sites for src in s.inputs}
    first: dict[str, torch.Tensor] = {}
    tap = Tap(gm, {k: Observer() for k in want}, want, first)
    tap.keep = True
    with torch.no_grad():
        tap.run(*batch)
    for s in sites:
        s.sample = [first[src] for src in s.inputs if src in first]


# ----------------------------------------------------------------------------- rewriting

def _param(gm: fx.GraphModule, base: str, t: torch.Tensor) -> str:
    name = unique_name(gm, base)
    gm.register_parameter(name, nn.Parameter(t.detach().clone(), requires_grad=False))
    return name


def _fresh(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph that shares its modules and parameters (cheap:
    the sensitivity search builds one per layer; nothing shared is modified)."""
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # keeps a torch.export graph's pytree in/out spec
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    g = fx.GraphModule(gm, graph, type(gm).__name__)
    for a, b in zip(gm.graph.nodes, g.graph.nodes):
        b.meta.update({k: v for k, v in a.meta.items() if k not in b.meta})
    return g


def _apply(gm: fx.GraphModule, sites: list[Site], opts: dict) -> fx.GraphModule:
    """``gm`` with ``sites`` replaced by their quantized form (a new module; ``gm`` is not modified)."""
    g = _fresh(gm)
    nodes = {n.name: n for n in g.graph.nodes}
    order = {n.name: i for i, n in enumerate(g.graph.nodes)}
    qnodes: dict[str, fx.Node] = {}
    last_placeholder = [n for n in g.graph.nodes if n.op == "placeholder"][-1]

    mutated = mutated_sources(g, {a["src"] for s in sites for a in s.plan.get("act", ())})

    def quantized(a: dict, site: Site) -> fx.Node:
        src = nodes[a["src"]]  # (a quantized layer's output is its replacement node by now)
        if a["src"] not in qnodes:
            anchor = last_placeholder if src.op == "placeholder" else src
            if src.op == "get_attr":
                anchor = src
            # a tensor written in place later (h.add_(1.0)) is quantized where it is read, not where it is made
            where = g.graph.inserting_before(nodes[site.name]) if a["src"] in mutated else g.graph.inserting_after(anchor)
            with where:
                q = g.graph.call_function(OPS.quantize.default, (src, a["scale"], a["zp"], 0, 255))
            q.meta["fxpress_quantize_site"] = site.name
            qnodes[a["src"]] = q
        return qnodes[a["src"]]

    for s in sorted(sites, key=lambda s: order[s.name]):
        node = nodes[s.name]
        p = s.plan
        base = s.label.replace(".", "_")
        with g.graph.inserting_before(node):
            if s.kind == "matmul":
                aq, bq = (quantized(a, s) for a in p["act"])
                a, b = p["act"]
                new = g.graph.call_function(OPS.qmatmul.default, (aq, a["scale"], a["zp"], bq, b["scale"], b["zp"]))
            else:
                w = g.graph.get_attr(_param(g, f"{base}_qweight", _weight_param(s)))
                ws = g.graph.get_attr(_param(g, f"{base}_wscale", p["w_scale"]))
                x = nodes[s.inputs[0]]
                conv = [s.conv["stride"], s.conv["padding"], s.conv["dilation"], s.conv["groups"]] if s.kind == "conv2d" else []
                if opts["mode"] == "static":
                    a = p["act"][0]
                    xq = quantized(a, s)
                    if s.conv1d:
                        xq = g.graph.call_function(torch.unsqueeze, (xq, 2))
                    bq = g.graph.get_attr(_param(g, f"{base}_qbias", p["bias_q"]))
                    if s.kind == "linear":
                        new = g.graph.call_function(OPS.qlinear.default, (xq, a["scale"], a["zp"], w, ws, bq, p["w_max"]))
                    else:
                        new = g.graph.call_function(OPS.qconv2d.default, (xq, a["scale"], a["zp"], w, ws, bq, *conv))
                else:
                    b = g.graph.get_attr(_param(g, f"{base}_bias", p["bias"]))
                    if s.conv1d:
                        x = g.graph.call_function(torch.unsqueeze, (x, 2))
                    if opts["mode"] == "dynamic":
                        new = g.graph.call_function(OPS.qlinear_dynamic.default, (x, w, ws, b, p["w_max"]))
                    else:
                        op = OPS.wlinear.default if s.kind == "linear" else OPS.wconv2d.default
                        new = g.graph.call_function(op, (x, w, ws, b, *conv))
                for extra in (w, ws):
                    extra.meta["fxpress_quantize_site"] = s.name
                if s.conv1d:
                    new.meta["fxpress_quantize_site"] = s.name
                    new = g.graph.call_function(torch.squeeze, (new, 2))
        new.meta["fxpress_quantize_site"] = s.name
        for k in ("tensor_meta", "stack_trace"):
            if k in node.meta:
                new.meta[k] = node.meta[k]
        node.replace_all_uses_with(new)
        g.graph.erase_node(node)
        nodes[s.name] = new  # later layers that read this one's output
    eliminate_dead_code(g)  # keeps in-place writes (fx's own DCE drops h.add_(1.0))
    g.delete_all_unused_submodules()
    g.recompile()
    return g


def _weight_param(s: Site) -> torch.Tensor:
    return s.plan["w"]


def _output_error(gm: fx.GraphModule, inputs: tuple, reference: list[torch.Tensor]) -> float:
    """The relative output error of ``gm`` on ``inputs`` (measure.output_error, the manager's measure)."""
    with torch.no_grad():
        outs = [t.detach() for t in flatten_outputs(gm(*inputs))]
    return output_error(outs, reference)[1]


# ----------------------------------------------------------------------------- per-layer numbers

def _weight_sqnr(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    shape = [q.shape[0], q.shape[1]] + [1] * (q.dim() - 2)
    deq = (q.float() * scale.reshape(shape)).sum(0)
    noise = float(((deq - w.detach().float()) ** 2).sum())
    sig = float((w.detach().float() ** 2).sum())
    return round(10 * math.log10(sig / noise), 2) if noise > 0 else math.inf


def _layer_error(s: Site, opts: dict) -> float | None:
    """Relative L2 error of this layer's output, quantized alone, on its first calibration batch."""
    p = s.plan
    x = s.sample
    with torch.no_grad():
        if s.kind == "matmul":
            ref = torch.matmul(x[0], x[1])
            a, b = p["act"]
            aq = OPS.quantize(x[0], a["scale"], a["zp"], 0, 255)
            bq = OPS.quantize(x[1], b["scale"], b["zp"], 0, 255)
            y = OPS.qmatmul(aq, a["scale"], a["zp"], bq, b["scale"], b["zp"])
        else:
            conv = [s.conv["stride"], s.conv["padding"], s.conv["dilation"], s.conv["groups"]] if s.kind == "conv2d" else []
            if s.conv1d:
                x = [x[0].unsqueeze(2)]
            w, b = s.weight.detach().float(), s.bias.detach().float() if s.bias is not None else None
            ref = F.linear(x[0], w, b) if s.kind == "linear" else F.conv2d(x[0], w, b, *conv)
            if opts["mode"] == "static":
                a = p["act"][0]
                xq = OPS.quantize(x[0], a["scale"], a["zp"], 0, 255)
                op = OPS.qlinear if s.kind == "linear" else OPS.qconv2d
                y = op(xq, a["scale"], a["zp"], p["w"], p["w_scale"], p["bias_q"], *conv)
            elif opts["mode"] == "dynamic":
                y = OPS.qlinear_dynamic(x[0], p["w"], p["w_scale"], p["bias"])
            else:
                op = OPS.wlinear if s.kind == "linear" else OPS.wconv2d
                y = op(x[0], p["w"], p["w_scale"], p["bias"], *conv)
    den = float(ref.double().norm())
    return float((y.double() - ref.double()).norm()) / den if den > 0 else float((y.double() - ref.double()).norm())
