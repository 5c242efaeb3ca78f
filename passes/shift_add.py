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
import torch.nn.functional as F
from torch import fx, nn

from fxpress.errors import PassError

from . import shift_add_ops as ops
from .base import Pass, PassContext, PassResult, register_pass
from .graph import finalize, flatten_outputs, unique_name
from .trace import copy_graph_module
from .manager import output_error
from .shift_add_attention import find_attention, rewrite_attention
from .stats import count_params, graph_costs, node_cost, shape_of

SHIFT_LINEAR = torch.ops.fxpress.shift_linear.default
SHIFT_CONV2D = torch.ops.fxpress.shift_conv2d.default

_F_LINEAR = {F.linear, torch.ops.aten.linear.default}
_F_CONV2D = {F.conv2d, torch.ops.aten.conv2d.default}
AUTO_INT_MIN_ROWS = 16  # mode "auto" on llvm: integer shifts for matmuls with at least this many rows
SAFETY = 0.9  # selection aims at 0.9 × budget so the manager's guard does not roll the pass back


@dataclass
class _Layer:
    key: str                      # module path, or the weight attribute for functional layers
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
    functional: bool = False      # F.linear / F.conv2d on get_attr weights (not a module)
    attrs: tuple[str, ...] = ()   # functional layers: the weight / bias attributes read

    @property
    def reduce_len(self) -> int:
        return self.weight[0].numel()

    def decoded(self) -> torch.Tensor:
        return ops.decode_pow2(self.codes, self.scale).reshape(self.weight.shape).to(self.weight.dtype)


def _attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(gm: nn.Module, target: str, value) -> None:
    *path, last = target.split(".")
    obj = gm
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _conv_padding(padding, kernel, dilation) -> list[int] | None:
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0]
        if padding == "same" and all((d * (k - 1)) % 2 == 0 for k, d in zip(kernel, dilation)):
            return [d * (k - 1) // 2 for k, d in zip(kernel, dilation)]
        return None
    return list(padding) if isinstance(padding, (tuple, list)) else [int(padding)] * 2


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v)] * 2


@register_pass("shift_add", default=False)
class ShiftAddPass(Pass):
    lossy = True
    wants_calibration = True  # integer path: activation ranges (falls back to the example inputs)

    # ------------------------------------------------------------------ options
    def _options(self, ctx: PassContext) -> dict[str, Any]:
        opt = {
            "terms": int(self.option(ctx, "terms", 1)),
            "exp_bits": int(self.option(ctx, "exp_bits", ops.EXP_BITS)),
            "mode": self.option(ctx, "mode", "auto"),
            "layers": self.option(ctx, "layers", None),
            "exclude": list(self.option(ctx, "exclude", []) or []),
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
        _drop_unused_weights(gm, [L for L in selected if L.functional])

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
            m["output_cosine"] = min(_cosine(a, b) for a, b in zip(y, ctx.reference_outputs))
        return gm, result

    # ------------------------------------------------------------------ candidates
    def _find_layers(self, gm: fx.GraphModule, result: PassResult) -> list[_Layer]:
        by_key: dict[str, _Layer] = {}
        order: list[str] = []
        for node in gm.graph.nodes:
            L = self._layer_of(gm, node, result)
            if L is None:
                continue
            if L.key in by_key:
                by_key[L.key].nodes.append(node)
            else:
                by_key[L.key] = L
                order.append(L.key)
        return [by_key[k] for k in order]

    def _layer_of(self, gm: fx.GraphModule, node: fx.Node, result: PassResult) -> _Layer | None:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if type(mod) is nn.Linear:
                if mod.weight.dtype != torch.float32:
                    result.skip(node, f"weight dtype {mod.weight.dtype}; shift_add converts float32 layers")
                    return None
                return _Layer(node.target, "linear", [node], mod.weight.detach(), _detach(mod.bias),
                              setter=_param_setter(mod))
            if type(mod) is nn.Conv2d:
                pad = _conv_padding(mod.padding, mod.kernel_size, mod.dilation)
                if mod.padding_mode != "zeros" or pad is None:
                    result.skip(node, f"padding {mod.padding!r} / mode {mod.padding_mode!r} not supported; stays dense")
                    return None
                if mod.weight.dtype != torch.float32:
                    result.skip(node, f"weight dtype {mod.weight.dtype}; shift_add converts float32 layers")
                    return None
                conv = dict(stride=_pair(mod.stride), padding=pad, dilation=_pair(mod.dilation), groups=mod.groups)
                return _Layer(node.target, "conv2d", [node], mod.weight.detach(), _detach(mod.bias), conv,
                              setter=_param_setter(mod))
            return None
        if node.op != "call_function" or node.target not in (_F_LINEAR | _F_CONV2D):
            return None
        args = list(node.args) + [None] * 7
        w_node = args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        b_node = node.kwargs.get("bias", args[2])
        if not isinstance(w_node, fx.Node) or w_node.op != "get_attr" or (
                b_node is not None and (not isinstance(b_node, fx.Node) or b_node.op != "get_attr")):
            result.skip(node, "weight or bias is computed in the graph, not a stored tensor; stays dense")
            return None
        w = _attr(gm, w_node.target)
        b = _attr(gm, b_node.target) if b_node is not None else None
        if w.dtype != torch.float32:
            return None
        setter = _attr_setter(gm, w_node.target)
        attrs = (w_node.target,) + ((b_node.target,) if b_node is not None else ())
        if node.target in _F_LINEAR:
            return _Layer(w_node.target, "linear", [node], w.detach(), _detach(b), setter=setter, functional=True,
                          attrs=attrs)
        kernel = tuple(w.shape[2:])
        stride = _pair(node.kwargs.get("stride", args[3] if args[3] is not None else 1))
        dilation = _pair(node.kwargs.get("dilation", args[5] if args[5] is not None else 1))
        pad = _conv_padding(node.kwargs.get("padding", args[4] if args[4] is not None else 0), kernel, dilation)
        groups = int(node.kwargs.get("groups", args[6] if args[6] is not None else 1))
        if pad is None or w.dim() != 4:
            result.skip(node, "conv padding/shape not supported; stays dense")
            return None
        return _Layer(w_node.target, "conv2d", [node], w.detach(), _detach(b),
                      dict(stride=stride, padding=pad, dilation=dilation, groups=groups), setter=setter,
                      functional=True, attrs=attrs)

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
                ends = {layers[0].key, layers[-1].key}
                for L in [L for L in picked if L.key in ends]:
                    result.skip(L.nodes[0], "first/last layer stays dense (keep_first_last=True)")
                picked = [L for L in picked if L.key not in ends]
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
            for batch in ctx.calibration_batches(8):
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
        base = L.key.replace(".", "_")
        names = []
        for suffix, t in (("shift_codes", codes), ("shift_scale", L.scale), ("shift_bias", bias)):
            name = unique_name(gm, f"{base}_{suffix}")
            gm.register_parameter(name, nn.Parameter(t.detach().clone().contiguous(), requires_grad=False))
            names.append(name)
        frac = L.frac_bits if L.mode == "int" else -1
        dense_mults = after_mults = 0
        produced = []
        for node in L.nodes:
            dm, _ = node_cost(node, gm)
            with gm.graph.inserting_before(node):
                c, s, b = (gm.graph.get_attr(n) for n in names)
                if L.kind == "linear":
                    new = gm.graph.call_function(SHIFT_LINEAR, (node.args[0], c, s, b, frac))
                else:
                    cv = L.conv
                    new = gm.graph.call_function(SHIFT_CONV2D, (node.args[0], c, s, b, list(cv["stride"]),
                                                                list(cv["padding"]), list(cv["dilation"]),
                                                                int(cv["groups"]), frac))
            new.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "stack_trace")})
            out = math.prod(shape_of(node) or (0,))
            dense_mults += dm
            after_mults += out
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            produced.append(new)
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
        trial.graph.eliminate_dead_code()
        trial.recompile()
        with torch.no_grad():
            after = flatten_outputs(trial(*ctx.example_inputs))
        err_before, err_after = output_error(before, ref)[1], output_error(after, ref)[1]
        cos = min(_cosine(a, b) for a, b in zip(after, ref))
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


def _drop_unused_weights(gm: fx.GraphModule, layers: list[_Layer]) -> None:
    """Delete the float weights (and biases) of converted functional layers nothing reads any more."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in {t for L in layers for t in L.attrs} - used:
        *path, last = target.split(".")
        owner = gm.get_submodule(".".join(path)) if path else gm
        if hasattr(owner, last):
            delattr(owner, last)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 1.0


def _detach(t):
    return None if t is None else t.detach()


def _param_setter(mod: nn.Module):
    def set_weight(w: torch.Tensor) -> None:
        mod.weight.data = w
    return set_weight


def _attr_setter(gm: nn.Module, target: str):
    def set_weight(w: torch.Tensor) -> None:
        cur = _attr(gm, target)
        if isinstance(cur, nn.Parameter):
            cur.data = w
        else:
            _set_attr(gm, target, w)
    return set_weight
