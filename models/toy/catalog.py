"""Toy catalogs on disk: rendered images with their attributes and captions, as a user's own folder would be.

``render_catalog`` writes ``toy_000000.png``… plus ``attributes.jsonl`` (the ground truth the report and the
edit analysis read back with ``read_catalog``), to a local folder or any fsspec URI.
"""

from __future__ import annotations

import io
import json
from typing import Any, Literal

import fsspec
import numpy as np
from PIL import Image

from models.toy.captions import caption
from models.toy.domain import Attributes, render_batch

ImageFormat = Literal["png", "jpeg", "webp"]


def render_catalog(
    folder: str,
    n: int,
    seed: int = 0,
    image_format: ImageFormat = "png",
    chunk: int = 512,
    **storage_options: Any,
) -> list[dict[str, Any]]:
    """Write n images ``toy_000000.png``… and ``attributes.jsonl`` into a local folder or fsspec URI.

    A stand-in for a user's own catalog (demo, dataset command). Each jsonl line is
    ``{"file", "attributes", "caption"}``; the records are returned too.
    """
    fs, root = fsspec.core.url_to_fs(str(folder), **storage_options)
    fs.makedirs(root, exist_ok=True)
    ext = "jpg" if image_format == "jpeg" else image_format
    records: list[dict[str, Any]] = []
    for start in range(0, n, chunk):
        images, attrs = render_batch(min(chunk, n - start), seed, start=start)
        for k, (image, a) in enumerate(zip(images, attrs)):
            i = start + k
            name = f"toy_{i:06d}.{ext}"
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format=image_format.upper())
            with fs.open(f"{root}/{name}", "wb") as f:
                f.write(buf.getvalue())
            text = caption(a, np.random.default_rng([seed, i, 0xCA]))
            records.append({"file": name, "attributes": a.to_dict(), "caption": text})
    with fs.open(f"{root}/attributes.jsonl", "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
    return records


def read_catalog(folder: str, **storage_options: Any) -> list[dict[str, Any]]:
    """The records of a catalog written by ``render_catalog``, ``attributes`` as ``Attributes``."""
    fs, root = fsspec.core.url_to_fs(str(folder), **storage_options)
    with fs.open(f"{root}/attributes.jsonl", "r") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{**r, "attributes": Attributes.from_dict(r["attributes"])} for r in rows]
