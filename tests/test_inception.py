"""The FID Inception (models/metrics.inception_extractor): torch-fidelity's TF-ported network through
torchmetrics, loaded from a file in the public layout (tests/formats/torch_fidelity_inception_v3.json,
listed from the library's module), computing what torch-fidelity itself computes. Nothing downloads."""

from __future__ import annotations

import fsspec
import pytest
import torch
from helpers_models import load_format, synthetic_state

from models.metrics import INCEPTION_FILE, MetricUnavailable, inception_extractor

FORMAT = "torch_fidelity_inception_v3"
torch.set_num_threads(2)


def library_module(path: str | None = None) -> torch.nn.Module:
    """torch-fidelity's own FeatureExtractorInceptionV3: from ``path``, or without weights (its
    state-dict layout only; the download it would start is stubbed out and no weights are loaded)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    if path is not None:
        return fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], path)

    class LayoutOnly(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        return LayoutOnly("inception-v3-compat", ["2048"])


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights in the public layout that keep activations in range (He-scaled convs, unit BN)."""
    g = torch.Generator().manual_seed(seed)
    fmt, out = load_format(FORMAT), {}
    for name, shape in fmt["state_dict"].items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.zeros(shape, dtype=torch.int64)
        elif name.endswith(("running_var", "bn.weight")):
            out[name] = torch.ones(shape)
        elif name.endswith(("running_mean", "bn.bias", "fc.bias")):
            out[name] = torch.zeros(shape)
        else:
            fan_in = torch.Size(shape[1:]).numel()
            out[name] = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5
    return out


def test_the_listed_layout_is_the_library_module():
    fmt = load_format(FORMAT)
    module = {k: list(v.shape) for k, v in library_module().state_dict().items()}
    assert module == fmt["state_dict"]
    floats = library_module().state_dict().items()
    assert sum(v.numel() for _, v in floats if v.is_floating_point()) == fmt["n_float_elements"]


def test_a_file_in_the_public_layout_loads(tmp_path):
    state = synthetic_state(load_format(FORMAT))  # tensor i filled with i: shows where each landed
    torch.save(state, tmp_path / INCEPTION_FILE)
    extract = inception_extractor(str(tmp_path / INCEPTION_FILE))
    loaded = extract.net.state_dict()  # the torchmetrics network it runs
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "fc.bias"):
        assert torch.equal(loaded[key], state[key])


def test_features_are_torch_fidelitys_own(tmp_path):
    """The TF-exact path: the same numbers as torch-fidelity's extractor (TF1 bilinear resize to 299,
    uint8 input), from a path or an fsspec URI."""
    uri = "memory://inception-test/" + INCEPTION_FILE
    with fsspec.open(uri, "wb") as f:
        torch.save(random_state(), f)
    torch.save(random_state(), tmp_path / INCEPTION_FILE)
    extract = inception_extractor(uri)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    feats = extract(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    as_bytes = ((images + 1) * 127.5).round().to(torch.uint8)
    with torch.no_grad():
        (reference,) = library_module(str(tmp_path / INCEPTION_FILE))(as_bytes)
    assert torch.allclose(feats, reference, rtol=1e-4, atol=1e-5), (feats - reference).abs().max()
    assert not torch.allclose(feats[0], feats[1])


def test_files_that_are_not_the_inception_weights_say_so(tmp_path):
    with pytest.raises(MetricUnavailable, match="evaluate.inception_weights"):
        inception_extractor(None)
    with pytest.raises(MetricUnavailable, match="not found"):
        inception_extractor(str(tmp_path / "absent.pth"))
    state = synthetic_state(load_format(FORMAT))
    state.pop("fc.bias")
    state["fc.weight"] = torch.zeros(
        1000, 2048
    )  # torchvision's ImageNet head, not TF's 1008 classes
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(MetricUnavailable, match=r"(?s)not torch-fidelity's .*fc\.bias.*fc\.weight"):
        inception_extractor(str(tmp_path / "other.pth"))
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")
    with pytest.raises(MetricUnavailable, match="tensors-only"):
        inception_extractor(str(tmp_path / "pickled.pth"))
