"""The model zoo: typed specs, one registry, checksummed checkpoints."""

from __future__ import annotations

import hashlib

import pydantic
import pytest
import torch

from models import zoo
from models.delta_mapper import DeltaMapper, MapperConfig, StraightforwardMapper

SMALL = {"size": 16, "channels": {4: 32, 8: 32, 16: 16}, "clip_dim": 8}


@pytest.fixture
def mapper_file(tmp_path):
    torch.manual_seed(0)
    model = DeltaMapper(MapperConfig.for_generator(16, channels={4: 32, 8: 32, 16: 16}, clip_dim=8))
    path = tmp_path / "mapper.safetensors"
    model.save(str(path))
    return model, str(path), hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(zoo, "_REGISTRY", dict(zoo._REGISTRY))


def test_spec_gathers_options_and_checkpoint_forms():
    spec = zoo.ModelSpec.model_validate(
        {"name": "stylegan2", "checkpoint": "s3://bucket/ffhq.pt", "size": 1024}
    )
    assert spec.options == {"size": 1024} and spec.checkpoint == zoo.CheckpointRef(
        uri="s3://bucket/ffhq.pt"
    )
    flat = zoo.ModelSpec(name="delta_mapper", checkpoint="m.safetensors", sha256="ab" * 32)
    nested = zoo.ModelSpec.model_validate(
        {"name": "delta_mapper", "checkpoint": {"uri": "m.safetensors", "sha256": "ab" * 32}}
    )
    assert flat == nested and flat.checkpoint.sha256 == "ab" * 32
    with pytest.raises(pydantic.ValidationError):
        zoo.ModelSpec(name="delta_mapper", checkpoint={"uri": "m", "sha256": "not-hex"})
    with pytest.raises(pydantic.ValidationError, match="sha256 given without a checkpoint"):
        zoo.ModelSpec(name="delta_mapper", sha256="ab" * 32)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(
        zoo.UnknownModelError, match="no_such_model.*delta_mapper.*open_clip.*stylegan2"
    ):
        zoo.build({"name": "no_such_model"})


def test_unknown_option_lists_accepted_ones():
    with pytest.raises(ValueError, match=r"\['sizee'\].*'size'"):
        zoo.validate({"name": "delta_mapper", "sizee": 16})


def test_list_models_and_roles():
    names = zoo.list_models()
    assert {"stylegan2", "e4e", "open_clip", "delta_mapper", "straightforward_mapper"} <= set(names)
    assert names == sorted(names)
    assert set(zoo.list_models(role="mapper")) >= {
        "delta_mapper",
        "straightforward_mapper",
        "deltaedit_ffhq",
    }
    assert "open_clip" not in zoo.list_models(role="mapper")


def test_build_delta_mapper_from_a_checkpoint_spec(mapper_file):
    model, path, digest = mapper_file
    built = zoo.build({"name": "delta_mapper", "checkpoint": {"uri": path, "sha256": digest}})
    assert isinstance(built, DeltaMapper) and built.config == model.config
    assert all(
        torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values())
    )
    assert isinstance(
        zoo.build({"name": "delta_mapper", "checkpoint": path, "sha256": digest[:12]}), DeltaMapper
    )


def test_sha256_mismatch_is_a_clear_error(mapper_file):
    _, path, digest = mapper_file
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(zoo.ChecksumError, match=f"sha256 mismatch.*{wrong}.*{digest}"):
        zoo.build({"name": "delta_mapper", "checkpoint": path, "sha256": wrong})


def test_fresh_mappers_from_options():
    fresh = zoo.build({"name": "straightforward_mapper", **SMALL})
    assert isinstance(fresh, StraightforwardMapper) and fresh.style_dim == 32 * 3 + 32 + 16
    with pytest.raises(ValueError, match="needs the generator 'size'"):
        zoo.build("delta_mapper")


def test_register_as_decorator(isolated_registry):
    @zoo.register("echo", role="test")
    def echo(checkpoint, *, device="cpu", storage_options=None, value: int = 0):
        """Returns its inputs."""
        return checkpoint, device, value

    assert zoo.build({"name": "echo", "checkpoint": "x.pt", "value": 3}) == ("x.pt", "cpu", 3)
    assert zoo.get("echo").description == "Returns its inputs." and zoo.list_models(
        role="test"
    ) == ["echo"]
    with pytest.raises(ValueError, match="already registered"):
        zoo.register("echo", echo, role="test")


def test_open_clip_entry_builds_a_custom_model():
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 16,
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    enc = zoo.build(
        {"name": "open_clip", "model": "toy", "model_config": cfg, "preprocess": "deltaedit"}
    )
    assert enc.describe()["model_name"] == "toy" and enc.preprocess_mode == "deltaedit"
    assert enc.encode_images(torch.zeros(1, 3, 32, 32)).shape == (1, 16)


def test_stylegan2_entry_builds_a_fresh_generator():
    gen = zoo.build(
        {
            "name": "stylegan2",
            "size": 16,
            "channels": {4: 32, 8: 32, 16: 16},
            "n_mlp": 2,
            "style_dim": 32,
        }
    )
    assert gen.layout.conv_total == 32 * 3 + 32 + 16


def test_generator_and_encoder_load_from_s3_with_storage_options(tmp_path, s3_bucket):
    import fsspec
    from helpers_models import TINY_E, TINY_G

    from models.e4e import Encoder
    from models.stylegan2 import Generator

    bucket, options = s3_bucket
    torch.manual_seed(0)
    gen = Generator(**TINY_G)
    Encoder(**TINY_E, generator=gen).save(str(tmp_path / "e.safetensors"))
    gen.save(str(tmp_path / "g.safetensors"))
    fs, path = fsspec.core.url_to_fs(bucket, **options)
    for name in ("e.safetensors", "g.safetensors"):
        fs.put(str(tmp_path / name), f"{path}/{name}")
    loaded = zoo.build(
        {"name": "stylegan2", "checkpoint": f"{bucket}/g.safetensors"}, storage_options=options
    )
    enc = zoo.build(
        {"name": "e4e", "checkpoint": f"{bucket}/e.safetensors"}, storage_options=options
    )
    w = torch.randn(1, gen.n_latent, TINY_G["style_dim"])
    assert torch.equal(loaded(w), gen(w)) and enc.generator is not None


def test_identity_follows_the_weights_not_the_path(tmp_path):
    import os
    import shutil

    first, moved = tmp_path / "a" / "m.safetensors", tmp_path / "b" / "m.safetensors"
    for path in (first, moved):
        path.parent.mkdir()
    torch.manual_seed(0)
    DeltaMapper(MapperConfig.for_generator(32, clip_dim=8)).save(str(first))
    shutil.copy(first, moved)
    spec = lambda p: zoo.ModelSpec(name="delta_mapper", checkpoint=str(p))  # noqa: E731
    before = zoo.identity(spec(first))
    assert before == zoo.identity(spec(moved)) and "sha256" in before and "checkpoint" not in before
    DeltaMapper(MapperConfig.for_generator(32, clip_dim=8)).save(str(first))  # retrained, same path
    os.utime(first, (1, 1))  # even with an old mtime
    assert zoo.identity(spec(first)) != before
    assert zoo.identity(None) is None


def test_saving_the_same_weights_again_gives_the_same_bytes(tmp_path):
    """safetensors orders the header's metadata differently on each save; ours sorts it, so a retraining
    that reproduces the weights reproduces the file, its sha256 and the fingerprints built on it."""
    torch.manual_seed(0)
    model = DeltaMapper(MapperConfig.for_generator(32, clip_dim=8))
    paths = [tmp_path / f"m{i}.safetensors" for i in range(12)]
    for path in paths:
        model.save(str(path))
    assert len({p.read_bytes() for p in paths}) == 1
    loaded = zoo.build(zoo.ModelSpec(name="delta_mapper", checkpoint=str(paths[-1])))
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values())
    )
