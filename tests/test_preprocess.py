"""Preprocessing: stages on their own, then the flow (Prefect + Ray) on disk and S3, bad input, and a
real kill of a running `deltaedit run preprocess` followed by a resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_models import TINY_G
from helpers_pipeline import (
    bad_catalog,
    kill_after_first_shard,
    parquet_list,
    store_snapshot,
    tiny_zoo,
    write_config,
)
from helpers_store import make_catalog

from infra.config import load_config
from infra.runtime.shards import plan_shards
from infra.runtime.stage import execute_shard
from infra.storage.fsio import Location
from infra.storage.readers import read_vectors
from infra.storage.store import StageStore
from models.layout import StyleLayout
from tasks.sample import SampleBuilder, sample_items


@pytest.fixture(scope="module")
def zoo_overrides(tmp_path_factory) -> list[str]:
    return tiny_zoo(tmp_path_factory.mktemp("zoo"))


def _cfg_overrides(
    root: str, source: str | None, zoo: list[str], options: dict | None = None
) -> list[str]:
    out = [
        f"root={root}",
        "ingest.shard_size=4",
        "ingest.image_size=32",
        "sample.n=6",
        "sample.shard_size=3",
        "ray.actors=2",
        "prefect.retries=0",
        "device=cpu",
        *zoo,
    ]
    if source:
        out.append(f"ingest.source={source}")
    if options:
        out.append(f"storage_options={json.dumps(options)}")
    return out


def test_samples_do_not_depend_on_sharding(tmp_path, zoo_overrides):
    cfg = load_config(None, zoo_overrides)
    builder = SampleBuilder(cfg.models.generator, batch_size=2, device="cpu")
    proc = builder.build()
    tables = []
    for n, shard_size in enumerate((6, 4)):
        store = StageStore(Location(str(tmp_path / f"r{n}")), "samples")
        for spec in plan_shards(sample_items(6, seed=0), shard_size):
            execute_shard(proc, spec, store, builder.fingerprint())
        tables.append(read_vectors(store))
    assert tables[0].column("key").to_pylist() == tables[1].column("key").to_pylist()
    assert tables[0].column("s").equals(tables[1].column("s"))
    layout = StyleLayout.for_generator(TINY_G["size"], channels=TINY_G["channels"])
    assert tables[0].schema.field("s").type.list_size == layout.conv_total
    assert tables[0].schema.field("s_rgb").type.list_size == layout.rgb_total


@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_preprocess_flow_with_bad_input_counts_add_up(tmp_path, zoo_overrides, s3_bucket):
    from flows.preprocess import preprocess_flow

    catalog = tmp_path / "catalog"
    expected = bad_catalog(catalog)
    bucket, options = s3_bucket
    uris = [str(catalog / name) for name in expected] + [f"{bucket}/missing/photo.png"]
    parquet_list(tmp_path / "list.parquet", uris)
    root = tmp_path / "run"
    overrides = _cfg_overrides(str(root), str(tmp_path / "list.parquet"), zoo_overrides, options)
    result = preprocess_flow(None, overrides)
    images = result["images"]
    n_ok = sum(v == "ok" for v in expected.values())
    assert (
        images["seen"] == len(uris)
        and images["ok"] == n_ok
        and images["failed"] == len(uris) - n_ok
    )
    assert result["codes"]["seen"] == n_ok == result["clip_images"]["ok"]
    assert result["samples"]["ok"] == 6 == result["clip_samples"]["ok"]

    store = StageStore(Location(str(root)), "images")
    rows = {r["source"]: r for s in store.finished() for r in store.manifest(s).to_pylist()}
    for name, status in expected.items():
        row = rows[str(catalog / name)]
        assert row["status"] == status, (name, row["error"])
        if status == "failed":
            assert row["error"] and len(row["error"]) > 10
    assert "decompression bomb" in rows[str(catalog / "bomb.png")]["error"]
    assert "too small" in rows[str(catalog / "one_pixel.png")]["error"]
    assert "0 bytes" in rows[str(catalog / "empty.png")]["error"]
    assert rows[f"{bucket}/missing/photo.png"]["status"] == "failed"
    emb = read_vectors(StageStore(Location(str(root)), "clip_images"))
    vecs = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    codes = read_vectors(StageStore(Location(str(root)), "codes"))
    assert all(
        r["psnr"] > 0
        for s in StageStore(Location(str(root)), "codes").finished()
        for r in StageStore(Location(str(root)), "codes").manifest(s).to_pylist()
    )
    assert codes.num_rows == n_ok

    redo = preprocess_flow(None, overrides, redo_failed=True)  # only shards with failures rerun
    with_failures = sum(
        any(r["status"] == "failed" for r in store.manifest(s).to_pylist())
        for s in store.finished()
    )
    assert redo["images"]["redone"] == with_failures and redo["images"]["ran"] == 0
    assert (redo["images"]["ok"], redo["images"]["failed"]) == (images["ok"], images["failed"])
    assert redo["codes"]["ran"] == redo["codes"]["redone"] == 0


@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_preprocess_on_s3_input_and_output(tmp_path, zoo_overrides, s3_bucket):
    import fsspec

    from flows.preprocess import preprocess_flow

    bucket, options = s3_bucket
    make_catalog(tmp_path / "c", 5)
    fs, path = fsspec.core.url_to_fs(bucket, **options)
    fs.put(str(tmp_path / "c") + "/", f"{path}/catalog/", recursive=True)
    overrides = _cfg_overrides(f"{bucket}/run", f"{bucket}/catalog", zoo_overrides, options)
    first = preprocess_flow(None, overrides)
    assert (
        first["images"]["ok"] == 5
        and first["codes"]["ok"] == 5
        and first["clip_samples"]["ok"] == 6
    )
    again = preprocess_flow(None, overrides)
    assert all(s["ran"] == 0 and s["skipped"] == s["shards"] for s in again.values())


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_killed_run_resumes_to_the_same_stores(tmp_path, zoo_overrides):
    from flows.preprocess import preprocess_flow

    make_catalog(tmp_path / "catalog", 16)
    configs = {}
    for name in ("killed", "clean"):
        overrides = _cfg_overrides(str(tmp_path / name), str(tmp_path / "catalog"), zoo_overrides)
        overrides = [o.replace("ingest.shard_size=4", "ingest.shard_size=2") for o in overrides]
        configs[name] = write_config(tmp_path / f"{name}.yaml", overrides)

    kill_after_first_shard(
        ["run", "preprocess", "--config", str(configs["killed"])],
        tmp_path,
        tmp_path / "killed" / "images",
        poll_s=0.2,
    )
    partial = store_snapshot(tmp_path / "killed")
    assert 0 < sum(k.endswith(".done.json") for k in partial) < 8 + 8 + 8 + 2 + 2

    resumed = preprocess_flow(str(configs["killed"]))
    assert sum(s["skipped"] for s in resumed.values()) >= 1  # finished shards were not redone
    preprocess_flow(str(configs["clean"]))  # an uninterrupted run
    killed, clean = store_snapshot(tmp_path / "killed"), store_snapshot(tmp_path / "clean")
    assert killed.keys() == clean.keys()
    assert [k for k in killed if killed[k] != clean[k]] == []
