"""Flows under a real Prefect API with a real local Ray cluster, on disk and on moto's S3 server."""

from __future__ import annotations

import fsspec
import pytest
from helpers_store import make_catalog

from infra.config import IngestConfig, RayConfig
from infra.runtime.ray_pool import ActorPool
from infra.runtime.shards import plan_shards
from infra.storage.catalog import list_images
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from tasks.ingest import IngestBuilder

pytestmark = pytest.mark.usefixtures("prefect_harness", "ray_cluster")


def _overrides(source: str, root: str, options: dict) -> list[str]:
    import json

    return [
        f"ingest.source={source}",
        f"root={root}",
        "ingest.shard_size=3",
        "ingest.image_size=16",
        f"storage_options={json.dumps(options)}",
        "ray.actors=2",
        "prefect.retries=0",
    ]


def _upload(local_dir, uri: str, options: dict) -> None:
    fs, path = fsspec.core.url_to_fs(uri, **options)
    fs.put(str(local_dir) + "/", path + "/", recursive=True)


def test_rerun_after_one_shard_runs_only_the_other_two(tmp_path, run_root):
    from flows.ingest import ingest_flow

    root, options = run_root
    catalog = tmp_path / "catalog"
    make_catalog(catalog, 8)
    (catalog / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    source = str(catalog)
    if root.startswith("s3://"):  # input on S3 too
        source = root.rsplit("/", 1)[0] + "/catalog"
        _upload(catalog, source, options)
    overrides = _overrides(source, root, options)

    first = ingest_flow(None, overrides, shards=["00001"])["images"]
    assert (first["shards"], first["ran"], first["skipped"]) == (1, 1, 0)

    second = ingest_flow(None, overrides)["images"]
    assert (second["shards"], second["ran"], second["skipped"]) == (3, 2, 1)
    assert second["seen"] == 9 and second["ok"] == 8 and second["failed"] == 1
    assert second["seen"] == second["ok"] + second["failed"]

    third = ingest_flow(None, overrides)["images"]
    assert (third["ran"], third["skipped"]) == (0, 3)

    store = StageStore(Location(root, options), "images")
    failed = [
        r
        for s in store.finished()
        for r in store.manifest(s).to_pylist()
        if r["status"] == "failed"
    ]
    assert len(failed) == 1 and "corrupt" in failed[0]["error"] or "decodable" in failed[0]["error"]


def test_overwrite_runs_everything_again(tmp_path):
    from flows.ingest import ingest_flow

    make_catalog(tmp_path / "c", 4)
    overrides = _overrides(str(tmp_path / "c"), str(tmp_path / "run"), {})
    assert ingest_flow(None, overrides)["images"]["ran"] == 2
    again = ingest_flow(None, overrides, overwrite=True)["images"]
    assert (again["ran"], again["skipped"], again["seen"]) == (2, 0, 4)


@pytest.mark.timeout(300)
def test_two_actor_pool_on_two_cores_finishes_four_shards(tmp_path):
    make_catalog(tmp_path / "c", 8)
    specs = plan_shards(list_images(str(tmp_path / "c")), 2)
    assert len(specs) == 4
    builder = IngestBuilder(IngestConfig(image_size=16))
    cfg = RayConfig(actors=2, cpus_per_actor=0.5)
    with ActorPool(str(tmp_path / "run"), {}, cfg) as pool:
        reports = list(pool.load(builder).map(specs))
    assert sorted(r.shard_id for r in reports) == ["00000", "00001", "00002", "00003"]
    assert all(r.outcome == "ran" and r.counts["ok"] == 2 for r in reports)
    assert StageStore(Location(str(tmp_path / "run")), "images").finished() == [
        s.shard_id for s in specs
    ]
