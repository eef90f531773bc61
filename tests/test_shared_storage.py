"""Shared storage for a cluster: a trainer's row cache at a URI (published once, fetched per node and
fingerprint) and Ray Train's storage at a shared path or URI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from infra.config import RayConfig
from infra.runtime.ray_train import train_storage
from infra.storage.fsio import Location
from tasks.train import row_cache
from tasks.train.row_cache import META, localize, materialize, publish, stored_fingerprint


def _build(folder: Path, fingerprint: str, rows: bytes) -> Path:
    """A cache folder as the trainers write it: rows, split flags, meta with the fingerprint."""

    def write(tmp: Path) -> dict:
        (tmp / "rows.bin").write_bytes(rows)
        np.save(tmp / "val.npy", np.zeros(len(rows), dtype=bool))
        return {"rows": len(rows)}

    return materialize(folder, fingerprint, write)


def test_a_cache_at_a_uri_is_fetched_once_per_fingerprint(s3_bucket, tmp_path, monkeypatch):
    bucket, options = s3_bucket
    target = Location(f"{bucket}/cache", options)
    downloads = []
    real = row_cache._download
    monkeypatch.setattr(
        row_cache, "_download", lambda loc, out: downloads.append(1) or real(loc, out)
    )

    publish(_build(tmp_path / "built", "fp1", b"abcd"), target)
    assert stored_fingerprint(target) == "fp1"
    assert sorted(target.listdir()) == sorted(["rows.bin", "val.npy", META])
    node = localize(target.uri, options, scratch=tmp_path / "node2")
    assert (node / "rows.bin").read_bytes() == b"abcd" and len(downloads) == 1
    assert json.loads((node / META).read_text()) == {"rows": 4, "fingerprint": "fp1"}
    assert localize(target.uri, options, scratch=tmp_path / "node2") == node and len(downloads) == 1

    publish(_build(tmp_path / "built", "fp2", b"efghij"), target)  # the stores changed
    assert (
        localize(target.uri, options, scratch=tmp_path / "node2") / "rows.bin"
    ).read_bytes() == b"efghij"
    assert len(downloads) == 2


def test_a_local_or_shared_cache_path_is_used_where_it_is(tmp_path):
    folder = _build(tmp_path / "shared" / "cache", "fp", b"xy")
    assert localize(str(folder)) == folder
    with pytest.raises(FileNotFoundError, match="no row cache"):
        localize("memory://nothing/here")


def test_ray_train_storage_is_local_scratch_a_shared_path_or_a_uri(s3_bucket, tmp_path):
    bucket, options = s3_bucket
    out = Location(f"{bucket}/run/mapper", options)
    assert train_storage(RayConfig(), out, tmp_path) == (str(tmp_path / "ray_train"), None)
    shared = RayConfig(train_storage=str(tmp_path / "nfs" / "ray"))
    assert train_storage(shared, out, tmp_path) == (str(tmp_path / "nfs" / "ray"), None)
    path, fs = train_storage(RayConfig(train_storage=f"{bucket}/ray"), out, tmp_path)
    assert path == f"{bucket[len('s3://') :]}/ray"
    with fs.open_output_stream(f"{path}/probe.txt") as f:  # pyarrow over the run's fsspec S3
        f.write(b"ok")
    assert Location(f"{bucket}/ray", options).read_bytes("probe.txt") == b"ok"
