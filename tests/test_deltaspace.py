"""DeltaSpace analysis: known answers on synthetic features, the paper's effect on real CLIP features,
clear errors on bad input, and the `deltaedit analyze deltaspace` command end to end."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads its BLAS: shared machines
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.analysis import deltaspace as ds

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def gapped_pairs(
    n: int = 300, d: int = 64, offset: float = 20.0, noise: float = 0.1, seed: int = 1
):
    """Shared per-pair content c plus a big constant offset per modality (orthogonal directions): the
    offset dominates raw space (two clouds, low paired cosine) and cancels in every difference."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n, d))
    i = c + offset * np.eye(d)[0] + noise * rng.normal(size=(n, d))
    t = c + offset * np.eye(d)[1] + noise * rng.normal(size=(n, d))
    return i.astype(np.float32), t.astype(np.float32)


def test_offset_dominates_raw_space_and_cancels_in_delta_space():
    i, t = gapped_pairs()
    di, dt = ds.make_deltas(i, t, 300, seed=0)
    r = ds.analyze(i, t, di, dt, seed=0)
    raw, delta = r["raw"], r["delta"]
    assert delta["paired_cosine"] > 0.95 and abs(delta["shuffled_cosine"]) < 0.1
    assert raw["paired_cosine"] < 0.3 and delta["paired_cosine"] > raw["paired_cosine"] + 0.5
    assert raw["modality_gap"] > 1.2 and delta["modality_gap"] < 0.3  # √2 for orthogonal offsets
    assert delta["retrieval"]["top1"] > 0.95
    assert delta["retrieval"]["chance_top1"] == pytest.approx(1 / 300)
    assert delta["retrieval"]["chance_top5"] == pytest.approx(5 / 300)


def test_unrelated_features_give_chance_level():
    rng = np.random.default_rng(2)
    i, t = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    di, dt = ds.make_deltas(i, t, 400, seed=3)
    r = ds.analyze(i, t, di, dt, seed=3)
    for space in ("raw", "delta"):
        assert abs(r[space]["paired_cosine"]) < 0.05 and abs(r[space]["shuffled_cosine"]) < 0.05
        assert r[space]["retrieval"]["top5"] < 0.05  # chance 0.0125


def test_modality_gap_of_two_points_is_exact():
    i = np.tile(np.eye(4)[0] * 3.0, (5, 1))  # every image row the same direction
    t = np.tile(np.eye(4)[1], (5, 1))
    r = ds.analyze(i, t, i, t, seed=0)["raw"]
    assert r["modality_gap"] == pytest.approx(np.sqrt(2)) and r[
        "cross_modal_cosine"
    ] == pytest.approx(0)
    assert r["retrieval"]["top1"] == 0  # all tied: ties count against the query


def test_retrieval_finds_exact_matches():
    x = np.random.default_rng(0).normal(size=(50, 8))
    assert ds.retrieval(x, 2 * x, chunk=7)["top1"] == 1.0
    assert ds.retrieval(x, np.roll(x, 1, axis=0))["top1"] == 0.0


def test_deltas_use_the_same_seeded_pairs_for_both_modalities():
    i, t = np.arange(20.0).reshape(10, 2), -np.arange(20.0).reshape(10, 2)
    a, b = ds.random_pairs(10, 500, seed=4)
    assert (a != b).all() and set(a) == set(range(10)) and set(b) == set(range(10))
    di, dt = ds.make_deltas(i, t, 500, seed=4)
    assert np.array_equal(di, i[a] - i[b]) and np.array_equal(dt, t[a] - t[b])
    assert not np.array_equal(ds.random_pairs(10, 500, seed=5)[0], a)


def test_shuffle_baseline_moves_every_row():
    perm = ds._derangement(1000, seed=0)
    assert sorted(perm) == list(range(1000)) and (perm != np.arange(1000)).all()


def test_load_npy_and_parquet_agree(tmp_path):
    i, t = gapped_pairs(n=20, d=8)
    np.save(tmp_path / "i.npy", i), np.save(tmp_path / "t.npy", t)
    from_npy = ds.load_features(str(tmp_path / "i.npy"), str(tmp_path / "t.npy"))
    table = pa.table(
        {
            "img": pa.array(list(i), type=pa.list_(pa.float32())),
            "txt": pa.array(list(t), type=pa.list_(pa.float32(), 8)),  # fixed_size_list
            "dimg": pa.array(list(i - t), type=pa.list_(pa.float64())),
            "dtxt": pa.array(list(t - i), type=pa.list_(pa.float64())),
        }
    )
    pq.write_table(table, tmp_path / "f.parquet")
    from_pq = ds.load_features(
        parquet=str(tmp_path / "f.parquet"),
        image_column="img",
        text_column="txt",
        delta_image_column="dimg",
        delta_text_column="dtxt",
    )
    assert np.array_equal(from_npy.i, from_pq.i) and np.array_equal(from_npy.t, from_pq.t)
    assert from_npy.di is None and np.allclose(from_pq.dt, t - i, atol=1e-6)


def test_load_from_fsspec_uri():
    import fsspec

    i, t = gapped_pairs(n=10, d=4)
    for name, x in (("i", i), ("t", t)):
        with fsspec.open(f"memory://deltaspace-test/{name}.npy", "wb") as f:
            np.save(f, x)
    feats = ds.load_features("memory://deltaspace-test/i.npy", "memory://deltaspace-test/t.npy")
    assert np.array_equal(feats.i, i) and np.array_equal(feats.t, t)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "file not found"),
        ("shape", "widths differ"),
        ("rows", "rows differ"),
        ("nan", "NaN"),
        ("one_row", "at least 2 rows"),
        ("three_d", "2-D"),
        ("text", "expected numbers"),
        ("column", "no column 'nope'"),
        ("ragged", "lengths"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, case, message):
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    np.save(good, np.ones((4, 3), np.float32))
    arrays = {
        "shape": np.ones((4, 5)),
        "rows": np.ones((3, 3)),
        "nan": np.full((4, 3), np.nan),
        "one_row": np.ones((1, 3)),
        "three_d": np.ones((4, 3, 1)),
        "text": np.full((4, 3), "a"),
    }
    if case in arrays:
        np.save(bad, arrays[case])
    kwargs = {"images": str(good), "texts": str(bad)}
    if case in ("column", "ragged"):
        pq.write_table(
            pa.table(
                {
                    "image": [[1.0, 2.0], [3.0, 4.0]],
                    "text": [[1.0, 2.0], [3.0]] if case == "ragged" else [[1.0, 2], [3, 4]],
                }
            ),
            tmp_path / "f.parquet",
        )
        kwargs = {
            "parquet": str(tmp_path / "f.parquet"),
            "text_column": "nope" if case == "column" else "text",
        }
    with pytest.raises(ds.FeatureError, match=message) as exc:
        ds.load_features(**kwargs)
    if case not in ("column", "ragged"):
        assert str(bad) in str(exc.value)


@pytest.mark.skipif(not REALDATA.is_dir(), reason=f"real CLIP features absent ({REALDATA})")
@pytest.mark.parametrize("dataset", ["celeba", "cocoval"])
def test_real_clip_deltas_align_far_better_than_shuffled(dataset):
    prefix = str(REALDATA / f"cspace_{dataset}_")
    feats = ds.load_features(*(prefix + k + ".npy" for k in ("i", "t", "deltai", "deltat")))
    r = ds.analyze(*feats, seed=0)
    delta, raw = r["delta"], r["raw"]
    assert (
        delta["paired_cosine"] > delta["shuffled_cosine"] + 0.1
        and abs(delta["shuffled_cosine"]) < 0.05
    )
    assert delta["retrieval"]["top5"] > 10 * delta["retrieval"]["chance_top5"]
    assert (
        raw["modality_gap"] > 0.5 > delta["modality_gap"]
    )  # two clouds in raw space, one in delta space


def test_cli_writes_json_and_figures(tmp_path, capsys):
    from app.cli import main

    i, t = gapped_pairs(n=60, d=16)
    np.save(tmp_path / "i.npy", i), np.save(tmp_path / "t.npy", t)
    out = tmp_path / "out"
    rc = main(
        [
            "analyze",
            "deltaspace",
            "--images",
            str(tmp_path / "i.npy"),
            "--texts",
            str(tmp_path / "t.npy"),
            "--pairs",
            "80",
            "--seed",
            "3",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and "paired cosine" in printed and str(out / "deltaspace.svg") in printed
    result = json.loads((out / "deltaspace.json").read_text())
    assert (
        result["delta"]["rows"] == 80
        and result["seed"] == 3
        and result["delta"]["paired_cosine"] > 0.9
    )
    assert (out / "deltaspace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / "deltaspace.svg").read_text()


def test_cli_bad_input_exits_2(tmp_path, capsys):
    from app.cli import main

    rc = main(
        [
            "analyze",
            "deltaspace",
            "--images",
            str(tmp_path / "no.npy"),
            "--texts",
            str(tmp_path / "no.npy"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert (
        rc == 2
        and "error: file not found" in capsys.readouterr().err
        and not (tmp_path / "out").exists()
    )


def test_cli_help_explains_what_is_measured(capsys):
    from app.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--help"])
    text = capsys.readouterr().out
    assert (
        exc.value.code == 0
        and "modality gap" in text
        and "shuffled" in text
        and "--delta-images" in text
    )
