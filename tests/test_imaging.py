"""The one image encoder every stage writes with (models.imaging.encode_image)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.imaging import LOSSY_QUALITY, encode_image


def _pixels(seed: int = 0) -> np.ndarray:
    """A smooth gradient with noise: compressible, but not trivially (like a rendered image)."""
    y, x = np.mgrid[0:64, 0:64]
    noise = np.random.default_rng(seed).integers(0, 24, (64, 64, 3))
    gradient = np.stack([x * 3, y * 3, (x + y) * 2], axis=-1)
    return (gradient + noise).clip(0, 255).astype(np.uint8)


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_png_is_lossless_at_every_level_and_the_level_trades_size():
    pixels = _pixels()
    fast, small = encode_image(pixels, "png", png_level=1), encode_image(pixels, "png", png_level=9)
    assert np.array_equal(_decode(fast), pixels) and np.array_equal(_decode(small), pixels)
    assert len(small) < len(fast)


@pytest.mark.parametrize("fmt, pil_format", [("jpg", "JPEG"), ("webp", "WEBP")])
def test_lossy_formats_use_one_quality_for_arrays_and_pil_images(fmt, pil_format):
    pixels = _pixels()
    data = encode_image(pixels, fmt)
    assert Image.open(io.BytesIO(data)).format == pil_format
    assert data == encode_image(Image.fromarray(pixels), fmt)
    ours, pil_default = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(ours, format=pil_format, quality=LOSSY_QUALITY)
    Image.fromarray(pixels).save(pil_default, format=pil_format)
    assert data == ours.getvalue()
    error = {
        name: np.abs(_decode(d).astype(int) - pixels).mean()
        for name, d in (("ours", data), ("pil_default", pil_default.getvalue()))
    }
    assert error["ours"] < error["pil_default"]


def test_decoded_batches_are_contiguous_nchw_in_the_generator_range():
    from infra.storage.readers import decode_images

    pixels = _pixels()
    batch = decode_images([encode_image(pixels, "png", png_level=1)] * 2)
    assert (
        batch.shape == (2, 3, 64, 64) and batch.is_contiguous()
    )  # channels-last would change conv rounding
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(batch[1], expected)
