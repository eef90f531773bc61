"""Tensor ↔ image-file helpers shared by the stages that produce images."""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8, rounding like torchvision's save_image."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def encode_png(pixels: np.ndarray, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square images to ``size`` px (antialiased when shrinking); unchanged if already that size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of two (B, 3, H, W) batches in [-1, 1] (peak-to-peak range 2)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(dim=1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)
