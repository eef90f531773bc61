"""CLIP input preprocessing on tensors: images (B, 3, H, W) in [-1, 1] → the model's (B, 3, S, S) input.

``clip`` is the model's own preprocessing; ``deltaedit`` is the official DeltaEdit code's (×7 nearest
upsampling then average pooling, no mean/std), needed to reuse the released mapper's CLIP space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def clip_preprocess(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
) -> torch.Tensor:
    """The model's preprocessing on tensors: [-1, 1] → [0, 1], resize, centre crop, normalise."""
    x = ((images.float() + 1) / 2).clamp(0, 1)
    h, w = x.shape[-2:]
    if resize_mode == "squash":
        new = (size, size)
    elif (
        resize_mode == "shortest"
    ):  # torchvision Resize(int): shorter side = size, longer side truncated
        new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    else:
        raise ValueError(
            f"resize_mode {resize_mode!r} is not supported on tensors (use shortest or squash)"
        )
    if (h, w) != new:
        smooth = interpolation in ("bilinear", "bicubic")
        x = F.interpolate(
            x,
            size=new,
            mode=interpolation,
            antialias=smooth,
            align_corners=False if smooth else None,
        ).clamp(0, 1)  # uint8 images clip too
    top, left = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def deltaedit_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """DeltaEdit's ``AvgPool2d(H·7 // size)(Upsample(scale_factor=7)(x))``, without materialising 7H × 7W.

    Nearest ×7 then average pooling is linear and separable: out = A x Aᵀ with A (size, H) holding the
    overlap of each pooling window with each upsampled pixel. Same result, a fraction of the memory
    (the literal version needs 7168² floats per channel at 1024 px).
    """
    h, w = images.shape[-2:]
    if h != w:
        raise ValueError(f"deltaedit preprocessing needs square images, got {h}×{w}")
    if (7 * h) % size:
        raise ValueError(
            f"deltaedit preprocessing needs 7·H divisible by the CLIP image size: "
            f"7·{h} = {7 * h} is not a multiple of {size}; use preprocess='clip'"
        )
    a = _upsample_pool_matrix(h, size).to(images.device)
    return torch.einsum("sh,bchw,tw->bcst", a, images.float(), a)


def _upsample_pool_matrix(n: int, size: int, factor: int = 7) -> torch.Tensor:
    k = factor * n // size  # pooling kernel (32 at 1024 → 224)
    out = torch.arange(size).view(-1, 1) * k  # window starts (size, 1)
    src = torch.arange(n).view(1, -1) * factor  # upsampled block starts (1, n)
    overlap = (torch.minimum(out + k, src + factor) - torch.maximum(out, src)).clamp_min(0)
    return overlap.float() / k  # (size, n), rows sum to 1


def pixels_to_tensor(images: Any) -> torch.Tensor:
    """PIL images, uint8 (B, H, W, 3) array/tensor or one (H, W, 3) image → float (B, 3, H, W) in [-1, 1]."""
    if isinstance(images, (list, tuple)):
        images = np.stack(
            [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
        )
    elif hasattr(images, "convert"):  # a single PIL image
        images = np.asarray(images.convert("RGB"))[None]
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[None]
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1
