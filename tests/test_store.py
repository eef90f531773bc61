"""Stores on local disk and on a real S3 server: atomic commits, markers, redo, overwrite, readers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest
import torch
from helpers_store import FlakyProcessor, items, png_bytes

from infra.runtime.shards import ShardSpec, key_for, plan_shards, select
from infra.runtime.stage import execute_shard
from infra.storage.fsio import Location
from infra.storage.readers import encoded_batches, iter_image_samples, read_vectors, vectors_tensor
from infra.storage.store import StageStore
from infra.storage.tables import decode_metadata

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _store(run_root) -> StageStore:
    root, options = run_root
    return StageStore(Location(root, options), "images")


def test_round_trip_images_vectors_manifest(run_root):
    store = _store(run_root)
    spec = plan_shards(items(5), 5)[0]
    report = execute_shard(FlakyProcessor(fail={"k002"}), spec, store, "code1")
    assert report.outcome == "ran" and report.counts == {"seen": 5, "ok": 4, "failed": 1}

    manifest = store.manifest("00000").to_pylist()
    assert [r["key"] for r in manifest] == [f"k{i:03d}" for i in range(5)]
    bad = next(r for r in manifest if r["status"] == "failed")
    assert bad["key"] == "k002" and bad["error"] == "simulated read error"

    batches = list(encoded_batches(iter_image_samples(store), batch_size=3))
    keys = [k for ks, _ in batches for k in ks]
    assert keys == ["k000", "k001", "k003", "k004"]
    assert (
        batches[0][1].shape == (3, 3, 8, 8)
        and batches[0][1].min() >= -1
        and batches[0][1].max() <= 1
    )

    table = read_vectors(store)
    assert pa.types.is_fixed_size_list(table.schema.field("emb").type)
    assert decode_metadata(table) == {"model": "test"}
    assert torch.equal(vectors_tensor(table, "emb")[:, 0], torch.tensor([0.0, 1, 3, 4]))


def test_done_marker_skips_and_fingerprints_matter(run_root):
    store = _store(run_root)
    spec = plan_shards(items(3), 3)[0]
    proc = FlakyProcessor()
    assert execute_shard(proc, spec, store, "code1").outcome == "ran"
    assert execute_shard(proc, spec, store, "code1").outcome == "skipped"
    assert execute_shard(proc, spec, store, "code2").outcome == "ran"  # code/config changed
    changed = ShardSpec(spec.shard_id, spec.items[:2])
    assert execute_shard(proc, changed, store, "code2").outcome == "ran"  # inputs changed
    assert len(proc.calls) == 3


def test_redo_failed_reruns_only_failed_samples_and_keeps_order(run_root):
    store = _store(run_root)
    spec = plan_shards(items(6), 6)[0]
    proc = FlakyProcessor(fail={"k001", "k004"})
    execute_shard(proc, spec, store, "c")
    proc.fail.clear()
    report = execute_shard(proc, spec, store, "c", redo_failed=True)
    assert report.outcome == "redone" and report.counts == {"seen": 6, "ok": 6, "failed": 0}
    assert proc.calls[-1] == ["k001", "k004"]  # only the failed ones
    clean = _store((run_root[0] + "-clean", run_root[1]))
    execute_shard(FlakyProcessor(), spec, clean, "c")
    assert store.manifest("00000").equals(clean.manifest("00000"))  # same as an uninterrupted run
    assert store.loc.read_bytes("00000.tar") == clean.loc.read_bytes("00000.tar")
    assert execute_shard(proc, spec, store, "c", redo_failed=True).outcome == "skipped"


def test_overwrite_removes_everything(run_root):
    store = _store(run_root)
    execute_shard(FlakyProcessor(), plan_shards(items(2), 2)[0], store, "c")
    assert store.finished() == ["00000"]
    store.overwrite()
    assert store.finished() == [] and store.loc.listdir() == []


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {repo!r})
    from helpers_store import png_bytes
    from infra.storage.fsio import Location
    from infra.storage.store import StageStore
    store = StageStore(Location({root!r}, {options!r}), "images")
    w = store.writer("00000")
    for i in range(50):
        w.add(f"k{{i:03d}}", "src", image=png_bytes(i), image_ext="png")
    print("written", flush=True)
    time.sleep(600)   # killed here, before commit
""")


def test_writer_killed_before_commit_leaves_nothing_visible(run_root):
    root, options = run_root
    code = KILLED_WRITER.format(
        tests=os.path.join(REPO_ROOT, "tests"), repo=REPO_ROOT, root=root, options=options
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store = _store(run_root)
    assert store.finished() == []
    assert store.marker("00000") is None
    assert not store.loc.exists("00000.tar") and not store.loc.exists("00000.manifest.parquet")
    assert store.loc.listdir() == []
    store.loc.clean_stale_temporaries()
    assert store.loc.fs.ls(store.loc.path, detail=False) == [] if store.loc.is_local else True


def test_an_aborted_writer_leaves_nothing_and_no_stray_traceback(run_root):
    """A processor that raises mid-shard aborts its writer: no file stays, and the half-written tar is
    closed before its temporary file goes (its finaliser used to print "write to closed file")."""
    import gc

    store = _store(run_root)
    writer = store.writer("00000")
    writer.add("k000", "src/k000", image=png_bytes(0), image_ext="png")
    stray: list = []
    hook, sys.unraisablehook = sys.unraisablehook, stray.append
    try:
        writer.abort()
        del writer
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert stray == []
    assert store.finished() == [] and store.loc.listdir() == []


def test_shards_are_deterministic_and_keys_safe():
    listing = items(10)
    a = plan_shards(listing, 4)
    b = plan_shards(list(reversed(listing)), 4)
    assert [s.shard_id for s in a] == ["00000", "00001", "00002"]
    assert [s.fingerprint for s in a] == [s.fingerprint for s in b]
    assert [s.shard_id for s in select(a, ["00002"])] == ["00002"]
    with pytest.raises(ValueError, match="unknown shard ids"):
        select(a, ["00009"])
    keys = {
        key_for("/data/a/cat.png", "/data"),
        key_for("/data/b/cat.png", "/data"),
        key_for("/data/a/cat.jpg", "/data"),
        key_for("/data/ü.ñ.x.png", "/data"),
    }
    assert len(keys) == 4 and not any("." in k for k in keys) and all(k.isascii() for k in keys)
    with pytest.raises(ValueError, match="duplicate sample key"):
        plan_shards(items(2) + items(1), 2)


def test_png_helper_is_deterministic():
    assert png_bytes(3) == png_bytes(3) != png_bytes(4)
