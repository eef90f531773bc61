"""Listing a catalog of images into Items: a local folder or glob, or an fsspec prefix (s3://...)."""
from __future__ import annotations

from typing import Any

import fsspec

from infra.shards import Item, key_for

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(source: str, storage_options: dict[str, Any] | None = None) -> list[Item]:
    """Every image-like file under ``source`` (a folder, a glob, or a URI prefix), with stable keys.

    The listing is sorted and each Item's metadata carries the file size, so a changed file changes
    its shard's input fingerprint.
    """
    fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
    protocol = source.split("://", 1)[0] + "://" if "://" in source else ""
    if any(ch in path for ch in "*?["):
        root = path.split("*", 1)[0].rsplit("/", 1)[0]
        found = {p: fs.info(p) for p in fs.glob(path)}
    else:
        if not fs.exists(path):
            raise FileNotFoundError(f"catalog source not found: {source}")
        root = path.rstrip("/")
        found = fs.find(path, detail=True)
    items = []
    for p, info in sorted(found.items()):
        if info.get("type") == "directory" or not p.lower().endswith(IMAGE_EXTENSIONS):
            continue
        items.append(Item(key_for(p, root), protocol + p if protocol else p,
                          {"size": info.get("size"), "etag": info.get("ETag") or info.get("mtime")}))
    return items
