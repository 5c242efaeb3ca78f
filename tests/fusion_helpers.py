"""Shared helpers for the fuse pass tests (test_fusion.py, test_fusion_property.py)."""
from __future__ import annotations

import torch
from torch import fx, nn

from fxpress.passes import PassContext, get_pass, output_error, run_graph, trace
from fxpress.passes.fusion.common import BN_TYPES

TOL = 1e-5  # fp32 relative error the fuse pass promises (max |y - ref| / max |ref|)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine parameters (fresh models have mean 0, var 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, BN_TYPES) and mod.running_mean is not None:
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.3)
                if mod.weight is not None:
                    mod.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1.0)
                    mod.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def count(gm: fx.GraphModule, types) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), types))


def bn_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), BN_TYPES)]


def fuse(model: nn.Module, *inputs, tol: float = TOL, **options):
    """Trace ``model`` (eval), run the fuse pass, check it still computes the same; return (gm, result, err)."""
    model.eval()
    with torch.no_grad():
        ref = run_graph(model, inputs)
    gm = trace(model, inputs).gm
    new, result = get_pass("fuse", **options)(gm, PassContext(example_inputs=inputs))
    new.graph.lint()
    err = output_error(run_graph(new, inputs), ref)[1]
    assert err <= tol, f"fused graph differs from eager: rel err {err:.3g}\n{new.code}"
    return new, result, err


def kinds(result) -> list[str]:
    return [r.kind for r in result.rewrites]


def skip_reason(result, node_name: str) -> str:
    reasons = [s.reason for s in result.skipped if s.node == node_name]
    assert reasons, f"no skip recorded for {node_name!r}; skipped: {[str(s) for s in result.skipped]}"
    return reasons[0]
