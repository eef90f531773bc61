"""ClipEncoder: a tiny open_clip model with random weights, our checkpoint format, preprocessing, prompts,
and the offline guarantee."""

from __future__ import annotations

import json
import socket

import fsspec
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.checkpoint import CheckpointError
from models.clip import (
    ClipEncoder,
    ClipWeightsUnavailable,
    PromptTooLongError,
    PromptTruncatedWarning,
    deltaedit_preprocess,
    resolve_pretrained,
)
from models.clip_templates import DROPPED_OPENAI_TEMPLATE, IMAGENET_TEMPLATES

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny() -> ClipEncoder:
    torch.manual_seed(0)
    return ClipEncoder.load("tiny", model_config=TINY, batch_size=4)


def images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- checkpoints --------------------------------------------------------------------------------------------


def test_save_and_load_our_format(tiny, tmp_path):
    path = str(tmp_path / "clip.safetensors")
    tiny.save(path, lineage={"trained_on": "toy"})
    loaded = ClipEncoder.load(checkpoint=path)
    assert loaded.model_name == "tiny" and loaded.lineage == {"trained_on": "toy"}
    assert loaded.describe() == {**tiny.describe(), "checkpoint": path}
    x = images(3)
    assert torch.equal(loaded.encode_images(x), tiny.encode_images(x))
    assert torch.equal(loaded.encode_text(["a red circle"]), tiny.encode_text(["a red circle"]))
    assert ClipEncoder.load(checkpoint=path, preprocess="deltaedit").preprocess_mode == "deltaedit"
    with pytest.raises(CheckpointError, match="'tiny', not 'ViT-B-32'"):
        ClipEncoder.load("ViT-B-32", checkpoint=path)


def test_open_clip_weights_and_json_config_from_a_uri(tiny, tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    uri = "memory://clip/weights.pt"
    with fsspec.open(uri, "wb") as f:  # open_clip's own format, on an fsspec URI
        torch.save(tiny.model.state_dict(), f)
    loaded = ClipEncoder.load(model_config=str(tmp_path / "tiny.json"), checkpoint=uri)
    assert loaded.model_name == "tiny" and loaded.describe()["checkpoint"] == uri
    x = images(2)
    assert torch.allclose(loaded.encode_images(x), tiny.encode_images(x), atol=1e-6)


# --- images -------------------------------------------------------------------------------------------------


def test_image_embeddings_are_unit_norm_and_batch_independent(tiny):
    x = images(5)
    batched = tiny.encode_images(x)
    assert batched.shape == (5, 32) and batched.dtype == torch.float32
    assert torch.allclose(batched.norm(dim=-1), torch.ones(5), atol=1e-5)
    one_by_one = torch.cat([tiny.encode_images(x[i : i + 1], batch_size=1) for i in range(5)])
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    assert tiny.encode_images(x[:0]).shape == (0, 32)


def test_clip_mode_resizes_crops_and_normalises(tiny):
    gray = torch.zeros(1, 3, 32, 32)  # 0 in [-1, 1] = 0.5 in [0, 1]
    mean, std = torch.tensor(tiny.preprocess_cfg["mean"]), torch.tensor(tiny.preprocess_cfg["std"])
    expected = ((0.5 - mean) / std).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    assert torch.allclose(tiny.preprocess(gray), expected, atol=1e-6)
    assert tiny.preprocess(images(2, 64)).shape == (2, 3, 32, 32)
    wide = torch.zeros(1, 3, 48, 96)
    wide[..., 24:72] = 1.0  # the centre square is white
    out = tiny.preprocess(wide)
    assert out.shape == (1, 3, 32, 32)
    assert torch.allclose(
        out[..., 4:28], ((1 - mean) / std).view(1, 3, 1, 1).expand(1, 3, 32, 24), atol=1e-5
    )


def test_deltaedit_preprocessing_is_the_official_upsample_then_pool():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32) / 3000 - 1
    # 32 px → 224: kernel 7·32/224 = 1, i.e. a plain nearest ×7 upsampling
    assert torch.equal(
        deltaedit_preprocess(x, 224), x.repeat_interleave(7, 2).repeat_interleave(7, 3)
    )
    y = images(1, 256)
    official = torch.nn.AvgPool2d(kernel_size=256 * 7 // 224)(torch.nn.Upsample(scale_factor=7)(y))
    assert torch.allclose(deltaedit_preprocess(y, 224), official, atol=1e-5)
    z = images(2, 64)  # toy size: 64 px → 32, kernel 14
    official = torch.nn.AvgPool2d(kernel_size=14)(torch.nn.Upsample(scale_factor=7)(z))
    assert torch.allclose(deltaedit_preprocess(z, 32), official, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        deltaedit_preprocess(images(1, 50), 224)


def test_deltaedit_mode_feeds_unnormalised_pixels(tiny, tmp_path):
    tiny.save(str(tmp_path / "c.safetensors"))
    enc = ClipEncoder.load(checkpoint=str(tmp_path / "c.safetensors"), preprocess="deltaedit")
    x = images(2, 64)
    assert torch.allclose(enc.preprocess(x), deltaedit_preprocess(x, 32))
    assert enc.describe()["preprocess"] == {"mode": "deltaedit", "image_size": 32}
    expected = F.normalize(enc.model.encode_image(deltaedit_preprocess(x, 32)), dim=-1)
    assert torch.allclose(enc.encode_images(x), expected, atol=1e-5)


def test_pil_and_uint8_images_take_the_same_path(tiny):
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    as_tensor = torch.as_tensor(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = tiny.encode_images(as_tensor)
    assert torch.allclose(tiny.encode_pixels(pixels), expected, atol=1e-6)
    pil = [Image.fromarray(p) for p in pixels]
    assert torch.allclose(tiny.encode_pixels(pil), expected, atol=1e-6)
    mixed = [pil[0], Image.fromarray(pixels[1]).resize((48, 32))]
    assert tiny.encode_pixels(mixed).shape == (2, 32)


# --- text ---------------------------------------------------------------------------------------------------


def test_text_embeddings_are_unit_norm_and_batch_independent(tiny):
    prompts = ["face", "face with smile", "a red square", "a blue circle", "grass"]
    batched = tiny.encode_text(prompts)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(5), atol=1e-5)
    one_by_one = torch.cat([tiny.encode_text([p], batch_size=1) for p in prompts])
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_template_average_is_renormalised_and_differs_from_the_plain_prompt(tiny):
    assert len(IMAGENET_TEMPLATES) == 79 == len(set(IMAGENET_TEMPLATES))
    openai = [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert [t for t in openai if t != DROPPED_OPENAI_TEMPLATE] == list(IMAGENET_TEMPLATES)
    prompt = tiny.encode_prompt("face")
    assert prompt.shape == (32,) and torch.isclose(prompt.norm(), torch.tensor(1.0), atol=1e-5)
    each = tiny.encode_text([t.format("face") for t in IMAGENET_TEMPLATES])
    assert torch.allclose(prompt, F.normalize(each.mean(0), dim=-1), atol=1e-5)
    assert not torch.allclose(prompt, tiny.encode_text(["face"])[0], atol=1e-3)
    delta = tiny.delta_text("face", "face with smile")
    assert torch.allclose(delta, tiny.encode_prompt("face with smile") - prompt, atol=1e-6)
    assert delta.norm() < 1.5 and not torch.isclose(delta.norm(), torch.tensor(1.0))


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_prompts_are_rejected(tiny, bad):
    with pytest.raises(ValueError, match="non-empty"):
        tiny.encode_text([bad])
    with pytest.raises(ValueError, match="non-empty"):
        tiny.delta_text("face", bad)


def test_long_prompts_warn_or_raise(tiny):
    long = "a face with " + " and ".join(["freckles"] * 20)
    check = tiny.check_prompt(long)
    assert check.truncated and check.n_tokens > check.context_length == 24
    with pytest.warns(PromptTruncatedWarning, match="truncated"):
        assert tiny.encode_text([long]).shape == (1, 32)
    with pytest.warns(PromptTruncatedWarning) as record:  # one warning for all 79 templated prompts
        tiny.encode_prompt(long)
    assert len(record) == 1 and "79 of 79" in str(record[0].message)
    strict = ClipEncoder(
        tiny.model, tiny.tokenizer, model_name="tiny", model_cfg=TINY, on_truncate="error"
    )
    with pytest.raises(PromptTooLongError):
        strict.encode_text([long])


def test_non_ascii_prompts_are_encoded(tiny):
    emb = tiny.encode_text(["visage souriant", "微笑む顔", "😀 face"])
    assert torch.isfinite(emb).all() and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)


# --- offline --------------------------------------------------------------------------------------------


def test_uncached_pretrained_tag_fails_fast_without_network(no_network, tmp_path):
    with pytest.raises(ClipWeightsUnavailable, match="not available offline.*never downloads"):
        ClipEncoder.load("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="known tags"):
        ClipEncoder.load("ViT-B-32", pretrained="no_such_tag", cache_dir=str(tmp_path))


def test_cached_url_weights_are_found(no_network, tmp_path):
    (tmp_path / "ViT-B-32.pt").write_bytes(b"cached")  # where open_clip caches the OpenAI URL
    path, cfg = resolve_pretrained("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert path == str(tmp_path / "ViT-B-32.pt") and cfg["quick_gelu"] is True


def test_vit_b32_with_random_weights(no_network):
    enc = ClipEncoder.load("ViT-B-32")
    assert (enc.image_size, enc.embed_dim, enc.context_length) == (224, 512, 77)
    emb = enc.encode_images(images(2, 64))
    assert emb.shape == (2, 512) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
