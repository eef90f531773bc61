"""The paper's setting (configs/ffhq.yaml) at toy scale: the train/eval split by key hash, train-diffusion on
generator samples larger than the photos (1024-px samples beside 256-px images), and the whole chain
preprocess → relevance import → train-mapper → train-diffusion → bulk-edit → evaluate on ffhq.yaml with
tiny synthetic weights: a small-layout version in the default set, the 1024 layout as a slow test."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers_models import load_format
from helpers_pipeline import TINY_CLIP
from helpers_store import make_catalog
from PIL import Image

from infra.config import load_config
from infra.storage.fsio import Location
from infra.storage.readers import decode_rgb, encoded_image, iter_image_samples
from infra.storage.store import StageStore
from models.clip import ClipEncoder
from models.e4e import Encoder
from models.layout import StyleLayout
from models.stylegan2 import Generator
from tasks.split import eval_keys, in_eval, split_value, train_keys
from tasks.train.diffusion_data import build_image_cache
from tasks.train.mapper_data import build_row_cache

REPO = Path(__file__).resolve().parents[1]
FFHQ = REPO / "configs" / "ffhq.yaml"


# --- the split ---------------------------------------------------------------------------------------------


def test_the_split_is_a_stable_hash_of_the_key_independent_of_the_validation_hold_out():
    from tasks.train.row_cache import is_validation

    keys = [f"img_{i:05d}_{i * 7919:08x}" for i in range(20_000)]
    share = np.mean([in_eval(k, 12_000 / 70_000) for k in keys])
    assert abs(share - 12_000 / 70_000) < 0.01  # ≈ 12 000 of FFHQ's 70 000
    assert not any(in_eval(k, 0.0) for k in keys[:100])  # 0: no split
    assert train_keys(0.0) is None and eval_keys(0.0) is None
    assert all(train_keys(0.2)(k) != eval_keys(0.2)(k) for k in keys[:200])
    # the validation hold-out hashes the bare key: its rows fall in both parts alike
    val = [k for k in keys if is_validation(k, 0.05)]
    assert 0.12 < np.mean([in_eval(k, 12_000 / 70_000) for k in val]) < 0.22
    assert split_value("img_00000") == split_value("img_00000")  # no state, no seed
    cfg = load_config(FFHQ)
    assert round(70_000 * (1 - cfg.split.eval_fraction)) == 58_000 and cfg.sample.n == 200_000
    assert cfg.train_mapper.steps == 201_562 and cfg.train_mapper.batch_size == 64
    assert cfg.train_mapper.pools == ["codes", "samples"] and cfg.train_mapper.local_partners == 0


# --- train-diffusion on mixed sources ------------------------------------------------------------------------

LAYOUT_1024 = StyleLayout.for_generator(1024)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _mixed_stores(root: Path, photo: int = 16, sample: int = 64, n: int = 12) -> dict:
    """Photos (images + codes) at ``photo`` px and generator samples at ``sample`` px (FFHQ's 256 and 1024
    scaled by 16), codes in the 1024 layout (6048 conv channels); returns key → (s, HWC image)."""
    rng = np.random.default_rng(0)
    loc, truth = Location(str(root)), {}
    meta = {"layout": LAYOUT_1024.to_dict()}
    images, codes = (StageStore(loc, s).writer("00000", meta) for s in ("images", "codes"))
    samples = StageStore(loc, "samples").writer("00000", meta)
    for i in range(n):
        for pool, size in (("photo", photo), ("sample", sample)):
            key, s = f"{pool}_{i:03d}", rng.normal(size=LAYOUT_1024.conv_total).astype(np.float32)
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            truth[key] = (s, img)
            if pool == "photo":
                images.add(key, key, image=_png(img), image_ext="png")
                codes.add(key, key, vectors={"s": s})
            else:
                samples.add(key, key, image=_png(img), image_ext="png", vectors={"s": s})
    for writer in (images, codes, samples):
        writer.commit(input_fingerprint="synthetic", code_fingerprint="synthetic")
    return truth


def _block_mean(img: np.ndarray, size: int) -> np.ndarray:
    f = img.shape[0] // size
    return img.reshape(size, f, size, f, 3).astype(np.float64).mean(axis=(1, 3))


def test_train_diffusion_caches_large_samples_beside_small_photos_at_the_photos_size(tmp_path):
    truth = _mixed_stores(tmp_path / "run")
    cache = build_image_cache(Location(str(tmp_path / "run")), tmp_path / "cache", val_fraction=0)
    assert cache.style_dim == 6048 and cache.image_shape == (3, 16, 16)
    assert cache.meta["counts"] == {"codes": 12, "samples": 12}
    s, x = cache.fetch(np.arange(len(cache)))
    pixels = ((x + 1) * 127.5).round().numpy().transpose(0, 2, 3, 1)
    for row, key in enumerate(
        [f"photo_{i:03d}" for i in range(12)] + [f"sample_{i:03d}" for i in range(12)]
    ):
        s_true, img = truth[key]
        assert np.array_equal(s[row].numpy(), s_true)
        if key.startswith("photo"):
            assert np.array_equal(pixels[row], img)  # the photos as they are
        else:  # e4e's face_pool: the mean of each 4×4 block (1024 → 256 in the paper)
            assert np.abs(pixels[row] - _block_mean(img, 16)).max() <= 0.5 + 1e-6

    # a set size brings every image to it, and the eval part of the catalog is left out
    held = build_image_cache(
        Location(str(tmp_path / "run")),
        tmp_path / "cache8",
        val_fraction=0,
        eval_fraction=0.5,
        image_size=8,
    )
    n_train = sum(not in_eval(f"photo_{i:03d}", 0.5) for i in range(12))
    assert held.image_shape == (3, 8, 8) and held.meta["counts"] == {
        "codes": n_train,
        "samples": 12,
    }


def test_without_resizing_the_mixed_sizes_are_the_error_the_issue_reports(tmp_path, monkeypatch):
    """The cache as it was before: every image at its stored size."""
    from tasks.train import diffusion_data

    _mixed_stores(tmp_path / "run")
    pairs = diffusion_data.shard_pairs(
        Location(str(tmp_path / "run")), ["codes", "samples"], diffusion_data.POOLS
    )
    monkeypatch.setattr(diffusion_data, "_photo_size", lambda pairs: None)
    (tmp_path / "rows").mkdir()
    with pytest.raises(ValueError, match=r"\(style dim, image shape\).*differs.*image_size"):
        diffusion_data._write_rows(pairs, tmp_path / "rows", 0.0)


def test_train_mapper_rows_leave_the_eval_part_out(tmp_path):
    loc, rng = Location(str(tmp_path / "run")), np.random.default_rng(0)
    keys = [f"img_{i:03d}" for i in range(40)]
    for codes_stage, clip_stage in (("codes", "clip_images"), ("samples", "clip_samples")):
        codes = StageStore(loc, codes_stage).writer("00000", {"layout": LAYOUT_1024.to_dict()})
        clip = StageStore(loc, clip_stage).writer("00000", {})
        for key in keys:
            codes.add(key, key, vectors={"s": rng.normal(size=8).astype(np.float32)})
            clip.add(key, key, vectors={"embedding": rng.normal(size=4).astype(np.float32)})
        for w in (codes, clip):
            w.commit(input_fingerprint="synthetic", code_fingerprint="synthetic")
    cache = build_row_cache(loc, tmp_path / "cache", val_fraction=0, eval_fraction=0.3)
    n_train = sum(not in_eval(k, 0.3) for k in keys)
    assert 0 < n_train < 40 and cache.meta["counts"] == {"codes": n_train, "samples": 40}


# --- the chain on configs/ffhq.yaml -----------------------------------------------------------------------

SMALL = {  # the smallest layout with the mismatch: 128-px samples (6 conv resolutions) beside 32-px photos
    "size": 128,
    "channels": {4: 16, 8: 16, 16: 16, 32: 8, 64: 8, 128: 4},
    "n_mlp": 2,
    "photo": 32,
    "images": 24,
    "samples": 16,
}
FULL = {  # rosinality's FFHQ 1024 layout (17 conv, 9 toRGB layers, 18 W+ rows), every width scaled down
    "size": 1024,
    "channels": {4: 16, 8: 16, 16: 16, 32: 16, 64: 8, 128: 8, 256: 4, 512: 4, 1024: 4},
    "n_mlp": 8,
    "photo": 256,
    "images": 32,
    "samples": 16,
}


def _tiny_ffhq_zoo(folder: Path, spec: dict) -> tuple[Generator, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    gen = Generator(spec["size"], 32, spec["n_mlp"], channels=spec["channels"])
    enc = Encoder(
        n_styles=gen.n_latent,
        style_dim=32,
        input_size=spec["photo"],
        backbone_blocks=(1, 1, 1, 1),
        widths=(8, 16, 16, 32),
        generator=gen,
    )
    clip = ClipEncoder.load("tiny", model_config=TINY_CLIP)
    gen.save(str(folder / "g.safetensors"))
    enc.save(str(folder / "e.safetensors"))
    clip.save(str(folder / "clip.safetensors"))
    fs3 = np.random.default_rng(0).normal(size=(gen.layout.conv_total, TINY_CLIP["embed_dim"]))
    np.save(
        folder / "fs3.npy", (fs3 / np.linalg.norm(fs3, axis=1, keepdims=True)).astype(np.float32)
    )
    return gen, [
        f"models.generator={{name: stylegan2, checkpoint: {folder / 'g.safetensors'}}}",
        f"models.encoder={{name: e4e, checkpoint: {folder / 'e.safetensors'}}}",
        f"models.clip={{name: open_clip, checkpoint: {folder / 'clip.safetensors'}}}",
        f"relevance.source={folder / 'fs3.npy'}",
    ]


def _ffhq_overrides(base: Path, spec: dict, zoo: list[str]) -> list[str]:
    return [
        f"root={base / 'run'}",
        "device=cpu",
        "prefect.retries=0",
        "ray.actors=1",
        "ray.cpus_per_actor=1",
        f"ingest.source={base / 'catalog'}",
        f"ingest.shard_size={spec['images'] // 2}",
        f"ingest.image_size={spec['photo']}",
        f"sample.n={spec['samples']}",
        "sample.shard_size=8",
        "sample.batch_size=8",
        "invert.batch_size=8",
        "relevance.n_stat_samples=256",
        "relevance.block_size=64",
        "train_mapper.steps=4",
        "train_mapper.batch_size=8",
        "train_mapper.val_fraction=0.2",
        "train_mapper.val_every=2",
        "train_mapper.val_pairs=8",
        "train_mapper.checkpoint_every=2",
        "train_mapper.threads=1",
        "train_diffusion.model={base_channels: 8, channel_mult: [1, 2], num_res_blocks: 1, "
        "norm_groups: 4, timesteps: 50, render_condition: true, prediction: v}",
        "train_diffusion.steps=2",
        "train_diffusion.batch_size=4",
        "train_diffusion.val_fraction=0.2",
        "train_diffusion.val_every=2",
        "train_diffusion.val_images=4",
        "train_diffusion.checkpoint_every=2",
        "train_diffusion.threads=1",
        "bulk_edit.methods=[deltaedit, styleclip_gd]",
        "bulk_edit.decoder=[generator, diffusion]",  # G's edits at G's size beside D's at the photos'
        "bulk_edit.diffusion={steps: 2, max_images: 1, methods: [deltaedit]}",
        "bulk_edit.images_per_shard=4",
        "bulk_edit.batch_size=8",
        "evaluate.inception_weights=null",
        "evaluate.identity_model=null",
        "evaluate.lpips_weights=null",
        "evaluate.grid_images=2",
        "evaluate.batch_size=8",  # 1024-px edits: 64 of them are 0.8 GB a tensor, on a small CPU host
        *zoo,
    ]


def _keys(root: Path, stage: str) -> set[str]:
    store = StageStore(Location(str(root)), stage)
    return {
        k
        for sid in store.finished()
        for k, s in zip(
            store.manifest(sid).column("key").to_pylist(),
            store.manifest(sid).column("status").to_pylist(),
        )
        if s == "ok"
    }


def _run_ffhq(base: Path, spec: dict) -> None:
    from flows.bulk_edit import bulk_edit_flow
    from flows.evaluate import evaluate_flow
    from flows.preprocess import preprocess_flow
    from flows.relevance import import_relevance
    from flows.train_diffusion import train_diffusion_flow
    from flows.train_mapper import train_mapper_flow

    make_catalog(base / "catalog", spec["images"], size=spec["photo"] + 8)
    gen, zoo = _tiny_ffhq_zoo(base / "zoo", spec)
    if (
        spec["size"] == 1024
    ):  # the real layout: every tensor of rosinality's FFHQ 1024 g_ema, by name
        assert set(gen.state_dict()) == set(load_format("rosinality_g_ema_1024")["state_dict"])
    overrides = _ffhq_overrides(base, spec, zoo)
    cfg = load_config(FFHQ, overrides)
    root = base / "run"

    pre = preprocess_flow(str(FFHQ), overrides)
    assert pre["images"]["ok"] == spec["images"] and pre["samples"]["ok"] == spec["samples"]
    sample = next(iter(iter_image_samples(StageStore(Location(str(root)), "samples"))))
    photo = next(iter(iter_image_samples(StageStore(Location(str(root)), "images"))))
    assert decode_rgb(encoded_image(sample)).shape[0] == spec["size"]  # G's own size
    assert decode_rgb(encoded_image(photo)).shape[0] == spec["photo"]  # ingest.image_size

    images = _keys(root, "images")
    eval_part = {k for k in images if in_eval(k, cfg.split.eval_fraction)}
    assert 0 < len(eval_part) < len(images)

    assert import_relevance(cfg, None)["rows"] == gen.layout.conv_total
    mapper = train_mapper_flow(str(FFHQ), overrides)["train_mapper"]
    assert mapper["done"] and mapper["rows"] == len(images) - len(eval_part) + spec["samples"]
    diffusion = train_diffusion_flow(str(FFHQ), overrides)["train_diffusion"]
    assert diffusion["done"] and diffusion["rows"] == len(images) - len(eval_part) + spec["samples"]
    assert (root / "diffusion" / "diffusion.safetensors").exists()

    edits = bulk_edit_flow(str(FFHQ), overrides)["edits"]
    store = StageStore(Location(str(root)), "edits")
    table = pa.concat_tables([store.manifest(s) for s in sorted(store.finished())])
    assert set(table.column("image_key").to_pylist()) == eval_part  # only the eval part is edited
    n_prompts = 8  # configs/prompts/ffhq.yaml
    assert edits["ok"] >= len(eval_part) * (1 + 2 * n_prompts)
    decoded = [k for k in table.column("key").to_pylist() if k.endswith("__diffusion")]
    assert len(decoded) >= n_prompts + 1  # DeltaEdit-D's edits and reconstruction of one image
    metrics = evaluate_flow(str(FFHQ), overrides)["metrics"]
    assert metrics["ok"] == metrics["seen"] == edits["ok"]
    assert (root / "report" / "index.html").exists()


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_ffhq_config_runs_end_to_end_on_a_small_layout(tmp_path):
    _run_ffhq(tmp_path, SMALL)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_ffhq_config_runs_end_to_end_in_the_1024_layout(tmp_path):
    _run_ffhq(tmp_path, FULL)
