"""(image, style code) rows for DeltaEdit-D training, streamed from the stores with bounded memory.

Two pools, joined on key shard by shard (``tasks.train.row_cache``):
  codes   — the ingested images (``images`` stage) with their e4e-inverted codes (``codes`` stage): real
            photos, whose details the diffusion decoder must learn to keep beyond what s encodes;
  samples — generator samples (``samples`` stage: images and their exact codes).
Each row is ``[s (float32 × S) | pixels (uint8 × 3·H·W)]`` in one flat local file, followed by G(s)'s pixels
(uint8 × 3·H·W, at the image's size) when a ``render`` is given (a decoder with ``render_condition``); the
per-channel mean and std of s over the training rows (the U-Net standardises s with them) are computed in
the same pass.

Images are brought to one side length before they are cached, as e4e and DeltaEdit shrink G's output
(the mean of each block, ``models.imaging.pool_to``): the paper's setting mixes 1024-px generator samples
with 256-px photos. ``image_size`` (``train_diffusion.image_size``) resizes every image; None resizes the
generator samples to the ingested photos' size (``ingest.image_size``, which bulk-edit's DDIM encoding
takes) and leaves the photos as they are. The catalog's eval part (``split.eval_fraction``,
``tasks.split``) is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infra.storage.fsio import Location
from infra.storage.readers import decode_rgb, encoded_image, iter_image_samples
from infra.storage.tables import column_to_numpy, decode_metadata
from models import zoo
from models.imaging import pool_to, to_uint8
from models.stylegan2 import StyleCode
from tasks.layout import CODES, DIFFUSION_POOLS
from tasks.split import in_eval
from tasks.train.row_cache import (
    FlatRows,
    ShardPair,
    SplitCache,
    is_validation,
    materialize,
    pairs_fingerprint,
    read_columns,
    shard_pairs,
)

POOLS = DIFFUSION_POOLS  # (images stage, codes stage) per pool
ROWS, SPLIT, STATS = "rows.bin", "val.npy", "style_stats.npy"
Render = Callable[
    [np.ndarray, np.ndarray], np.ndarray
]  # (s (n, S), s_rgb (n, R)) → G(s) uint8 (n, 3, H, W)


@dataclass
class GeneratorRender:
    """G(s) of cached codes for a decoder conditioned on the rendering (``render_condition``): the
    generator of ``spec``, loaded on first use, in batches, as 8-bit pixels like the cached images."""

    spec: zoo.ModelSpec
    storage_options: dict[str, Any]
    batch_size: int = 64

    @cached_property
    def generator(self) -> Any:
        return zoo.build(self.spec, storage_options=self.storage_options).eval()

    def identity(self) -> Any:
        """What the renderings depend on (part of the cache's fingerprint)."""
        return zoo.identity(self.spec, self.storage_options)

    @torch.no_grad()
    def __call__(self, s: np.ndarray, s_rgb: np.ndarray) -> np.ndarray:
        out = []
        for lo in range(0, len(s), self.batch_size):
            code = StyleCode(
                torch.from_numpy(s[lo : lo + self.batch_size]),
                torch.from_numpy(s_rgb[lo : lo + self.batch_size]),
            )
            out.append(to_uint8(self.generator.synthesize(code)).transpose(0, 3, 1, 2))
        return np.concatenate(out)


def build_image_cache(
    root: Location,
    cache_dir: str | Path,
    *,
    pools: Sequence[str] = tuple(DIFFUSION_POOLS),
    shards: Sequence[str] | None = None,
    val_fraction: float = 0.01,
    eval_fraction: float = 0.0,
    image_size: int | None = None,
    render: GeneratorRender | None = None,
) -> "ImageCache":
    """Join the pools' images and codes into a flat row file under ``cache_dir`` (reused if current),
    every image at ``image_size`` px (None: the generator samples at the photos' size), with G(s) beside
    each image when ``render`` is given."""
    pairs = shard_pairs(root, pools, POOLS, shards)
    if not pairs:
        raise FileNotFoundError(
            f"no finished images+codes shard pairs under {root.uri} (pools {list(pools)})"
        )
    folder = materialize(
        cache_dir,
        pairs_fingerprint(
            pairs,
            "diffusion",
            val_fraction,
            *([["eval", eval_fraction]] if eval_fraction else []),
            *([["size", image_size]] if image_size else []),
            *([["render", render.identity()]] if render else []),
        ),
        lambda tmp: _write_rows(pairs, tmp, val_fraction, eval_fraction, image_size, render),
    )
    return ImageCache(folder)


def _shard_rows(
    images: Any,
    codes: Any,
    sid: str,
    eval_fraction: float = 0.0,
    image_size: int | None = None,
    render: Render | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray, Any]:
    """(keys, s (n, S), pixels (n, 3, H, W) uint8 — (n, 6, H, W) with G(s) after the image when
    ``render`` is given —, codes table) of one shard, joined on key."""
    table = read_columns(codes, sid, ["key", "s", *(["s_rgb"] if render else [])])
    pos = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    s_all = column_to_numpy(table, "s")
    held_out = eval_fraction if codes.stage == CODES else 0.0
    keys, s, pixels = [], [], []
    for sample in iter_image_samples(images, [sid]):
        key = sample["__key__"]
        if key in pos and not in_eval(key, held_out):
            keys.append(key)
            s.append(s_all[pos[key]])
            pixels.append(
                _at_size(decode_rgb(encoded_image(sample)), image_size, f"{images.stage}/{key}")
            )
    if not keys:
        return (
            [],
            np.zeros((0, s_all.shape[1]), np.float32),
            np.zeros((0, 3, 0, 0), np.uint8),
            table,
        )
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        raise ValueError(
            f"{images.stage}/{sid}: images of several sizes {sorted(shapes)}; the diffusion "
            "decoder trains on one size (set ingest.image_size)"
        )
    s_kept, pixels_kept = np.stack(s).astype(np.float32), np.stack(pixels)
    if render is not None:
        rgb = column_to_numpy(table, "s_rgb")[[pos[k] for k in keys]].astype(np.float32)
        size = pixels_kept.shape[-1]
        rendered = [
            _at_size(r.transpose(1, 2, 0), size, f"G(s) of {codes.stage}/{sid}")
            for r in render(s_kept, rgb)
        ]
        pixels_kept = np.concatenate([pixels_kept, np.stack(rendered)], axis=1)
    return keys, s_kept, pixels_kept, table


def _at_size(rgb: np.ndarray, size: int | None, where: str) -> np.ndarray:
    """(H, W, 3) uint8 → (3, size, size) uint8 (``models.imaging.pool_to``); None: as it is."""
    chw = rgb.transpose(2, 0, 1)
    if size is None or chw.shape[1:] == (size, size):
        return chw
    if chw.shape[1] != chw.shape[2]:
        raise ValueError(
            f"{where}: a {chw.shape[2]}×{chw.shape[1]} image; the diffusion decoder trains on square "
            "images (ingest.resize: fit or center_crop)"
        )
    x = pool_to(torch.from_numpy(np.ascontiguousarray(chw)).float()[None], size)[0]
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def _photo_size(pairs: list[ShardPair]) -> int | None:
    """The side length of the catalog's ingested photos (the first one found); None without any."""
    for images, codes, sid in pairs:
        if codes.stage == CODES:
            for sample in iter_image_samples(images, [sid]):
                return decode_rgb(encoded_image(sample)).shape[0]
    return None


def _write_rows(
    pairs: list[ShardPair],
    out: Path,
    val_fraction: float,
    eval_fraction: float = 0.0,
    image_size: int | None = None,
    render: Render | None = None,
) -> dict[str, Any]:
    """Stream shard by shard: never more than one shard's images in memory."""
    val: list[bool] = []
    counts: dict[str, int] = {}
    shape: tuple[int, ...] | None = None
    layout = None
    total = total_sq = None
    photo_size = None if image_size else _photo_size(pairs)
    with open(out / ROWS, "wb") as f:
        for images, codes, sid in pairs:
            size = image_size or (None if codes.stage == CODES else photo_size)
            keys, s, pixels, table = _shard_rows(images, codes, sid, eval_fraction, size, render)
            if not keys:
                continue
            if shape is None:
                shape, layout = (
                    (s.shape[1], *pixels.shape[1:]),
                    decode_metadata(table).get("layout"),
                )
                total, total_sq = np.zeros(s.shape[1]), np.zeros(s.shape[1])
            elif (s.shape[1], *pixels.shape[1:]) != shape:
                raise ValueError(
                    f"{images.stage}/{sid}: (style dim, image shape) "
                    f"{(s.shape[1], *pixels.shape[1:])} differs from {shape}"
                    + (
                        ""
                        if image_size
                        else " (train_diffusion.image_size brings images to one size)"
                    )
                )
            rows = np.concatenate(
                [s.view(np.uint8).reshape(len(keys), -1), pixels.reshape(len(keys), -1)], 1
            )
            f.write(np.ascontiguousarray(rows).tobytes())
            held = np.asarray([is_validation(k, val_fraction) for k in keys])
            total += s[~held].sum(0, dtype=np.float64)
            total_sq += np.square(s[~held], dtype=np.float64).sum(0)
            val += held.tolist()
            counts[codes.stage] = counts.get(codes.stage, 0) + len(keys)
    if shape is None:
        raise FileNotFoundError(
            f"no image has a style code in {[f'{a.stage}+{b.stage}' for a, b, _ in pairs]}"
        )
    n_train = len(val) - int(sum(val))
    mean = total / max(n_train, 1)
    std = np.sqrt(np.maximum(total_sq / max(n_train, 1) - mean**2, 0.0))
    np.save(out / SPLIT, np.asarray(val, dtype=bool))
    np.save(out / STATS, np.stack([mean, std]).astype(np.float32))
    return {
        "rows": len(val),
        "style_dim": shape[0],
        "image_shape": [shape[1] // (2 if render else 1), *shape[2:]],
        "render": render is not None,
        "layout": layout,
        "counts": counts,
        "validation": int(sum(val)),
    }


class ImageCache(SplitCache):
    """Random access to the (s, image) rows of a built cache; RAM use independent of its size."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(folder, SPLIT)
        self.style_dim, self.image_shape = self.meta["style_dim"], tuple(self.meta["image_shape"])
        self.rendered = bool(self.meta.get("render"))
        pixels = int(np.prod(self.image_shape)) * (2 if self.rendered else 1)
        self.rows = FlatRows(self.folder / ROWS, 4 * self.style_dim + pixels)

    def style_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) of s over the training rows."""
        mean, std = np.load(self.folder / STATS)
        return torch.from_numpy(mean), torch.from_numpy(std)

    def fetch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(condition, images (B, 3, H, W) float32 in [-1, 1]) of the given row numbers: the condition is
        s (B, S) float32, followed by G(s)'s pixels in [-1, 1] in a rendered cache
        (``StyleUNet.condition``'s layout)."""
        raw = self.rows.fetch(rows)
        cut = 4 * self.style_dim
        s = torch.from_numpy(np.ascontiguousarray(raw[:, :cut]).view(np.float32))
        pixels = torch.from_numpy(raw[:, cut:]).float() / 127.5 - 1.0
        if not self.rendered:
            return s, pixels.reshape(len(rows), *self.image_shape)
        image, render = pixels.chunk(2, dim=1)
        return torch.cat([s, render], dim=1), image.reshape(len(rows), *self.image_shape)
