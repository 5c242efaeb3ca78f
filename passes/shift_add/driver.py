"""The ``shift_add`` pass: Linear and Conv2d weights rounded to (sums of) signed powers of two.

Post-training, DeepShift-Q style: each weight becomes ``±2^-e`` (``e`` in [0, 14]) times a per-output-
channel float scale, packed in a 5-bit code (sign + 4-bit exponent, one uint8 per code); with
``terms=2`` each weight is the sum of two such powers (10 bits, far lower error, still multiply-free).
Converted layers become ``fxpress::shift_linear`` / ``fxpress::shift_conv2d`` ops that hold the codes as
uint8 parameters (never a float weight) and lower to TIR kernels that shift instead of multiply.
Optionally (``attention=True``) attention blocks ``softmax(q k^T c) v`` become ShiftAddViT-style
additive attention over sign-binarized q and k (``fxpress::binary_attention``) — a different function,
reported separately.

Options (``compile(options={"shift_add": {...}})`` or ``get_pass("shift_add", **opts)``):

=================  =========================================================================
terms              1 (default: 5-bit codes) or 2 (sum of two powers of two, 10 bits)
exp_bits           exponent field width, <= 4 (default 4: e in [0, 14])
mode               "auto" (default: on llvm, per layer, the variant measured fastest there: "int" for
                   matmuls with >= 16 rows, "float" for conv and few-row matmuls; "float" on other
                   targets), "int" (fixed-point activations, integer shifts), "float" (exponent add)
layers             names / fnmatch patterns of layers to convert (module paths, e.g. "layers.*.ffn.*");
                   listed layers are converted even when first or last
exclude            names / patterns to keep dense
keep_first_last    keep the first and last Linear/Conv dense (default True)
tolerance          relative output-error budget for automatic selection (default: compile's
                   tolerance). With a budget, layers are added from least to most sensitive while
                   the model's error stays under 0.9 × budget; without one, every candidate converts
attention          rewrite attention blocks to binarized additive attention (default False)
int_headroom       integer path: fixed point leaves this factor above the calibrated max |x| (4)
=================  =========================================================================

Report: per-layer rows (weight error, sensitivity, bits, bytes, multiplies removed) in
``PassResult.layers``; model-level totals in ``PassResult.metrics``. See docs/passes/shift_add.md.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxpress.errors import PassError

from ..base import Option, Pass, PassContext, PassResult, register_pass
from ..graph import add_frozen_params, cosine, eliminate_dead_code, finalize, flatten_outputs
from ..layer_scan import LayerScan
from ..measure import output_error
from ..stats import count_params, graph_costs, node_cost, shape_of
from ..trace import copy_graph_module
from ..weight_ops import CONV_T, EMBEDDING, LINEAR, WeightOp, as_conv2d
from . import ops
from .attention import find_attention, rewrite_attention

SHIFT_LINEAR = torch.ops.fxpress.shift_linear.default
SHIFT_CONV2D = torch.ops.fxpress.shift_conv2d.default

AUTO_INT_MIN_ROWS = 16  # mode "auto" on llvm: integer shifts for matmuls with at least this many rows
SAFETY = 0.9  # selection aims at 0.9 × budget so the manager's guard does not roll the pass back


@dataclass
class _Layer:
    key: str                      # module path (every layer is a module after weight_ops_lift)
    kind: str                     # "linear" | "conv2d"
    nodes: list[fx.Node]
    weight: torch.Tensor
    bias: torch.Tensor | None
    conv: dict[str, Any] = field(default_factory=dict)
    setter: Any = None            # callable(tensor) that swaps the layer's weight (trials)
    codes: torch.Tensor | None = None   # channel-major [T, out, K]
    scale: torch.Tensor | None = None
    weight_error: float = 0.0
    sensitivity: float | None = None
    frac_bits: int = -1
    mode: str = "float"

    @property
    def reduce_len(self) -> int:
        return self.weight[0].numel()

    def decoded(self) -> torch.Tensor:
        return ops.decode_pow2(self.codes, self.scale).reshape(self.weight.shape).to(self.weight.dtype)


@register_pass("shift_add", default=False)
class ShiftAddPass(Pass):
    lossy = True

    # ------------------------------------------------------------------ options
    OPTIONS = {
        "terms": Option((int,), 1, low=1, high=2, doc="1 (5-bit codes) or 2 (two powers of two)"),
        "exp_bits": Option((int,), ops.EXP_BITS, low=1, high=ops.EXP_BITS),
        "mode": Option((str,), "auto", choices=("auto", "int", "float")),
        "layers": Option((list, tuple, str, type(None)), None, doc="layer names / patterns to convert"),
        "exclude": Option((list, tuple, str, type(None)), None),
        "keep_first_last": Option((bool,), True, doc="keep the stem and the head dense"),
        "tolerance": Option((int, float, type(None)), None, low=0, open_low=True),
        "attention": Option((bool,), False),
        "int_headroom": Option((int, float), 4.0, low=1),
    }

    def _options(self, ctx: PassContext) -> dict[str, Any]:
        opt = {
            "terms": int(self.option(ctx, "terms", 1)),
            "exp_bits": int(self.option(ctx, "exp_bits", ops.EXP_BITS)),
            "mode": self.option(ctx, "mode", "auto"),
            "layers": self.option(ctx, "layers", None),
            "exclude": _as_list(self.option(ctx, "exclude", [])),
            "keep_first_last": bool(self.option(ctx, "keep_first_last", True)),
            "tolerance": self.option(ctx, "tolerance", ctx.tolerance),
            "attention": bool(self.option(ctx, "attention", False)),
            "int_headroom": float(self.option(ctx, "int_headroom", 4.0)),
        }
        if opt["terms"] not in (1, 2):
            raise PassError(f"shift_add: option terms={opt['terms']!r}; use 1 (5-bit codes) or 2 (two powers of two)")
        if not 1 <= opt["exp_bits"] <= ops.EXP_BITS:
            raise PassError(f"shift_add: option exp_bits={opt['exp_bits']!r}; use 1..{ops.EXP_BITS}")
        if opt["mode"] not in ("auto", "int", "float"):
            raise PassError(f"shift_add: option mode={opt['mode']!r}; use 'auto', 'int' or 'float'")
        if opt["mode"] == "auto" and ctx.target != "llvm":
            opt["mode"] = "float"  # measured only on llvm; elsewhere the exact float path
        if isinstance(opt["layers"], str):
            opt["layers"] = [opt["layers"]]
        if opt["tolerance"] is not None and not float(opt["tolerance"]) > 0:
            raise PassError(f"shift_add: tolerance must be a positive relative error, got {opt['tolerance']!r}")
        return opt

    # ------------------------------------------------------------------ run
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassResult]:
        opt = self._options(ctx)
        result = PassResult()
        params_before, bytes_before = count_params(gm)
        macs_before, mults_before = graph_costs(gm)
        layers = self._find_layers(gm, result)
        selected = self._choose(gm, layers, ctx, opt, result)
        for L in selected:
            L.mode = self._layer_mode(L, opt["mode"])
        int_layers = [L for L in selected if L.mode == "int"]
        if int_layers:
            self._calibrate(gm, int_layers, ctx, opt)
        for L in selected:
            self._rewrite(gm, L, opt, result)
        gm.recompile()  # the attention step runs the graph as rewritten so far
        att_error = None
        if opt["attention"]:
            att_error = self._attention(gm, ctx, opt, result)
        finalize(gm)
        self._scan.count(result, {c for r in result.rewrites if r.kind.startswith("shift_") for c in r.consumed})

        params_after, bytes_after = count_params(gm)
        macs_after, mults_after = graph_costs(gm)
        nominal = (1 + opt["exp_bits"]) * opt["terms"]
        conv_weights = sum(L.weight.numel() for L in selected)
        m = result.metrics
        m.update(
            mode=opt["mode"], int_layers=len(int_layers), terms=opt["terms"], layers_converted=len(selected),
            layers_found=len(layers),
            weights_converted=conv_weights, bits_per_weight=nominal, stored_bits_per_weight=8 * opt["terms"],
            converted_bytes_before=sum(r["bytes_before"] for r in result.layers),
            converted_bytes_after=sum(r["bytes_after"] for r in result.layers),
            converted_bytes_packed=sum(r["bytes_packed"] for r in result.layers),
            model_bytes_before=bytes_before, model_bytes_after=bytes_after,
            params_before=params_before, params_after=params_after,
            multiplies_before=mults_before, multiplies_after=mults_after,
            multiplies_removed=mults_before - mults_after, macs_before=macs_before, macs_after=macs_after,
        )
        if opt["attention"]:
            m["attention_rewrites"] = sum(1 for r in result.rewrites if r.kind == "binary_attention")
            m["attention_added_error"] = att_error
        with torch.no_grad():
            y = flatten_outputs(gm(*ctx.example_inputs))
        if ctx.reference_outputs is not None:
            m["output_rel_error"] = output_error(y, ctx.reference_outputs)[1]
            m["output_cosine"] = min(cosine(a, b) for a, b in zip(y, ctx.reference_outputs))
        return gm, result

    # ------------------------------------------------------------------ candidates
    def _find_layers(self, gm: fx.GraphModule, result: PassResult) -> list[_Layer]:
        scan = self._scan = LayerScan.of(gm, result)
        by_key: dict[str, _Layer] = {}
        order: list[str] = []
        for w in scan.ops:
            L = self._layer_of(w, result)
            if L is None:
                continue
            if L.key in by_key:
                by_key[L.key].nodes.append(w.node)
            else:
                by_key[L.key] = L
                order.append(L.key)
        return [by_key[k] for k in order]

    @staticmethod
    def _layer_of(w: WeightOp, result: PassResult) -> _Layer | None:
        if w.kind == EMBEDDING:
            result.skip(w.node, f"{w.label}: embedding (a lookup table): stays fp32")
            return None
        if w.kind == CONV_T:
            result.skip(w.node, f"{w.describe()}: transposed convolution is not converted; stays dense")
            return None
        if w.module is None:
            result.skip(w.node, f"{w.describe()}: could not be lifted to a module; stays dense")
            return None
        if w.weight.dtype != torch.float32:
            result.skip(w.node, f"weight dtype {w.weight.dtype}; shift_add converts float32 layers")
            return None
        if w.kind == LINEAR:
            return _Layer(w.key, "linear", [w.node], w.weight.detach(), _detach(w.bias), setter=_param_setter(w.module))
        geo = as_conv2d(w)
        if geo is None:
            result.skip(w.node, f"{w.describe()}: 3-D conv or asymmetric 'same' padding; stays dense")
            return None
        weight, g = geo
        conv = dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"], groups=g["groups"])
        return _Layer(w.key, "conv2d", [w.node], weight.detach(), _detach(w.bias), conv,
                      setter=_param_setter(w.module))

    # ------------------------------------------------------------------ selection
    def _choose(self, gm, layers: list[_Layer], ctx: PassContext, opt: dict, result: PassResult) -> list[_Layer]:
        if not layers:
            return []
        names = [L.key for L in layers]
        if opt["layers"] is not None:
            unknown = [p for p in opt["layers"] if not any(fnmatch.fnmatchcase(n, p) for n in names)]
            if unknown:
                raise PassError(f"shift_add: option layers names {unknown}, which match no Linear/Conv2d layer. "
                                f"Convertible layers: {names}")
            picked = [L for L in layers if any(fnmatch.fnmatchcase(L.key, p) for p in opt["layers"])]
            for L in layers:
                if L not in picked:
                    result.skip(L.nodes[0], "not listed in option 'layers'")
        else:
            picked = list(layers)
            if opt["keep_first_last"]:
                stems, heads = self._scan.stems, self._scan.heads
                for L in [L for L in picked if L.nodes[0].name in stems | heads]:
                    what = "stem (first layer on the raw input)" if L.nodes[0].name in stems else "head (last layer)"
                    result.skip(L.nodes[0], f"{what} stays dense (keep_first_last=True)")
                picked = [L for L in picked if L.nodes[0].name not in stems | heads]
        keep = [L for L in picked if any(fnmatch.fnmatchcase(L.key, p) for p in opt["exclude"])]
        for L in keep:
            result.skip(L.nodes[0], "excluded by option 'exclude'")
        picked = [L for L in picked if L not in keep]
        for L in picked:
            L.codes, L.scale = ops.encode_pow2(L.weight, opt["terms"], opt["exp_bits"])
            L.weight_error = float((L.decoded() - L.weight).norm() / L.weight.norm().clamp_min(1e-30))
        if opt["tolerance"] is None or opt["layers"] is not None or not picked:
            return picked
        return self._by_sensitivity(gm, picked, ctx, float(opt["tolerance"]), result)

    def _by_sensitivity(self, gm, picked: list[_Layer], ctx: PassContext, tol: float,
                        result: PassResult) -> list[_Layer]:
        """Greedy: least sensitive first, keep a layer only if the model error stays under 0.9 × tol."""
        ref = ctx.reference_outputs
        if ref is None:
            with torch.no_grad():
                ref = flatten_outputs(gm(*ctx.example_inputs))

        def error(active: list[_Layer]) -> float:
            for L in active:
                L.setter(L.decoded())
            try:
                with torch.no_grad():
                    y = flatten_outputs(gm(*ctx.example_inputs))
            finally:
                for L in active:
                    L.setter(L.weight)
            return output_error(y, ref)[1]

        base = error([])
        for L in picked:
            L.sensitivity = error([L]) - base
        budget = SAFETY * tol
        chosen: list[_Layer] = []
        for L in sorted(picked, key=lambda L: L.sensitivity):
            err = error(chosen + [L])
            if err <= budget:
                chosen.append(L)
            else:
                result.skip(L.nodes[0], f"converting it raises the output error to {err:.3g} > "
                                        f"{SAFETY} × tolerance {tol:g} (sensitivity {L.sensitivity:.3g})")
        result.notes.append(f"sensitivity selection: {len(chosen)}/{len(picked)} layers within "
                            f"{SAFETY} × tolerance {tol:g} (error before this pass {base:.3g})")
        order = {id(L): i for i, L in enumerate(picked)}
        return sorted(chosen, key=lambda L: order[id(L)])

    @staticmethod
    def _layer_mode(L: _Layer, mode: str) -> str:
        """"auto" (llvm): the kernel variant measured fastest for the layer's shape on this CPU.

        benchmarks/results/shift_add_cpu_t1.md: the integer shift won on compute-bound matmuls
        (1.3-1.4x over the float exponent add at 64-128 rows); the float path won on conv2d (1.3x)
        and on GEMV-like matmuls with few rows (1.5x), where the integer path's quantize pass costs more.
        """
        if mode != "auto":
            return mode
        if L.kind != "linear":
            return "float"
        rows = min(math.prod(shape_of(n) or (0,)) // L.weight.shape[0] for n in L.nodes)
        return "int" if rows >= AUTO_INT_MIN_ROWS else "float"

    # ------------------------------------------------------------------ integer path calibration
    def _calibrate(self, gm, layers: list[_Layer], ctx: PassContext, opt: dict) -> None:
        """max |x| entering each layer over the calibration batches → fraction bits."""
        watch = {n: L for L in layers for n in L.nodes}
        amax: dict[str, float] = {L.key: 0.0 for L in layers}

        class _Probe(fx.Interpreter):
            def run_node(self, n):
                if n in watch:
                    x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
                    if isinstance(x, torch.Tensor) and x.numel():
                        key = watch[n].key
                        amax[key] = max(amax[key], float(x.detach().abs().max()))
                return super().run_node(n)

        with torch.no_grad():
            for batch in ctx.calibration_batches(8, gm):
                _Probe(gm).run(*batch)
        for L in layers:
            L.frac_bits = ops.frac_bits_for(amax[L.key], opt["terms"], L.reduce_len, opt["int_headroom"])

    # ------------------------------------------------------------------ rewriting
    def _rewrite(self, gm: fx.GraphModule, L: _Layer, opt: dict, result: PassResult) -> None:
        if L.kind == "linear":
            codes = ops.linear_codes(L.codes)
        else:
            codes = ops.conv_codes(L.codes, L.weight.shape)
        out_ch = L.weight.shape[0]
        bias = L.bias if L.bias is not None else torch.zeros(out_ch, dtype=L.weight.dtype)
        names = add_frozen_params(gm, L.key, {"shift_codes": codes, "shift_scale": L.scale, "shift_bias": bias})
        frac = L.frac_bits if L.mode == "int" else -1
        cv = L.conv

        def call(g: fx.Graph, x: fx.Node, c: fx.Node, s: fx.Node, b: fx.Node) -> fx.Node:
            if L.kind == "linear":
                return g.call_function(SHIFT_LINEAR, (x, c, s, b, frac))
            return g.call_function(SHIFT_CONV2D, (x, c, s, b, list(cv["stride"]), list(cv["padding"]),
                                                  list(cv["dilation"]), int(cv["groups"]), frac))

        dense_mults = sum(node_cost(node, gm)[0] for node in L.nodes)
        after_mults = sum(math.prod(shape_of(node) or (0,)) for node in L.nodes)  # one multiply per output
        produced = self._scan.replace_calls(gm, L.nodes, names, call)
        packed_bytes = (L.codes.numel() * (1 + opt["exp_bits"]) + 7) // 8  # ops.pack_bitstream's size
        row = dict(
            layer=L.key, op=L.kind, weight_shape=list(L.weight.shape), terms=opt["terms"],
            bits_per_weight=(1 + opt["exp_bits"]) * opt["terms"], mode=L.mode, frac_bits=frac,
            weight_rel_error=round(L.weight_error, 6),
            sensitivity=None if L.sensitivity is None else float(L.sensitivity),
            bytes_before=L.weight.numel() * L.weight.element_size(),
            bytes_after=codes.numel() * codes.element_size() + L.scale.numel() * 4,
            bytes_packed=packed_bytes + L.scale.numel() * 4,
            multiplies_before=dense_mults, multiplies_after=after_mults,
            zero_fraction=float((ops.unpack_codes(L.codes)[1] == ops.ZERO_EXP).all(0).float().mean()),
        )
        result.layers.append(row)
        result.rewrite("shift_" + L.kind, L.nodes, produced, layer=L.key, terms=opt["terms"],
                       weight_error=round(L.weight_error, 4))

    # ------------------------------------------------------------------ attention
    def _attention(self, gm: fx.GraphModule, ctx: PassContext, opt: dict, result: PassResult) -> float | None:
        """Rewrite every attention block, after measuring the rewrite on a copy of the graph.

        Returns the output error the rewrite adds. With a tolerance, a rewrite that would push the
        model past 0.9 × tolerance is skipped (and reported) instead of rolling back the whole pass.
        """
        matches = find_attention(gm)
        if not matches:
            result.notes.append("attention=True but no softmax(q @ k^T) @ v block was found")
            return None
        with torch.no_grad():
            before = flatten_outputs(gm(*ctx.example_inputs))
        ref = ctx.reference_outputs if ctx.reference_outputs is not None else before
        trial = copy_graph_module(gm)
        for mt in find_attention(trial):
            rewrite_attention(trial, mt)
        eliminate_dead_code(trial)  # keeps in-place writes
        trial.recompile()
        with torch.no_grad():
            after = flatten_outputs(trial(*ctx.example_inputs))
        err_before, err_after = output_error(before, ref)[1], output_error(after, ref)[1]
        cos = min(cosine(a, b) for a, b in zip(after, ref))
        result.metrics["attention_output_rel_error"] = err_after
        result.metrics["attention_output_cosine"] = cos
        tol = opt["tolerance"]
        if tol is not None and err_after > SAFETY * float(tol):
            for mt in matches:
                result.skip(mt.out, f"binarized attention would raise the output error to {err_after:.3g} > "
                                    f"{SAFETY} × tolerance {float(tol):g}; kept softmax attention")
            return None
        for mt in matches:
            new = rewrite_attention(gm, mt)
            result.rewrite("binary_attention", mt.nodes, [new])
        result.notes.append(f"binarized additive attention on {len(matches)} block(s): output error "
                            f"{err_before:.3g} -> {err_after:.3g}, cosine {cos:.4f} (changes the function)")
        return err_after - err_before


def _detach(t):
    return None if t is None else t.detach()


def _param_setter(mod: nn.Module):
    shape = mod.weight.shape  # a Conv1d's [out, in, k] takes the [out, in, 1, k] trial weight reshaped

    def set_weight(w: torch.Tensor) -> None:
        mod.weight.data = w.reshape(shape)
    return set_weight


def _as_list(v) -> list:
    if v is None:
        return []
    return [v] if isinstance(v, str) else list(v)
