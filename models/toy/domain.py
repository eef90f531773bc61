"""The toy domain: coloured shapes on coloured backgrounds, rendered procedurally from five attributes.

It is the embedded default (docs/toy-domain.md): a first offline run trains a small
generator, encoder and CLIP on these renders, and the attribute oracle reads edits back. So every
attribute is a small categorical set whose values stay unambiguous under the renderer's jitter, and
images are smooth (analytic anti-aliasing from signed distances) because generators learn smooth
images faster.

Geometry is in image-width units: the image spans [0, 1]², x to the right, y downwards. Every item of
``render_batch(n, seed)`` draws from its own generator, ``default_rng([seed, i])``, so image ``i`` of a
seed is the same whatever ``n`` or chunking: a catalog written in chunks equals one big batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

# Ordered value lists; an attribute's class index is its position here (the oracle's label).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "diamond"),
    "shape_color": ("red", "green", "blue", "yellow", "purple", "orange"),
    "background": ("white", "black", "gray", "navy"),
    "size": ("small", "medium", "large"),
    "position": ("center", "left", "right", "top", "bottom"),
}
NAMES: tuple[str, ...] = tuple(ATTRIBUTES)

SHAPE_RGB = np.array(
    [
        (220, 40, 40),
        (40, 170, 70),
        (40, 90, 230),  # red, green, blue
        (240, 210, 40),
        (150, 60, 200),
        (245, 135, 30),
    ],
    np.float32,
)  # yellow, purple, orange
BACKGROUND_RGB = np.array(
    [(240, 240, 240), (20, 20, 20), (128, 128, 128), (20, 35, 105)], np.float32
)
RADIUS = np.array(
    [0.11, 0.16, 0.23], np.float32
)  # small, medium, large: circle radius (width units)
OFFSET = 0.18  # centre offset of left/right/top/bottom
POSITION_XY = (
    np.array([(0, 0), (-OFFSET, 0), (OFFSET, 0), (0, -OFFSET), (0, OFFSET)], np.float32) + 0.5
)

# Jitter half-ranges: small enough that no two values of an attribute can look alike.
JITTER_XY = 0.02  # centre offset (≈1.3 px at 64 px); large shapes stay inside the frame
JITTER_SCALE = 0.05  # relative size
JITTER_ROT = np.pi / 18  # ±10° for polygons (diamond = square turned 45°, far from ±10°)
JITTER_FG = 12.0  # per-channel shape colour, 0..255
JITTER_BG = 8.0  # background brightness, 0..255

# Polygons as (normal angles, inradius / radius): sd(p) = max_k n_k·p - d. Triangle repeats an edge to pad.
_POLYGONS = {
    "square": ((0, 90, 180, 270), 0.89),  # area ≈ circle of the same radius
    "triangle": ((90, 210, 330, 90), 0.6),  # equilateral, apex up, circumradius 1.2 r
    "diamond": ((45, 135, 225, 315), 0.79),  # half-diagonal 1.12 r
}
_TRIANGLE_SHIFT = 0.3  # move the triangle down by this × r so its bounding box is centred
_N_UNIFORMS = len(NAMES) + 8  # attribute draws + dx, dy, scale, rot, fg rgb, bg


@dataclass(frozen=True)
class Attributes:
    """One image's ground truth; every field is a value of ``ATTRIBUTES[field]``."""

    shape: str
    shape_color: str
    background: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name in NAMES:
            if getattr(self, name) not in ATTRIBUTES[name]:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {ATTRIBUTES[name]}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attributes:
        return cls(**{name: d[name] for name in NAMES})

    def indices(self) -> tuple[int, ...]:
        """Class index per attribute, in ``NAMES`` order (the oracle's labels)."""
        return tuple(ATTRIBUTES[name].index(getattr(self, name)) for name in NAMES)

    @classmethod
    def from_indices(cls, idx: tuple[int, ...] | list[int] | np.ndarray) -> Attributes:
        return cls(**{name: ATTRIBUTES[name][int(i)] for name, i in zip(NAMES, idx)})

    def replace(self, **changes: str) -> Attributes:
        """A copy with some attributes changed: the ground truth of an edit."""
        return Attributes(**{**self.to_dict(), **changes})


def sample_attributes(rng: np.random.Generator) -> Attributes:
    """Uniform over every combination of values."""
    return Attributes.from_indices([rng.integers(len(ATTRIBUTES[n])) for n in NAMES])


def render(attrs: Attributes, rng: np.random.Generator | None = None, size: int = 64) -> np.ndarray:
    """One image, uint8 (size, size, 3). Without ``rng`` the canonical render (no jitter)."""
    u = np.full((1, _N_UNIFORMS), 0.5) if rng is None else rng.random((1, _N_UNIFORMS))
    return _rasterize(_params(np.array([attrs.indices()]), u[:, len(NAMES) :]), size)[0]


def render_batch(
    n: int, seed: int, size: int = 64, start: int = 0
) -> tuple[np.ndarray, list[Attributes]]:
    """Items ``start .. start+n-1`` of ``seed``: images uint8 (n, size, size, 3) and their attributes."""
    u = (
        np.stack(
            [np.random.default_rng([seed, i]).random(_N_UNIFORMS) for i in range(start, start + n)]
        )
        if n
        else np.zeros((0, _N_UNIFORMS))
    )
    idx = uniforms_to_indices(u)
    return _rasterize(_params(idx, u[:, len(NAMES) :]), size), [
        Attributes.from_indices(row) for row in idx
    ]


def render_random(
    rng: np.random.Generator, n: int, size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Fast path for training loops: n fresh images from one generator and their labels (n, 5) int64."""
    u = rng.random((n, _N_UNIFORMS))
    idx = uniforms_to_indices(u)
    return _rasterize(_params(idx, u[:, len(NAMES) :]), size), idx


def uniforms_to_indices(u: np.ndarray) -> np.ndarray:
    """Uniform draws (n, ≥5) in [0, 1) → attribute indices (n, 5), uniform over each value list."""
    counts = np.array([len(ATTRIBUTES[n]) for n in NAMES])
    return np.minimum((u[:, : len(NAMES)] * counts).astype(np.int64), counts - 1)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) → float (n, 3, H, W) in [-1, 1], the generator's convention."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _params(idx: np.ndarray, j: np.ndarray) -> dict[str, np.ndarray]:
    """Attribute indices (n, 5) and jitter uniforms (n, 8) → per-image geometry and colours."""
    shape, color, bg, size, pos = idx.T
    j = (2.0 * j - 1.0).astype(np.float32)  # jitter uniforms in [-1, 1]
    radius = RADIUS[size] * (1 + JITTER_SCALE * j[:, 2])
    centre = POSITION_XY[pos] + JITTER_XY * j[:, 0:2]
    names = ATTRIBUTES["shape"]
    angles = np.zeros((len(idx), 4), np.float32)
    inradius = np.zeros(len(idx), np.float32)
    for k, name in enumerate(names[1:], start=1):
        normals, ratio = _POLYGONS[name]
        angles[shape == k] = np.deg2rad(normals)
        inradius[shape == k] = ratio
    rot = np.where(shape == 0, 0.0, JITTER_ROT * j[:, 3]).astype(np.float32)
    centre[:, 1] += np.where(
        shape == names.index("triangle"), _TRIANGLE_SHIFT * radius, 0.0
    ).astype(np.float32)
    return {
        "circle": shape == 0,
        "centre": centre,
        "radius": radius,
        "angles": angles + rot[:, None],
        "inradius": inradius * radius,
        "fg": SHAPE_RGB[color] + JITTER_FG * j[:, 4:7],
        "bg": BACKGROUND_RGB[bg] + JITTER_BG * j[:, 7:8],
    }


def _rasterize(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Signed distance per pixel → coverage clip(0.5 - sd·size, 0, 1): a one-pixel box filter."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    dx = grid[None, None, :] - p["centre"][:, 0, None, None]  # (n, 1, W)
    dy = grid[None, :, None] - p["centre"][:, 1, None, None]  # (n, H, 1)
    cos, sin = (
        np.cos(p["angles"])[:, :, None, None],
        np.sin(p["angles"])[:, :, None, None],
    )  # (n, 4, 1, 1)
    sd = cos[:, 0] * dx + sin[:, 0] * dy  # (n, H, W): max over edge planes
    for k in range(1, cos.shape[1]):
        np.maximum(sd, cos[:, k] * dx + sin[:, k] * dy, out=sd)
    sd -= p["inradius"][:, None, None]
    circle = p["circle"]
    if circle.any():
        sd[circle] = np.sqrt(dx[circle] ** 2 + dy[circle] ** 2) - p["radius"][circle, None, None]
    cover = np.clip(0.5 - sd * size, 0.0, 1.0)[..., None]  # (n, H, W, 1)
    bg, fg = p["bg"][:, None, None, :], p["fg"][:, None, None, :]
    return np.clip(np.rint(bg + cover * (fg - bg)), 0, 255).astype(np.uint8)
