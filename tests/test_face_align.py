"""Face alignment before inversion (``ingest.align``, #23): FFHQ's recipe puts eyes and mouth where
FFHQ puts them whatever the face's tilt, size and position; a missing or broken landmark model is a
ConfigError naming the key and the path before any work; a face the model cannot place fails only its
own sample. The landmark model is a TorchScript network saved in tmp that finds coloured markers."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_models import (
    BLUE,
    GREEN,
    RED,
    FivePoints,
    MarkerLandmarks,
    marker_face,
    save_torchscript,
)
from PIL import Image

from app.cli import main
from flows.editor_inputs import what_ingest_did
from infra.config import ConfigError, IngestConfig, load_config
from infra.runtime.shards import Item, ShardSpec, plan_shards
from infra.runtime.stage import execute_shard, open_store
from infra.storage.catalog import list_catalog
from infra.storage.records import MemorySink
from models.face_align import LandmarkError, align_face, check_landmarks
from tasks.ingest import IngestBuilder, IngestProcessor

# FFHQ's recipe on a marker face (helpers_models.marker_face: eye-to-mouth = eye distance d): the
# square's side is 4d, its centre 0.1d below the eye midpoint, so in the aligned image (fractions of
# its side):
FFHQ_EYE_LEFT, FFHQ_EYE_RIGHT, FFHQ_MOUTH = (0.375, 0.475), (0.625, 0.475), (0.5, 0.725)


def marker_at(img: Image.Image, colour: tuple[int, int, int]) -> np.ndarray:
    """(x, y) centroid of the pixels near ``colour`` (in pixel-index coordinates); the blurred, faded
    reflections of markers that padding makes are not near enough."""
    px = np.asarray(img, np.float32)
    near = np.abs(px - np.array(colour, np.float32)).max(axis=2) < 70
    ys, xs = np.nonzero(near)
    assert len(xs), f"no {colour} marker in the aligned image"
    return np.array([xs.mean(), ys.mean()])


@pytest.fixture(scope="module")
def model() -> MarkerLandmarks:
    return MarkerLandmarks()


@pytest.mark.parametrize(
    "tilt, size, at",
    [(0.0, 64, (100.0, 90.0)), (25.0, 64, (90.0, 100.0)), (-40.0, 32, (70.0, 120.0))],
)
def test_eyes_and_mouth_land_where_ffhq_puts_them(model, tilt, size, at):
    img = marker_face(tilt, at=at)
    out, done = align_face(img, landmarks_of(model, img), size)
    assert out.size == (size, size)
    for colour, where in ((RED, FFHQ_EYE_LEFT), (BLUE, FFHQ_EYE_RIGHT), (GREEN, FFHQ_MOUTH)):
        # pixel index i covers [i, i + 1): the expected spot in index coordinates is size·f - 0.5
        expected = np.array(where) * size - 0.5
        np.testing.assert_allclose(marker_at(out, colour), expected, atol=1.0)
    # the record says truly where the source's points went
    eyes = done.project([done.eye_left, done.eye_right])
    np.testing.assert_allclose(eyes, np.array([FFHQ_EYE_LEFT, FFHQ_EYE_RIGHT]) * size, atol=0.1)


def test_a_face_reaching_past_the_picture_is_padded_not_cut(model):
    img = marker_face(40.0, at=(40.0, 40.0))  # the square reaches far past the top-left corner
    out, done = align_face(img, landmarks_of(model, img), 64)
    assert done.padded
    px = np.asarray(out, np.float32)
    assert px[:4, :4].std() < 40 and np.abs(px[:4, :4] - 128).max() < 60  # faded grey, not black
    np.testing.assert_allclose(marker_at(out, RED), np.array(FFHQ_EYE_LEFT) * 64 - 0.5, atol=1.0)
    unpadded, record = align_face(img, landmarks_of(model, img), 64, pad=False)
    assert not record.padded and np.asarray(unpadded)[:4, :4].max() == 0  # black outside


@pytest.mark.parametrize(
    "points, why",
    [
        (np.zeros((5, 2)), "shape (68, 2)"),
        (np.full((68, 2), np.nan), "not finite"),
        (np.zeros((68, 2)), "degenerate"),
    ],
)
def test_landmarks_that_cannot_align_say_why(points, why):
    with pytest.raises(LandmarkError, match=re.escape(why)):
        align_face(Image.new("RGB", (32, 32)), points, 16)


def test_a_network_output_of_one_batch_is_accepted():
    assert check_landmarks(torch.ones(1, 68, 2)).shape == (68, 2)


def test_a_missing_or_broken_landmark_model_fails_before_any_work(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "landmarks.pt"
    cfg = load_config(None, [f"ingest.align.landmarks={missing}", f"ingest.source={tmp_path}"])
    with pytest.raises(ConfigError, match=r"ingest\.align\.landmarks.*not found.*landmarks\.pt"):
        IngestBuilder.from_config(cfg)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    cfg = load_config(None, [f"ingest.align.landmarks={junk}"])
    with pytest.raises(
        ConfigError, match=r"ingest\.align\.landmarks: .*junk\.pt is not a TorchScript"
    ):
        IngestBuilder.from_config(cfg)
    # `deltaedit edit --align` stops before any model is loaded, with the key and the path
    code = main(
        ["edit", "x.png", "-p", "a red shape", "-o", str(tmp_path / "out"), "--align", str(missing)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "ingest.align.landmarks" in err and str(missing) in err
    assert not (tmp_path / "out").exists()


def test_ingest_aligns_and_a_face_it_cannot_place_fails_alone(tmp_path, model):
    photos = tmp_path / "photos"
    photos.mkdir()
    marker_face(0.0).save(photos / "a_upright.png")
    marker_face(0.0, markers=False).save(photos / "b_no_face.png")
    marker_face(30.0, size=(240, 180), at=(120.0, 70.0)).save(photos / "c_tilted.png")
    landmarks = save_torchscript(model, tmp_path / "landmarks.pt")
    cfg = load_config(
        None,
        [
            f"root={tmp_path / 'run'}",
            f"ingest.source={photos}",
            "ingest.image_size=32",
            f"ingest.align.landmarks={landmarks}",
            "ingest.align.output_size=64",
        ],
    )
    builder = IngestBuilder.from_config(cfg)
    store = open_store(cfg.root, {}, builder.stage)
    proc, code_fp = builder.build(), builder.fingerprint()
    specs = plan_shards(list_catalog(cfg.ingest.source), 10)
    for spec in specs:
        execute_shard(proc, spec, store, code_fp)
    (shard,) = store.finished()
    assert store.marker(shard)["counts"] == {"seen": 3, "ok": 2, "failed": 1}
    records = {Path(r.source).name: r for r in store.records(shard)}
    failed = records["b_no_face.png"]
    assert failed.status == "failed"
    assert "ingest.align.landmarks" in failed.error and "not finite" in failed.error
    for name in ("a_upright.png", "c_tilted.png"):
        r = records[name]
        assert r.fields["aligned_size"] == 64 and (r.fields["width"], r.fields["height"]) == (
            32,
            32,
        )
        assert r.sample_meta["align"]["size"] == 64 and len(r.sample_meta["align"]["quad"]) == 4
        out = Image.open(io.BytesIO(r.image)).convert("RGB")
        np.testing.assert_allclose(
            marker_at(out, RED), np.array(FFHQ_EYE_LEFT) * 32 - 0.5, atol=1.5
        )
        np.testing.assert_allclose(
            marker_at(out, BLUE), np.array(FFHQ_EYE_RIGHT) * 32 - 0.5, atol=1.5
        )
    done, box = what_ingest_did(records["c_tilted.png"].fields, 32, "fit")
    assert done == "240x180: face aligned (ingest.align) to 64x64, resized to 32x32"
    assert box == (0.0, 0.0, 1.0, 1.0)
    # another landmark model at the same path is another ingest (the file's bytes are fingerprinted)
    save_torchscript(FivePoints(), tmp_path / "landmarks.pt")
    assert IngestBuilder.from_config(cfg).fingerprint() != code_fp


def test_a_model_of_the_wrong_kind_fails_each_sample_with_the_reason(tmp_path):
    path = save_torchscript(FivePoints(), tmp_path / "five.pt")
    (tmp_path / "a.png").write_bytes(_png(marker_face()))
    proc = IngestProcessor(IngestConfig(image_size=16, align={"landmarks": path}))
    sink = MemorySink()
    proc(ShardSpec("s0", (Item("a", str(tmp_path / "a.png")),)), sink)
    (r,) = sink.records
    assert (
        r.status == "failed" and "expected 68 (x, y) landmarks" in r.error and "(5, 2)" in r.error
    )


def landmarks_of(model: torch.nn.Module, img: Image.Image) -> np.ndarray:
    """The model's points for ``img`` given as the ingest stage gives it: (1, 3, H, W) in [0, 1]."""
    x = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]
    return model(x).numpy()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_export_gives_an_aligned_edit_back_at_its_aligned_square():
    from tasks.export import encode

    edit = _png(Image.new("RGB", (32, 32), (90, 90, 90)))
    row = {"orig_width": 240, "orig_height": 180, "aligned_size": 64}
    _, width, height, done = encode(edit, "png", row, "fit")
    assert (width, height) == (64, 64) and "face-aligned square of ingest.align" in done
    _, width, height, _ = encode(edit, "png", {"orig_width": 240, "orig_height": 180}, "fit")
    assert (width, height) == (240, 180)  # without alignment: the source's own size
