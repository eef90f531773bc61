"""infra.storage.tarstream: the same members as tarfile reads, for our shards and for any other valid tar."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
import webdataset as wds

from infra.storage.tarstream import _pax_members, _pax_records, _Unsupported, tar_members

# Long (> 100 bytes) and non-ASCII names make tarfile write pax headers; sizes 0, 511, 512, 513 probe padding.
NAMES = ["plain", "ünïcode_ñame", "x" * 150, "name.with.dots", "last"]
SIZES = [0, 511, 512, 513, 4000]


def _store_tar() -> bytes:
    """A shard as our stores write it (webdataset's TarWriter, as ShardWriter uses it)."""
    buf = io.BytesIO()
    writer = wds.TarWriter(buf, mtime=0)
    for name, size in zip(NAMES, SIZES):
        writer.write(
            {
                "__key__": name,
                "png": bytes(range(256)) * (size // 256) + b"\x07" * (size % 256),
                "json": b"{}",
            }
        )
    writer.close()
    return buf.getvalue()


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def _gnu_tar(names: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = i + 1
            tar.addfile(info, io.BytesIO(b"z" * (i + 1)))
    return buf.getvalue()


def test_store_shards_are_read_without_tarfile():
    data = _store_tar()
    expected = _tarfile_members(data)
    assert len(expected) == 2 * len(NAMES)
    assert any("ñ" in n for n, _ in expected) and any(
        len(n) > 100 for n, _ in expected
    )  # pax headers
    assert list(_pax_members(io.BytesIO(data))) == expected  # the fast path alone reads them all
    assert list(tar_members(io.BytesIO(data))) == expected


def test_other_tars_are_handed_to_tarfile_from_the_first_header_it_does_not_read():
    data = _gnu_tar(["a.png", "b" * 120 + ".png", "c.png"])  # GNU long name: an 'L' header
    fast = _pax_members(io.BytesIO(data))
    assert next(fast) == ("a.png", b"z")
    with pytest.raises(_Unsupported):
        next(fast)
    assert list(tar_members(io.BytesIO(data))) == _tarfile_members(data)  # once each, in order


def test_pax_records_are_parsed():
    assert _pax_records(b"10 path=x\n" + b"18 mtime=1.234567\n") == {
        "path": "x",
        "mtime": "1.234567",
    }


@pytest.mark.parametrize(
    "records", [b"0 path=x\n", b"99 path=x\n", b"12 path=x\n", b"21 GNU.sparse.size=3\n"]
)
def test_malformed_or_unusual_pax_records_are_left_to_tarfile(records):
    assert _pax_records(records) is None


def test_compressed_tars_are_read_by_tarfile():
    data = _store_tar()
    assert list(tar_members(io.BytesIO(gzip.compress(data)))) == _tarfile_members(data)


def test_a_corrupt_header_is_reported_by_tarfile():
    data = bytearray(_store_tar())
    second = 1024  # "plain.json" (2 bytes of data) ends at 1024
    data[second + 130] ^= 0x01  # one bit of the next member's size field
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(data))))


def test_a_truncated_shard_is_an_error_never_a_silently_short_read():
    data = _store_tar()
    with pytest.raises(tarfile.ReadError):
        list(tar_members(io.BytesIO(data[: len(data) // 2 + 100])))
    errors = 0
    for cut in range(1, 14_000, 7):  # the members end at 13,824; then end-of-archive zeros
        try:
            members = list(tar_members(io.BytesIO(data[:cut])))
        except tarfile.ReadError:
            errors += 1
            continue
        assert members == _tarfile_members(data[:cut]), (
            cut
        )  # where it reads, it reads what tarfile does
    assert errors > 1000
