"""`deltaedit export` (tasks/export.py): a bulk_edit.catalog's edits written back under the user's own
file names. The stores are written by the real stage processors in this process (ingest → invert →
embed → edit with the committed toy zoo and a seeded random Delta Mapper; no Prefect, no Ray) over a
20-image catalog with nested folders and non-ASCII names; the metrics store is written directly for
some of the edits (the manifest must join what is there and leave the rest empty)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from infra.config import load_config
from infra.storage.fsio import Location
from infra.storage.store import StageStore

REPO = Path(__file__).resolve().parents[1]
ZOO, CONFIG = REPO / "zoo" / "toy", REPO / "configs" / "toy.yaml"
PROMPTS = "- {id: red, source: a shape, target: a red shape}\n"
SIZES = [(64, 64), (96, 64), (48, 80), (120, 72)]


def _names() -> list[str]:
    """20 catalog paths: nested folders, non-ASCII, spaces, dots, and two sources sharing a stem."""
    names = [f"holiday/day{d}/img_{n}.png" for d in (1, 2) for n in range(4)]
    names += [f"café/日本 {n}.png" for n in range(4)]
    names += [
        "Ünïcode/ñ/straße.jpg",
        "a.b.c.png",
        "top.png",
        "deep/er/still/x.png",
        "résumé.webp",
        "same/cat.png",
        "same/cat.jpg",
        "photo 1.png",
    ]
    assert len(names) == 20 and len(set(names)) == 20
    return names


@pytest.fixture(scope="module")
def catalog_run(tmp_path_factory) -> tuple[Path, Path, dict[str, tuple[int, int]], list[str]]:
    from infra.runtime.shards import plan_shards
    from infra.runtime.stage import execute_shard
    from infra.runtime.upstream import plan_downstream
    from infra.storage.catalog import list_catalog
    from models import zoo
    from models.delta_mapper import DeltaMapper, MapperConfig
    from models.toy.catalog import render_catalog
    from models.zoo import ModelSpec
    from tasks.edit.plan import edit_builder, edit_variants, input_stages
    from tasks.edit.processor import plan_edits
    from tasks.embed import EmbedBuilder
    from tasks.ingest import IngestBuilder
    from tasks.invert import InvertBuilder

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("export")
    root, photos = base / "run", base / "photos"
    (base / "prompts.yaml").write_text(PROMPTS)
    render_catalog(str(base / "renders"), 20, seed=3)
    renders = sorted((base / "renders").glob("*.png"))
    sizes = {}
    for n, (name, render) in enumerate(zip(_names(), renders)):
        path = photos / name
        path.parent.mkdir(parents=True, exist_ok=True)
        size = SIZES[n % len(SIZES)]
        Image.open(render).convert("RGB").resize(size).save(path)
        sizes[name] = size
    gen = zoo.build(ModelSpec(name="stylegan2", checkpoint=str(ZOO / "generator.safetensors")))
    clip_dim = zoo.build(
        ModelSpec(name="open_clip", checkpoint=str(ZOO / "clip.safetensors"))
    ).embed_dim
    (root / "mapper").mkdir(parents=True)
    DeltaMapper(MapperConfig(layout=gen.layout.to_dict(), clip_dim=clip_dim)).save(
        str(root / "mapper" / "mapper.safetensors")
    )
    overrides = [
        f"root={root}",
        f"bulk_edit.prompts={base / 'prompts.yaml'}",
        "device=cpu",
        "bulk_edit.methods=[deltaedit]",
        "bulk_edit.decoder=[generator]",
        "bulk_edit.tau=0",
        f"bulk_edit.catalog={photos}",
        "ingest.image_size=64",
        "ingest.resize=fit",
        "ingest.shard_size=8",
        "bulk_edit.images_per_shard=8",
        "bulk_edit.condition=text",  # no training embeddings here to retrieve from
        "bulk_edit.mask=text",
    ]
    cfg = load_config(CONFIG, overrides)
    stages = input_stages(cfg)
    loc = Location(cfg.root)
    images, codes = StageStore(loc, stages.images), StageStore(loc, stages.codes)
    ingest = IngestBuilder.from_config(cfg, stages.images)
    for spec in plan_shards(list_catalog(str(photos)), cfg.ingest.shard_size):
        execute_shard(ingest.build(), spec, images, ingest.fingerprint())
    for builder, out in (
        (InvertBuilder.from_config(cfg, stages.images, stages.codes), codes),
        (EmbedBuilder.from_config(cfg, stages.images), StageStore(loc, stages.clip)),
    ):
        processor = builder.build()
        for spec in plan_downstream(images):
            execute_shard(processor, spec, out, builder.fingerprint())
    variants = edit_variants(cfg, "test")
    builder = edit_builder(cfg, "test", variants)
    processor, edits = builder.build(), StageStore(loc, stages.edits)
    for spec in plan_edits(codes, variants, cfg.bulk_edit.methods, cfg.bulk_edit):
        execute_shard(processor, spec, edits, builder.fingerprint())
    edit_keys = sorted(
        k
        for s in edits.finished()
        for k in edits.manifest(s).column("key").to_pylist()
        if not k.endswith("__recon")
    )
    writer = StageStore(loc, stages.metrics).writer("000000")  # half the edits measured
    for n, key in enumerate(edit_keys[::2]):
        writer.add(key, f"{stages.edits}/{key}", psnr=20.0 + n, clip_direction=0.1 * n)
    writer.commit(input_fingerprint="test", code_fingerprint="test")
    return root, photos, sizes, edit_keys


def _expected_file(name: str) -> str:
    stem = (
        name if name.startswith("same/cat") else name.rsplit(".", 1)[0]
    )  # colliding stems keep the ext
    return f"{stem}/red__deltaedit"


def test_export_round_trips_the_catalog_under_the_original_names(catalog_run, tmp_path):
    from tasks.export import export_edits

    root, photos, sizes, edit_keys = catalog_run
    out = tmp_path / "out"
    result = export_edits(str(root), str(out), original_size=True)
    assert result.stage == "catalog_edits" and result.catalog_root == str(photos)
    assert not result.skipped and len(result.written) == len(edit_keys) == 20
    for name, (w, h) in sizes.items():
        path = out / f"{_expected_file(name)}.png"
        assert path.is_file(), path
        with Image.open(path) as image:
            assert image.size == (w, h) and image.mode == "RGB"
    with (out / "manifest.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    by_source = {r["source"]: r for r in rows}
    assert set(by_source) == {str(photos / n) for n in sizes}
    row = by_source[str(photos / "café/日本 1.png")]
    assert row["file"] == "café/日本 1/red__deltaedit.png"
    assert (row["prompt_id"], row["method"], row["decoder"]) == ("red", "deltaedit", "generator")
    assert (row["source_text"], row["target_text"]) == ("a shape", "a red shape")
    assert float(row["tau"]) == 0 and float(row["strength"]) == 1
    assert (row["width"], row["height"]) == ("96", "64") and "padding cut off" in row["resized"]
    measured = {r["edit_key"]: r for r in rows if r["psnr"]}
    assert set(measured) == set(edit_keys[::2])
    assert float(measured[edit_keys[2]]["psnr"]) == 21.0


def test_generator_size_parquet_manifest_and_jpg(catalog_run, tmp_path):
    from tasks.export import export_edits

    root, photos, sizes, _ = catalog_run
    out = tmp_path / "out"
    result = export_edits(str(root), str(out), fmt="jpg", manifest="parquet", stage="catalog_edits")
    assert len(result.written) == 20
    with Image.open(out / "holiday/day2/img_3/red__deltaedit.jpg") as image:
        assert image.format == "JPEG" and image.size == (64, 64)  # the generator's resolution
    table = pq.read_table(out / "manifest.parquet")
    assert table.num_rows == 20 and {"source", "prompt_id", "tau", "strength", "psnr"} <= set(
        table.column_names
    )
    assert table.column("psnr").null_count == 10


def test_cli_prints_where_each_file_went(catalog_run, tmp_path, capsys):
    from app.cli import main

    root, photos, _, _ = catalog_run
    out = tmp_path / "cli"
    assert main(["export", str(root), "--to", str(out), "--original-size", "--format", "webp"]) == 0
    printed = capsys.readouterr().out
    line = next(row for row in printed.splitlines() if "straße" in row)
    assert line == (
        f"{photos / 'Ünïcode/ñ/straße.jpg'} [red, deltaedit] -> "
        f"{out / 'Ünïcode/ñ/straße/red__deltaedit.webp'}"
    )
    assert "20 edits of catalog_edits exported" in printed and "0 skipped" in printed
    assert (out / "Ünïcode/ñ/straße/red__deltaedit.webp").is_file()


def test_a_root_without_finished_edits_is_a_clear_error(tmp_path, capsys):
    from app.cli import main
    from tasks.export import ExportError, export_edits

    with pytest.raises(ExportError, match="no finished edits"):
        export_edits(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert main(["export", str(tmp_path / "empty"), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no finished edits" in err and "catalog_edits" in err and "bulk-edit" in err
    assert not (tmp_path / "out").exists()


def test_export_to_s3(catalog_run, s3_bucket):
    import s3fs

    from tasks.export import export_edits

    root, _, sizes, _ = catalog_run
    bucket, options = s3_bucket
    result = export_edits(
        str(root),
        f"{bucket}/exported",
        original_size=True,
        storage_options={},
        dest_storage_options=options,
    )
    assert len(result.written) == 20
    fs = s3fs.S3FileSystem(**options)
    name = "café/日本 1.png"
    data = fs.cat(f"{bucket}/exported/{_expected_file(name)}.png")
    assert Image.open(io.BytesIO(data)).size == sizes[name]
    manifest = fs.cat(f"{bucket}/exported/manifest.csv").decode()
    assert manifest.count("\n") == 21


def test_restore_size_undoes_fit_padding():
    from tasks.export import restore_size
    from tasks.ingest import resize

    source = Image.fromarray(np.full((30, 90, 3), 200, np.uint8))  # 90×30: padded top and bottom
    fitted = resize(source, 64, "fit")
    back, done = restore_size(fitted, 90, 30, "fit")
    assert back.size == (90, 30) and "padding cut off" in done
    assert np.abs(np.asarray(back, np.int16) - 200).max() <= 2  # no black band left
