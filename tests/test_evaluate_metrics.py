"""The metrics stage's definitions (tasks/evaluate.py) and the report's labels: PSNR/SSIM against the
input and against the reconstruction, identity from an ArcFace IR-SE-50 file (or a TorchScript network),
FID features from torch-fidelity's Inception when its file is given; the † columns of the paper's Tab. 1.
Synthetic weight files in the public layouts; nothing downloads, no Ray."""

from __future__ import annotations

from functools import partial

import pandas as pd
import pytest
import torch
from helpers_pipeline import tiny_zoo
from test_arcface import _random_state as arcface_state
from test_inception import random_state as inception_state

from infra.config import load_config
from infra.storage.fsio import Location
from models import metrics as M
from models.arcface import identity_features
from tasks.edit.plan import input_stages
from tasks.evaluate import MetricsBuilder
from tasks.reporting import evaluation as ER

torch.set_num_threads(2)
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning"),  # the TorchScript option's file
    pytest.mark.filterwarnings("ignore:'torch.load' received a zip file:UserWarning"),
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.save(arcface_state(), folder / "model_ir_se50.pth")
    torch.save(inception_state(), folder / M.INCEPTION_FILE)
    torch.jit.save(torch.jit.script(torch.nn.Flatten()), str(folder / "face_id.pt"))
    return folder, tiny_zoo(folder / "zoo")


def builder(tmp_path, weights, *overrides: str) -> MetricsBuilder:
    folder, zoo = weights
    cfg = load_config(None, [*zoo, f"root={tmp_path}", "device=cpu", *overrides])
    return MetricsBuilder.from_config(cfg, input_stages(cfg))


def test_the_field_s_networks_are_wired_from_their_files(tmp_path, weights):
    folder, _ = weights
    paper = builder(
        tmp_path,
        weights,
        f"evaluate.inception_weights={folder / M.INCEPTION_FILE}",  # features: auto -> inception
        f"evaluate.identity_model={folder / 'model_ir_se50.pth'}",  # identity_format: arcface
    )
    proc = paper.build()
    assert isinstance(proc.models.features, M.InceptionFeatures)
    assert (
        isinstance(proc.models.identity, partial) and proc.models.identity.func is identity_features
    )
    assert proc.output_metadata["features"] == "inception"
    assert proc.output_metadata["identity"] == "arcface_ir_se50"
    plain = builder(tmp_path, weights)
    assert plain.cfg.feature_extractor == "clip" and plain.fingerprint() != paper.fingerprint()
    script = builder(
        tmp_path,
        weights,
        f"evaluate.identity_model={folder / 'face_id.pt'}",
        "evaluate.identity_format=torchscript",
        "evaluate.identity_input_size=16",
    ).build()
    assert script.models.identity(torch.zeros(2, 3, 32, 32)).shape == (2, 3 * 16 * 16)
    with pytest.raises(
        M.MetricUnavailable, match="identity model"
    ):  # a TorchScript file is no ArcFace
        builder(tmp_path, weights, f"evaluate.identity_model={folder / 'face_id.pt'}").build()


def test_psnr_and_ssim_against_the_input_and_against_the_reconstruction(tmp_path, weights):
    proc = builder(tmp_path, weights).build()
    proc.models.lpips = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3))  # L1 stands in for LPIPS
    proc.models.identity = lambda x: x.flatten(1)
    proc._directions["t"] = torch.randn(proc.models.clip.embed_dim)
    g = torch.Generator().manual_seed(0)
    source = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    recon = (source + 0.1 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)
    edit = (recon + 0.2 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)
    meta = [
        {"method": "deltaedit", "terms": "t", "omega": float("nan")},
        {"method": "reconstruction", "terms": "t", "omega": float("nan")},
    ]
    images = torch.stack([edit[0], recon[1]])  # row 0 an edit, row 1 a reconstruction
    rows = proc._measure(["e", "r"], meta, images, recon, source)
    (_, e, vectors), (_, r, _) = rows
    vs_recon, vs_input = M.pixel_metrics(edit[:1], recon[:1]), M.pixel_metrics(edit[:1], source[:1])
    assert e["psnr"] == pytest.approx(float(vs_recon["psnr"][0]), rel=1e-6)
    assert e["psnr_input"] == pytest.approx(float(vs_input["psnr"][0]), rel=1e-6)
    assert e["ssim_input"] == pytest.approx(float(vs_input["ssim"][0]), rel=1e-6)
    assert e["psnr_input"] < e["psnr"]  # the inversion's error counts against the input
    assert r["psnr"] == r["psnr_input"] and r["ssim"] == r["ssim_input"]  # a reconstruction: vs x
    assert e["lpips"] == pytest.approx(float((edit[0] - recon[0]).abs().mean()), rel=1e-6)
    assert r["lpips"] == pytest.approx(float((recon[1] - source[1]).abs().mean()), rel=1e-6)
    assert e["identity"] == pytest.approx(
        float(torch.cosine_similarity(edit[:1].flatten(1), source[:1].flatten(1))), rel=1e-5
    )
    assert set(vectors) == {"features", "input_features"}


def test_the_report_labels_what_each_number_is_measured_against(tmp_path):
    assert ER.tab1_columns("inception", "arcface_ir_se50") == ["psnr_input", "fid", "identity"]
    assert ER.tab1_columns("clip", "torchscript") == ["psnr_input"]
    note = ER.tab1_note("clip", None)
    assert "Tab. 1" in note and "CLIP features" in note and "model_ir_se50.pth" in note
    assert "Not comparable here: none" in ER.tab1_note("inception", "arcface_ir_se50")
    by_method = pd.DataFrame(
        {"method": ["deltaedit"], "psnr": [30.0], "psnr_input": [22.9], "fid": [10.3], "kid": [0.1]}
    )
    recon = pd.DataFrame({"decoder": ["generator"], "psnr": [24.0], "n": [3]})
    by_prompt = by_method.assign(variant="smile")[["method", "variant", "psnr", "psnr_input"]]
    tabs = {"by_method": by_method, "by_prompt": by_prompt, "reconstruction": recon}
    shown = ER.labelled(tabs, ER.tab1_columns("inception", None))
    assert list(shown["by_method"].columns) == [
        "method",
        "psnr vs recon",
        "psnr vs input †",
        "fid vs inputs †",
        "kid vs inputs",
    ]
    assert list(shown["reconstruction"].columns) == ["decoder", "psnr vs input", "n"]
    out = Location(str(tmp_path / "report"))
    ER.write(
        out, tabs, {}, {}, [ER.tab1_note("inception", None)], ER.tab1_columns("inception", None)
    )
    page = (tmp_path / "report" / "index.html").read_text()
    assert "psnr vs input †" in page and "† measured as the paper" in page
    assert list(pd.read_parquet(tmp_path / "report" / "by_method.parquet").columns) == list(
        by_method.columns
    )


def test_edits_of_different_sizes_are_measured_in_separate_batches():
    """A 1024-px generator edit and a 256-px diffusion edit of one image cannot share a stacked batch."""
    from infra.runtime.shards import Item
    from tasks.evaluate import _batches

    items = [Item(f"k{n}", "s") for n in range(7)]
    size = {"k0": 1024, "k1": 256, "k2": 1024, "k3": 1024, "k4": 256, "k5": 1024, "k6": 256}
    batches = _batches(items, lambda i: (size[i.key],), batch_size=3)
    assert [[i.key for i in b] for b in batches] == [
        ["k0", "k2", "k3"], ["k5"], ["k1", "k4", "k6"]
    ]  # fmt: skip
    assert all(len({size[i.key] for i in b}) == 1 for b in batches)
    same = _batches(items, lambda i: (64,), batch_size=3)  # one size: the shard's order, as before
    assert [i.key for b in same for i in b] == [i.key for i in items]
