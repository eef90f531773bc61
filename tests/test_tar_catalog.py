"""WebDataset tar catalogs: listed in one pass, ingested with one open per tar and shard and one read per
member (locally and on moto's S3 server), into the same images as the same files in a folder."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from helpers_store import make_catalog

import tasks.ingest as ingest
from infra.config import IngestConfig
from infra.runtime.shards import plan_shards
from infra.storage.catalog import list_catalog
from infra.storage.records import MemorySink

N = 12
SHARD = 5  # 3 shards of one tar


def _tar(folder: Path, images: list[Path]) -> bytes:
    """A WebDataset tar: <key>.png and <key>.json per sample (the json members are not images)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in images:
            for name, data in ((path.name, path.read_bytes()), (path.stem + ".json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Counting:
    """Wraps ``tasks.ingest.open_uri``: opens per URI and read calls on the files it returns."""

    def __init__(self, monkeypatch):
        self.opens: Counter[str] = Counter()
        self.reads = 0
        real = ingest.open_uri

        def opener(uri, mode="rb", storage_options=None):
            self.opens[uri] += 1
            f = real(uri, mode, storage_options)
            read = f.read

            def counted(*args):
                self.reads += 1
                return read(*args)

            f.read = counted
            return f

        monkeypatch.setattr(ingest, "open_uri", opener)


def _ingest(source: str, options: dict) -> tuple[list, dict[str, bytes]]:
    cfg = IngestConfig(source=source, image_size=16)
    specs = plan_shards(list_catalog(source, options), SHARD)
    sink = MemorySink()
    processor = ingest.IngestProcessor(cfg, options)
    for spec in specs:
        processor(spec, sink)
    return specs, {r.source.rsplit("/", 1)[-1].split("#")[-1]: r.image for r in sink.records}


@pytest.fixture
def photos(tmp_path) -> tuple[list[Path], bytes]:
    images = make_catalog(tmp_path / "photos", N)
    return images, _tar(tmp_path, images)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_tar_of_n_members_is_read_with_n_member_reads(
    where, photos, tmp_path, monkeypatch, request
):
    images, data = photos
    if where == "local":
        source, options = str(tmp_path / "shard-000.tar"), {}
        Path(source).write_bytes(data)
    else:
        import fsspec

        bucket, options = request.getfixturevalue("s3_bucket")
        source = f"{bucket}/catalog/shard-000.tar"
        with fsspec.open(source, "wb", **options) as f:
            f.write(data)
    gets = Counter()
    if where == "s3":  # the GET requests behind the reads, too
        import s3fs

        fetch = s3fs.core.S3File._fetch_range

        def counted_fetch(self, start, end):
            gets["range"] += 1
            return fetch(self, start, end)

        monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted_fetch)
    listed = list_catalog(source, options)
    assert len(listed) == N and all({"size", "offset"} <= i.meta.keys() for i in listed)
    counting = _Counting(monkeypatch)
    gets.clear()
    specs, from_tar = _ingest(source, options)
    assert len(specs) == 3
    assert sum(counting.opens.values()) == len(specs)  # one open of the tar per shard
    assert counting.reads == N  # one read per member: no scan of the tar per member
    assert gets["range"] <= N  # on S3: at most one GET per member read
    print(
        f"{where}: {N} members, {sum(counting.opens.values())} opens, {counting.reads} reads, "
        f"{gets['range']} S3 GETs"
    )
    _, from_folder = _ingest(str(images[0].parent), {})
    assert from_tar == from_folder and all(from_tar.values())


def test_a_member_listed_without_an_offset_is_found_and_a_missing_one_fails_alone(photos, tmp_path):
    _, data = photos
    tar = tmp_path / "cat.tar"
    tar.write_bytes(data)
    with ingest.SourceReader({}) as reader:
        plain = reader.read(ingest.Item("k", f"{tar}#img_003.png"))
    assert plain == (tmp_path / "photos" / "img_003.png").read_bytes()
    assert ingest.read_source(f"{tar}#img_005.png", {}) == (
        (tmp_path / "photos" / "img_005.png").read_bytes()
    )
    spec = plan_shards(list_catalog(str(tar)), N)[0]
    gone = type(spec)(spec.shard_id, (*spec.items, ingest.Item("zz", f"{tar}#nothing.png")))
    sink = MemorySink()
    ingest.IngestProcessor(IngestConfig(source=str(tar), image_size=16))(gone, sink)
    status = {r.key: (r.status, r.error) for r in sink.records}
    assert status["zz"][0] == "failed" and "nothing.png" in status["zz"][1]
    assert sum(s == "ok" for s, _ in status.values()) == N
