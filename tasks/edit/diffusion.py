"""DeltaEdit-D decoding for the edit stage: DDIM-encode each input photo under its code s once, then decode
the edited codes ŝ from that x_T (plain, or mask-guided: ŝ only where ε(ŝ) and ε(s) disagree).

Why encode the photo rather than sample from noise: a deterministic DDIM encoding x₀ → x_T under s keeps
what s does not describe (the details GAN inversion loses), so decoding x_T under s reconstructs the photo
and decoding it under ŝ changes what the edit asks for. ``encode_depth`` < 1 stops the encoding part-way
(x at step t_max instead of pure noise): more of the photo is kept and less can change. ``guidance`` w > 1
decodes with ε(s) + w·(ε(ŝ) − ε(s)) (``models.diffusion.EditGuidance``), for a decoder that follows its
code weakly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from infra.config import DiffusionEditConfig
from models.diffusion import EditGuidance, StyleUNet, ddim_decode, ddim_encode, mask_guided_decode


@dataclass
class DiffusionDecoder:
    model: StyleUNet
    cfg: DiffusionEditConfig
    batch_size: int

    @property
    def t_max(self) -> int:
        """The step encoding stops at: ``encode_depth`` of the way to T − 1."""
        return round(self.cfg.encode_depth * (self.model.config.timesteps - 1))

    def check(self, x0: Tensor, s: Tensor) -> None:
        """Input photos and codes must be what the model was trained on (clear error otherwise)."""
        size, dim = self.model.config.image_size, self.model.style_dim
        if tuple(x0.shape[-2:]) != (size, size):
            raise ValueError(
                f"the diffusion decoder takes {size}×{size} images, the input is "
                f"{x0.shape[-1]}×{x0.shape[-2]}"
            )
        if s.shape[-1] != dim:
            raise ValueError(
                f"the diffusion decoder takes style codes of {dim} channels, got {s.shape[-1]}"
            )

    @torch.no_grad()
    def encode(self, x0: Tensor, s: Tensor) -> Tensor:
        """x at step ``t_max`` of each photo (B, 3, H, W) under its code (B, S), in batches."""
        self.check(x0, s)
        return torch.cat(
            [
                ddim_encode(
                    self.model, x, src, self.cfg.steps, refine=self.cfg.refine, t_max=self.t_max
                ).cpu()
                for x, src in self._batches(x0, s)
            ]
        )

    @torch.no_grad()
    def decode(self, x_t: Tensor, s: Tensor, s_edit: Tensor | None = None) -> Tensor:
        """Decode under ``s_edit`` (with guidance from the source codes ``s``), or reconstruct under ``s``."""
        images = []
        for x, src, edit in self._batches(x_t, s, s if s_edit is None else s_edit):
            eps = (
                EditGuidance(self.model, src, self.cfg.guidance)
                if self.cfg.guidance != 1
                else self.model
            )
            images.append(ddim_decode(eps, x, edit, self.cfg.steps, t_max=self.t_max).cpu())
        return torch.cat(images)

    @torch.no_grad()
    def decode_masked(self, x_t: Tensor, s: Tensor, s_edit: Tensor) -> tuple[Tensor, Tensor]:
        """(images, masks (B, 1, H, W)): ŝ inside the edit mask, s outside (``mask_guided_decode``)."""
        images, masks = [], []
        for x, src, edit in self._batches(x_t, s, s_edit):
            image, mask = mask_guided_decode(
                self.model,
                x,
                src,
                edit,
                self.cfg.steps,
                self.cfg.mask_threshold,
                self.cfg.mask_smooth,
                t_max=self.t_max,
                guidance=self.cfg.guidance,
            )
            images.append(image.cpu())
            masks.append(mask.cpu())
        return torch.cat(images), torch.cat(masks)

    def _batches(self, *tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
        """Row slices of ``batch_size`` of every tensor, on the model's device."""
        device = next(self.model.parameters()).device
        for lo in range(0, len(tensors[0]), self.batch_size):
            yield tuple(t[lo : lo + self.batch_size].to(device) for t in tensors)
