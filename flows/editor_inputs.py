"""The inputs `Editor.edit` accepts: one or many images (paths, PIL images, arrays) and prompts, and
what the ingest stage's fitting does to an image, in words."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image


def as_list(value: Any, single: tuple[type, ...]) -> list[Any]:
    """One value or a sequence of them as a list (a 4-D array: a batch of images)."""
    if isinstance(value, np.ndarray) and value.ndim == 4:
        return list(value)
    if isinstance(value, single) and not (isinstance(value, tuple) and is_prompt_pair_batch(value)):
        return [value]
    return list(value)


def is_prompt_pair_batch(value: tuple) -> bool:
    """A tuple of prompts rather than one (source, target) pair."""
    return not (len(value) == 2 and all(isinstance(t, str) for t in value))


def array_image(array: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 3) or (H, W, 4) uint8 (or float in [0, 1]) → a PIL image."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"an image array must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}"
        )
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError("the image array has non-finite values")
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 (or float in [0, 1]), got {array.dtype}")
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)


def describe_source(image: Any, n: int) -> str:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"<image {n}>"


def what_was_done(
    size: tuple[int, int], side: int, policy: str
) -> tuple[str, tuple[float, float, float, float]]:
    """ingest.resize's work on a (width, height) image, in words, and where the picture lies."""
    w, h = size
    full = (0.0, 0.0, 1.0, 1.0)
    if policy == "none":
        return f"{w}x{h} kept as it is (ingest.resize none)", full
    if (w, h) == (side, side):
        return f"{w}x{h}: used as it is", full
    if policy == "center_crop" or w == h:
        c = min(w, h)
        crop = (
            ""
            if w == h
            else (
                f"cropped to its central {c}x{c} ({w - c} px off the width), "
                if w > h
                else f"cropped to its central {c}x{c} ({h - c} px off the height), "
            )
        )
        return f"{w}x{h}: {crop}resized to {side}x{side}", full
    # ImageOps.contain's arithmetic, then the canvas offset of tasks.ingest.resize
    fw, fh = (side, round(h / w * side)) if w > h else (round(w / h * side), side)
    left, top = (side - fw) // 2, (side - fh) // 2
    bars = (
        f"{top} px top, {side - fh - top} px bottom"
        if fw == side
        else f"{left} px left, {side - fw - left} px right"
    )
    box = (left / side, top / side, (left + fw) / side, (top + fh) / side)
    return (
        f"{w}x{h}: resized to {fw}x{fh} (aspect ratio kept), padded to {side}x{side} with "
        f"black bars ({bars})"
    ), box


def what_ingest_did(
    row: dict[str, Any], side: int, policy: str
) -> tuple[str, tuple[float, float, float, float]]:
    """``what_was_done`` for a row of the ingest stage's manifest, face alignment included (an
    ``aligned_size`` column: ingest.align made a square of that side before resizing)."""
    size, aligned = (row["orig_width"], row["orig_height"]), row.get("aligned_size")
    if not aligned:
        return what_was_done(size, side, policy)
    _, box = what_was_done((aligned, aligned), side, policy)
    w, h = row["width"], row["height"]
    resized = "" if (w, h) == (aligned, aligned) else f", resized to {w}x{h}"
    return f"{size[0]}x{size[1]}: face aligned (ingest.align) to {aligned}x{aligned}{resized}", box


def pil_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB") if image.mode != "RGB" else image
