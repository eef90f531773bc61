"""Listing a catalog of images into Items, from any of the sources users keep catalogs in:

- a local folder or glob, or an fsspec prefix (``s3://bucket/photos/``): every image file under it;
- WebDataset tars (``shards/*.tar`` or one ``.tar``): every image member, source ``<tar>#<member>``, its
  size and the offset of its data in the tar in the Item's metadata (ingest reads it with one seek);
- a Parquet list (``list.parquet``) with a ``uri``/``url``/``path`` column of image locations;
- an LMDB folder (LSUN's release: ``data.mdb``, keys image ids, values encoded images), local only:
  every entry, source ``<folder>#<id>`` (``infra.storage.lmdb_catalog``).
"""

from __future__ import annotations

import tarfile
from typing import Any

import fsspec
import pyarrow.parquet as pq

from infra.runtime.shards import Item, key_for
from infra.storage.lmdb_catalog import is_lmdb, list_lmdb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


URI_COLUMNS = ("uri", "url", "path")


def list_catalog(source: str, storage_options: dict[str, Any] | None = None) -> list[Item]:
    """Items of any supported catalog source (see the module docstring)."""
    opts = storage_options or {}
    if source.endswith(".parquet"):
        return list_parquet(source, opts)
    if source.endswith(".tar"):
        return list_tars(source, opts)
    if is_lmdb(source, opts):
        return list_lmdb(source, opts)
    return list_images(source, opts)


def list_parquet(source: str, storage_options: dict[str, Any]) -> list[Item]:
    with fsspec.open(source, "rb", **storage_options) as f:
        table = pq.read_table(f)
    column = next((c for c in URI_COLUMNS if c in table.column_names), None)
    if column is None:
        raise ValueError(
            f"{source}: a Parquet catalog needs one of the columns {URI_COLUMNS}, "
            f"found {table.column_names}"
        )
    uris = [u for u in table.column(column).to_pylist() if u]
    return [Item(key_for(u), u) for u in sorted(set(uris))]


def list_tars(source: str, storage_options: dict[str, Any]) -> list[Item]:
    """One Item per image member of each WebDataset tar matched by ``source`` (a path or glob), with the
    member's size and data offset (one pass over each tar's headers; the data is skipped)."""
    fs, path = fsspec.core.url_to_fs(source, **storage_options)
    protocol = source.split("://", 1)[0] + "://" if "://" in source else ""
    tars = sorted(fs.glob(path)) if any(ch in path for ch in "*?[") else [path]
    items = []
    for tar_path in tars:
        with fs.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.lower().endswith(IMAGE_EXTENSIONS):
                    uri = f"{protocol}{tar_path}#{member.name}"
                    items.append(
                        Item(key_for(uri), uri, {"size": member.size, "offset": member.offset_data})
                    )
    return items


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
        items.append(
            Item(
                key_for(p, root),
                protocol + p if protocol else p,
                {"size": info.get("size"), "etag": info.get("ETag") or info.get("mtime")},
            )
        )
    return items
