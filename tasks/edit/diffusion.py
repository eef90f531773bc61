"""DeltaEdit-D decoding for the edit stage: DDIM-encode each input photo under its code s once, then decode
the edited codes ŝ from that x_T (plain, or mask-guided: ŝ only where ε(ŝ) and ε(s) disagree).

Why encode the photo rather than sample from noise: a deterministic DDIM encoding x₀ → x_T under s keeps
what s does not describe (the details GAN inversion loses), so decoding x_T under s reconstructs the photo
and decoding it under ŝ changes what the edit asks for. ``encode_depth`` < 1 stops the encoding part-way
(x at step t_max instead of pure noise): more of the photo is kept and less can change. ``guidance`` w > 1
decodes with ε(s) + w·(ε(ŝ) − ε(s)) (``models.diffusion.EditGuidance``), for a decoder that follows its
code weakly. ``eta`` > 0 decodes with fresh noise each step: the part of a photo the code does not explain
(kept in x_T at its place) fades, at the cost of some of the photo's detail. ``edit_region: generator``
encodes, for each edit, the photo with G(s) where the edit changes G's rendering (``encode_edits``), so
a moved or reshaped shape leaves no outline. A decoder conditioned on G(s) too (``render_condition``)
gets the generator's rendering of each code, the source's toRGB styles kept (DeltaEdit edits conv
styles only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from infra.config import DiffusionEditConfig
from models.diffusion import EditGuidance, StyleUNet, ddim_decode, ddim_encode, mask_guided_decode
from models.imaging import pool_to

Render = Callable[[Tensor, Tensor], Tensor]  # (conv, toRGB styles) → G(s) in [-1, 1]


def region_mask(source: Tensor, edited: Tensor, threshold: float, dilate: int) -> Tensor:
    """(B, 1, H, W) in [0, 1]: where the renderings ``edited`` (B, 3, H, W) differ from ``source``
    (1, 3, H, W) by more than ``threshold`` (channel mean of |·|), grown by ``dilate`` pixels and
    feathered over 3 px so the photo and G(s) meet without a seam."""
    changed = ((edited - source).abs().mean(1, keepdim=True) > threshold).to(edited.dtype)
    if dilate:
        changed = F.max_pool2d(changed, 2 * dilate + 1, stride=1, padding=dilate)
    return F.avg_pool2d(changed, 3, stride=1, padding=1, count_include_pad=False)


def noise_seed(image_key: str) -> int:
    """The seed of an image's decoding noise (``eta`` > 0): a hash of its key alone, so an edit is the
    same in any run, shard or batch, and all edits of an image share their reconstruction's noise."""
    return int.from_bytes(hashlib.blake2b(b"noise:" + image_key.encode(), digest_size=7).digest())


@dataclass(frozen=True)
class DiffusionEdit:
    """One diffusion edit of a photo: its record key, the key it shares with its plain / mask-guided twin,
    the edited code ŝ (S,) and whether it is mask-guided."""

    key: str
    twin: str
    code: Tensor
    masked: bool


@dataclass
class DiffusionDecoder:
    model: StyleUNet
    cfg: DiffusionEditConfig
    batch_size: int
    render: Render | None = None  # G(s) (``render_condition``; ``edit_region: generator``)

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
    def encode(self, x0: Tensor, s: Tensor, rgb: Tensor | None = None) -> Tensor:
        """x at step ``t_max`` of each photo (B, 3, H, W) under its code (B, S) (and toRGB styles ``rgb``
        for a decoder conditioned on G(s)), in batches."""
        self.check(x0, s)
        return torch.cat(
            [
                ddim_encode(
                    self.model,
                    x,
                    self._condition(src, col),
                    self.cfg.steps,
                    refine=self.cfg.refine,
                    t_max=self.t_max,
                ).cpu()
                for x, src, col in self._batches(x0, s, rgb)
            ]
        )

    @torch.no_grad()
    def edit_image(
        self, photo: Tensor, s: Tensor, rgb: Tensor, edits: list[DiffusionEdit], seed: int
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """One photo (1, 3, H, W) with code s (1, S) and toRGB styles (1, R): (its reconstruction, each
        edit's image by key, each mask-guided edit's mask by twin key). The photo is DDIM-encoded once;
        each edit starts from that x_T, or with ``edit_region: generator`` from its own encoding
        (``encode_edits``), shared by both twins; ``seed``: the noise at ``eta`` > 0."""
        x_t = self.encode(photo, s, rgb)
        recon = self.decode(x_t, s, rgb=rgb, seed=seed)[0]
        codes = {e.twin: e.code for e in edits}
        if self.cfg.edit_region == "generator" and codes:
            starts = dict(
                zip(codes, self.encode_edits(photo, s, torch.stack(list(codes.values())), rgb))
            )
        else:
            starts = dict.fromkeys(codes, x_t[0])
        images: dict[str, Tensor] = {}
        masks: dict[str, Tensor] = {}
        for masked in (False, True):
            group = [e for e in edits if e.masked == masked]
            if not group:
                continue
            n = len(group)
            args = (torch.stack([starts[e.twin] for e in group]), s.repeat(n, 1))
            codes_n, rgb_n = torch.stack([e.code for e in group]), rgb.repeat(n, 1)
            if masked:
                decoded, mask = self.decode_masked(*args, codes_n, rgb=rgb_n, seed=seed)
                masks.update({e.twin: mask[k] for k, e in enumerate(group)})
            else:
                decoded = self.decode(*args, codes_n, rgb=rgb_n, seed=seed)
            images.update({e.key: decoded[k] for k, e in enumerate(group)})
        return recon, images, masks

    @torch.no_grad()
    def encode_edits(self, x0: Tensor, s: Tensor, s_edit: Tensor, rgb: Tensor) -> Tensor:
        """x at step ``t_max`` for each edit ``s_edit`` (B, S) of one photo x0 (1, 3, H, W) with code s
        (1, S) (``edit_region: generator``): the photo with G(s) where the edit changes G's rendering
        (``region_mask``), encoded under s. Inside that region the decoder then starts from what s
        explains (decoded under ŝ it draws G(ŝ)'s content there), not from the photo's own detail, which
        the exact inversion would carry to the same place whatever ŝ says: a moved or reshaped shape left
        its outline. (Masking x_T instead does not work: the inversion spreads an edge over all of x_T.)"""
        n = len(s_edit)
        source = self._rendered(s, rgb)
        edited = torch.cat(
            [self._rendered(e, r) for _, e, r in self._batches(None, s_edit, rgb.expand(n, -1))]
        )
        mask = region_mask(source, edited, self.cfg.region_threshold, self.cfg.region_dilate)
        photos = mask * source + (1 - mask) * x0.to(mask)
        return self.encode(photos, s.expand(n, -1), rgb.expand(n, -1))

    @torch.no_grad()
    def decode(
        self,
        x_t: Tensor,
        s: Tensor,
        s_edit: Tensor | None = None,
        rgb: Tensor | None = None,
        seed: int = 0,
    ) -> Tensor:
        """Decode under ``s_edit`` (with guidance from the source codes ``s``), or reconstruct under ``s``;
        ``seed``: the noise of a decode with ``eta`` > 0 (each batch draws the same)."""
        images = []
        for x, src, edit, col in self._batches(x_t, s, s if s_edit is None else s_edit, rgb):
            src, edit = self._condition(src, col), self._condition(edit, col)
            eps = (
                EditGuidance(self.model, src, self.cfg.guidance)
                if self.cfg.guidance != 1
                else self.model
            )
            images.append(
                ddim_decode(
                    eps, x, edit, self.cfg.steps, t_max=self.t_max, eta=self.cfg.eta, seed=seed
                ).cpu()
            )
        return torch.cat(images)

    @torch.no_grad()
    def decode_masked(
        self, x_t: Tensor, s: Tensor, s_edit: Tensor, rgb: Tensor | None = None, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """(images, masks (B, 1, H, W)): ŝ inside the edit mask, s outside (``mask_guided_decode``)."""
        images, masks = [], []
        for x, src, edit, col in self._batches(x_t, s, s_edit, rgb):
            image, mask = mask_guided_decode(
                self.model,
                x,
                self._condition(src, col),
                self._condition(edit, col),
                self.cfg.steps,
                self.cfg.mask_threshold,
                self.cfg.mask_smooth,
                t_max=self.t_max,
                guidance=self.cfg.guidance,
                eta=self.cfg.eta,
                seed=seed,
            )
            images.append(image.cpu())
            masks.append(mask.cpu())
        return torch.cat(images), torch.cat(masks)

    def _condition(self, s: Tensor, rgb: Tensor | None) -> Tensor:
        """What the model is called with: s, or s with G(s) at the decoder's size (``StyleUNet.condition``)."""
        if not self.model.config.render_condition:
            return s
        return self.model.condition(s, self._rendered(s, rgb))

    def _rendered(self, s: Tensor, rgb: Tensor | None) -> Tensor:
        """G(s) in [-1, 1] at the decoder's size (the source's toRGB styles ``rgb``)."""
        if self.render is None or rgb is None:
            raise ValueError(
                "this diffusion decoder needs the generator and the codes' toRGB styles (it is "
                "conditioned on G(s), or edit_region is generator)"
            )
        device = next(self.model.parameters()).device
        return pool_to(
            self.render(s.to(device), rgb.to(device)).clamp(-1, 1), self.model.config.image_size
        )

    def _batches(self, *tensors: Tensor | None) -> Iterator[tuple[Tensor | None, ...]]:
        """Row slices of ``batch_size`` of every tensor (None stays None), on the model's device."""
        device = next(self.model.parameters()).device
        n = len(next(t for t in tensors if t is not None))
        for lo in range(0, n, self.batch_size):
            yield tuple(
                None if t is None else t[lo : lo + self.batch_size].to(device) for t in tensors
            )
