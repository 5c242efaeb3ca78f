"""Calibration statistics of the low_rank pass: each layer's input second moment (activation-aware
methods) and the empirical Fisher of its weight (method "fisher")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from fxpress.errors import PassError

from ..base import PassContext, runs_with_batch_of_one
from ..graph import flatten_outputs
from .factor import LayerStats
from .layers import Layer


def collect_activations(gm: fx.GraphModule, layers: list[Layer], ctx: PassContext, opt: dict) -> None:
    """Each layer's input rows (im2col patches for a conv) over the calibration batches, into ``L.stats``."""
    for L in layers:
        L.stats = LayerStats(L.d)

    def hook_for(L: Layer):
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


def collect_fisher(gm: fx.GraphModule, layers: list[Layer], ctx: PassContext, opt: dict) -> None:
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
                    loss = _loss(out, xs, lab, loss_fn)
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
