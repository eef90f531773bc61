"""Metric functions of the evaluation flow: known values on hand-made inputs, no downloads."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from models.metrics import (
    PSNR_CAP,
    MetricUnavailable,
    clip_direction,
    clip_extractor,
    frechet_distance,
    identity_similarity,
    inception_extractor,
    kernel_distance,
    lpips_metric,
    oracle_scores,
    pixel_metrics,
    summarize,
)

torch.set_num_threads(1)


def images(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pixel_metrics_identical_and_noisy():
    x = images()
    same = pixel_metrics(x, x)
    assert set(same) == {"psnr", "ssim", "mse"} and all(v.shape == (3,) for v in same.values())
    assert torch.all(same["psnr"] == PSNR_CAP) and torch.allclose(same["ssim"], torch.ones(3))
    assert torch.all(same["mse"] == 0)
    small = pixel_metrics((x + 0.05 * torch.randn_like(x)).clamp(-1, 1), x)
    big = pixel_metrics((x + 0.3 * torch.randn_like(x)).clamp(-1, 1), x)
    assert torch.all(big["psnr"] < small["psnr"]) and torch.all(small["psnr"] < 100)
    assert torch.all(big["ssim"] < small["ssim"]) and torch.all(small["ssim"] < 1)
    # PSNR uses the [-1, 1] range (data_range 2): 10 log10(4 / mse)
    assert torch.allclose(small["psnr"], 10 * torch.log10(4 / small["mse"]), atol=1e-3)


def test_pixel_metrics_resizes_pred_to_ref():
    ref = torch.zeros(2, 3, 16, 16)
    pred = torch.zeros(2, 3, 64, 64)
    out = pixel_metrics(pred, ref)
    assert out["psnr"].shape == (2,) and torch.all(out["mse"] == 0)


def naive_fid(a, b):
    """Reference: complex eigenvalues of the covariance product, as torchmetrics computes it."""
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).square().sum()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    eig = torch.linalg.eigvals(ca @ cb)
    return float(mu + ca.trace() + cb.trace() - 2 * eig.sqrt().real.sum())


def test_frechet_distance():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 4, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-8
    shifted = [frechet_distance(a, a + s) for s in (0.5, 1.0, 2.0)]
    assert shifted == sorted(shifted)
    assert shifted[1] == pytest.approx(4.0, rel=1e-6)  # same covariance: ||Δmu||² = 4 · 1²
    # 1-D by hand: (mu1-mu2)² + (s1 - s2)²
    x, y = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [5.0]])
    assert frechet_distance(x, y) == pytest.approx((1 - 3) ** 2 + (2**0.5 - 8**0.5) ** 2)
    b = torch.randn(150, 4, generator=g) * 1.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(naive_fid(a, b), rel=1e-6)
    few = frechet_distance(
        torch.randn(5, 20, generator=g), torch.randn(6, 20, generator=g)
    )  # N < D
    assert math.isfinite(few) and few > 0


def symmetric_fid(a, b):
    """Reference for N < D: Tr((S1 S2)^½) = Tr((S1^½ S2 S1^½)^½), a symmetric PSD argument (two eigh)."""
    a, b = a.double(), b.double()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = root @ cb @ root
    tr = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + ca.trace() + cb.trace() - 2 * tr)


def test_frechet_distance_is_torchmetrics_fid_on_the_rows_and_holds_with_few_rows():
    from torchmetrics.image.fid import FrechetInceptionDistance

    from models.metrics import GivenFeatures

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g) * 1.3 + 0.2
    fid = FrechetInceptionDistance(feature=GivenFeatures(8))
    fid.update(a.double(), real=True)
    fid.update(b.double(), real=False)
    assert frechet_distance(a, b) == pytest.approx(float(fid.compute()), rel=1e-12)
    # a few dozen rows of 512-d CLIP or 2048-d Inception features: rank-deficient covariances
    few_a, few_b = torch.randn(24, 256, generator=g), torch.randn(32, 256, generator=g) + 0.1
    assert frechet_distance(few_a, few_b) == pytest.approx(symmetric_fid(few_a, few_b), rel=1e-6)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kernel_distance_agrees_with_torchmetrics_kid_on_equal_sets():
    from torchmetrics.image.kid import KernelInceptionDistance

    from models.metrics import GivenFeatures

    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g) + 0.3
    kid = KernelInceptionDistance(feature=GivenFeatures(16), subsets=1, subset_size=40)
    kid.update(a.double(), real=True)
    kid.update(b.double(), real=False)
    mean, _ = kid.compute()  # one subset of all rows: a permutation of each set, nothing drawn away
    assert kernel_distance(a, b) == pytest.approx(float(mean), rel=1e-9)
    assert kernel_distance(a, b) > 0.05


def test_frechet_distance_rejects_too_few_rows():
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="feature sizes"):
        frechet_distance(torch.randn(3, 4), torch.randn(3, 5))


def test_kernel_distance():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    same = kernel_distance(a, b)
    assert abs(same) < 0.02
    far = kernel_distance(a, b + 1.0)
    assert far > 0.5 and far > 20 * abs(same)
    sub = kernel_distance(a, b + 1.0, subset_size=50, subsets=20)
    assert sub == pytest.approx(far, rel=0.3)
    with pytest.raises(ValueError):
        kernel_distance(a, b, subset_size=1000)


def test_clip_direction_and_extractor():
    original = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    dt = torch.nn.functional.normalize(torch.randn(16), dim=0)
    assert torch.allclose(
        clip_direction(original + 0.3 * dt, original, dt), torch.ones(4), atol=1e-5
    )
    assert torch.allclose(
        clip_direction(original - 0.3 * dt, original, dt), -torch.ones(4), atol=1e-5
    )
    per_image = torch.stack([dt, -dt, dt, -dt])
    assert torch.allclose(
        clip_direction(original + 0.3 * dt, original, per_image),
        torch.tensor([1.0, -1.0, 1.0, -1.0]),
        atol=1e-5,
    )
    assert torch.all(clip_direction(original, original, dt) == 0)

    class Fake:
        def encode_images(self, x):
            return x.mean(dim=(2, 3))

    feats = clip_extractor(Fake())(images(2))
    assert feats.shape == (2, 3)
    with pytest.raises(TypeError):
        clip_extractor(object())


def test_identity_similarity():
    x = images(3)
    flat = lambda t: t.flatten(1)  # noqa: E731
    assert torch.allclose(identity_similarity(flat, x, x), torch.ones(3), atol=1e-6)
    assert torch.allclose(identity_similarity(flat, x, -x), -torch.ones(3), atol=1e-6)


def test_oracle_scores():
    before = {
        "shape": torch.tensor([0, 1, 2]),
        "shape_color": torch.tensor([0, 0, 0]),
        "background": torch.tensor([1, 1, 1]),
        "size": torch.tensor([2, 2, 2]),
    }
    after = {
        "shape": torch.tensor([0, 1, 2]),
        "shape_color": torch.tensor([3, 3, 1]),
        "background": torch.tensor([1, 0, 1]),
        "size": torch.tensor([2, 2, 0]),
    }
    out = oracle_scores(before, after, {"shape_color": 3})
    assert out["edit_accuracy"].tolist() == [1.0, 1.0, 0.0]
    assert torch.allclose(out["preservation"], torch.tensor([1.0, 2 / 3, 2 / 3]))
    two = oracle_scores(before, after, {"shape_color": 3, "background": 1})
    assert two["edit_accuracy"].tolist() == [1.0, 0.0, 0.0]
    assert two["preservation"].tolist() == [1.0, 1.0, 0.5]
    logits = {
        k: torch.nn.functional.one_hot(v, 6).float() for k, v in after.items()
    }  # logits accepted too
    assert oracle_scores(before, logits, {"shape_color": 3})["edit_accuracy"].tolist() == [
        1.0,
        1.0,
        0.0,
    ]
    with pytest.raises(ValueError, match="position"):
        oracle_scores(before, after, {"position": 1})
    sweep = oracle_scores(before, after, {}, changing={"shape_color"})  # a colour interpolation
    assert torch.isnan(sweep["edit_accuracy"]).all()
    assert torch.allclose(
        sweep["preservation"], torch.tensor([1.0, 2 / 3, 2 / 3])
    )  # colour not counted


def test_an_interpolation_changes_the_attributes_its_endpoints_name():
    from models.toy.captions import changed_attributes

    assert changed_attributes("a shape + a shape", "a red shape + a blue shape") == {"shape_color"}
    assert changed_attributes("a red shape", "a red circle") == {"shape"}
    assert changed_attributes("a shape", "a shape") == set()


def test_summarize():
    rows = pd.DataFrame(
        {
            "method": ["a", "a", "a", "b"],
            "prompt_id": [0, 0, 1, 0],
            "psnr": [10.0, 20.0, float("nan"), 5.0],
            "ok": [True, False, True, True],
            "note": ["x", "y", "z", "w"],
        }
    )
    out = summarize(rows, ["method", "prompt_id"])
    assert "note" not in out.columns and list(out.columns[:3]) == ["method", "prompt_id", "n"]
    get = lambda m, p: out[(out.method == m) & (out.prompt_id == p)].iloc[0]  # noqa: E731
    assert get("a", 0).psnr == 15.0 and get("a", 0).n == 2 and get("a", 0).ok == 0.5
    assert math.isnan(get("a", 1).psnr)
    assert get("a", "overall").psnr == 15.0 and get("a", "overall").n == 3  # NaN skipped
    assert get("b", "overall").psnr == 5.0
    assert len(out) == 5


def test_lpips_without_weights_is_unavailable():
    with pytest.raises(MetricUnavailable, match="backbone"):
        lpips_metric(None)


def test_lpips_from_local_backbone_file(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    backbone = torchvision.models.alexnet(
        weights=None
    ).features  # synthetic stand-in for ImageNet weights
    path = tmp_path / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in backbone.state_dict().items()}, path)
    metric = lpips_metric(str(path))
    assert torch.equal(metric.model.state_dict()["net.slice2.3.weight"], backbone[3].weight)
    x = images(2, 64)
    assert torch.allclose(metric(x, x), torch.zeros(2))
    near = metric(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1))
    far = metric(x, (x + 0.5 * torch.randn_like(x)).clamp(-1, 1))
    assert near.shape == (2,) and torch.all(near > 0) and torch.all(far > near)
    torch.save({"something": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(MetricUnavailable, match="missing"):
        lpips_metric(str(tmp_path / "wrong.pth"))


def test_inception_without_package_or_file_is_unavailable(tmp_path):
    with pytest.raises(MetricUnavailable, match="inception"):
        inception_extractor(str(tmp_path / "missing.pth"))
