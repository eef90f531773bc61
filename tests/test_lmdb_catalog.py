"""LMDB catalogs in LSUN's official layout (a folder with data.mdb; keys image ids, values encoded JPEG or
WebP bytes): listed and ingested like any catalog; an LMDB on S3 is refused with a message that says why."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

import tasks.ingest as ingest
from infra.config import IngestConfig
from infra.runtime.shards import key_for, plan_shards
from infra.storage.catalog import list_catalog
from infra.storage.lmdb_catalog import id_text
from infra.storage.records import STATUS_OK, MemorySink
from tasks.split import in_eval

N = 10


def _encoded(i: int, fmt: str) -> bytes:
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)  # LSUN's are not square
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def lsun_lmdb(
    folder: Path, n: int = N, extra: dict[bytes, bytes] | None = None
) -> dict[str, bytes]:
    """An LMDB as LSUN's release writes it (``lsun/data.py`` export: sha1-hex ids → JPEG; a WebP too);
    returns id → value."""
    entries = {
        hashlib.sha1(f"image {i}".encode()).hexdigest().encode(): _encoded(
            i, "WEBP" if i == 3 else "JPEG"
        )
        for i in range(n)
    }
    entries.update(extra or {})
    folder.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(folder), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key, value)
    env.close()
    return {id_text(k): v for k, v in entries.items()}


def test_listing_an_lsun_lmdb_gives_one_item_per_entry(tmp_path):
    entries = lsun_lmdb(tmp_path / "church_outdoor_train_lmdb")
    folder = str(tmp_path / "church_outdoor_train_lmdb")
    items = list_catalog(folder)
    assert [i.source for i in items] == [f"{folder}#{k}" for k in sorted(entries)]
    assert [i.meta["size"] for i in items] == [len(entries[k]) for k in sorted(entries)]
    assert [i.key for i in items] == [key_for(k) for k in sorted(entries)]  # not the folder's path
    assert list_catalog(folder + "/data.mdb") == items  # the data file names the same catalog
    assert list_catalog(f"file://{folder}/") == [
        type(i)(i.key, "file://" + i.source, i.meta) for i in items
    ]


def test_ingest_reads_lmdb_entries_as_it_reads_files(tmp_path):
    entries = lsun_lmdb(tmp_path / "cat", extra={b"broken": b"not an image", b"\xff\xfe": b""})
    folder = str(tmp_path / "cat")
    items = list_catalog(folder)
    assert len(items) == N + 2 and f"{folder}#0xfffe" in {i.source for i in items}
    cfg = IngestConfig(source=folder, image_size=16)
    sink, processor = MemorySink(), ingest.IngestProcessor(cfg)
    for spec in plan_shards(items, 4):
        processor(spec, sink)
    by_source = {r.source.split("#")[-1]: r for r in sink.records}
    ok = {k for k, r in by_source.items() if r.status == STATUS_OK}
    assert ok == set(entries) - {"broken", "0xfffe"}
    assert "not a decodable image" in by_source["broken"].error
    assert "empty file" in by_source["0xfffe"].error
    for image_id in ok:
        record = by_source[image_id]
        assert Image.open(io.BytesIO(record.image)).size == (16, 16)
        assert record.sample_meta["orig_format"] == ("WEBP" if image_id == _id(3) else "JPEG")
    assert ingest.read_source(f"{folder}#{_id(0)}", {}) == entries[_id(0)]


def _id(i: int) -> str:
    return hashlib.sha1(f"image {i}".encode()).hexdigest()


def test_the_split_of_an_lmdb_catalog_does_not_depend_on_where_it_lies(tmp_path):
    lsun_lmdb(tmp_path / "a" / "cat")
    lsun_lmdb(tmp_path / "b" / "cat")
    a, b = (list_catalog(str(tmp_path / d / "cat")) for d in "ab")
    assert [i.key for i in a] == [i.key for i in b]
    assert [in_eval(i.key, 0.5) for i in a] == [in_eval(i.key, 0.5) for i in b]


def test_an_lmdb_on_s3_is_refused_with_the_reason(s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    fs.pipe(f"{bucket}/lsun/church_outdoor_train_lmdb/data.mdb", b"\0" * 64)
    with pytest.raises(ValueError, match=r"must be a local path.*memory-maps data.mdb.*s3://"):
        list_catalog(f"{bucket}/lsun/church_outdoor_train_lmdb", options)


def test_a_folder_without_data_mdb_is_an_image_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(_encoded(0, "JPEG"))
    assert [i.source for i in list_catalog(str(tmp_path / "photos"))] == [
        str(tmp_path / "photos" / "a.jpg")
    ]
