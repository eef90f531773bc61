"""Delta Mapper: the released checkpoint's format, our safetensors round trip, and the official semantics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError
from models.delta_mapper import DeltaMapper, MapperConfig, StraightforwardMapper
from models.layout import StyleLayout
from models.mapper_blocks import EqualLinear, PixelNorm

FORMAT = Path(__file__).parent / "formats" / "deltaedit_net_face.json"
SMALL_CHANNELS = {
    4: 64,
    8: 64,
    16: 64,
    32: 32,
    64: 32,
}  # medium mixes 64 and 32 -> flat; fine shared


def official_shapes() -> dict[str, list[int]]:
    return json.loads(FORMAT.read_text())["state_dict"]


@pytest.fixture(scope="module")
def official_state() -> dict[str, torch.Tensor]:
    """Random weights with the names and shapes of the released net_face.pth, built from the JSON."""
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=gen) for k, shape in official_shapes().items()}


@pytest.fixture(scope="module")
def official_file(official_state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("official") / "net_face.pth"
    torch.save(official_state, path)  # a bare state dict, as scripts/train.py saves it
    return path


@pytest.fixture(scope="module")
def official_model(official_file) -> DeltaMapper:
    return DeltaMapper.from_checkpoint(str(official_file))


def small_config(**kwargs) -> MapperConfig:
    return MapperConfig.for_generator(64, channels=SMALL_CHANNELS, clip_dim=16, **kwargs)


def inputs(batch: int, style_dim: int, clip_dim: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, style_dim, generator=gen),
        torch.randn(batch, clip_dim, generator=gen),
        torch.randn(batch, clip_dim, generator=gen),
    )


# --- the released format --------------------------------------------------------------------------------


def test_keys_and_shapes_equal_the_official_format():
    with torch.device("meta"):
        model = DeltaMapper(MapperConfig.official())
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == list(official_shapes().items())  # same names, shapes and order
    assert sum(math.prod(s) for _, s in ours) == json.loads(FORMAT.read_text())["n_float_elements"]


def test_official_checkpoint_loads_strictly(official_model, official_state):
    state = official_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in official_state.items())
    assert official_model.config == MapperConfig.official()


def test_wrong_shape_names_parameter_and_both_shapes(official_state, tmp_path):
    bad = dict(official_state)
    bad["fm_fine.mapping.0.weight"] = torch.zeros(2464, 4000)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(
        CheckpointError, match=r"fm_fine\.mapping\.0\.weight.*\(2464, 4000\).*\(2464, 4928\)"
    ):
        DeltaMapper.from_checkpoint(str(tmp_path / "bad.pth"))


def test_official_round_trips_through_safetensors(official_model, tmp_path):
    path = str(tmp_path / "mapper.safetensors")
    official_model.save(path, lineage={"source": "net_face.pth"})
    loaded = DeltaMapper.from_checkpoint(path)
    assert loaded.config == official_model.config and loaded.lineage == {"source": "net_face.pth"}
    before, after = official_model.state_dict(), loaded.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    s, i, d = inputs(2, 6048, 512)
    with torch.no_grad():
        out = official_model(s, i, d)
        assert out.shape == (2, 6048)  # FFHQ 1024 conv channels
        assert torch.equal(out, loaded(s, i, d))


# --- semantics --------------------------------------------------------------------------------------------


def test_pixelnorm_normalises_the_layer_axis_of_3d_inputs():
    x = torch.randn(2, 3, 8) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1)
    y = PixelNorm()(x)
    assert torch.allclose(y.pow(2).mean(dim=1), torch.ones(2, 8), atol=1e-5)  # over layers
    assert not torch.allclose(
        y.pow(2).mean(dim=-1), torch.ones(2, 3), atol=1e-2
    )  # not over channels


def test_mapper_uses_layer_axis_pixelnorm():
    """Scaling a coarse channel alike in every coarse layer is invisible only with the official quirk."""
    s, i, d = inputs(2, StyleLayout.for_generator(64, channels=SMALL_CHANNELS).conv_total, 16)
    scale = torch.rand(64) + 0.5  # per channel, shared by the layers
    s_scaled = s.clone()
    s_scaled[:, : 3 * 64] = (s[:, : 3 * 64].view(2, 3, 64) * scale).reshape(2, -1)
    torch.manual_seed(0)
    official = DeltaMapper(small_config())
    torch.manual_seed(0)
    channelwise = DeltaMapper(small_config(norm_axis="channel"))
    with torch.no_grad():
        assert torch.allclose(official(s, i, d), official(s_scaled, i, d), atol=1e-5)
        assert not torch.allclose(channelwise(s, i, d), channelwise(s_scaled, i, d), atol=1e-3)


def test_condition_is_normalised():
    torch.manual_seed(0)
    model = DeltaMapper(small_config())
    s, i, d = inputs(3, model.style_dim, 16)
    with torch.no_grad():
        assert torch.allclose(model(s, i, d), model(s, 7.0 * i, 0.01 * d), atol=1e-5)
    cond = DeltaMapper.condition(i, torch.full((3, 16), 1e-8))
    assert torch.allclose(cond[:, :16].norm(dim=-1), torch.ones(3))
    assert torch.allclose(cond[:, 16:], torch.full((3, 16), 1e-3))  # Δi / max(‖Δi‖, 1e-5)


def test_equal_linear_matches_the_fused_formula():
    layer = EqualLinear(8, 4, lr_mul=0.01, activation=True)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(5, 8)
    pre = x @ (layer.weight * 0.01 / math.sqrt(8)).T + layer.bias * 0.01
    assert torch.allclose(layer(x), F.leaky_relu(pre, 0.2) * math.sqrt(2), atol=1e-6)


def test_generalised_small_layout_builds_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = DeltaMapper(small_config())
    plan = {g.name: (g.n_layers, g.width) for g in model.groups}
    assert plan == {"coarse": (3, 64), "medium": (0, 224), "fine": (2, 32)}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["sm_medium.mapping.1.weight"] == (224, 224)
    assert shapes["cm_fine.mapping.1.weight"] == (32, 32)  # condition 2·16 → 32
    assert shapes["fm_coarse.mapping.0.weight"] == (64, 128)
    s, i, d = inputs(4, model.style_dim, 16)
    out = model(s, i, d)
    assert out.shape == (4, model.style_dim) == (4, 64 * 3 + 224 + 32 * 2)
    loss = F.mse_loss(out, torch.randn_like(out)) + (1 - F.cosine_similarity(out, s).mean())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    uri = "memory://mappers/small.safetensors"  # any fsspec URI
    model.save(uri)
    with torch.no_grad():
        assert torch.equal(DeltaMapper.from_checkpoint(uri)(s, i, d), model(s, i, d))


def test_bad_input_shapes_are_reported():
    model = DeltaMapper(small_config())
    s, i, d = inputs(2, model.style_dim, 16)
    with pytest.raises(ValueError, match="s must be"):
        model(s[:, :-1], i, d)
    with pytest.raises(ValueError, match="condition must be"):
        model(s, i[:, :8], d[:, :8])


def test_straightforward_mapper_has_its_own_kind(tmp_path):
    torch.manual_seed(0)
    model = StraightforwardMapper(small_config())
    s, i1, i2 = inputs(2, model.style_dim, 16)
    cond = model.condition(i1, i2)
    assert torch.allclose(
        cond, torch.cat([F.normalize(i1, dim=-1), F.normalize(i2, dim=-1)], dim=-1)
    )
    assert model(s, i1, i2).shape == s.shape
    path = str(tmp_path / "sf.safetensors")
    model.save(path)
    assert isinstance(StraightforwardMapper.from_checkpoint(path), StraightforwardMapper)
    with pytest.raises(CheckpointError, match="straightforward_mapper"):
        DeltaMapper.from_checkpoint(path)
