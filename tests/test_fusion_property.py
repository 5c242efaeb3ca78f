"""Property tests for the ``fuse`` pass: random conv / linear / BN / activation chains must compute the same
function after fusion (fp32 relative error ≤ 1e-5), and the rewrites the pass promises must have happened."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fusion_helpers import bn_nodes, count, fuse, randomize_bn

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ACTS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid, "hardswish": nn.Hardswish, "leaky_relu": lambda: nn.LeakyReLU(0.1),
}
CONV = {1: nn.Conv1d, 2: nn.Conv2d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
LAYERS = ("conv", "convT", "linear")
VANISH = ("dropout", "identity")  # removed by the cleanup step before BN folding


def _act(draw):
    return ACTS[draw(st.sampled_from(sorted(ACTS)))]()


@st.composite
def conv_chains(draw):
    """(model, input, kinds): convs / transposed convs / BN / activations / dropout / identity on
    [N, C, L] or [N, C, H, W], optionally followed by a flatten and a Linear / BN1d / activation head."""
    dim = draw(st.sampled_from([1, 2]))
    ch = ch0 = draw(st.integers(1, 4))
    size = size0 = draw(st.integers(4, 7))
    layers, kinds = [], []
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(["conv", "conv", "convT", "bn", "bn", "act", "dropout", "identity"]))
        if kind == "conv":
            out, k = draw(st.integers(1, 6)), draw(st.sampled_from([1, 3]))
            pad = draw(st.sampled_from([0, k // 2])) if size - k + 1 >= 3 else k // 2
            mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
            groups = ch if out % ch == 0 and draw(st.booleans()) else 1
            layers.append(CONV[dim](ch, out, k, padding=pad, padding_mode=mode, groups=groups,
                                    bias=draw(st.booleans())))
            ch, size = out, size - k + 1 + 2 * pad
        elif kind == "convT":
            out, k = draw(st.integers(1, 6)), draw(st.sampled_from([2, 3]))
            stride = draw(st.sampled_from([1, 2])) if size <= 6 else 1
            groups = ch if out % ch == 0 and draw(st.booleans()) else 1
            layers.append(CONVT[dim](ch, out, k, stride=stride, groups=groups, bias=draw(st.booleans())))
            ch, size = out, (size - 1) * stride + k
        elif kind == "bn":
            layers.append(BN[dim](ch, affine=draw(st.booleans())))
        elif kind == "act":
            layers.append(_act(draw))
        else:
            layers.append(nn.Dropout(0.3) if kind == "dropout" else nn.Identity())
        kinds.append(kind)
    if draw(st.booleans()):
        layers.append(nn.Flatten())
        kinds.append("flatten")
        feats = ch * size ** dim
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["linear", "linear", "bn", "act"]))
            if kind == "linear":
                out = draw(st.integers(1, 12))
                layers.append(nn.Linear(feats, out, bias=draw(st.booleans())))
                feats = out
            else:
                layers.append(nn.BatchNorm1d(feats) if kind == "bn" else _act(draw))
            kinds.append(kind)
    model = randomize_bn(nn.Sequential(*layers), seed=draw(st.integers(0, 2**16)))
    x = torch.randn(2, ch0, *[size0] * dim, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return model, x, kinds


def _bns_folding_into_producer(kinds: list[str]) -> set[int]:
    """Indices of the BNs whose producer (after dropout / identity / earlier folded BNs vanish) is a layer."""
    out, prev = set(), None
    for i, kind in enumerate(kinds):
        if kind in VANISH:
            continue
        if kind == "bn" and prev in LAYERS:
            out.add(i)
            continue  # folded away: the layer stays the producer of what follows
        prev = kind
    return out


@SETTINGS
@given(conv_chains())
def test_random_conv_chains_fuse_exactly(case):
    model, x, kinds = case
    gm, res, _ = fuse(model, x)
    m = res.metrics
    remaining = {n.target for n in bn_nodes(gm)}
    for i in _bns_folding_into_producer(kinds):
        assert str(i) not in remaining, f"BN {i} after a layer was not folded: {kinds}\n{res.skipped}"
    assert m["bn_after"] <= m["bn_before"] == kinds.count("bn")
    assert m["ops_after"] <= m["ops_before"] and m["macs_after"] <= m["macs_before"]
    assert count(gm, (nn.Dropout, nn.Identity)) == 0
    # Every BN still there says why.
    assert remaining <= {n.target for n in gm.graph.nodes if n.name in {s.node for s in res.skipped}}


@st.composite
def linear_chains(draw):
    """Linears of random widths, separated by nothing, an activation, a BatchNorm1d or a dropout."""
    rank3 = draw(st.booleans())
    widths = draw(st.lists(st.integers(1, 24), min_size=2, max_size=6))
    layers, kinds = [], []
    for a, b in zip(widths, widths[1:]):
        if layers:
            sep = draw(st.sampled_from(["none", "none", "act", "bn", "dropout"]))
            if sep == "act":
                layers.append(_act(draw))
            elif sep == "bn" and not rank3:
                layers.append(nn.BatchNorm1d(a))
            elif sep == "dropout":
                layers.append(nn.Dropout(0.5))
        layers.append(nn.Linear(a, b, bias=draw(st.booleans())))
    model = randomize_bn(nn.Sequential(*layers), seed=draw(st.integers(0, 2**16)))
    shape = (2, 3, widths[0]) if rank3 else (4, widths[0])
    return model, torch.randn(*shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))


@SETTINGS
@given(linear_chains())
def test_random_linear_chains_merge_only_when_cheaper(case):
    model, x = case
    gm, res, _ = fuse(model, x)
    assert res.metrics["macs_after"] <= res.metrics["macs_before"]
    for node in gm.graph.nodes:  # no mergeable pair is left behind
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Linear):
            continue
        src = node.args[0]
        if src.op == "call_module" and isinstance(gm.get_submodule(src.target), nn.Linear) and len(src.users) == 1:
            a, b = gm.get_submodule(src.target), gm.get_submodule(node.target)
            assert a.in_features * b.out_features >= a.out_features * (a.in_features + b.out_features)


@st.composite
def parallel_heads(draw):
    n_in = draw(st.integers(2, 12))
    heads = draw(st.lists(st.tuples(st.integers(1, 8), st.booleans(), st.sampled_from([None, "relu", "gelu"])),
                          min_size=1, max_size=4))
    rank3 = draw(st.booleans())
    x = torch.randn(*((2, 3) if rank3 else (4,)), n_in, generator=torch.Generator().manual_seed(3))
    return Heads(n_in, heads), x, heads


class Heads(nn.Module):
    """Several Linears on one input (each optionally activated), concatenated."""

    def __init__(self, n_in, heads):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(n_in, out, bias=bias) for out, bias, _ in heads)
        self.acts = [act for _, _, act in heads]

    def forward(self, x):
        outs = []
        for fc, act in zip(self.fcs, self.acts):
            y = fc(x)
            outs.append(torch.relu(y) if act == "relu" else nn.functional.gelu(y) if act == "gelu" else y)
        return torch.cat(outs, dim=-1)


@SETTINGS
@given(parallel_heads())
def test_random_parallel_linears_merge_per_activation(case):
    model, x, heads = case
    gm, res, _ = fuse(model, x)
    # One Linear per distinct activation (heads with the same activation share one Linear + split).
    assert count(gm, nn.Linear) == len({act for _, _, act in heads})
    assert res.metrics["macs_after"] == res.metrics["macs_before"]
