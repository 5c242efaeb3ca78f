"""fxpress ops for low-rank layers: a Linear or Conv2d factored into two thinner layers.

``fxpress::lowrank_linear(x, U, V, bias)``
    ``y = (x @ U) @ V + bias`` with ``U: [in_features, rank]``, ``V: [rank, out_features]``,
    ``bias: [out_features]``. Both factors are stored in GEMM order (no transposes at run time),
    so ``U @ V`` is the transpose of the original ``nn.Linear`` weight's low-rank approximation.

``fxpress::lowrank_conv2d(x, U, V, bias, stride, padding, dilation)``
    ``y = conv2d(conv2d(x, U, stride, padding, dilation), V[:, :, None, None]) + bias`` with
    ``U: [rank, in_channels, kh, kw]`` (the k×k conv to ``rank`` channels) and ``V: [out_channels, rank]``
    (the 1×1 conv back to ``out_channels``). Groups are always 1.

Both ops have a reference (eager) implementation, a fake (meta) kernel for tracing/export, and a
registered cost so the report counts their MACs. They lower to Relax in ``lowering/low_rank_lowering.py``.
The bias is always present (zeros when the original layer had none) so every backend sees one signature.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

from ..stats import arg_shape, numel, register_cost

__all__ = ["lowrank_linear", "lowrank_conv2d", "lowrank_linear_macs", "lowrank_conv2d_macs"]


@torch.library.custom_op("fxpress::lowrank_linear", mutates_args=())
def lowrank_linear(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Reference: two GEMMs through the rank-r bottleneck, then the bias."""
    return torch.matmul(torch.matmul(x, U), V) + bias


@lowrank_linear.register_fake
def _lowrank_linear_fake(x, U, V, bias):
    torch._check(x.shape[-1] == U.shape[0], lambda: f"lowrank_linear: x has {x.shape[-1]} features, U expects {U.shape[0]}")
    torch._check(U.shape[1] == V.shape[0], lambda: "lowrank_linear: U and V ranks differ")
    return x.new_empty((*x.shape[:-1], V.shape[1]))


@torch.library.custom_op("fxpress::lowrank_conv2d", mutates_args=())
def lowrank_conv2d(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor,
                   stride: list[int], padding: list[int], dilation: list[int]) -> torch.Tensor:
    """Reference: k×k conv to ``rank`` channels, then a 1×1 conv (with the bias) back up."""
    h = F.conv2d(x, U, None, stride, padding, dilation)
    return F.conv2d(h, V[:, :, None, None], bias)


@lowrank_conv2d.register_fake
def _lowrank_conv2d_fake(x, U, V, bias, stride, padding, dilation):
    n, _, h, w = x.shape
    kh, kw = U.shape[2], U.shape[3]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, V.shape[0], oh, ow))


# ----------------------------------------------------------------------------- costs

def lowrank_linear_macs(rows: int, in_features: int, rank: int, out_features: int) -> int:
    return rows * rank * (in_features + out_features)


def lowrank_conv2d_macs(out_pixels: int, in_channels: int, kernel: tuple[int, int], rank: int, out_channels: int) -> int:
    """``out_pixels`` = N·OH·OW (the first conv carries the stride, so both convs run at output size)."""
    return out_pixels * rank * (in_channels * math.prod(kernel) + out_channels)


@register_cost(torch.ops.fxpress.lowrank_linear.default)
def _lowrank_linear_cost(node: fx.Node, gm: fx.GraphModule) -> tuple[int, int]:
    u = arg_shape(node, gm, 1)
    v = arg_shape(node, gm, 2)
    out = numel(node)
    if not u or not v or not out:
        return 0, 0
    m = lowrank_linear_macs(out // v[1], u[0], u[1], v[1])
    return m, m


@register_cost(torch.ops.fxpress.lowrank_conv2d.default)
def _lowrank_conv2d_cost(node: fx.Node, gm: fx.GraphModule) -> tuple[int, int]:
    u = arg_shape(node, gm, 1)
    v = arg_shape(node, gm, 2)
    out = numel(node)
    if not u or not v or not out:
        return 0, 0
    m = lowrank_conv2d_macs(out // v[0], u[1], (u[2], u[3]), u[0], v[0])
    return m, m
