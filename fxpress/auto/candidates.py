"""Per-layer candidates of the auto search, and the pass pipeline that realizes a configuration.

A *configuration* maps each layer (the weight key ``passes.weight_ops`` gives it, after ``fuse``) to one
``Candidate``. Every technique is an existing pass restricted to the layers that chose it through its own
per-layer options, so the auto search adds no new numerics:

- ``int8``   quantize, static int8 activations x int8 weights (``skip`` = every other layer);
- ``w4``     quantize, weight-only int4 (a renamed QuantizePass, since a pipeline runs each pass name once);
- ``lr<r>``  low_rank, activation-aware, at rank ``r`` (``rank={key: r}``; unlisted layers are left alone);
- ``shift``  shift_add, one power-of-two term (``layers=[key]``, ``keep_first_last=False``);
- ``lr<r>+int8`` (Linear layers, when both low_rank and int8 are allowed) low_rank at rank ``r`` written as
  two Linear calls (``as_linears``), each then quantized by the int8 pass: fewer multiply-adds and a
  quarter of the bytes, from one technique's error on top of the other's.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass

from fxpress.passes import Pass, get_pass
from fxpress.passes.quantize import QuantizePass
from fxpress.passes.weight_ops import CONV, LINEAR, WeightOp, find_weight_ops

TECHNIQUES = ("int8", "w4", "low_rank", "shift_add")
LOW_RANK_INT8 = "low_rank+int8"  # a combination, offered when both of its techniques are
# Fractions of the dense weight count a low-rank candidate keeps ((out + in) * r / (out * in)).
LOW_RANK_KEEP = (0.125, 0.25, 0.5)


class WeightOnlyQuantize(QuantizePass):
    """quantize under a second name, so one pipeline can hold int8 layers and weight-only int4 layers."""

    name = "quantize_w4"


@dataclass(frozen=True)
class Candidate:
    name: str        # "fp32" | "int8" | "w4" | "lr16" | "shift"
    technique: str   # "fp32" or one of TECHNIQUES
    rank: int = 0    # low_rank only

    def __str__(self) -> str:
        return self.name


FP32 = Candidate("fp32", "fp32")


@dataclass
class Layer:
    """One weight-bearing layer of the fused graph the search chooses for."""

    key: str                  # weight key (shared call sites share it)
    label: str                # for the report
    names: list[str]          # node names of its call sites (quantize's ``skip`` matches these)
    kind: str                 # "linear" | "conv"
    out: int                  # output features / channels
    d: int                    # reduction length (in features, or in/groups * kernel)
    weight_params: int
    candidates: list[Candidate]

    def describe(self) -> str:
        return f"{self.label} ({self.kind} {self.out}x{self.d})"


def find_layers(gm, techniques: tuple[str, ...]) -> list[Layer]:
    """The Linear / Conv layers of ``gm`` (after fuse) and the candidates each one can take."""
    layers: dict[str, Layer] = {}
    for w in find_weight_ops(gm).ops:
        if w.kind not in (LINEAR, CONV):
            continue
        if w.key in layers:
            layers[w.key].names.append(w.node.name)
            continue
        out, d = int(w.weight.shape[0]), int(w.weight[0].numel())
        layers[w.key] = Layer(w.key, w.label, [w.node.name], w.kind, out, d, int(w.weight.numel()),
                              _candidates_for(w, out, d, techniques))
    return list(layers.values())


def _candidates_for(w: WeightOp, out: int, d: int, techniques: tuple[str, ...]) -> list[Candidate]:
    cands = [FP32]
    if "int8" in techniques:
        cands.append(Candidate("int8", "int8"))
    if "w4" in techniques:
        cands.append(Candidate("w4", "w4"))
    grouped = w.kind == CONV and (w.conv is None or w.conv.groups != 1 or w.conv.dims == 3)
    if "low_rank" in techniques and not grouped:
        full = min(out, d)
        ranks = sorted({max(1, int(keep * out * d / (out + d))) for keep in LOW_RANK_KEEP})
        for r in ranks:
            if r < full and (out + d) * r <= 0.9 * out * d:  # low_rank's min_saving is 0.1
                cands.append(Candidate(f"lr{r}", "low_rank", rank=r))
                if "int8" in techniques and w.kind == LINEAR:
                    cands.append(Candidate(f"lr{r}+int8", LOW_RANK_INT8, rank=r))
    if "shift_add" in techniques and not (w.kind == CONV and w.conv is not None and w.conv.dims == 3):
        cands.append(Candidate("shift", "shift_add"))
    return cands


def build_passes(layers: list[Layer], config: dict[str, Candidate]) -> list[Pass]:
    """``fuse`` plus each technique's pass restricted to the layers that chose it (none: the pass is left out)."""
    by_tech: dict[str, list[Layer]] = {}
    for L in layers:
        c = config.get(L.key, FP32)
        if c.technique != "fp32":
            by_tech.setdefault(c.technique, []).append(L)
    out: list[Pass] = [get_pass("fuse")]
    factored = by_tech.get("low_rank", []) + by_tech.get(LOW_RANK_INT8, [])
    if factored:
        out.append(get_pass("low_rank", method="activation_aware", min_layer_size=0,
                            rank={L.key: config[L.key].rank for L in factored},
                            as_linears=[L.key for L in by_tech.get(LOW_RANK_INT8, [])]))
    if "shift_add" in by_tech:
        out.append(get_pass("shift_add", keep_first_last=False,
                            layers=[glob.escape(L.key) for L in by_tech["shift_add"]]))
    for tech, cls, opts in (("int8", QuantizePass, dict(mode="static", bits=8)),
                            ("w4", WeightOnlyQuantize, dict(mode="weight_only", bits=4))):
        # int8 also takes the two factors of every lr<r>+int8 layer (new nodes: in no skip list)
        takes = by_tech.get(tech, []) + (by_tech.get(LOW_RANK_INT8, []) if tech == "int8" else [])
        if takes:
            chosen = {L.key for L in takes}
            skip = [n for L in layers if L.key not in chosen for n in L.names + [L.label]]
            out.append(cls(matmul=False, skip=skip, **opts))
    return out


def describe(config: dict[str, Candidate], layers: list[Layer]) -> str:
    """``conv0=int8 fc1=lr16 ...`` (fp32 layers left out); ``all fp32`` when nothing is compressed."""
    parts = [f"{L.label}={config[L.key]}" for L in layers if config.get(L.key, FP32) != FP32]
    return " ".join(parts) or "all fp32"
