"""BatchNorm folding: an eval-mode BN is the per-channel affine map y = s·x + t, with
s = γ / sqrt(var + ε) and t = β − mean·s. It folds

- *after* a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear whose output only it reads
  (output channel c of the layer is scaled by s[c], its bias becomes b·s + t), and otherwise
- *before* the Conv/Linear layers that are its only readers (input channel c of their weights
  is scaled by s[c], and t pushed through the weights into the bias), where that is exact:
  a Linear always; a Conv when it pads nothing, pads by copying input values (reflect /
  replicate / circular), or t = 0; a ConvTranspose only when t = 0 (its border outputs sum
  fewer inputs, so a constant input shift is not a constant output shift).

All arithmetic is done in float64 and cast back to the layer's dtype.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from ..base import PassResult
from .common import (AFFINE_LAYER_TYPES, BN_TYPES, CONV_TYPES, CONVT_TYPES, FuseState, is_inplace, kind_of,
                            module_of, own_module, rank, set_param)


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 for an eval-mode BN with running statistics."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    inv = torch.rsqrt(var + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma * inv
    return scale, beta - mean * scale


def bn_unfoldable_reason(bn: nn.Module) -> str | None:
    if bn.training:
        return "BatchNorm is in training mode (normalises with batch statistics); call model.eval() first"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return ("BatchNorm has track_running_stats=False: it normalises with batch statistics even in eval "
                "mode, so it is not a fixed affine map")
    return None


# ----------------------------------------------------------------------------- fold after a layer

def _after_reason(gm: fx.GraphModule, bn_node: fx.Node, bn: nn.Module) -> str | None:
    prod = bn_node.args[0]
    if not isinstance(prod, fx.Node) or prod.op == "placeholder":
        return "its input is a graph input, not a conv/linear output"
    layer = module_of(gm, prod)
    if not isinstance(layer, AFFINE_LAYER_TYPES):
        return f"its producer '{prod.name}' ({kind_of(gm, prod)}) is not a Conv/ConvTranspose/Linear"
    if len(prod.users) > 1:
        others = sorted(u.name for u in prod.users if u is not bn_node)
        return (f"its producer '{prod.name}' has other users ({', '.join(others)}) that need the unnormalised "
                "output")
    out_ch = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out_ch != bn.num_features:
        return f"producer '{prod.name}' has {out_ch} output channels, BatchNorm {bn.num_features}"
    if isinstance(layer, nn.Linear) and rank(bn_node) != 2:
        return (f"BatchNorm after Linear '{prod.name}' on a rank-{rank(bn_node)} tensor normalises dim 1, "
                "not the Linear's feature dim")
    return None


def _fold_after(state: FuseState, bn_node: fx.Node, bn: nn.Module) -> None:
    gm = state.gm
    prod = bn_node.args[0]
    layer = own_module(gm, prod, "bn")
    scale, shift = bn_affine(bn)
    w = layer.weight.detach().double()
    if isinstance(layer, CONVT_TYPES):  # weight [in, out/groups, k...]
        g = layer.groups
        shaped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        new_w = (shaped * scale.reshape(g, 1, w.shape[1], *[1] * (w.dim() - 2))).reshape(w.shape)
    else:  # conv [out, in/groups, k...], linear [out, in]
        new_w = w * scale.reshape(-1, *[1] * (w.dim() - 1))
    added_bias = layer.bias is None
    bias = torch.zeros_like(scale) if added_bias else layer.bias.detach().double()
    new_b = bias * scale + shift
    set_param(layer, "weight", new_w, layer.weight)
    set_param(layer, "bias", new_b, layer.weight if added_bias else layer.bias)
    bn_node.replace_all_uses_with(prod)
    gm.graph.erase_node(bn_node)
    state.result.rewrite("fold_bn_after", [prod, bn_node], [prod], layer=type(layer).__name__,
                         added_bias=added_bias)


# ----------------------------------------------------------------------------- fold before layers

def _zero_padding(conv: nn.Module) -> bool:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return True
        return all(d * (k - 1) == 0 for d, k in zip(conv.dilation, conv.kernel_size))  # "same"
    return all(p == 0 for p in conv.padding)


def _before_reason(gm: fx.GraphModule, bn_node: fx.Node, bn: nn.Module, shift: torch.Tensor) -> str | None:
    users = list(bn_node.users)
    if not users:
        return "its output is unused"
    src = bn_node.args[0]
    if isinstance(src, fx.Node) and any(is_inplace(gm, u) for u in src.users):
        return f"its input '{src.name}' is modified in place, which the BN output was shielded from"
    no_shift = bool((shift == 0).all())
    for u in users:
        if u.op == "output":
            return "it is a graph output"
        layer = module_of(gm, u)
        if not isinstance(layer, AFFINE_LAYER_TYPES) or u.args != (bn_node,) or u.kwargs:
            return f"its consumer '{u.name}' ({kind_of(gm, u)}) is not a Conv/Linear reading it as input"
        in_ch = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        if in_ch != bn.num_features:
            return f"consumer '{u.name}' has {in_ch} input channels, BatchNorm {bn.num_features}"
        if isinstance(layer, nn.Linear):
            if rank(bn_node) != 2:
                return (f"BatchNorm before Linear '{u.name}' on a rank-{rank(bn_node)} tensor normalises dim 1, "
                        "not the Linear's feature dim")
        elif isinstance(layer, CONV_TYPES):
            if not (no_shift or _zero_padding(layer) or layer.padding_mode != "zeros"):
                return (f"consumer '{u.name}' zero-pads its input: the padded zeros would not get the BN shift, "
                        "so folding is not exact")
        elif isinstance(layer, CONVT_TYPES) and not no_shift:
            return (f"consumer '{u.name}' is a ConvTranspose: border outputs sum fewer inputs, so the BN shift "
                    "does not fold exactly")
    return None


def _fold_before(state: FuseState, bn_node: fx.Node, bn: nn.Module) -> None:
    gm = state.gm
    scale, shift = bn_affine(bn)
    users = list(bn_node.users)
    for u in users:
        layer = own_module(gm, u, "bn")
        w = layer.weight.detach().double()
        bias = layer.bias.detach().double() if layer.bias is not None else None
        k = [1] * (w.dim() - 2)
        if isinstance(layer, nn.Linear):
            new_w = w * scale[None, :]
            extra = w @ shift
        elif isinstance(layer, CONV_TYPES):  # [out, in/g, k...]: input channel of (o, i) is group(o)·in/g + i
            g = layer.groups
            o, ig = w.shape[0], w.shape[1]
            shaped = w.reshape(g, o // g, ig, *w.shape[2:])
            new_w = (shaped * scale.reshape(g, 1, ig, *k)).reshape(w.shape)
            extra = (shaped * shift.reshape(g, 1, ig, *k)).reshape(g, o // g, -1).sum(-1).reshape(o)
        else:  # ConvTranspose [in, out/g, k...], shift is zero
            new_w = w * scale.reshape(-1, 1, *k)
            extra = torch.zeros(layer.out_channels, dtype=torch.float64)
        set_param(layer, "weight", new_w, layer.weight)
        if bias is not None or bool((extra != 0).any()):
            new_b = (bias if bias is not None else torch.zeros_like(extra)) + extra
            set_param(layer, "bias", new_b, layer.bias if layer.bias is not None else layer.weight)
    src = bn_node.args[0]
    bn_node.replace_all_uses_with(src)
    gm.graph.erase_node(bn_node)
    state.result.rewrite("fold_bn_before", [bn_node] + users, users,
                         layers=[type(module_of(gm, u)).__name__ for u in users])


# ----------------------------------------------------------------------------- steps

def fold_into_producers(gm: fx.GraphModule, result: PassResult) -> bool:
    """The ``bn`` step's first form alone, outside the fuse pass: fold every eval-mode BN into the
    Conv/ConvTranspose/Linear before it whose output only it reads (quantize does this so that it
    quantizes the folded layer). Rewrites are recorded in ``result``."""
    if not fold_batchnorm(FuseState(gm, result, {"bn_before": False})):
        return False
    gm.delete_all_unused_submodules()
    gm.recompile()
    return True


def fold_batchnorm(state: FuseState) -> bool:
    gm, changed = state.gm, False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(module_of(gm, node), BN_TYPES):
            continue
        bn = module_of(gm, node)
        why = bn_unfoldable_reason(bn) or (None if len(node.args) == 1 and not node.kwargs else
                                           "called with keyword arguments; not rewritten")
        if why:
            state.why_not(node, why)
            continue
        after = _after_reason(gm, node, bn)
        if after is None:
            _fold_after(state, node, bn)
            changed = True
            continue
        if not state.enabled("bn_before"):
            state.why_not(node, f"not folded into its producer: {after}")
            continue
        before = _before_reason(gm, node, bn, bn_affine(bn)[1])
        if before is None:
            _fold_before(state, node, bn)
            changed = True
            continue
        state.why_not(node, f"not folded into its producer: {after}; nor into its consumers: {before}")
    return changed
