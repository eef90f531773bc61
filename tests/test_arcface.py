"""ArcFace IR-SE-50 (models/arcface.py): the public file's layout, loading from a path or URI, the
preprocessing of e4e's ID loss, and clear errors for a file of another network."""

from __future__ import annotations

import fsspec
import pytest
import torch
from helpers_models import load_format, meta_shapes, synthetic_state

from models.arcface import IRSE50, face_crop, identity_features, load_arcface
from models.errors import CheckpointError

FORMAT = "arcface_ir_se50"


def _random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights in the public layout, BatchNorm statistics kept sane."""
    torch.manual_seed(seed)
    model = IRSE50()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
    return model.state_dict()


def test_parameter_names_and_shapes_are_the_public_files():
    ours = {k: v for k, v in meta_shapes(IRSE50()).items() if not k.endswith("num_batches_tracked")}
    assert ours == load_format(FORMAT)["state_dict"]
    assert (
        sum(torch.Size(s).numel() for s in ours.values()) == load_format(FORMAT)["n_float_elements"]
    )


@pytest.mark.parametrize("counters", [True, False], ids=["torch>=0.4.1 file", "older file"])
def test_loads_a_file_in_the_public_format_with_or_without_batch_counters(tmp_path, counters):
    state = synthetic_state(load_format(FORMAT))
    if counters:
        state.update(
            {k: torch.tensor(7) for k in IRSE50().state_dict() if k.endswith("num_batches_tracked")}
        )
    torch.save(state, tmp_path / "model_ir_se50.pth")
    model = load_arcface(str(tmp_path / "model_ir_se50.pth"))
    assert not model.training
    loaded = model.state_dict()
    assert torch.equal(loaded["output_layer.3.weight"], state["output_layer.3.weight"])
    assert torch.equal(
        loaded["body.23.res_layer.5.fc2.weight"], state["body.23.res_layer.5.fc2.weight"]
    )


def test_identity_of_an_image_with_itself_is_one_and_differs_from_another(tmp_path):
    uri = "memory://arcface-test/model_ir_se50.pth"
    with fsspec.open(uri, "wb") as f:
        torch.save(_random_state(), f)
    model = load_arcface(uri)
    g = torch.Generator().manual_seed(1)
    a, b = (
        torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
        torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
    )
    fa, fb = identity_features(model, a), identity_features(model, b)
    assert fa.shape == (2, 512)
    assert torch.allclose(fa.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(
        (fa * identity_features(model, a.clone())).sum(1), torch.ones(2), atol=1e-5
    )
    assert ((fa * fb).sum(1) < 0.999).all()


def test_face_crop_is_e4e_preprocessing():
    x = torch.arange(256 * 256, dtype=torch.float32).reshape(1, 1, 256, 256).expand(1, 3, 256, 256)
    crop = face_crop(x)
    assert crop.shape == (1, 3, 112, 112)
    expected = torch.nn.functional.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], 112)
    assert torch.equal(crop, expected)
    big = torch.nn.functional.interpolate(
        x, size=512, mode="nearest"
    )  # any size comes to 256 first
    assert torch.allclose(face_crop(big), crop)


def test_a_file_of_another_network_names_what_does_not_match(tmp_path):
    state = synthetic_state(load_format(FORMAT))
    state.pop("output_layer.3.bias")
    state["output_layer.3.weight"] = torch.zeros(512, 512 * 14 * 14)  # the 224-px Backbone
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(
        CheckpointError, match=r"missing keys \['output_layer.3.bias'\].*output_layer.3.weight"
    ):
        load_arcface(str(tmp_path / "other.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_arcface(str(tmp_path / "list.pth"))


def test_identity_metric_from_an_arcface_file(tmp_path):
    from models.metrics import MetricUnavailable, arcface_extractor, identity_similarity

    torch.save(_random_state(3), tmp_path / "model_ir_se50.pth")
    extract = arcface_extractor(str(tmp_path / "model_ir_se50.pth"))
    g = torch.Generator().manual_seed(4)
    a = torch.rand(3, 3, 128, 128, generator=g) * 2 - 1
    b = a.flip(-1)
    same, other = identity_similarity(extract, a, a), identity_similarity(extract, a, b)
    assert torch.allclose(same, torch.ones(3), atol=1e-5)
    assert (other < same - 1e-4).all()
    with pytest.raises(MetricUnavailable, match="identity model: .*not found"):
        arcface_extractor(str(tmp_path / "absent.pth"))
