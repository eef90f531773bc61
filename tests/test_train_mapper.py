"""Delta Mapper training: the row cache and sampler, the loop (learning, determinism, resume), the flow
(single process, straightforward baseline, Ray Train with 2 CPU workers). Synthetic stores, tiny layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_models import TINY_G
from helpers_pipeline import training_overrides

from infra.config import load_config
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from models.checkpoint import load_safetensors
from models.delta_mapper import DeltaMapper, StraightforwardMapper
from models.layout import StyleLayout
from tasks.train import mapper_data
from tasks.train.mapper import build_model, evaluate, fit, mapper_config
from tasks.train.mapper_data import PairSampler, build_row_cache, nearest_rows, validation_pairs
from tasks.train.row_cache import is_validation

LAYOUT = StyleLayout.for_generator(TINY_G["size"], channels=TINY_G["channels"])
CLIP_DIM = 8


def write_stores(
    root: Path, n_codes: int = 60, n_samples: int = 100, shard_size: int = 32, seed: int = 0
) -> None:
    """codes/clip_images and samples/clip_samples with a learnable link: s = A·z, i = normalise(B·z)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(4, LAYOUT.conv_total)).astype(np.float32)
    b = rng.normal(size=(4, CLIP_DIM)).astype(np.float32)
    for (codes, clip), n in (
        (("codes", "clip_images"), n_codes),
        (("samples", "clip_samples"), n_samples),
    ):
        z = rng.normal(size=(n, 4)).astype(np.float32)
        s, e = z @ a, z @ b
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        for lo in range(0, n, shard_size):
            sid, rows = f"{lo // shard_size:05d}", range(lo, min(n, lo + shard_size))
            _shard(
                root,
                codes,
                sid,
                {"layout": LAYOUT.to_dict()},
                {f"{codes}_{i:05d}": {"s": s[i], "s_rgb": np.zeros(3, np.float32)} for i in rows},
            )
            _shard(
                root,
                clip,
                sid,
                {"model": "synthetic"},
                {f"{codes}_{i:05d}": {"embedding": e[i]} for i in rows},
            )


def _shard(
    root: Path, stage: str, sid: str, meta: dict, rows: dict[str, dict[str, np.ndarray]]
) -> None:
    writer = StageStore(Location(str(root)), stage).writer(sid, meta)
    for key, vectors in rows.items():
        writer.add(key, key, vectors=vectors)
    writer.commit(input_fingerprint=sid, code_fingerprint="synthetic")


def settings(**kw):
    base = {
        "steps": 12,
        "batch_size": 8,
        "val_fraction": 0.2,
        "val_every": 4,
        "val_pairs": 16,
        "checkpoint_every": 4,
        "lr": 0.5,
    }
    overrides = [f"train_mapper.{k}={v}" for k, v in {**base, **kw}.items()]
    return load_config(None, overrides).train_mapper


@pytest.fixture
def stores(tmp_path) -> Path:
    torch.set_num_threads(1)
    write_stores(tmp_path / "run")
    return tmp_path / "run"


def _cache(stores: Path, **kw):
    return build_row_cache(
        Location(str(stores)), stores / "cache", val_fraction=kw.pop("val_fraction", 0.2), **kw
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(str(out / "mapper.safetensors"))[0]


def test_cache_reads_one_shard_at_a_time_and_fetches_only_batches(stores, monkeypatch):
    seen: list[int] = []
    real = mapper_data.read_columns
    monkeypatch.setattr(
        mapper_data,
        "read_columns",
        lambda store, sid, cols: seen.append(len(r := real(store, sid, cols))) or r,
    )
    cache = _cache(stores)
    assert len(cache) == 160 and max(seen) <= 32 and "w" not in str(seen)
    assert cache.meta["counts"] == {"codes": 60, "samples": 100}
    assert _cache(stores).meta == cache.meta and len(seen) == 2 * (2 + 4)  # reused: no second pass
    tm = settings(steps=5, val_every=100)
    result = fit(tm, 0, cache, Location(str(stores / "out")), log=lambda _: None)
    # every step reads 2 × batch rows; the final validation reads 2 × val_pairs; nothing else
    assert cache.rows_read == 5 * 2 * 8 + 2 * min(16, cache.val_rows.size) and result["done"]


def test_validation_split_is_disjoint_and_deterministic(tmp_path):
    for name, shard_size in (("a", 32), ("b", 7)):
        write_stores(tmp_path / name, shard_size=shard_size)
    caches = [_cache(tmp_path / n) for n in ("a", "b")]
    keys = [
        k
        for pool, n in (("codes", 60), ("samples", 100))
        for k in (f"{pool}_{i:05d}" for i in range(n))
    ]
    expected = {k for k in keys if is_validation(k, 0.2)}
    for cache in caches:
        assert cache.is_val.sum() == len(expected) > 0
        assert set(cache.train_rows).isdisjoint(cache.val_rows)
    sampler = PairSampler(caches[0].train_rows, 8, seed=0)
    drawn = np.concatenate([np.concatenate(sampler.batch(step)) for step in range(50)])
    assert set(drawn) <= set(caches[0].train_rows)
    assert np.array_equal(
        sampler.batch(37)[1], PairSampler(caches[0].train_rows, 8, seed=0).batch(37)[1]
    )
    ranks = [PairSampler(caches[0].train_rows, 8, seed=0, rank=r, world=2) for r in (0, 1)]
    primaries = [
        set(np.concatenate([w.batch(i)[0] for i in range(w.steps_per_epoch)])) for w in ranks
    ]
    assert primaries[0].isdisjoint(primaries[1])  # each worker its own slice


def test_local_partners_come_from_the_nearest_rows_in_clip_space(stores):
    cache = _cache(stores)
    rows = cache.train_rows
    near = nearest_rows(cache, 5, chunk=7)  # chunks smaller than the pool
    emb = torch.nn.functional.normalize(cache.fetch(rows)[1], dim=1)
    sim = emb @ emb.T
    sim.fill_diagonal_(-2)
    assert np.array_equal(np.sort(near, 1), np.sort(sim.topk(5, dim=1).indices.numpy(), 1))
    assert not (near == np.arange(len(rows))[:, None]).any()  # never itself
    local = PairSampler(rows, 8, seed=0, neighbours=near, local_fraction=1.0)
    for step in range(20):
        primary, partner = local.batch(step)
        at = np.searchsorted(rows, primary)
        assert all(np.searchsorted(rows, q) in near[a] for a, q in zip(at, partner))
    half = PairSampler(rows, 8, seed=0, neighbours=near, local_fraction=0.5)
    hits = [
        np.searchsorted(rows, q) in near[np.searchsorted(rows, p)]
        for step in range(100)
        for p, q in zip(*half.batch(step))
    ]
    assert 0.4 < np.mean(hits) < 0.65  # half local, some uniform ones land near too
    assert np.array_equal(
        half.batch(9)[1], PairSampler(rows, 8, 0, neighbours=near, local_fraction=0.5).batch(9)[1]
    )


def test_covariance_relevance_finds_the_embedding_direction_each_channel_moves(stores):
    from tasks.relevance_covariance import covariance_pairs, covariance_rows

    pairs = covariance_pairs(Location(str(stores)), ["codes", "samples"])
    rows = covariance_rows(pairs)
    s, e = (torch.cat(t) for t in zip(*[_cache(stores).fetch(np.arange(160))]))
    e = torch.nn.functional.normalize(e.double(), dim=1)
    cov = (s.double() - s.double().mean(0)).T @ (e - e.mean(0)) / len(s)
    assert rows.shape == (LAYOUT.conv_total, CLIP_DIM)
    assert torch.allclose(rows.norm(dim=1), torch.ones(len(rows)), atol=1e-5)
    assert torch.allclose(
        rows.double(), torch.nn.functional.normalize(cov, dim=1), atol=1e-5
    )  # streamed = whole
    with pytest.raises(FileNotFoundError, match="preprocess"):
        covariance_pairs(Location(str(stores / "nothing")), ["samples"])


def test_loss_decreases_on_a_learnable_problem(stores):
    cache = _cache(stores)
    tm = settings(steps=150, checkpoint_every=1000, val_every=150, val_pairs=32, batch_size=16)
    pairs = validation_pairs(cache.val_rows, 32, 0)
    before = evaluate(build_model("delta", mapper_config(cache), 0), "delta", cache, pairs, 16)
    after = fit(tm, 0, cache, Location(str(stores / "out")), log=lambda _: None)["val"]
    assert (
        after["val_loss"] < 0.7 * before["val_loss"] and after["val_cos"] > before["val_cos"] + 0.2
    )


def test_same_seed_gives_bit_identical_weights(stores):
    cache, tm = _cache(stores), settings()
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        fit(tm, seed, cache, Location(str(stores / name)), log=lambda _: None)
    a, b, c = (_weights(stores / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_interrupted_then_resumed_equals_uninterrupted(stores):
    cache, tm = _cache(stores), settings()
    clean = fit(tm, 0, cache, Location(str(stores / "clean")), log=lambda _: None)
    out = Location(str(stores / "killed"))
    first = fit(
        tm, 0, cache, out, stop_at=10, log=lambda _: None
    )  # dies at step 10: last checkpoint 8
    assert (first["step"], first["done"]) == (10, False) and not (
        stores / "killed" / "mapper.safetensors"
    ).exists()
    resumed = fit(tm, 0, cache, out, log=lambda _: None)
    assert (resumed["start_step"], resumed["step"], resumed["ran"]) == (8, 12, 4)
    a, b = _weights(stores / "clean"), _weights(stores / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val"] == clean["val"]
    again = fit(tm, 0, cache, out, log=lambda _: None)  # finished: nothing to do
    assert again["ran"] == 0 and again["done"]
    with pytest.raises(ValueError, match="other settings.*deltaedit demo --overwrite"):
        fit(settings(lr=0.1), 0, cache, out, log=lambda _: None)


def _flow_overrides(root: Path, **kw) -> list[str]:
    base = {
        "steps": 6,
        "batch_size": 8,
        "val_fraction": 0.2,
        "val_every": 3,
        "val_pairs": 16,
        "checkpoint_every": 3,
        "threads": 1,
    }
    return training_overrides(root, "train_mapper", {**base, **kw})


@pytest.mark.usefixtures("prefect_harness")
def test_flow_trains_resumes_and_trains_the_baseline(tmp_path):
    from flows.train_mapper import train_mapper_flow

    write_stores(tmp_path / "run")
    result = train_mapper_flow(None, _flow_overrides(tmp_path / "run"))["train_mapper"]
    assert result["done"] and result["ran"] == 6 and result["val"]["step"] == 6
    mapper = DeltaMapper.from_checkpoint(str(tmp_path / "run" / "mapper" / "mapper.safetensors"))
    assert mapper.style_dim == LAYOUT.conv_total and mapper.config.clip_dim == CLIP_DIM
    longer = train_mapper_flow(None, _flow_overrides(tmp_path / "run", steps=9))["train_mapper"]
    assert (longer["start_step"], longer["ran"]) == (6, 3)  # a rerun continues
    fresh = train_mapper_flow(None, _flow_overrides(tmp_path / "run"), overwrite=True)[
        "train_mapper"
    ]
    assert (fresh["start_step"], fresh["ran"]) == (0, 6)
    overrides = _flow_overrides(
        tmp_path / "run", model="straightforward", cache_dir=tmp_path / "c2"
    )
    base = train_mapper_flow(None, overrides, overwrite=True)["train_mapper"]
    assert base["done"] and base["ran"] == 6  # its own folder: the Delta Mapper stays
    baseline = StraightforwardMapper.from_checkpoint(
        str(tmp_path / "run" / "mapper_straightforward" / "mapper.safetensors")
    )
    assert isinstance(baseline, StraightforwardMapper)
    assert (
        DeltaMapper.from_checkpoint(str(tmp_path / "run" / "mapper" / "mapper.safetensors")).KIND
        == "delta_mapper"
    )


@pytest.mark.slow  # ~60 s of Ray Train start-up; CI runs the same launcher (infra/runtime/ray_train.py) in
@pytest.mark.timeout(300)  # test_train_diffusion's two-worker resume test
@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_flow_on_ray_train_with_two_cpu_workers(tmp_path):
    from flows.train_mapper import train_mapper_flow

    write_stores(tmp_path / "run")
    result = train_mapper_flow(None, _flow_overrides(tmp_path / "run", workers=2, steps=4))[
        "train_mapper"
    ]
    assert result["done"] and result["step"] == 4
    DeltaMapper.from_checkpoint(str(tmp_path / "run" / "mapper" / "mapper.safetensors"))


@pytest.mark.usefixtures("prefect_harness")
def test_flow_with_its_row_cache_at_a_uri(tmp_path, s3_bucket):
    """cache_dir: s3://... — built here, published there, and what training reads (every node's copy)."""
    import json

    from flows.train_mapper import train_mapper_flow
    from tasks.train.row_cache import stored_fingerprint

    bucket, options = s3_bucket
    write_stores(tmp_path / "run")
    overrides = _flow_overrides(tmp_path / "run", cache_dir=f"{bucket}/mapper_cache")
    result = train_mapper_flow(None, [*overrides, f"storage_options={json.dumps(options)}"])
    assert result["train_mapper"]["done"] and result["train_mapper"]["ran"] == 6
    assert stored_fingerprint(Location(f"{bucket}/mapper_cache", options)) is not None


@pytest.mark.slow  # Ray Train start-up, as above
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_flow_on_ray_train_with_cache_and_train_storage_on_s3(tmp_path, s3_bucket):
    """What a multi-node run needs: the row cache and Ray Train's storage at URIs every node reaches."""
    import json

    from flows.train_mapper import train_mapper_flow

    bucket, options = s3_bucket
    write_stores(tmp_path / "run")
    overrides = [
        *_flow_overrides(tmp_path / "run", workers=2, steps=4, cache_dir=f"{bucket}/cache"),
        f"ray.train_storage={bucket}/ray_train",
        f"storage_options={json.dumps(options)}",
    ]
    result = train_mapper_flow(None, overrides)["train_mapper"]
    assert result["done"] and result["step"] == 4
    assert Location(f"{bucket}/ray_train", options).listdir()  # Ray Train wrote its run state
