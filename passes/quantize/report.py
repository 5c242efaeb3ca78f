"""The quantize pass's report: a row per site and the model-level numbers."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..base import PassResult
from .sites import Site

OPS = torch.ops.fxpress


def report(sites: list[Site], chosen: list[Site], sensitivity: dict[str, float], opts: dict, err: float,
           result: PassResult) -> None:
    """Per-site rows (scales, clipping, SQNR, error alone, sensitivity) and the model-level metrics."""
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
