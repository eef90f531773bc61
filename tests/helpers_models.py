"""Helpers for the model tests: public format listings, synthetic checkpoints, tiny seeded StyleGAN2 /
e4e models, and a synthetic face-landmark network (TorchScript) with marker faces it finds."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from models.e4e import Encoder
from models.stylegan2 import Generator

FORMATS = Path(__file__).resolve().parent / "formats"

# A 32 px generator with custom widths: 7 conv + 4 toRGB layers, 8 W+ rows of 64; milliseconds on CPU.
TINY_G = dict(size=32, style_dim=64, n_mlp=2, channels={4: 64, 8: 48, 16: 32, 32: 16})
# A 32 px-input encoder paired with TINY_G (8 styles of 64).
TINY_E = dict(
    n_styles=8, style_dim=64, input_size=32, backbone_blocks=(1, 1, 2, 1), widths=(16, 24, 32, 48)
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
        ],
    ),
]


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """IEEE float32 and deterministic cuDNN inside the block (no effect on the CPU).

    Two runs of the same float32 graph on a GPU need not agree to allclose's default rtol 1e-5:
    cuDNN convolutions use TF32 by default (``torch.backends.cudnn.conv.fp32_precision == "tf32"``,
    10-bit mantissa, ~1e-3 relative error on Ampere and later, H200 included), and the algorithms
    cuDNN picks for a transposed convolution (StyleGAN2's up-sampling conv) may reduce with atomics,
    in another order on every call. With TF32 off and deterministic algorithms the same graph gives
    the same bits, so the CUDA variants keep the CPU's tolerances instead of a looser one.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.deterministic, cudnn.benchmark)
    matmul.fp32_precision = cudnn.conv.fp32_precision = "ieee"
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        matmul.fp32_precision, cudnn.conv.fp32_precision = saved[:2]
        cudnn.deterministic, cudnn.benchmark = saved[2:]


@cache
def load_format(name: str) -> dict[str, Any]:
    """A public checkpoint listing from tests/formats (names, shapes, dtypes in checkpoint order)."""
    return json.loads((FORMATS / f"{name}.json").read_text())


def synthetic_state(fmt: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors with exactly the listed names, shapes and dtypes; tensor i is filled with the value i
    (cheap, and every parameter carries a tag that shows where it landed)."""
    out = {}
    for i, (name, shape) in enumerate(fmt["state_dict"].items()):
        if name.startswith(prefix):
            dtype = getattr(torch, fmt["dtypes"].get(name, "float32"))
            out[name] = torch.full(shape, i, dtype=dtype)
    return out


def meta_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def tiny_generator(seed: int = 0, **overrides: Any) -> Generator:
    """Seeded TINY_G with non-zero noise strengths and biases, so every path of the network matters."""
    torch.manual_seed(seed)
    gen = Generator(**{**TINY_G, **overrides})
    with torch.no_grad():
        for name, p in gen.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.3)
            elif name.endswith("activate.bias") or (
                name.startswith("to_rgb") and name.count(".") <= 2 and name.endswith(".bias")
            ):
                p.normal_(0, 0.1)
    gen.latent_avg = torch.randn(gen.style_dim)
    return gen.eval()


def tiny_encoder(seed: int = 0, generator: Generator | None = None, **overrides: Any) -> Encoder:
    """Seeded TINY_E in eval mode with non-trivial BatchNorm statistics and a random latent_avg."""
    torch.manual_seed(seed)
    enc = Encoder(**{**TINY_E, **overrides}, generator=generator)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    enc.latent_avg = torch.randn(enc.n_styles, enc.style_dim)
    return enc.eval()


# --- face alignment (ingest.align) --------------------------------------------------------------

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)  # left eye, right eye, mouth centre
EYES = 40.0  # eye distance in source pixels; the mouth lies as far below the eye line


class MarkerLandmarks(torch.nn.Module):
    """68 iBUG points from markers: the red disc's centre is the left eye (points 36-41), the blue one
    the right eye (42-47), the green one the mouth centre with its corners (48, 54) ± 0.35 × the eye
    line. No marker: NaN points, as a detector that finds no face might give."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, g, b = x[0, 0], x[0, 1], x[0, 2]
        eye_l = marker_centroid((r > 0.6) & (g < 0.4) & (b < 0.4))
        eye_r = marker_centroid((b > 0.6) & (r < 0.4) & (g < 0.4))
        mouth = marker_centroid((g > 0.6) & (r < 0.4) & (b < 0.4))
        across = (eye_r - eye_l) * 0.35
        lm = ((eye_l + eye_r) / 2).expand(68, 2).clone()
        lm[36:42] = eye_l
        lm[42:48] = eye_r
        lm[48] = mouth - across
        lm[54] = mouth + across
        return lm


def marker_centroid(mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    n = m.sum()  # 0: NaN (0 / 0)
    xs = torch.arange(m.shape[1], dtype=torch.float32)
    ys = torch.arange(m.shape[0], dtype=torch.float32)
    return torch.stack([(m.sum(0) * xs).sum() / n, (m.sum(1) * ys).sum() / n])


class FivePoints(torch.nn.Module):
    """A model of the wrong kind: 5 points, not 68."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(5, 2)


def save_torchscript(module: torch.nn.Module, path: Path) -> str:
    with warnings.catch_warnings():  # torch 2.14 calls TorchScript deprecated; it still works
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


def marker_face(
    tilt_deg: float = 0.0, size: tuple[int, int] = (200, 200), at=(100.0, 90.0), markers=True
) -> Image.Image:
    """A grey picture with a marker face: eyes EYES apart, the mouth EYES below, tilted by tilt_deg
    (clockwise on screen) about the eye midpoint ``at``."""
    img = Image.new("RGB", size, (128, 128, 128))
    if not markers:
        return img
    draw, t = ImageDraw.Draw(img), math.radians(tilt_deg)
    for (dx, dy), colour in (((-EYES / 2, 0), RED), ((EYES / 2, 0), BLUE), ((0, EYES), GREEN)):
        x = at[0] + dx * math.cos(t) - dy * math.sin(t)
        y = at[1] + dx * math.sin(t) + dy * math.cos(t)
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
    return img
