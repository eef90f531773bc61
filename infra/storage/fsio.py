"""Filesystem access for local paths and any fsspec URI, with atomic commits.

A file becomes visible only when complete: locally it is written under a temporary name in the same
folder and renamed (``os.replace`` is atomic); on object stores (s3://, gs://, ...) it is staged in a
local temporary file and uploaded with one ``put`` — an object appears only when its upload completes.
A writer killed before the commit therefore leaves nothing under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"  # temporary names contain this; listings ignore them


def open_uri(
    uri: str, mode: str = "rb", storage_options: dict[str, Any] | None = None
) -> IO[bytes]:
    """The one opener for a single file at any local path or fsspec URI (s3://, gs://, memory://, ...).

    Returns an open file object (use it in ``with``); a missing file raises FileNotFoundError.
    """
    return fsspec.open(str(uri), mode, **(storage_options or {})).open()


class Location:
    """A folder on some filesystem: ``Location("s3://b/run", {"endpoint_url": ...})``."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = str(uri).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        self.is_local = isinstance(self.fs, LocalFileSystem)

    @property
    def absolute_uri(self) -> str:
        """The URI other processes can use whatever their working directory (local paths made absolute)."""
        return self.path if self.is_local else self.uri

    def child(self, *parts: str) -> "Location":
        return Location("/".join([self.uri, *parts]), self.storage_options)

    def full(self, name: str) -> str:
        """Filesystem path (no protocol) of ``name`` inside this folder."""
        return f"{self.path}/{name}"

    def url(self, name: str) -> str:
        """Full URI of ``name`` inside this folder (what users and webdataset see)."""
        return f"{self.uri}/{name}"

    def exists(self, name: str) -> bool:
        """Asks the store itself: listing caches (s3fs keeps one) may predate another writer's commit."""
        path = self.full(name)
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def listdir(self) -> list[str]:
        """Names in this folder, without temporary files; empty if the folder does not exist."""
        try:
            entries = self.fs.ls(self.path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if TMP_MARK not in n)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open(self.full(name), "rb") as f:
            return f.read()

    def open(self, name: str, mode: str = "rb") -> IO[bytes]:
        return self.fs.open(self.full(name), mode)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.atomic_writer(name) as f:
            f.write(data)

    @contextlib.contextmanager
    def atomic_writer(self, name: str) -> Iterator[IO[bytes]]:
        """Write ``name`` so that it appears complete or not at all."""
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)
            tmp = self.full(f"{name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.full(name))
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            with tempfile.NamedTemporaryFile(prefix="deltaedit-", suffix=TMP_MARK) as f:
                yield f
                f.flush()
                self.fs.put_file(f.name, self.full(name))

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.full(name), recursive=True)

    def remove_all(self) -> None:
        """Delete this folder and everything in it."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path, recursive=True)

    def clean_stale_temporaries(self) -> int:
        """Remove temporary files left by killed writers; returns how many."""
        try:
            entries = self.fs.ls(self.path, detail=False, refresh=True)
        except FileNotFoundError:
            return 0
        stale = [e for e in entries if TMP_MARK in e.rsplit("/", 1)[-1]]
        for entry in stale:
            self.fs.rm(entry)
        return len(stale)
