"""LMDB catalogs, as LSUN ships them: a folder with ``data.mdb`` (and ``lock.mdb``) whose keys are image ids
and whose values are the encoded image bytes (JPEG in the official release, WebP in some re-packs).

- ``is_lmdb``: whether a catalog source is such a folder (or its ``data.mdb``);
- ``list_lmdb``: one Item per entry, source ``<folder>#<id>``, key ``key_for(<id>)`` (stable when the
  folder moves, so the split by key hash, ``tasks.split``, keeps every image in its part), the value's
  size in the metadata (read without copying the value);
- ``LmdbReader``: the bytes of ``<folder>#<id>`` sources, one read-only environment per folder, opened
  once per shard.

The lmdb library memory-maps a local file: an LMDB under ``s3://`` (or any fsspec URI that is not a
local path) cannot be opened, and ``list_lmdb`` says so (copy it to a local disk or a shared mount).
"""

from __future__ import annotations

import os
from typing import Any

import fsspec

from infra.runtime.shards import Item, key_for

DATA_FILE = "data.mdb"
HEX_PREFIX = "0x"  # an id that is not UTF-8 is written as 0x<hex> in its source


def _local_path(source: str) -> str | None:
    """The local path of ``source`` (``file://`` stripped); None for any other protocol."""
    if source.startswith("file://"):
        return source[len("file://") :]
    return None if "://" in source else source


def lmdb_folder(source: str) -> str:
    """The environment folder of a catalog source (a folder, or its data.mdb)."""
    path = source.rstrip("/")
    return (path[: -len(DATA_FILE)].rstrip("/") or ".") if path.endswith(DATA_FILE) else path


def is_lmdb(source: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``source`` is an LMDB environment: a folder holding data.mdb, or that data.mdb (for a
    URI: one lookup; a glob never is)."""
    if any(ch in source for ch in "*?["):
        return False
    folder = lmdb_folder(source)
    local = _local_path(folder)
    if local is not None:
        return os.path.isfile(os.path.join(local, DATA_FILE))
    fs, path = fsspec.core.url_to_fs(folder, **(storage_options or {}))
    try:
        return fs.exists(f"{path.rstrip('/')}/{DATA_FILE}")
    except Exception:  # an unreachable bucket is the folder listing's error to report
        return False


def _open(folder: str) -> Any:
    import lmdb  # deferred: only LMDB catalogs need the C extension

    local = _local_path(folder)
    if local is None:
        raise ValueError(
            f"{folder}: an LMDB catalog must be a local path (or a shared mount): the lmdb library "
            "memory-maps data.mdb and cannot open it through s3:// or another fsspec URI; copy the "
            "folder to a local disk (e.g. `aws s3 sync` it) and point ingest.source at the copy"
        )
    if not os.path.isfile(os.path.join(local, DATA_FILE)):
        raise FileNotFoundError(f"{folder}: no {DATA_FILE} (not an LMDB environment)")
    return lmdb.open(
        local, readonly=True, lock=False, readahead=False, meminit=False, max_readers=126
    )


def id_text(raw: bytes) -> str:
    """An LMDB key as source text: its UTF-8 text, else 0x<hex>."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return HEX_PREFIX + raw.hex()
    if text.startswith(HEX_PREFIX) or "#" in text:
        return HEX_PREFIX + raw.hex()  # would read back as another key
    return text


def id_bytes(text: str) -> bytes:
    return bytes.fromhex(text[len(HEX_PREFIX) :]) if text.startswith(HEX_PREFIX) else text.encode()


def list_lmdb(source: str, storage_options: dict[str, Any] | None = None) -> list[Item]:
    """One Item per entry of the LMDB at ``source``, in key order (keys and value sizes only)."""
    folder = lmdb_folder(source)
    env = _open(folder)
    items = []
    try:
        with env.begin(buffers=True) as txn:
            for raw_key, value in txn.cursor():
                image_id = id_text(bytes(raw_key))
                items.append(Item(key_for(image_id), f"{folder}#{image_id}", {"size": len(value)}))
    finally:
        env.close()
    return items


def lmdb_entry(source: str) -> tuple[str, str] | None:
    """(folder, id) of a ``<folder>#<id>`` source whose folder is a local LMDB; None otherwise."""
    if "#" not in source:
        return None
    folder, image_id = source.rsplit("#", 1)
    local = _local_path(folder)
    if local is None or not os.path.isfile(os.path.join(local, DATA_FILE)):
        return None
    return folder, image_id


class LmdbReader:
    """Values of ``<folder>#<id>`` sources; each folder's environment opened once, closed by ``close``."""

    def __init__(self) -> None:
        self._envs: dict[str, Any] = {}

    def read(self, folder: str, image_id: str) -> bytes:
        env = self._envs.get(folder)
        if env is None:
            env = self._envs[folder] = _open(folder)
        with env.begin() as txn:
            value = txn.get(id_bytes(image_id))
        if value is None:
            raise KeyError(
                f"no entry {image_id!r} in the LMDB {folder} (changed since it was listed?)"
            )
        return value

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()
