"""The style-space layout of a StyleGAN2 generator, as data.

Every modulated layer of the synthesis network owns a slice of the style space S. DeltaEdit edits the
conv layers only; toRGB styles come from W+. The layout is derived from the generator's architecture,
so any resolution works (FFHQ 1024: 17 conv layers, 6048 channels; 9 toRGB layers, 3040 channels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

LayerKind = Literal["conv", "rgb"]
Group = Literal["coarse", "medium", "fine"]


@dataclass(frozen=True)
class StyleLayer:
    name: str  # parameter prefix in the rosinality state dict: conv1, convs.3, to_rgb1, to_rgbs.2
    kind: LayerKind  # conv (edited by DeltaEdit) or rgb (toRGB, taken from W+)
    channels: int  # style channels = input channels of the modulated conv
    resolution: int  # output resolution of the layer
    wplus_index: int  # row of W+ that feeds its modulation
    offset: int  # start of its slice in the flattened conv (or rgb) vector

    @property
    def group(self) -> Group:
        """DeltaEdit's coarse / medium / fine split: ≤ 8 px, 16–32 px, ≥ 64 px."""
        if self.resolution <= 8:
            return "coarse"
        return "medium" if self.resolution <= 32 else "fine"

    @property
    def stop(self) -> int:
        return self.offset + self.channels


def rosinality_channels(channel_multiplier: int = 2) -> dict[int, int]:
    """Feature channels per resolution in rosinality's Generator."""
    cm = channel_multiplier
    return {
        4: 512,
        8: 512,
        16: 512,
        32: 512,
        64: 256 * cm,
        128: 128 * cm,
        256: 64 * cm,
        512: 32 * cm,
        1024: 16 * cm,
    }


@dataclass(frozen=True)
class StyleLayout:
    layers: tuple[
        StyleLayer, ...
    ]  # conv layers in generator order, then rgb layers in generator order

    @classmethod
    def for_generator(
        cls, size: int, channel_multiplier: int = 2, channels: dict[int, int] | None = None
    ) -> "StyleLayout":
        """Layout of rosinality's Generator(size, channel_multiplier) (or of custom per-resolution channels)."""
        log_size = int(math.log2(size))
        if 2**log_size != size or size < 8:
            raise ValueError(f"generator size must be a power of two ≥ 8, got {size}")
        ch = channels or rosinality_channels(channel_multiplier)
        conv: list[tuple[str, int, int, int]] = [("conv1", ch[4], 4, 0)]
        rgb: list[tuple[str, int, int, int]] = [("to_rgb1", ch[4], 4, 1)]
        in_ch = ch[4]
        for k, lvl in enumerate(range(3, log_size + 1)):
            res = 2**lvl
            conv.append((f"convs.{2 * k}", in_ch, res, 2 * k + 1))
            conv.append((f"convs.{2 * k + 1}", ch[res], res, 2 * k + 2))
            rgb.append((f"to_rgbs.{k}", ch[res], res, 2 * k + 3))
            in_ch = ch[res]
        return cls(_with_offsets(conv, "conv") + _with_offsets(rgb, "rgb"))

    @property
    def conv(self) -> tuple[StyleLayer, ...]:
        return tuple(layer for layer in self.layers if layer.kind == "conv")

    @property
    def rgb(self) -> tuple[StyleLayer, ...]:
        return tuple(layer for layer in self.layers if layer.kind == "rgb")

    @property
    def conv_total(self) -> int:
        return sum(layer.channels for layer in self.conv)

    @property
    def rgb_total(self) -> int:
        return sum(layer.channels for layer in self.rgb)

    @property
    def n_latent(self) -> int:
        """Rows of W+ (18 at 1024 px)."""
        return max(layer.wplus_index for layer in self.layers) + 1

    def group_layers(self, group: Group) -> tuple[StyleLayer, ...]:
        return tuple(layer for layer in self.conv if layer.group == group)

    def to_dict(self) -> dict:
        return {"layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "StyleLayout":
        return cls(tuple(StyleLayer(**layer) for layer in data["layers"]))


def _with_offsets(rows: list[tuple[str, int, int, int]], kind: LayerKind) -> tuple[StyleLayer, ...]:
    out, offset = [], 0
    for name, channels, res, widx in rows:
        out.append(StyleLayer(name, kind, channels, res, widx, offset))
        offset += channels
    return tuple(out)
