"""Sequential reading of the tar shards our stores write, ten times cheaper per member than ``tarfile``.

Python's ``tarfile`` decodes every field of every 512-byte header and wraps each member in a file object:
~30 µs a member, the largest per-sample cost of reading a store of small images, and all of it under the
GIL, so the model thread waits while a reader thread parses (``bench/embed_bench.py`` measures the stage).
The stores' tars come from webdataset's ``TarWriter`` (``tarfile``, POSIX.1-2001 pax format): regular
files, with a pax header before a member whose name is long or not ASCII. Those are read here from the
name, size, type and checksum fields alone (~7 µs a member). At the first header of any other kind (GNU
long names, links, global pax headers, a compressed file, a bad checksum) the rest of the file is handed
to ``tarfile``, which reads every valid tar and names what is wrong with an invalid one.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_REGULAR = (b"0", b"\0")
_PAX = b"x"


class _Unsupported(Exception):
    """A header this reader leaves to ``tarfile``; ``offset`` is where that member's headers begin."""

    def __init__(self, offset: int):
        super().__init__(offset)
        self.offset = offset


_PAX_KEYS = {"path", "size", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "comment"}


def tar_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file of the tar ``f`` (a seekable binary file), in stored order."""
    try:
        yield from _pax_members(f)
    except _Unsupported as where:
        f.seek(where.offset)
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            yield from ((m.name, tar.extractfile(m).read()) for m in tar if m.isreg())


def _pax_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Members up to the first header this reader does not handle (then _Unsupported, before anything of
    that member is yielded)."""
    pax: dict[str, str] = {}
    start = f.tell()
    while True:
        header = f.read(BLOCK)
        if (
            not header.strip(b"\0") and not pax
        ):  # end-of-archive block (or a file that ends without one)
            return
        kind = header[156:157]
        if (
            len(header) < BLOCK
            or kind not in (*_REGULAR, _PAX)
            or header[345]
            or not _checksum_ok(header)
        ):
            raise _Unsupported(start)  # truncated, other header kinds, ustar prefix, corrupt
        size = int(pax["size"]) if "size" in pax else _octal(header[124:136])
        if size is None:
            raise _Unsupported(start)  # base-256 (GNU) size
        data = f.read(size)
        if len(data) < size or len(f.read(-size % BLOCK)) < -size % BLOCK:
            raise _Unsupported(start)  # truncated data or padding: tarfile says which
        if kind == _PAX:
            pax = _pax_records(data)
            if pax is None:
                raise _Unsupported(start)  # sparse files, charsets, malformed records
            continue
        yield (
            pax.get("path") or header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"),
            data,
        )
        pax, start = {}, f.tell()


def _checksum_ok(header: bytes) -> bool:
    """The header checksum: the byte sum with the checksum field counted as eight spaces."""
    return _octal(header[148:156]) == sum(header) - sum(header[148:156]) + 8 * 32


def _octal(field: bytes) -> int | None:
    """A NUL- or space-terminated octal number; None for base-256 (GNU) or malformed fields."""
    digits = field.split(b"\0", 1)[0].strip()
    if field[0] & 0x80 or not digits or digits.strip(b"01234567"):
        return None
    return int(digits, 8)


def _pax_records(data: bytes) -> dict[str, str] | None:
    """``"<length> <key>=<value>\\n"`` records of a pax extended header; None if any is malformed or has
    a key other than the plain ones ``tarfile`` writes."""
    records, pos = {}, 0
    try:
        while pos < len(data):
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            if pos + length <= space or pos + length > len(data):
                return None  # a record must hold its own length field and fit
            key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
            records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
            pos += length
    except ValueError:
        return None
    plain = records.keys() <= _PAX_KEYS and records.get("size", "0").isdecimal()
    return records if plain else None
