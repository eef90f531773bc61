"""The Delta Mapper of DeltaEdit and the paper's "straightforward" baseline mapper.

Lyu et al., "DeltaEdit: Exploring Text-free Training for Text-Driven Image Manipulation" (CVPR 2023):
the mapper takes a style code s₁, the CLIP embedding i₁ of its image and a CLIP-space direction Δi, and
predicts the style-space edit Δs. It is trained without text (Δi = i₂ − i₁ between two images,
Δs = s₂ − s₁) and at inference Δt = t(target) − t(source) replaces Δi.

Architecture (official ``delta_mapper.py``), for each of the coarse / medium / fine groups of conv layers:
  style module     sm: Mapper(C → C) on s, shared over the layers of a group whose layers have one width
                       (applied to (B, L, C)), or on the flat group vector otherwise (FFHQ fine: 2464)
  condition module cm: Mapper(2D → C) on cat(i/‖i‖, Δi/max(‖Δi‖, 1e-5))
  fusion module    fm: Mapper(2C → C, no PixelNorm) on cat(sm, cm broadcast over the layers)
The layout comes from the generator, so any StyleGAN2 resolution works; the FFHQ 1024 layout with
D = 512 reproduces the released ``net_face.pth`` key for key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from models.checkpoint import (
    CheckpointError,
    is_safetensors,
    load_safetensors,
    load_strict,
    load_torch,
    save_safetensors,
)
from models.layout import Group, StyleLayout
from models.mapper_blocks import Mapper, NormAxis

GROUPS: tuple[Group, ...] = ("coarse", "medium", "fine")


@dataclass(frozen=True)
class MapperConfig:
    layout: dict[
        str, Any
    ]  # StyleLayout.to_dict() of the generator; only its conv layers are edited
    clip_dim: int = 512  # CLIP embedding size D; the condition has 2·D features
    num_layers: int = 4  # EqualLinear layers per Mapper
    lr_mul: float = 0.01  # equalised-learning-rate multiplier of every EqualLinear
    norm_axis: NormAxis = (
        "layer"  # PixelNorm axis on (B, L, C) style blocks; "layer" = official quirk
    )

    @classmethod
    def for_generator(
        cls,
        size: int,
        channel_multiplier: int = 2,
        channels: dict[int, int] | None = None,
        **kwargs: Any,
    ) -> "MapperConfig":
        """Config for rosinality's Generator(size, channel_multiplier) (or custom per-resolution channels)."""
        layout = StyleLayout.for_generator(size, channel_multiplier, channels=channels)
        return cls(layout=layout.to_dict(), **kwargs)

    @classmethod
    def official(cls) -> "MapperConfig":
        """The released FFHQ mapper: 1024 px generator (6048 conv channels), CLIP ViT-B/32 (D = 512)."""
        return cls.for_generator(1024, clip_dim=512)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MapperConfig":
        return cls(**data)


class GroupPlan(NamedTuple):
    name: Group
    start: int  # slice of the flat conv style vector
    stop: int
    n_layers: int  # L: > 0 when the style module is shared over layers, else 0 (flat)
    width: int  # C: per-layer channels when shared, else the group's total channels


def plan_groups(layout: StyleLayout) -> tuple[GroupPlan, ...]:
    """Coarse / medium / fine slices of the conv style vector, and whether each can share one module."""
    plans = []
    for group in GROUPS:
        layers = layout.group_layers(group)
        if not layers:
            continue
        start, stop = layers[0].offset, layers[-1].stop
        if sum(layer.channels for layer in layers) != stop - start:
            raise ValueError(f"layers of the {group} group are not contiguous in the style vector")
        widths = {layer.channels for layer in layers}
        shared = len(widths) == 1
        plans.append(
            GroupPlan(
                group,
                start,
                stop,
                len(layers) if shared else 0,
                layers[0].channels if shared else stop - start,
            )
        )
    if plans[0].start != 0 or plans[-1].stop != layout.conv_total:
        raise ValueError("coarse/medium/fine groups must cover the conv style vector in order")
    return tuple(plans)


class DeltaMapper(nn.Module):
    """DeltaEdit's Delta Mapper: (s, i, Δi) → Δs.

    Call ``M(s, clip_img, delta_clip)`` with s (B, conv_total), clip_img (B, D), delta_clip (B, D); returns
    Δs (B, conv_total). Both CLIP inputs are normalised here as the official data loader does, so their
    scale does not matter: pass the raw image embedding and the unnormalised Δi (training) or Δt (editing).
    """

    KIND: ClassVar[str] = "delta_mapper"

    def __init__(self, config: MapperConfig) -> None:
        super().__init__()
        self.config = config
        self.layout = StyleLayout.from_dict(config.layout)
        self.groups = plan_groups(self.layout)
        self.lineage: dict[str, Any] = {}
        opts = dict(num_layers=config.num_layers, lr_mul=config.lr_mul, norm_axis=config.norm_axis)
        cond_dim = 2 * config.clip_dim
        # registration order = state-dict order of the released checkpoint: all sm, then cm, then fm
        for g in self.groups:
            setattr(self, f"sm_{g.name}", Mapper(g.width, g.width, **opts))
        for g in self.groups:
            setattr(self, f"cm_{g.name}", Mapper(cond_dim, g.width, **opts))
        for g in self.groups:
            setattr(self, f"fm_{g.name}", Mapper(2 * g.width, g.width, norm=False, **opts))

    @property
    def style_dim(self) -> int:
        return self.layout.conv_total

    @staticmethod
    def condition(clip_img: torch.Tensor, delta_clip: torch.Tensor) -> torch.Tensor:
        """cat(i/‖i‖, Δi/max(‖Δi‖, 1e-5)): (B, D), (B, D) -> (B, 2D), image embedding first."""
        img = clip_img / clip_img.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        delta = delta_clip / delta_clip.norm(dim=-1, keepdim=True).clamp_min(1e-5)
        return torch.cat([img, delta], dim=-1)

    def forward(
        self, s: torch.Tensor, clip_img: torch.Tensor, delta_clip: torch.Tensor
    ) -> torch.Tensor:
        return self.fuse(s, self.condition(clip_img, delta_clip))

    def fuse(self, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Δs from s (B, conv_total) and a prepared condition (B, 2D) — the official ``forward``."""
        self._check_inputs(s, cond)
        outs = []
        for g in self.groups:
            x = s[:, g.start : g.stop]  # (B, N)
            c = getattr(self, f"cm_{g.name}")(cond)  # (B, C)
            if g.n_layers:
                x = x.reshape(-1, g.n_layers, g.width)  # (B, L, C)
                c = c.unsqueeze(1).expand(-1, g.n_layers, -1)  # (B, L, C)
            x = getattr(self, f"sm_{g.name}")(x)
            y = getattr(self, f"fm_{g.name}")(torch.cat([x, c], dim=-1))
            outs.append(y.reshape(s.shape[0], -1))  # (B, N)
        return torch.cat(outs, dim=1)  # (B, conv_total)

    def _check_inputs(self, s: torch.Tensor, cond: torch.Tensor) -> None:
        if s.ndim != 2 or s.shape[1] != self.style_dim:
            raise ValueError(f"s must be (B, {self.style_dim}), got {tuple(s.shape)}")
        if cond.shape != (s.shape[0], 2 * self.config.clip_dim):
            raise ValueError(
                f"condition must be ({s.shape[0]}, {2 * self.config.clip_dim}) "
                f"(two CLIP embeddings of {self.config.clip_dim}), got {tuple(cond.shape)}"
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
    def from_checkpoint(
        cls, uri: str, config: MapperConfig | None = None, **storage_options: Any
    ) -> "DeltaMapper":
        """Load our safetensors (kind checked) or a torch-saved bare state dict such as ``net_face.pth``.

        A torch state dict carries no config: ``config`` defaults to the official FFHQ 1024 / D=512 layout.
        Loading is strict; a mismatch raises CheckpointError naming the parameter and both shapes.
        """
        if is_safetensors(uri):
            tensors, header = load_safetensors(uri, **storage_options)
            if header["kind"] != cls.KIND:
                raise CheckpointError(
                    f"{uri} holds a '{header['kind']}' checkpoint, not a '{cls.KIND}'"
                )
            model = cls(MapperConfig.from_dict(header["config"]))
            model.lineage = header["lineage"]
        else:
            tensors = load_torch(uri, **storage_options)
            if isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
                tensors = tensors["state_dict"]
            model = cls(config or MapperConfig.official())
        load_strict(model, tensors, str(uri))
        return model


class StraightforwardMapper(DeltaMapper):
    """The paper's naïve text-free baseline: (s₁, i₁, i₂) → Δs, CLIP image features as pseudo text.

    DeltaEdit (CVPR 2023, introduction) first tries conditioning on the target image's CLIP embedding and
    swapping in the target text's embedding at inference; it edits poorly because of the modality gap
    between image and text embeddings, which motivates the delta space. Same style / condition / fusion
    structure as DeltaMapper, but the condition is cat(i₁/‖i₁‖, i₂/‖i₂‖) instead of (i₁, Δi).
    """

    KIND: ClassVar[str] = "straightforward_mapper"

    @staticmethod
    def condition(clip_img: torch.Tensor, clip_img2: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """cat(i₁/‖i₁‖, i₂/‖i₂‖): (B, D), (B, D) -> (B, 2D)."""
        first = clip_img / clip_img.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        second = clip_img2 / clip_img2.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return torch.cat([first, second], dim=-1)

    def forward(
        self,
        s: torch.Tensor,
        clip_img: torch.Tensor,  # type: ignore[override]
        clip_img2: torch.Tensor,
    ) -> torch.Tensor:
        return self.fuse(s, self.condition(clip_img, clip_img2))
