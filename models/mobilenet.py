"""MobileNetV2: inverted residuals with depthwise 3x3 convs and linear bottlenecks."""

from collections.abc import Sequence

import torch
from torch import nn

from ._seed import seeded

# (expansion t, output channels c, repeats n, first stride s), as in the paper.
DEFAULT_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# Same block kinds with fewer repeats and stages: still has residual and
# non-residual blocks and every stride, but runs fast on a 2-core CI box.
SMALL_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    # Channel rounding from the reference implementation: never drop more
    # than 10% below the requested width.
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        layers = [conv_bn_relu6(in_ch, hidden, 1, 1)] if expand != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            # Linear bottleneck: no activation after the projection.
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # use_residual is a build-time constant, so tracing sees a fixed graph.
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, width_mult: float, num_classes: int, blocks: Sequence[tuple[int, int, int, int]]):
        super().__init__()
        in_ch = _make_divisible(32 * width_mult)
        last_ch = _make_divisible(1280 * max(1.0, width_mult))
        layers = [conv_bn_relu6(3, in_ch, 3, 2)]
        for t, c, n, s in blocks:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(conv_bn_relu6(in_ch, last_ch, 1, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def mobilenet_v2(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    seed: int = 0,
    blocks: Sequence[tuple[int, int, int, int]] = DEFAULT_BLOCKS,
) -> MobileNetV2:
    """MobileNetV2, seeded init, eval mode. Pass ``blocks=SMALL_BLOCKS`` for a fast variant."""
    with seeded(seed):
        model = MobileNetV2(width_mult, num_classes, blocks)
    return model.eval()
