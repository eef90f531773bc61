"""The ε-predicting U-Net of DeltaEdit-D, modulated by a StyleGAN2 style code s through AdaGN.

DeltaEdit-D (Lyu et al., DeltaEdit / DeltaSpace) swaps the StyleGAN2 generator for a diffusion decoder
conditioned on the style code s, so an edited code ŝ = s + Δŝ can be decoded while deterministic DDIM
encoding keeps the details of a real photo that the GAN inversion loses. As in Diffusion Autoencoders
(Preechakul et al.) and ADM (Dhariwal & Nichol), the condition enters every residual block through
adaptive group normalisation: h ← GroupNorm(h)·(1 + scale) + shift, with (scale, shift) a linear map of
the block's embedding. That embedding is the timestep embedding plus a projection of one part of s,
and the parts follow StyleGAN2's own hierarchy (``models.delta_mapper.plan_groups``): the coarse conv
styles (4–8 px) drive the lowest U-Net resolutions and the bottleneck, the medium ones (16–32 px) the
middle levels, the fine ones the highest levels. Layouts without a fine group (a 32 px generator)
spread the groups they have over the levels in the same order.

Two options, both off by default (the paper's decoder):

- ``render_condition``: the U-Net also sees G(s), the generator's rendering of the code, as extra input
  channels. AdaGN gives every pixel the same scale and shift, so a decoder conditioned on s alone must
  learn to lay out a shape (where, how large, which outline) from a vector, which takes far more training
  than a CPU affords: the toy decoder trained 3000 steps on s alone turns noise into images that show the
  code's attributes at chance level. With G(s) in its input it learns in a few hundred steps to keep what
  the code says and to add what the photo has beyond it. The condition a model is called with is then
  ``condition(s, render)``: s followed by the rendering's pixels, so the samplers pass it through as any s.
- ``prediction: v`` (Salimans & Ho 2022): the network predicts v = √ᾱ·ε − √(1 − ᾱ)·x₀ and ``forward``
  returns the ε it implies, so the samplers are unchanged. At high noise the ε target is nearly x_t itself and
  says nothing about x₀, so an ε-model never needs the rendering there; v makes it predict x₀.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from models.checkpoint import CheckpointError, load_safetensors, load_strict, save_safetensors
from models.delta_mapper import GroupPlan, plan_groups
from models.diffusion.ddim import NoiseSchedule
from models.layout import Group, StyleLayout


@dataclass(frozen=True)
class DiffusionConfig:
    layout: dict[str, Any]  # StyleLayout.to_dict() of the generator; s = its conv styles
    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (
        1,
        2,
        2,
        4,
    )  # one entry per resolution level, highest resolution first
    num_res_blocks: int = 2  # residual blocks per level (down path; up path has the same)
    norm_groups: int = 32  # GroupNorm groups (reduced to a divisor of the width)
    emb_dim: int = 0  # timestep/style embedding width; 0 → 4·base_channels
    schedule: Literal["linear", "cosine"] = "linear"  # β schedule the model is trained with
    timesteps: int = 1000  # training diffusion steps T
    prediction: Literal["eps", "v"] = "eps"  # what the network predicts (forward always returns ε)
    render_condition: bool = False  # G(s) as extra input channels (``StyleUNet.condition``)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiffusionConfig":
        return cls(**{**data, "channel_mult": tuple(data.get("channel_mult", cls.channel_mult))})


def level_groups(n_levels: int, groups: tuple[Group, ...]) -> list[Group]:
    """Group that modulates each U-Net level (index 0 = highest resolution): fine high, coarse low."""
    g = len(groups)
    return [groups[g - 1 - min(g - 1, i * g // n_levels)] for i in range(n_levels)]


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps → (B, dim) (Vaswani et al.; as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GN–SiLU–conv, then AdaGN from the embedding, SiLU–conv (zero-initialised), plus a skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.ada = nn.Linear(emb_dim, 2 * c_out)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.ada(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift  # AdaGN
        return self.skip(x) + self.conv2(F.silu(h))


class StyleUNet(nn.Module):
    """ε(x_t, t, s): x_t (B, C, H, W), t (B,) integer steps in [0, T), s (B, layout.conv_total) → (B, C, H, W).

    s is standardised with the ``style_mean`` / ``style_std`` buffers (identity until a training flow sets
    them from the codes store with ``set_style_stats``) before each group's projection. With
    ``render_condition`` the third argument is ``condition(s, render)`` instead of s.
    """

    KIND: ClassVar[str] = "style_diffusion"

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__()
        self.config = config
        self.layout = StyleLayout.from_dict(config.layout)
        self.groups: tuple[GroupPlan, ...] = plan_groups(self.layout)
        self.lineage: dict[str, Any] = {}
        n, base, gn = len(config.channel_mult), config.base_channels, config.norm_groups
        if config.image_size % 2 ** (n - 1):
            raise ValueError(
                f"image_size {config.image_size} is not divisible by 2^{n - 1} ({n} levels)"
            )
        emb = config.emb_dim or 4 * base
        chans = [base * m for m in config.channel_mult]
        self.level_group = level_groups(n, tuple(g.name for g in self.groups))
        self.register_buffer("style_mean", torch.zeros(self.layout.conv_total))
        self.register_buffer("style_std", torch.ones(self.layout.conv_total))
        self.time_mlp = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.style_proj = nn.ModuleDict(
            {g.name: nn.Linear(g.stop - g.start, emb) for g in self.groups}
        )
        self.schedule = NoiseSchedule(config.schedule, config.timesteps)
        rendered = config.in_channels if config.render_condition else 0
        self.conv_in = nn.Conv2d(config.in_channels + rendered, base, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        c = base
        for i, ch in enumerate(chans):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(c, ch, emb, gn))
                c = ch
            self.down.append(nn.ModuleList(blocks))
            self.downsample.append(
                nn.Conv2d(ch, ch, 3, stride=2, padding=1) if i < n - 1 else nn.Identity()
            )
        self.mid = nn.ModuleList([ResBlock(c, c, emb, gn), ResBlock(c, c, emb, gn)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in range(n):  # index i = level i, built highest first
            ch = chans[i]
            self.upsample.append(
                nn.Conv2d(chans[i + 1], ch, 3, padding=1) if i < n - 1 else nn.Identity()
            )
            self.up.append(
                nn.ModuleList(
                    [
                        ResBlock(2 * ch if k == 0 else ch, ch, emb, gn)
                        for k in range(config.num_res_blocks)
                    ]
                )
            )
        self.norm_out = _norm(base, gn)
        self.conv_out = nn.Conv2d(base, config.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def style_dim(self) -> int:
        return self.layout.conv_total

    @property
    def condition_dim(self) -> int:
        """Width of the condition ``forward`` takes: s, then G(s)'s pixels with ``render_condition``."""
        c, size = self.config.in_channels, self.config.image_size
        return self.style_dim + (c * size * size if self.config.render_condition else 0)

    def condition(self, s: torch.Tensor, render: torch.Tensor | None = None) -> torch.Tensor:
        """The condition of codes s (B, S) and their renderings G(s) (B, C, H, W) in [-1, 1]: s itself for a
        model without ``render_condition``, else s followed by the flattened rendering."""
        if not self.config.render_condition:
            return s
        c, size = self.config.in_channels, self.config.image_size
        if render is None or render.shape != (s.shape[0], c, size, size):
            got = None if render is None else tuple(render.shape)
            raise ValueError(
                f"this decoder is conditioned on G(s) too: pass renderings of shape "
                f"({s.shape[0]}, {c}, {size}, {size}), got {got}"
            )
        return torch.cat([s, render.flatten(1).to(s.dtype)], dim=1)

    def set_style_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel statistics of real style codes, used to standardise s (their std spans ~4–23)."""
        self.style_mean.copy_(mean)
        self.style_std.copy_(std.clamp_min(1e-6))

    def embeddings(self, t: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-group embedding: timestep embedding + linear projection of that group's standardised styles."""
        temb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        z = (s - self.style_mean) / self.style_std
        return {g.name: temb + self.style_proj[g.name](z[:, g.start : g.stop]) for g in self.groups}

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """ε predicted for x_t at steps t under condition s (``condition``)."""
        self._check(x, t, s)
        out = self._net(x, t, s)
        if self.config.prediction == "eps":
            return out
        a = self.schedule.alpha_bar_like(t, x)
        return (1 - a).sqrt() * x + a.sqrt() * out  # ε from v: x_t = √ᾱ·x₀ + √(1 − ᾱ)·ε

    def _net(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        s = cond[:, : self.style_dim]
        if self.config.render_condition:
            x = torch.cat([x, cond[:, self.style_dim :].reshape(x.shape).to(x.dtype)], dim=1)
        embs = self.embeddings(t, s)
        h, skips = self.conv_in(x), []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, embs[self.level_group[i]])
            skips.append(h)
            h = self.downsample[i](h)
        for block in self.mid:
            h = block(h, embs[self.groups[0].name])  # bottleneck ← coarse
        for i in reversed(range(len(self.up))):
            if i < len(self.up) - 1:
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = torch.cat([h, skips[i]], dim=1)
            for block in self.up[i]:
                h = block(h, embs[self.level_group[i]])
        return self.conv_out(F.silu(self.norm_out(h)))

    def _check(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> None:
        c, size = self.config.in_channels, self.config.image_size
        if x.ndim != 4 or x.shape[1:] != (c, size, size):
            raise ValueError(f"x must be (B, {c}, {size}, {size}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be ({x.shape[0]},), got {tuple(t.shape)}")
        if s.shape != (x.shape[0], self.condition_dim):
            what = "condition(s, G(s))" if self.config.render_condition else "s"
            raise ValueError(
                f"{what} must be ({x.shape[0]}, {self.condition_dim}), got {tuple(s.shape)}"
            )

    def save(self, uri: str, lineage: dict[str, Any] | None = None) -> None:
        """Safetensors with the config in the header, so ``from_checkpoint`` rebuilds this exact model."""
        save_safetensors(
            uri,
            self.state_dict(),
            config=self.config.to_dict(),
            lineage=lineage if lineage is not None else self.lineage,
            kind=self.KIND,
        )

    @classmethod
    def from_checkpoint(cls, uri: str, **storage_options: Any) -> "StyleUNet":
        """Load one of our ``style_diffusion`` safetensors checkpoints (strict; errors name the parameter)."""
        tensors, header = load_safetensors(uri, **storage_options)
        if header["kind"] != cls.KIND:
            raise CheckpointError(
                f"{uri} holds a '{header['kind']}' checkpoint, not a '{cls.KIND}'"
            )
        model = cls(DiffusionConfig.from_dict(header["config"]))
        model.lineage = header["lineage"]
        load_strict(model, tensors, str(uri))
        return model
