"""Relevance matrix Rₛ: the exact mode against a literal StyleCLIP loop, the fast mode against exact, the
stage over blocks of channels, and the flow on Prefect + Ray resuming block by block."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from helpers_models import TINY_G
from helpers_pipeline import TINY_CLIP, tiny_zoo

from infra.config import load_config
from infra.runtime.shards import plan_shards
from infra.runtime.stage import execute_shard
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from models.clip import ClipEncoder
from models.relevance import _STATS_STREAM, _z, exact_rows, fast_rows, freeze, style_statistics
from models.stylegan2 import Generator, StyleCode
from tasks.relevance import RelevanceBuilder, channel_items, load_relevance

# Tiny random-weight models, 3 images: measured mean row cosine 0.860 (min -0.07). Random generators are
# far less smooth along a channel than trained ones, so the tangent is a rougher stand-in for the ±5σ
# secant here; bench/relevance_bench.py measures the toy-sized and trained toy models.
FAST_MIN_MEAN_COSINE = 0.8


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    G, clip = Generator(**TINY_G), ClipEncoder.load("tiny", model_config=TINY_CLIP)
    freeze(G, clip.model)
    return G, clip, style_statistics(G, n_stat_samples=512, n_images=3, seed=0)


@pytest.fixture(scope="module")
def zoo_overrides(tmp_path_factory) -> list[str]:
    return tiny_zoo(tmp_path_factory.mktemp("zoo"))


def styleclip_row(G, clip, stats, c: int, k: float) -> torch.Tensor:
    """StyleCLIP's definition, literally: one image and one sign at a time."""
    directions = []
    for i in range(stats.base.batch_size):
        embeddings = []
        for sign in (-1, 1):
            code = StyleCode(stats.base.conv[i : i + 1].clone(), stats.base.rgb[i : i + 1].clone())
            code.conv[0, c] = stats.mean[c]  # the channel at its mean ...
            code.conv[0, c] += sign * k * stats.std[c]  # ... then ± kσ
            with torch.no_grad():
                feat = clip.model.encode_image(clip.preprocess(G.synthesize(code)))
            embeddings.append(feat[0] / feat[0].norm())
        diff = embeddings[1] - embeddings[0]
        directions.append(diff / diff.norm())
    mean = torch.stack(directions).mean(0)
    return mean / mean.norm()


def test_statistics_are_seeded_population_moments(tiny):
    G, _, stats = tiny
    with torch.no_grad():
        s = G.style_space(G.mapping(_z(512, G.style_dim, 0, _STATS_STREAM))).conv.double()
    assert torch.allclose(stats.mean, s.mean(0).float(), atol=1e-5)
    assert torch.allclose(stats.std, s.std(0, unbiased=False).float(), atol=1e-4)
    again = style_statistics(G, 512, 3, seed=0)
    assert torch.equal(again.mean, stats.mean) and torch.equal(again.base.conv, stats.base.conv)
    assert stats.base.conv.shape == (3, G.layout.conv_total)


def test_exact_matches_a_literal_styleclip_loop(tiny):
    G, clip, stats = tiny
    layout = G.layout
    channels = [
        0,
        5,
        layout.conv[2].offset + 1,
        layout.conv[-1].stop - 1,
    ]  # first, middle, last layers
    rows = exact_rows(
        G, clip, stats, channels, sigma_scale=5.0, batch_size=5
    )  # odd: pairs cross batches
    expected = torch.stack([styleclip_row(G, clip, stats, c, 5.0) for c in channels])
    assert rows.shape == (len(channels), clip.embed_dim)
    assert torch.allclose(rows, expected, atol=1e-5), (rows - expected).abs().max()
    assert torch.allclose(rows.norm(dim=1), torch.ones(len(channels)), atol=1e-5)


def test_fast_agrees_with_exact_on_every_channel(tiny):
    G, clip, stats = tiny
    channels = list(range(G.layout.conv_total))
    exact = exact_rows(G, clip, stats, channels, 5.0, batch_size=64)
    fast = fast_rows(G, clip, stats, batch_size=3)
    assert fast.shape == exact.shape == (G.layout.conv_total, clip.embed_dim)
    assert torch.allclose(fast.norm(dim=1), torch.ones(len(channels)), atol=1e-5)
    cos = (exact * fast).sum(1)
    print(f"tiny models: fast vs exact mean row cosine {cos.mean():.4f}, min {cos.min():.4f}")
    assert cos.mean() >= FAST_MIN_MEAN_COSINE


def test_low_rank_fast_mode_stays_close_to_the_full_jacobian(tiny):
    G, clip, stats = tiny
    full = fast_rows(G, clip, stats, batch_size=1)
    assert torch.allclose(
        full, fast_rows(G, clip, stats, batch_size=3), atol=1e-5
    )  # batching is exact
    low = fast_rows(
        G, clip, stats, batch_size=1, rank=12
    )  # image 1 full, images 2-3 on 12 of 32 dims
    assert torch.allclose(low.norm(dim=1), torch.ones(len(low)), atol=1e-5)
    cos = (low * full).sum(1)
    print(f"tiny models: rank-12 vs full Jacobian mean row cosine {cos.mean():.4f}")
    assert cos.mean() >= 0.95 and not torch.allclose(low, full, atol=1e-3)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_stage_writes_unit_rows_for_the_whole_layout(tmp_path, zoo_overrides, mode):
    cfg = load_config(
        None,
        zoo_overrides
        + [
            "device=cpu",
            f"relevance.mode={mode}",
            "relevance.n_images=2",
            "relevance.n_stat_samples=256",
            "relevance.batch_size=32",
        ],
    )
    builder = RelevanceBuilder.from_config(cfg)
    proc = builder.build()
    store = StageStore(Location(str(tmp_path)), builder.stage)
    n = proc.generator.layout.conv_total
    for spec in plan_shards(channel_items(n), 100):
        report = execute_shard(proc, spec, store, builder.fingerprint())
        assert report.outcome == "ran" and report.counts["ok"] == len(spec.items)
    matrix = load_relevance(str(tmp_path), f"relevance_{mode}")
    assert (
        matrix.shape
        == (n, proc.clip.embed_dim)
        == (sum(layer.channels for layer in proc.generator.layout.conv), 32)
    )
    assert torch.allclose(matrix.norm(dim=1), torch.ones(n), atol=1e-5)
    assert torch.allclose(matrix[:7], proc.rows(range(7)), atol=1e-6)
    rows = store.manifest("00000").to_pylist()
    assert rows[0]["layer"] == "conv1" and rows[0]["channel"] == 0


def test_compare_reports_cosine_and_overlap(zoo_overrides):
    from flows.relevance import compare_relevance, format_comparison

    cfg = load_config(
        None, zoo_overrides + ["device=cpu", "relevance.n_images=2", "relevance.n_stat_samples=256"]
    )
    result = compare_relevance(cfg, channels=24, top_k=5, prompts=["a circle -> a square"])
    assert result["channels"] == 24 and 0 < result["mean_row_cosine"] <= 1.0001
    assert 0 <= result["top_k_overlap"]["a circle -> a square"] <= 1
    assert "mean row cosine" in format_comparison(result)


def test_cli_compare_prints_the_comparison(tmp_path, zoo_overrides):
    cli = str(Path(sys.executable).with_name("deltaedit"))
    out = subprocess.run(
        [
            cli,
            "relevance",
            "compare",
            *zoo_overrides,
            "device=cpu",
            "relevance.n_images=2",
            "relevance.n_stat_samples=128",
            "--channels",
            "8",
            "--top-k",
            "3",
            "--prompt",
            "a circle -> a square",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "mean row cosine" in out.stdout and "top-3 overlap" in out.stdout


@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_flow_resumes_by_block_and_matches_one_process(tmp_path, zoo_overrides):
    from flows.relevance import relevance_flow

    overrides = zoo_overrides + [
        f"root={tmp_path / 'run'}",
        "device=cpu",
        "prefect.retries=0",
        "ray.actors=2",
        "relevance.mode=exact",
        "relevance.n_images=2",
        "relevance.n_stat_samples=256",
        "relevance.block_size=128",
        "relevance.batch_size=32",
    ]
    first = relevance_flow(None, overrides, shards=["00001"])["relevance_exact"]
    assert (first["shards"], first["ran"], first["skipped"]) == (1, 1, 0)
    with pytest.raises(ValueError, match="channels missing"):
        load_relevance(str(tmp_path / "run"), "relevance_exact")
    full = relevance_flow(None, overrides)["relevance_exact"]
    n = Generator(**TINY_G).layout.conv_total  # 304 channels → 3 blocks of ≤ 128
    assert (full["shards"], full["ran"], full["skipped"]) == (3, 2, 1)
    assert full["seen"] == full["ok"] == n and full["failed"] == 0
    matrix = load_relevance(str(tmp_path / "run"), "relevance_exact")
    reference = RelevanceBuilder.from_config(load_config(None, overrides)).build().rows(range(n))
    assert matrix.shape == reference.shape and torch.allclose(matrix, reference, atol=1e-5)
    assert torch.allclose(F.normalize(matrix, dim=1), matrix, atol=1e-5)


# --- importing StyleCLIP's published matrix ------------------------------------------------------------


def _published(
    path: Path, rows: int, dim: int = 32, scale: float = 1.0, seed: int = 0
) -> np.ndarray:
    """An fs3.npy for the tiny generator: unit rows as StyleCLIP's GetFs leaves them (× ``scale``)."""
    fs3 = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    fs3 /= np.linalg.norm(fs3, axis=1, keepdims=True)
    np.save(path, fs3 * scale)
    return fs3


def test_an_imported_matrix_round_trips_where_bulk_edit_reads_it(tmp_path, zoo_overrides):
    from flows.relevance import import_relevance
    from infra.storage.readers import read_vectors
    from infra.storage.tables import decode_metadata
    from tasks.layout import relevance_stage

    layout = Generator(**TINY_G).layout
    fs3 = _published(tmp_path / "fs3.npy", layout.conv_total)
    run = tmp_path / "run"
    overrides = zoo_overrides + [
        f"root={run}",
        "device=cpu",
        "relevance.block_size=128",
        "relevance.mode=imported",  # what bulk-edit's config says, so it reads relevance_imported
    ]
    cfg = load_config(None, overrides)
    result = import_relevance(cfg, str(tmp_path / "fs3.npy"))
    assert result["stage"] == relevance_stage(cfg.relevance.mode) == "relevance_imported"
    assert (result["rows"], result["embed_dim"], result["ran"], result["skipped"]) == (
        304,
        32,
        3,
        0,
    )
    matrix = load_relevance(str(run), "relevance_imported")
    assert matrix.shape == fs3.shape and torch.allclose(matrix, torch.from_numpy(fs3), atol=1e-6)
    store = StageStore(Location(str(run)), "relevance_imported")
    meta = decode_metadata(read_vectors(store))
    assert meta["source"] == str(tmp_path / "fs3.npy") and meta["mode"] == "imported"
    assert store.manifest("00000").to_pylist()[0]["layer"] == "conv1"
    # the same file again: every block is done; the fingerprint follows the file's content
    again = import_relevance(
        load_config(None, overrides + [f"relevance.source={tmp_path}/fs3.npy"])
    )
    assert (again["ran"], again["skipped"]) == (0, 3)
    # rows not of unit length are normalised as GetFs does, and another file replaces the blocks
    _published(tmp_path / "scaled.npy", layout.conv_total, scale=3.0)
    assert import_relevance(cfg, str(tmp_path / "scaled.npy"))["ran"] == 3
    assert torch.allclose(
        load_relevance(str(run), "relevance_imported"), torch.from_numpy(fs3), atol=1e-6
    )


def test_a_file_that_does_not_fit_the_run_names_both_counts(tmp_path, zoo_overrides):
    from flows.relevance import import_relevance
    from infra.config import ConfigError

    layout = Generator(**TINY_G).layout
    cfg = load_config(None, zoo_overrides + [f"root={tmp_path / 'run'}", "device=cpu"])
    _published(tmp_path / "with_rgb.npy", layout.conv_total + layout.rgb_total)
    with pytest.raises(ConfigError, match=r"has 464 rows, but .* 304 conv-style channels.*toRGB"):
        import_relevance(cfg, str(tmp_path / "with_rgb.npy"))
    _published(tmp_path / "ffhq.npy", 6048, dim=512)
    with pytest.raises(ConfigError, match=r"6048 rows, but .* 304 .*FFHQ 1024"):
        import_relevance(cfg, str(tmp_path / "ffhq.npy"))
    _published(tmp_path / "other_clip.npy", layout.conv_total, dim=512)
    with pytest.raises(ConfigError, match="512 columns, but the run's CLIP embeds in 32"):
        import_relevance(cfg, str(tmp_path / "other_clip.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(ConfigError, match="not a .npy array"):
        import_relevance(cfg, str(tmp_path / "junk.npy"))
    with pytest.raises(ConfigError, match="needs a file"):
        import_relevance(cfg)
    assert not (tmp_path / "run" / "relevance_imported").exists()


def test_cli_imports_a_published_matrix(tmp_path, zoo_overrides):
    _published(tmp_path / "fs3.npy", Generator(**TINY_G).layout.conv_total)
    cli = str(Path(sys.executable).with_name("deltaedit"))
    args = [cli, "relevance", "import", str(tmp_path / "fs3.npy"), *zoo_overrides]
    out = subprocess.run(
        [*args, f"root={tmp_path / 'run'}", "device=cpu"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "304 x 32" in out.stdout and "relevance.mode=imported" in out.stdout
    assert load_relevance(str(tmp_path / "run"), "relevance_imported").shape == (304, 32)
