"""The pipeline flow on tiny models: every step in order, a run manifest at the end, and a second run that
does no work and writes the same manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_pipeline import tiny_zoo
from helpers_store import make_catalog

from infra.config import load_config

ORACLE = Path(__file__).resolve().parents[1] / "zoo" / "toy" / "oracle.safetensors"
PROMPTS = "- {id: red, source: a shape, target: a red shape}\n"


def _overrides(base: Path) -> list[str]:
    return [
        f"root={base / 'run'}",
        f"ingest.source={base / 'run' / 'catalog'}",  # under the root, as the demo's: an input
        "ingest.shard_size=4",
        "ingest.image_size=32",
        "sample.n=0",
        "train_mapper.pools=[codes]",
        "ray.actors=2",
        "prefect.retries=0",
        "device=cpu",
        "relevance.n_images=1",
        "relevance.n_stat_samples=64",
        "relevance.block_size=128",
        "train_mapper.steps=2",
        "train_mapper.batch_size=4",
        "train_mapper.val_fraction=0.2",
        "train_mapper.val_every=2",
        "train_mapper.checkpoint_every=2",
        "train_mapper.val_pairs=4",
        f"bulk_edit.prompts={base / 'prompts.yaml'}",
        "bulk_edit.methods=[deltaedit]",
        "bulk_edit.images_per_shard=4",
        "bulk_edit.tau=0.01",
        "bulk_edit.templates=none",
        f"evaluate.oracle={ORACLE}",
        "evaluate.grid_images=2",
        *tiny_zoo(base / "zoo"),
    ]


def test_plan_steps_follow_the_config():
    from flows.pipeline import plan_steps

    toy = load_config(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml")
    assert [label for label, _, _ in plan_steps(toy)] == [
        "preprocess",
        "relevance",
        "mapper",
        "straightforward",
        "bulk-edit",  # the toy config names its diffusion decoder: nothing to train
    ]
    own = load_config(
        None, ["bulk_edit.decoder=[generator, diffusion]", "bulk_edit.methods=[styleclip_gd]"]
    )
    assert [name for _, name, _ in plan_steps(own)] == [
        "preprocess",
        "relevance",
        "train-diffusion",
        "bulk-edit",
    ]


def test_the_manifest_leaves_out_timings_inputs_and_caches_and_a_rerun_reproduces_it(tmp_path):
    """The default-set version of the slow test below: a run root's manifest, twice."""
    from helpers_store import FlakyProcessor, items

    from infra.runtime.shards import plan_shards
    from infra.runtime.stage import execute_shard
    from infra.storage.fsio import Location
    from infra.storage.store import StageStore
    from tasks import manifest as M

    root = Location(str(tmp_path / "run"))
    make_catalog(tmp_path / "run" / "catalog", 2)
    for name in ("mapper_cache/rows.npy", "edits/_prefect/x", "edits/a.tar.tmp-123"):
        (tmp_path / "run" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / name).write_bytes(b"x")
    store = StageStore(root, "edits")
    for spec in plan_shards(items(6), 3):
        execute_shard(FlakyProcessor(), spec, store, "code")
    cfg = load_config(None, [f"root={root.uri}", f"ingest.source={root.uri}/catalog"])
    code = M.code_version()
    made = M.build(cfg, code, M.input_fingerprints(cfg), {}, ["catalog"])
    assert sorted(made["artifacts"]) == [
        f"edits/{s}{ext}"
        for s in ("00000", "00001")
        for ext in (".done.json", ".manifest.parquet", ".parquet", ".tar")
    ]
    assert made["inputs"]["catalog"]["items"] == 2
    store.writer("00000").commit(
        input_fingerprint="other", code_fingerprint="code"
    )  # a redone shard
    assert M.build(cfg, code, M.input_fingerprints(cfg), {}, ["catalog"]) != made
    store.overwrite()
    for spec in plan_shards(items(6), 3):  # the same shards again: other timings, same manifest
        execute_shard(FlakyProcessor(), spec, store, "code")
    assert M.build(cfg, code, M.input_fingerprints(cfg), {}, ["catalog"]) == made


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_pipeline_runs_every_step_then_a_rerun_does_no_work_and_writes_the_same_manifest(tmp_path):
    from flows.pipeline import pipeline_flow

    make_catalog(tmp_path / "run" / "catalog", 6)
    (tmp_path / "prompts.yaml").write_text(PROMPTS)
    overrides = _overrides(tmp_path)
    first = pipeline_flow(None, overrides)
    steps = first["steps"]
    assert steps["images"]["ok"] == 6 and steps["mapper"]["ran"] == 2
    assert steps["edits"]["ok"] == 6 * 2 and steps["metrics"]["ok"] == 6 * 2
    manifest_path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    artifacts = manifest["artifacts"]
    assert manifest["config_sha256"] and manifest["code"] and manifest["seed"] == 0
    assert manifest["inputs"]["catalog"]["items"] == 6 and manifest["inputs"]["prompts"]
    assert not any(
        k.startswith(("catalog/", "mapper_cache/")) or "_prefect" in k for k in artifacts
    )
    assert "mapper/mapper.safetensors" in artifacts and "report/index.html" in artifacts
    assert artifacts["edits/00000-000.done.json"]["counts"]["ok"] == 8  # 4 images × (recon + red)
    assert len(artifacts["edits/00000-000.tar"]) == 64  # a sha256

    second = pipeline_flow(None, overrides)
    again = second["steps"]
    sharded = [s for s in again.values() if "ran" in s and "shards" in s]
    assert sharded and all(s["ran"] == 0 and s["skipped"] == s["shards"] for s in sharded)
    assert again["mapper"]["ran"] == 0 and second["skipped"] == ["evaluate"]
    assert manifest_path.read_text() == json.dumps(manifest, indent=1, sort_keys=True)
