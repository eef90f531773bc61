"""DeltaEdit-D training: the (image, code) cache, the loop (learning, EMA, determinism, resume) and the
flow (single process; Ray Train with 2 CPU gloo workers that resumes from its checkpoint). Synthetic stores
of 16 px images whose colours are a function of the code, tiny U-Net."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_models import TINY_G, tiny_generator
from helpers_pipeline import training_overrides
from PIL import Image

from infra.config import ConfigError, load_config
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from models import zoo
from models.checkpoint import load_safetensors
from models.diffusion import StyleUNet
from models.imaging import pool_to
from models.layout import StyleLayout
from models.stylegan2 import StyleCode
from tasks.train.diffusion import build_model, fit, model_config, validation_loss
from tasks.train.diffusion_data import GeneratorRender, build_image_cache
from tasks.train.row_cache import is_validation

torch.set_num_threads(1)
LAYOUT = StyleLayout.for_generator(TINY_G["size"], channels=TINY_G["channels"])
SIZE = 16
TINY_UNET = {
    "base_channels": 8,
    "channel_mult": "[1,2]",
    "num_res_blocks": 1,
    "norm_groups": 4,
    "timesteps": 100,
}


def picture(s: np.ndarray) -> np.ndarray:
    """A learnable (3, 16, 16) uint8 image of a code: left half coloured by s[0:3], right half by s[3:6]."""
    img = np.zeros((3, SIZE, SIZE), np.uint8)
    img[:, :, : SIZE // 2] = (np.tanh(s[0:3]) * 120 + 128).astype(np.uint8)[:, None, None]
    img[:, :, SIZE // 2 :] = (np.tanh(s[3:6]) * 120 + 128).astype(np.uint8)[:, None, None]
    return img


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def write_stores(
    root: Path,
    n_real: int = 40,
    n_samples: int = 60,
    shard_size: int = 16,
    seed: int = 0,
    sizes: tuple[int, ...] = (SIZE,),
    rgb: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """images+codes (every 7th code without an image: a failed ingest) and samples, with toRGB styles
    ``s_rgb`` when ``rgb``; returns key → (s, img)."""
    rng = np.random.default_rng(seed)
    truth = {}
    for pool, n in (("codes", n_real), ("samples", n_samples)):
        for lo in range(0, n, shard_size):
            sid = f"{lo // shard_size:05d}"
            image_stage = "images" if pool == "codes" else "samples"
            images = StageStore(Location(str(root)), image_stage).writer(
                sid, {"layout": LAYOUT.to_dict()}
            )
            codes = (
                images
                if pool == "samples"
                else StageStore(Location(str(root)), "codes").writer(
                    sid, {"layout": LAYOUT.to_dict()}
                )
            )
            for i in range(lo, min(n, lo + shard_size)):
                key, s = f"{pool}_{i:05d}", rng.normal(size=LAYOUT.conv_total).astype(np.float32)
                vectors = {"s": s}
                if rgb:
                    vectors["s_rgb"] = rng.normal(size=LAYOUT.rgb_total).astype(np.float32)
                img = picture(s)
                if len(sizes) > 1 and i == lo + 1:
                    img = np.zeros((3, sizes[1], sizes[1]), np.uint8)
                if pool == "codes":
                    if i % 7 == 3:
                        images.add_failure(key, key, "corrupt")
                    else:
                        images.add(key, key, image=_png(img), image_ext="png")
                        truth[key] = (s, img)
                    codes.add(key, key, vectors=vectors)
                else:
                    images.add(key, key, image=_png(img), image_ext="png", vectors=vectors)
                    truth[key] = (s, img)
            for writer in dict.fromkeys((images, codes)):
                writer.commit(input_fingerprint=sid, code_fingerprint="synthetic")
    return truth


@pytest.fixture
def stores(tmp_path) -> Path:
    write_stores(tmp_path / "run")
    return tmp_path / "run"


def settings(**kw):
    base = {
        "steps": 8,
        "batch_size": 8,
        "val_fraction": 0.2,
        "val_every": 4,
        "val_images": 16,
        "checkpoint_every": 3,
        "lr": 2e-3,
        "ema_decay": 0.9,
        "warmup_steps": 4,
    }
    overrides = [f"train_diffusion.{k}={v}" for k, v in {**base, **kw}.items()]
    overrides += [f"train_diffusion.model.{k}={v}" for k, v in TINY_UNET.items()]
    return load_config(None, overrides).train_diffusion


def _cache(stores: Path, **kw):
    return build_image_cache(
        Location(str(stores)), stores / "cache", val_fraction=kw.pop("val_fraction", 0.2), **kw
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(str(path))[0]


def test_cache_joins_images_and_codes_exactly(tmp_path):
    truth = write_stores(tmp_path / "run")
    cache = _cache(tmp_path / "run")
    n_real = sum(k.startswith("codes") for k in truth)
    assert len(cache) == len(truth) == n_real + 60 and n_real == 40 - len(range(3, 40, 7))
    assert cache.meta["counts"] == {"codes": n_real, "samples": 60} and cache.image_shape == (
        3,
        SIZE,
        SIZE,
    )
    keys = sorted(
        truth, key=lambda k: (not k.startswith("codes"), k)
    )  # cache order: pools, shards, keys
    s, x = cache.fetch(np.arange(len(keys)))
    for row, key in enumerate(keys):
        assert np.array_equal(s[row].numpy(), truth[key][0])
        assert np.array_equal(
            ((x[row] + 1) * 127.5).round().numpy().astype(np.uint8), truth[key][1]
        )
    assert [bool(v) for v in cache.is_val] == [is_validation(k, 0.2) for k in keys]
    train = np.stack([truth[k][0] for k, v in zip(keys, cache.is_val) if not v])
    mean, std = cache.style_stats()
    assert np.allclose(mean.numpy(), train.mean(0), atol=1e-5) and np.allclose(
        std.numpy(), train.std(0), atol=1e-4
    )
    assert _cache(tmp_path / "run").meta == cache.meta  # reused, not rebuilt


def _tiny_generator_spec(folder: Path) -> zoo.ModelSpec:
    gen = tiny_generator()
    gen.save(str(folder / "g.safetensors"))
    return zoo.ModelSpec(name="stylegan2", checkpoint=str(folder / "g.safetensors"))


def test_rendered_cache_holds_g_of_each_code_beside_its_image(tmp_path):
    """A decoder conditioned on G(s) trains on rows that carry G(s) (the codes' conv and toRGB styles
    rendered, brought to the images' size, 8-bit) after s; the images themselves are unchanged."""
    truth = write_stores(tmp_path / "run", rgb=True)
    render = GeneratorRender(_tiny_generator_spec(tmp_path), {})
    cache = _cache(tmp_path / "run", render=render)
    plain = build_image_cache(Location(str(tmp_path / "run")), tmp_path / "plain", val_fraction=0.2)
    assert cache.rendered and not plain.rendered and cache.image_shape == plain.image_shape
    rows = np.arange(len(truth))
    (cond, x), (s, x_plain) = cache.fetch(rows), plain.fetch(rows)
    assert torch.equal(x, x_plain) and torch.equal(cond[:, : LAYOUT.conv_total], s)
    table = StageStore(Location(str(tmp_path / "run")), "codes").vectors("00000")
    key_row = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    first = sorted(k for k in truth if k.startswith("codes"))[0]
    s_rgb = np.asarray(table.column("s_rgb")[key_row[first]].as_py(), np.float32)[None]
    with torch.no_grad():
        expected = pool_to(
            tiny_generator()
            .synthesize(StyleCode(torch.from_numpy(truth[first][0][None]), torch.from_numpy(s_rgb)))
            .clamp(-1, 1),  # as the edit stage renders it (tasks.edit.diffusion)
            SIZE,
        )
    got = cond[0, LAYOUT.conv_total :].reshape(1, 3, SIZE, SIZE)
    assert (got - expected).abs().max() <= 1.5 / 127.5  # 8-bit rounding (twice)
    assert cache.meta["fingerprint"] != plain.meta["fingerprint"]


def test_render_condition_needs_the_rendered_cache_and_a_generator(stores):
    cfg = settings(**{"model.render_condition": "true"})
    with pytest.raises(ValueError, match="render_condition needs G"):
        model_config(cfg, _cache(stores))
    from flows.train_diffusion import generator_render

    with pytest.raises(ConfigError, match="models.generator"):
        generator_render(load_config(None, ["train_diffusion.model.render_condition=true"]))


def test_cache_refuses_images_of_several_sizes(tmp_path):
    write_stores(tmp_path / "run", sizes=(SIZE, 8))
    with pytest.raises(
        ValueError, match=r"images/00000: images of several sizes.*ingest.image_size"
    ):
        _cache(tmp_path / "run")


def test_training_lowers_the_validation_loss_and_the_ema_follows(stores):
    cache = _cache(stores)
    dc = settings(steps=60, val_every=60, checkpoint_every=1000, ema_decay=0.95)
    val = np.sort(cache.val_rows)[:16]
    before = validation_loss(build_model(model_config(dc, cache), cache, 0), cache, val, 8, 0)
    result = fit(dc, 0, cache, Location(str(stores / "out")), log=lambda _: None)
    assert result["done"] and result["val"]["val_loss"] < 0.75 * before
    ema = StyleUNet.from_checkpoint(str(stores / "out" / "diffusion.safetensors"))
    assert ema.lineage["step"] == 60 and ema.lineage["counts"] == cache.meta["counts"]
    assert torch.allclose(ema.style_mean, cache.style_stats()[0])  # s is standardised like the data
    raw = torch.load(
        io.BytesIO((stores / "out" / "step-00000060.state.pt").read_bytes()), weights_only=True
    )["model"]
    ema_w = _weights(stores / "out" / "diffusion.safetensors")
    assert not torch.equal(
        raw["conv_in.weight"], ema_w["conv_in.weight"]
    )  # EMA ≠ raw weights, but close
    assert torch.allclose(raw["conv_in.weight"], ema_w["conv_in.weight"], atol=0.2)


def test_same_seed_same_weights_and_resume_equals_uninterrupted(stores):
    cache, dc = _cache(stores), settings()
    clean = fit(dc, 0, cache, Location(str(stores / "clean")), log=lambda _: None)
    fit(dc, 0, cache, Location(str(stores / "again")), log=lambda _: None)
    out = Location(str(stores / "killed"))
    first = fit(
        dc, 0, cache, out, stop_at=5, log=lambda _: None
    )  # dies at step 5: last checkpoint 3
    assert (first["step"], first["done"]) == (5, False) and not (
        stores / "killed" / "diffusion.safetensors"
    ).exists()
    resumed = fit(dc, 0, cache, out, log=lambda _: None)
    assert (resumed["start_step"], resumed["step"], resumed["ran"]) == (3, 8, 5)
    a, b, c = (_weights(stores / n / "diffusion.safetensors") for n in ("clean", "again", "killed"))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert resumed["val"] == clean["val"]
    with pytest.raises(ValueError, match="overwrite"):
        fit(settings(lr=1e-3), 0, cache, out, log=lambda _: None)


def _flow_overrides(root: Path, **kw) -> list[str]:
    base = {
        "steps": 4,
        "batch_size": 8,
        "val_fraction": 0.2,
        "val_every": 2,
        "val_images": 8,
        "checkpoint_every": 2,
        "threads": 1,
    }
    return training_overrides(
        root,
        "train_diffusion",
        {**base, **kw},
        *(f"train_diffusion.model.{k}={v}" for k, v in TINY_UNET.items()),
    )


@pytest.mark.usefixtures("prefect_harness")
def test_flow_trains_and_the_zoo_loads_its_checkpoint(stores):
    from flows.train_diffusion import train_diffusion_flow

    result = train_diffusion_flow(None, _flow_overrides(stores))["train_diffusion"]
    assert result["done"] and result["ran"] == 4 and result["val"]["step"] == 4
    ckpt = stores / "diffusion" / "diffusion.safetensors"
    model = zoo.build({"name": "style_diffusion", "checkpoint": str(ckpt)})
    assert (
        isinstance(model, StyleUNet)
        and model.style_dim == LAYOUT.conv_total
        and model.config.image_size == SIZE
    )
    assert (stores / "diffusion_cache" / "meta.json").exists()


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_flow_on_ray_train_with_two_cpu_workers_resumes_from_its_checkpoint(stores, monkeypatch):
    """A relative run root, as in configs/toy.yaml: the workers (in Ray's own directory) write into it too."""
    from flows.train_diffusion import train_diffusion_flow

    monkeypatch.chdir(stores.parent)
    first = train_diffusion_flow(None, _flow_overrides(Path(stores.name), workers=2))[
        "train_diffusion"
    ]
    assert first["done"] and (first["start_step"], first["step"]) == (0, 4)
    step4 = _weights(stores / "diffusion" / "diffusion.safetensors")
    longer = train_diffusion_flow(None, _flow_overrides(Path(stores.name), workers=2, steps=6))[
        "train_diffusion"
    ]
    assert longer["done"] and (longer["start_step"], longer["step"], longer["ran"]) == (4, 6, 2)
    step6 = _weights(stores / "diffusion" / "diffusion.safetensors")
    assert (
        StyleUNet.from_checkpoint(str(stores / "diffusion" / "diffusion.safetensors")).lineage[
            "workers"
        ]
        == 2
    )
    assert not all(torch.equal(step4[k], step6[k]) for k in step4)
