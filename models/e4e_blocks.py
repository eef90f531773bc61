"""Building blocks of the e4e encoder (Encoder4Editing over an IR-SE backbone), with e4e's parameter names.

The backbone is ArcFace's IR-SE ResNet: four stages of bottleneck units, each stage halving the side.
Feature maps after stages 2, 3 and 4 (c1, c2, c3) feed an FPN-like pyramid: coarse styles read c3,
middle styles c3 + lateral(c2), fine styles that + lateral(c1). Style 0 predicts w0 and every other
style predicts a delta added to w0 — e4e's "progressive deltas", which keep W+ close to W.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.stylegan2_layers import EqualLinear


class SEModule(nn.Module):
    """Squeeze-and-excitation: rescale channels by a gate computed from their global average."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    """IR-SE unit: BN → conv3 → PReLU → conv3(stride) → BN → SE, plus a (projected) shortcut."""

    def __init__(self, in_channels: int, depth: int, stride: int, se_reduction: int = 16):
        super().__init__()
        if in_channels == depth:  # MaxPool2d(1, stride) is a parameter-free subsampling
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, se_reduction),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def ir_se_stem(width: int) -> nn.Sequential:
    """The IR-SE input layer: conv3 → BN → PReLU (``input_layer.{0,1,2}`` in e4e's and ArcFace's files)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width)
    )


def ir_se_body(
    blocks: Sequence[int], widths: Sequence[int], se_reduction: int = 16
) -> nn.Sequential:
    """The IR-SE stages (``body.<unit>``): ``blocks[i]`` units of width ``widths[i]``; each stage halves the
    side in its first unit. (3, 4, 14, 3) units of (64, 128, 256, 512) is IR-SE-50."""
    units, in_ch = [], widths[0]
    for n_units, depth in zip(blocks, widths):
        for u in range(n_units):
            units.append(BottleneckIRSE(in_ch, depth, 2 if u == 0 else 1, se_reduction))
            in_ch = depth
    return nn.Sequential(*units)


class GradualStyleBlock(nn.Module):
    """Strided 3×3 convs down to 1×1, then an EqualLinear: a (B, C, s, s) map → one style vector (B, out)."""

    def __init__(self, in_channels: int, out_channels: int, spatial: int):
        super().__init__()
        n_down = int(math.log2(spatial))
        if 2**n_down != spatial or n_down < 1:
            raise ValueError(f"GradualStyleBlock needs a power-of-two side ≥ 2, got {spatial}")
        layers: list[nn.Module] = []
        for i in range(n_down):
            layers += [
                nn.Conv2d(
                    in_channels if i == 0 else out_channels, out_channels, 3, stride=2, padding=1
                ),
                nn.LeakyReLU(),
            ]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_channels, out_channels)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.convs(x).reshape(-1, self.out_channels))


class Encoder4Editing(nn.Module):
    """e4e's encoder network: images → W+ offsets (B, n_styles, style_dim), before adding latent_avg."""

    def __init__(
        self,
        n_styles: int,
        style_dim: int = 512,
        input_size: int = 256,
        backbone_blocks: Sequence[int] = (3, 4, 14, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        se_reduction: int = 16,
        coarse_ind: int = 3,
        middle_ind: int = 7,
    ):
        super().__init__()
        if len(backbone_blocks) != 4 or len(widths) != 4:
            raise ValueError(
                "the IR-SE backbone has exactly 4 stages (backbone_blocks and widths of length 4)"
            )
        if (
            input_size % 16 or input_size < 32
        ):  # 4 stride-2 stages; c3 must be ≥ 2×2 (a power of two)
            raise ValueError(f"input_size must be 16 × a power of two ≥ 2, got {input_size}")
        self.n_styles, self.coarse_ind, self.middle_ind = n_styles, coarse_ind, middle_ind
        self.input_layer = ir_se_stem(widths[0])
        self.body = ir_se_body(backbone_blocks, widths, se_reduction)
        ends = [sum(backbone_blocks[: i + 1]) - 1 for i in range(4)]
        self.taps = (ends[1], ends[2], ends[3])  # body indices whose outputs are c1, c2, c3
        side = input_size // 16  # side of c3 (c2: 2×, c1: 4×)
        top = widths[3]
        self.styles = nn.ModuleList(
            GradualStyleBlock(
                top, style_dim, side if i < coarse_ind else 2 * side if i < middle_ind else 4 * side
            )
            for i in range(n_styles)
        )
        self.latlayer1 = nn.Conv2d(widths[2], top, kernel_size=1)
        self.latlayer2 = nn.Conv2d(widths[1], top, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, input_size, input_size) in [-1, 1] → (B, n_styles, style_dim)."""
        c1, c2, c3 = self._pyramid(x)  # sides input/4, input/8, input/16
        w0 = self.styles[0](c3)
        ws, features, p2 = [w0], c3, c3
        for i in range(1, self.n_styles):
            if i == self.coarse_ind:
                p2 = features = _upsample_add(c3, self.latlayer1(c2))
            elif i == self.middle_ind:
                features = _upsample_add(p2, self.latlayer2(c1))
            ws.append(w0 + self.styles[i](features))
        return torch.stack(ws, dim=1)

    def _pyramid(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.input_layer(x)
        taps: list[Tensor] = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self.taps:
                taps.append(x)
        return taps[0], taps[1], taps[2]


def _upsample_add(x: Tensor, y: Tensor) -> Tensor:
    """FPN merge: bilinearly resize x to y's side (align_corners=True, as e4e) and add."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y
