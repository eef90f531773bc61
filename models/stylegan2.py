"""StyleGAN2 generator (rosinality layout) that exposes the style space S.

DeltaEdit works in S: a code is the output of every layer's `modulation` applied to its W+ row. The
generator therefore splits the usual forward pass in two, ``style_space(w_plus) -> StyleCode`` and
``synthesize(code) -> image``, with ``G(w_plus) == G.synthesize(G.style_space(w_plus))``. Parameter names
and shapes match rosinality/stylegan2-pytorch exactly, so its checkpoints (and e4e's decoder) load
strictly; our own checkpoints are safetensors with the constructor config in the header.

Small configs use the same code: ``Generator(32, style_dim=64, n_mlp=2, channels={4: 64, 8: 64, 16: 32,
32: 32})`` is a toy generator that runs in milliseconds on CPU.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from models.checkpoint import (
    CheckpointError,
    check_state_dict,
    is_safetensors,
    load_safetensors,
    load_torch,
    save_safetensors,
)
from models.layout import StyleLayer, StyleLayout, rosinality_channels
from models.stylegan2_layers import ConstantInput, EqualLinear, PixelNorm, StyledConv, ToRGB

NoiseMode = Literal["const", "random", "none"]
KIND = "stylegan2"


@dataclass
class StyleCode:
    """A batch of points in S, flattened in generator order (see `StyleLayout` for the slices)."""

    conv: Tensor  # (B, layout.conv_total): conv1, convs.0, convs.1, ...
    rgb: Tensor  # (B, layout.rgb_total): to_rgb1, to_rgbs.0, ...

    @property
    def batch_size(self) -> int:
        return self.conv.shape[0]

    def to(self, *args: Any, **kwargs: Any) -> "StyleCode":
        """Same as ``Tensor.to`` on both parts (device and/or dtype)."""
        return StyleCode(self.conv.to(*args, **kwargs), self.rgb.to(*args, **kwargs))

    def clone(self) -> "StyleCode":
        return StyleCode(self.conv.clone(), self.rgb.clone())

    def check(self, layout: StyleLayout) -> None:
        """Raise ValueError unless the widths match the layout."""
        if self.conv.ndim != 2 or self.conv.shape[1] != layout.conv_total:
            raise ValueError(
                f"StyleCode.conv has shape {tuple(self.conv.shape)}, expected (B, {layout.conv_total})"
            )
        if self.rgb.shape != (self.batch_size, layout.rgb_total):
            raise ValueError(
                f"StyleCode.rgb has shape {tuple(self.rgb.shape)}, "
                f"expected ({self.batch_size}, {layout.rgb_total})"
            )

    def layer(self, layer: StyleLayer) -> Tensor:
        """Style of one layer: (B, layer.channels)."""
        flat = self.conv if layer.kind == "conv" else self.rgb
        return flat[:, layer.offset : layer.stop]

    def layers(self, layout: StyleLayout) -> dict[str, Tensor]:
        """Per-layer styles keyed by parameter prefix (conv1, convs.0, ..., to_rgb1, to_rgbs.0, ...)."""
        self.check(layout)
        return {layer.name: self.layer(layer) for layer in layout.layers}

    @classmethod
    def from_layers(cls, layout: StyleLayout, styles: Mapping[str, Tensor]) -> "StyleCode":
        """Inverse of `layers`: concatenate per-layer styles (B, channels) in generator order."""
        conv = torch.cat([styles[layer.name] for layer in layout.conv], dim=1)
        rgb = torch.cat([styles[layer.name] for layer in layout.rgb], dim=1)
        code = cls(conv, rgb)
        code.check(layout)
        return code


class Generator(nn.Module):
    """rosinality's StyleGAN2 Generator with an explicit S space; state-dict compatible."""

    def __init__(
        self,
        size: int,
        style_dim: int = 512,
        n_mlp: int = 8,
        channel_multiplier: int = 2,
        channels: Mapping[int, int] | None = None,
        lr_mlp: float = 0.01,
    ):
        """
        Args:
            size: output resolution, a power of two ≥ 8.
            style_dim: width of z, w and the mapping network.
            n_mlp: layers of the mapping network.
            channel_multiplier: rosinality's width factor for ≥ 64 px (ignored when `channels` is given).
            channels: feature channels per resolution {4: c, 8: c, ..., size: c} for custom (toy) widths.
            lr_mlp: learning-rate multiplier of the mapping network.
        """
        super().__init__()
        ch = _channel_table(size, channel_multiplier, channels)
        self.config: dict[str, Any] = dict(
            size=size,
            style_dim=style_dim,
            n_mlp=n_mlp,
            channel_multiplier=channel_multiplier,
            lr_mlp=lr_mlp,
            channels=dict(channels) if channels else None,
        )
        self.size, self.style_dim = size, style_dim
        self.layout = StyleLayout.for_generator(size, channel_multiplier, channels=ch)
        self.num_layers = len(self.layout.conv)
        self.n_latent = self.layout.n_latent

        self.style = nn.Sequential(
            PixelNorm(),
            *[
                EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True)
                for _ in range(n_mlp)
            ],
        )
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], style_dim)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        in_ch = ch[4]
        for res in (2**i for i in range(3, size.bit_length())):
            self.convs.append(StyledConv(in_ch, ch[res], style_dim, upsample=True))
            self.convs.append(StyledConv(ch[res], ch[res], style_dim))
            self.to_rgbs.append(ToRGB(ch[res], style_dim))
            in_ch = ch[res]
        self.noises = nn.Module()  # fixed per-layer noise maps, part of the checkpoint
        for i, layer in enumerate(self.layout.conv):
            self.noises.register_buffer(
                f"noise_{i}", torch.randn(1, 1, layer.resolution, layer.resolution)
            )
        # W mean of the training run (rosinality keeps it beside g_ema, not inside it): not in state_dict.
        self.register_buffer("latent_avg", None, persistent=False)

    # --- z → w → S -------------------------------------------------------------------------------
    def mapping(self, z: Tensor) -> Tensor:
        """z (B, style_dim) → w (B, style_dim)."""
        return self.style(z)

    def style_space(self, w_plus: Tensor) -> StyleCode:
        """W+ (B, n_latent, style_dim), or one w (B, style_dim) for every row → S code."""
        w = self._as_wplus(w_plus)
        conv = [self._modulation(layer)(w[:, layer.wplus_index]) for layer in self.layout.conv]
        rgb = [self._modulation(layer)(w[:, layer.wplus_index]) for layer in self.layout.rgb]
        return StyleCode(torch.cat(conv, dim=1), torch.cat(rgb, dim=1))

    # --- S → image ---------------------------------------------------------------------------------
    def synthesize(self, code: StyleCode, noise_mode: NoiseMode = "const") -> Tensor:
        """S code → image (B, 3, size, size), roughly in [-1, 1].

        noise_mode: 'const' uses the stored `noises.noise_i` maps (as DeltaEdit decodes), 'random' draws
        fresh noise, 'none' adds no noise.
        """
        code.check(self.layout)
        conv = [code.layer(layer) for layer in self.layout.conv]
        rgb = [code.layer(layer) for layer in self.layout.rgb]
        noise = self._noise(noise_mode, code.batch_size)
        x = self.conv1(self.input(code.batch_size), conv[0], noise[0])  # (B, C4, 4, 4)
        skip = self.to_rgb1(x, rgb[0])  # (B, 3, 4, 4)
        for k, to_rgb in enumerate(self.to_rgbs):  # one resolution per step
            x = self.convs[2 * k](x, conv[2 * k + 1], noise[2 * k + 1])  # up-sampling conv
            x = self.convs[2 * k + 1](x, conv[2 * k + 2], noise[2 * k + 2])
            skip = to_rgb(x, rgb[k + 1], skip)
        return skip

    def forward(self, w_plus: Tensor, noise_mode: NoiseMode = "const") -> Tensor:
        """W+ (or w) → image; identical to ``synthesize(style_space(w_plus))``."""
        return self.synthesize(self.style_space(w_plus), noise_mode)

    # --- truncation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def mean_latent(self, n: int = 4096, seed: int = 0) -> Tensor:
        """Mean w of n mapped samples (style_dim,), reproducible through `seed`."""
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.style_dim, generator=gen).to(self.input.input.device)
        return self.mapping(z).mean(dim=0)

    def truncate(self, w: Tensor, psi: float, mean: Tensor | None = None) -> Tensor:
        """w ← mean + ψ (w − mean); mean = `mean`, else `latent_avg`, else `mean_latent()`."""
        if mean is None:
            mean = self.latent_avg if self.latent_avg is not None else self.mean_latent()
        return mean + psi * (w - mean)

    # --- checkpoints -------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path_or_uri: str,
        size: int | None = None,
        style_dim: int = 512,
        n_mlp: int = 8,
        channel_multiplier: int = 2,
        *,
        storage_options: Mapping[str, Any] | None = None,
    ) -> "Generator":
        """Load a rosinality checkpoint (``{'g_ema', 'latent_avg', ...}`` or a bare state dict) or ours.

        With ``size=None`` the architecture is inferred from the state dict; otherwise the given
        arguments are used and any disagreement is reported by the strict check. Our safetensors
        files carry their own config (the arguments are then ignored). The result is in eval mode.
        ``storage_options`` go to fsspec (e.g. an S3 endpoint).
        """
        uri, opts = str(path_or_uri), dict(storage_options or {})
        if is_safetensors(uri):
            tensors, header = load_safetensors(uri, **opts)
            if header["kind"] != KIND:
                raise CheckpointError(
                    f"{uri}: checkpoint kind is {header['kind']!r}, expected {KIND!r}"
                )
            latent_avg = tensors.pop("latent_avg", None)
            return cls.from_state_dict(
                tensors,
                latent_avg,
                config=config_from_json(header["config"]),
                source=uri,
                copy=False,
            )
        state_dict, latent_avg = split_rosinality(load_public(uri, **opts), uri)
        config = (
            None
            if size is None
            else dict(
                size=size, style_dim=style_dim, n_mlp=n_mlp, channel_multiplier=channel_multiplier
            )
        )
        return cls.from_state_dict(state_dict, latent_avg, config=config, source=uri, copy=False)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        latent_avg: Tensor | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        source: str = "state dict",
        copy: bool = True,
    ) -> "Generator":
        """Build (inferring the config when None) and load strictly; the result is in eval mode.

        copy=False adopts the given tensors without copying (for freshly read checkpoints).
        """
        config = dict(config) if config is not None else infer_config(state_dict, source)
        gen = build_and_load(lambda: cls(**config), state_dict, source, copy=copy)
        if latent_avg is not None:
            if latent_avg.numel() != gen.style_dim:
                raise CheckpointError(
                    f"{source}: 'latent_avg' has shape {tuple(latent_avg.shape)}, "
                    f"model expects ({gen.style_dim},)"
                )
            gen.latent_avg = latent_avg.reshape(gen.style_dim).float()
        return gen

    def save(self, path_or_uri: str, lineage: Mapping[str, Any] | None = None) -> None:
        """Write our safetensors format: state dict (+ 'latent_avg'), config and lineage in the header."""
        tensors = dict(self.state_dict())
        if self.latent_avg is not None:
            tensors["latent_avg"] = self.latent_avg
        save_safetensors(str(path_or_uri), tensors, config=self.config, lineage=lineage, kind=KIND)

    # --- internals -----------------------------------------------------------------------------------
    def _modulation(self, layer: StyleLayer) -> nn.Module:
        return self.get_submodule(layer.name).conv.modulation

    def _as_wplus(self, w_plus: Tensor) -> Tensor:
        if w_plus.ndim == 2:
            w_plus = w_plus[:, None].expand(-1, self.n_latent, -1)
        if w_plus.ndim != 3 or w_plus.shape[1:] != (self.n_latent, self.style_dim):
            raise ValueError(
                f"expected W+ of shape (B, {self.n_latent}, {self.style_dim}) or (B, {self.style_dim}), "
                f"got {tuple(w_plus.shape)}"
            )
        return w_plus

    def _noise(self, mode: NoiseMode, batch: int) -> list[Tensor | None]:
        fixed = [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]
        if mode == "const":
            return fixed
        if mode == "none":
            return [None] * self.num_layers
        if mode == "random":
            return [
                torch.randn(batch, 1, *n.shape[-2:], device=n.device, dtype=n.dtype) for n in fixed
            ]
        raise ValueError(f"noise_mode must be 'const', 'random' or 'none', got {mode!r}")


def _channel_table(
    size: int, channel_multiplier: int, channels: Mapping[int, int] | None
) -> dict[int, int]:
    """Channels for every resolution 4..size; custom tables must cover all of them."""
    if channels is None:
        return rosinality_channels(channel_multiplier)
    table = {int(k): int(v) for k, v in channels.items()}
    missing = [2**i for i in range(2, size.bit_length()) if 2**i not in table]
    if missing:
        raise ValueError(f"channels must give every resolution 4..{size}; missing {missing}")
    return table


def config_from_json(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our header config back to constructor args (JSON turned the channel keys into strings)."""
    config = dict(config)
    if config.get("channels"):
        config["channels"] = {int(k): int(v) for k, v in config["channels"].items()}
    return config


def load_public(uri: str, **storage_options: Any) -> Any:
    """``torch.load(weights_only=True)``, also allowing the argparse.Namespace of training checkpoints."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_torch(uri, **storage_options)


def split_rosinality(ckpt: Any, source: str) -> tuple[dict[str, Tensor], Tensor | None]:
    """(g_ema state dict, latent_avg or None) of a rosinality checkpoint or of a bare state dict."""
    if isinstance(ckpt, Mapping) and "g_ema" in ckpt:
        return dict(ckpt["g_ema"]), ckpt.get("latent_avg")
    if isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        return dict(ckpt), None
    keys = list(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise CheckpointError(
        f"{source}: expected a rosinality checkpoint with 'g_ema' or a bare state dict, got {keys}"
    )


def infer_config(state_dict: Mapping[str, Tensor], source: str = "state dict") -> dict[str, Any]:
    """Generator constructor args from a rosinality state dict (size from the toRGB count, widths from shapes)."""

    def need(key: str) -> Tensor:
        if key not in state_dict:
            raise CheckpointError(
                f"{source}: missing key '{key}' (needed to infer the architecture)"
            )
        return state_dict[key]

    n_rgbs = 1 + max(
        (int(m.group(1)) for k in state_dict if (m := re.fullmatch(r"to_rgbs\.(\d+)\.bias", k))),
        default=-1,
    )
    n_mlp = sum(1 for k in state_dict if re.fullmatch(r"style\.\d+\.weight", k))
    size = 2 ** (n_rgbs + 2)
    channels = {4: need("input.input").shape[1]}
    channels.update(
        {2 ** (k + 3): need(f"to_rgbs.{k}.conv.weight").shape[2] for k in range(n_rgbs)}
    )
    style_dim = need("conv1.conv.modulation.weight").shape[1]
    config: dict[str, Any] = dict(
        size=size, style_dim=style_dim, n_mlp=n_mlp, channel_multiplier=2, channels=channels
    )
    for cm in (2, 1, 4):  # prefer a standard multiplier when the widths are rosinality's
        if all(rosinality_channels(cm)[r] == c for r, c in channels.items()):
            config.update(channel_multiplier=cm, channels=None)
            break
    return config


def build_and_load(
    factory: Callable[[], nn.Module],
    state_dict: Mapping[str, Tensor],
    source: str,
    copy: bool = True,
) -> Any:
    """Build on the meta device (no random init), check strictly, then adopt the checkpoint's tensors."""
    with torch.device("meta"):
        module = factory()
    check_state_dict({k: v.shape for k, v in module.state_dict().items()}, state_dict, source)
    tensors = {k: v.clone() if copy else v for k, v in state_dict.items()}
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.eval()
