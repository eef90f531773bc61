"""e4e encoder: public layout, checkpoint loading (official container and ours), forward behaviour."""

from __future__ import annotations

import pytest
import torch
from helpers_models import (
    DEVICES,
    TINY_E,
    exact_float32,
    load_format,
    meta_shapes,
    synthetic_state,
    tiny_encoder,
    tiny_generator,
)

from models.checkpoint import CheckpointError
from models.e4e import Encoder
from models.stylegan2 import Generator

E4E = "e4e_ffhq_encode_1024"


def test_state_dict_matches_public_layout() -> None:
    fmt = load_format(E4E)
    with torch.device("meta"):
        enc = Encoder(generator=Generator(1024))  # defaults = the official architecture
    assert list(meta_shapes(enc).items()) == list(
        fmt["state_dict"].items()
    )  # names, order and shapes
    dtypes = {
        k: str(v.dtype).removeprefix("torch.")
        for k, v in enc.state_dict().items()
        if v.dtype != torch.float32
    }
    assert dtypes == fmt["dtypes"]
    assert enc.n_styles == fmt["n_styles"] == 18


def _official_container(state: dict, latent_avg: torch.Tensor | None, **opts) -> dict:
    return {
        "state_dict": state,
        "latent_avg": latent_avg,
        "opts": {"start_from_latent_avg": True, **opts},
    }


@pytest.mark.slow
def test_real_e4e_1024_round_trip(tmp_path) -> None:
    fmt = load_format(E4E)
    state = synthetic_state(fmt)
    avg = torch.randn(1, 512).expand(18, 512).clone()
    torch.save(
        _official_container(state, avg, **fmt["checkpoint"]["opts"]),
        tmp_path / "e4e_ffhq_encode.pt",
    )
    del state
    enc = Encoder.from_checkpoint(str(tmp_path / "e4e_ffhq_encode.pt"))
    loaded = enc.state_dict()
    for i, name in enumerate(fmt["state_dict"]):
        assert loaded[name].flatten()[0].item() == i, name
    assert enc.generator is not None and enc.generator.config["size"] == 1024
    assert torch.equal(enc.latent_avg, avg) and torch.allclose(enc.generator.latent_avg, avg[0])


# --- official container with a small architecture ----------------------------------------------------
@pytest.fixture
def tiny_pair():
    gen = tiny_generator()
    enc = tiny_encoder(generator=gen)
    return enc, gen


def _save_official(enc: Encoder, tmp, with_decoder: bool = True, **opts) -> str:
    state = {k: v for k, v in enc.state_dict().items() if with_decoder or k.startswith("encoder.")}
    path = tmp / "e4e.pt"
    torch.save(_official_container(state, enc.latent_avg.clone(), **opts), path)
    return str(path)


def test_official_container_loads_with_paired_generator(tiny_pair, tmp_path) -> None:
    enc, gen = tiny_pair
    loaded = Encoder.from_checkpoint(_save_official(enc, tmp_path, stylegan_size=32), **TINY_E)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    w = loaded(x)
    assert w.shape == (2, 8, 64) and torch.equal(w, enc(x))
    assert loaded.generator is not None and not loaded.training
    assert torch.equal(loaded.generator(w), gen(w))  # images through the paired decoder
    assert torch.allclose(loaded.generator.latent_avg, enc.latent_avg.mean(0))


def test_official_container_without_decoder(tiny_pair, tmp_path) -> None:
    enc, _ = tiny_pair
    arch = {
        k: v for k, v in TINY_E.items() if k != "n_styles"
    }  # n_styles counted from the style blocks
    loaded = Encoder.from_checkpoint(_save_official(enc, tmp_path, with_decoder=False), **arch)
    assert loaded.generator is None and loaded.n_styles == 8


def test_latent_avg_broadcast_and_disabled(tiny_pair, tmp_path) -> None:
    enc, _ = tiny_pair
    state = {k: v for k, v in enc.state_dict().items() if k.startswith("encoder.")}
    avg = torch.randn(64)
    torch.save(_official_container(state, avg), tmp_path / "a.pt")
    assert torch.equal(
        Encoder.from_checkpoint(str(tmp_path / "a.pt"), **TINY_E).latent_avg, avg.expand(8, 64)
    )
    torch.save(
        {**_official_container(state, avg), "opts": {"start_from_latent_avg": False}},
        tmp_path / "b.pt",
    )
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(Encoder.from_checkpoint(str(tmp_path / "b.pt"), **TINY_E)(x), enc.encoder(x))
    torch.save(_official_container(state, torch.randn(3, 64)), tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"latent_avg.*\(3, 64\)"):
        Encoder.from_checkpoint(str(tmp_path / "c.pt"), **TINY_E)


def _load_error(state: dict, tmp) -> str:
    torch.save(_official_container(state, None), tmp / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        Encoder.from_checkpoint(str(tmp / "bad.pt"), **TINY_E)
    return str(err.value)


def test_strict_errors_name_keys_and_shapes(tiny_pair, tmp_path) -> None:
    enc, _ = tiny_pair
    state = {k: v for k, v in enc.state_dict().items() if k.startswith("encoder.")}
    bad = {**state, "encoder.styles.1.linear.weight": torch.zeros(64, 32)}
    msg = _load_error(bad, tmp_path)
    assert "encoder.styles.1.linear.weight" in msg and "(64, 32)" in msg and "(64, 64)" in msg
    bad = {k: v for k, v in state.items() if k != "encoder.latlayer1.bias"}
    bad["encoder.extra.weight"] = torch.zeros(1)
    msg = _load_error(bad, tmp_path)
    assert "'encoder.latlayer1.bias'" in msg and "'encoder.extra.weight'" in msg
    assert "'pool.weight'" in _load_error({**state, "pool.weight": torch.zeros(1)}, tmp_path)


def test_decoder_must_match_the_encoder(tiny_pair, tmp_path) -> None:
    enc, _ = tiny_pair
    enc.decoder = tiny_generator(
        size=16, channels={4: 32, 8: 32, 16: 16}
    )  # 6 W+ rows, encoder gives 8
    with pytest.raises(CheckpointError, match="decoder has 6 W\\+ rows"):
        Encoder.from_checkpoint(_save_official(enc, tmp_path), **TINY_E)


# --- forward ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_forward_adds_latent_avg(device: str) -> None:
    enc = tiny_encoder().to(device)
    x = torch.rand(3, 3, 32, 32, device=device) * 2 - 1
    with exact_float32():  # on CUDA: no TF32, deterministic cuDNN (see exact_float32)
        w = enc(x)
        assert w.shape == (3, 8, 64) and torch.isfinite(w).all()
        assert torch.allclose(w - enc.latent_avg, enc.encoder(x), atol=1e-6)
    assert not torch.allclose(w[:, 0], w[:, 5])  # rows carry their own deltas
    with pytest.raises(ValueError, match="resize to 32 px"):
        enc(torch.zeros(1, 3, 64, 64, device=device))


def test_rows_are_w0_plus_deltas_from_the_pyramid() -> None:
    enc = tiny_encoder()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    base = enc.encoder(x)
    with torch.no_grad():
        enc.encoder.latlayer2.weight.add_(
            1.0
        )  # feeds only the fine styles (index ≥ middle_ind = 7)
    changed = (enc.encoder(x) - base).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [False] * 7 + [True]
    base = enc.encoder(x)
    with torch.no_grad():
        enc.encoder.latlayer1.weight.add_(
            1.0
        )  # feeds middle and, through them, fine styles (index ≥ 3)
    changed = (enc.encoder(x) - base).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [False] * 3 + [True] * 5
    with torch.no_grad():
        for block in enc.encoder.styles[1:]:
            block.linear.weight.zero_()
            block.linear.bias.zero_()
    w = enc.encoder(x)  # no deltas: every row is w0
    assert torch.allclose(w, w[:, :1].expand_as(w))


def test_official_default_architecture_counts() -> None:
    with torch.device("meta"):
        enc = Encoder()
    body = enc.encoder.body
    assert len(body) == 3 + 4 + 14 + 3 and enc.encoder.taps == (6, 20, 23)
    assert [len(s.convs) // 2 for s in enc.encoder.styles] == [4] * 3 + [5] * 4 + [6] * 11


# --- our format ----------------------------------------------------------------------------------
def test_safetensors_round_trip_with_generator(tiny_pair, tmp_path) -> None:
    enc, gen = tiny_pair
    path = str(tmp_path / "e.safetensors")
    enc.save(path, lineage={"generator": "tiny"})
    loaded = Encoder.from_checkpoint(path)
    assert loaded.config == enc.config and loaded.generator.config == gen.config
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(x), enc(x))
    assert torch.equal(loaded.generator(loaded(x)), gen(enc(x)))
    assert torch.equal(loaded.generator.latent_avg, gen.latent_avg)


def test_safetensors_round_trip_encoder_only_and_kind_checks(tmp_path) -> None:
    enc = tiny_encoder(seed=1)
    path = str(tmp_path / "e.safetensors")
    enc.save(path)
    loaded = Encoder.from_checkpoint(path)
    x = torch.rand(1, 3, 32, 32)
    assert loaded.generator is None and torch.equal(loaded(x), enc(x))
    with pytest.raises(CheckpointError, match="kind is 'e4e', expected 'stylegan2'"):
        Generator.from_checkpoint(path)
    tiny_generator().save(str(tmp_path / "g.safetensors"))
    with pytest.raises(CheckpointError, match="expected 'e4e'"):
        Encoder.from_checkpoint(str(tmp_path / "g.safetensors"))
