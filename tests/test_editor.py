"""`Editor` (flows/editor.py) and `deltaedit edit`: one's own images edited by the bulk-edit stage's
code. On a tiny run of the committed toy zoo whose stores are written directly (a seeded random
Delta Mapper and a random unit-row Rₛ; no Prefect, no Ray): an edit through the API equals the same
edit through the pipeline's stages pixel for pixel; inputs of any size are fitted and say how; each
bad input fails only its own edits, with its reason; the CLI writes files and prints their paths."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infra.config import ConfigError, load_config
from infra.storage.fsio import Location
from infra.storage.store import StageStore

REPO = Path(__file__).resolve().parents[1]
ZOO, CONFIG = REPO / "zoo" / "toy", REPO / "configs" / "toy.yaml"
PROMPTS = """
- {id: red, source: a shape, target: a red shape}
- {id: square, source: a shape, target: a square}
"""
LONG = " ".join(["a very large red shape on a white background"] * 8)  # > toy CLIP's 32 tokens


def _write(
    store: StageStore, rows: dict[str, dict[str, np.ndarray]], meta: dict | None = None
) -> None:
    writer = store.writer("000000", meta)
    for key, vectors in rows.items():
        writer.add(key, f"test/{key}", vectors=vectors)
    writer.commit(input_fingerprint="test", code_fingerprint="test")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, list[str], Path]:
    """A run root with a random (seeded) Delta Mapper under mapper/ and a random unit-row Rₛ, the
    overrides that point configs/toy.yaml at it (DeltaEdit-G only), and a catalog of three photos:
    a toy render (64×64), a wide one (120×72) and a tall RGBA one (40×90)."""
    from models import zoo
    from models.delta_mapper import DeltaMapper, MapperConfig
    from models.toy.catalog import render_catalog
    from models.zoo import ModelSpec

    torch.manual_seed(0)
    torch.set_num_threads(1)  # as the stage actors run (cpus_per_actor 0.5 → 1 thread)
    base = tmp_path_factory.mktemp("editor")
    root, photos = base / "run", base / "photos"
    (base / "prompts.yaml").write_text(PROMPTS)
    render_catalog(str(base / "renders"), 3, seed=5)
    renders = sorted((base / "renders").glob("*.png"))
    photos.mkdir()
    Image.open(renders[0]).save(photos / "a.png")
    Image.open(renders[1]).convert("RGB").resize((120, 72)).save(photos / "b.png")
    tall = Image.open(renders[2]).convert("RGBA").resize((40, 90))
    tall.putalpha(200)
    tall.save(photos / "c.png")
    gen = zoo.build(ModelSpec(name="stylegan2", checkpoint=str(ZOO / "generator.safetensors")))
    clip_dim = zoo.build(
        ModelSpec(name="open_clip", checkpoint=str(ZOO / "clip.safetensors"))
    ).embed_dim
    rows = torch.nn.functional.normalize(torch.randn(gen.layout.conv_total, clip_dim), dim=1)
    _write(
        StageStore(Location(str(root)), "relevance_covariance"),
        {f"ch{c:06d}": {"direction": r.numpy()} for c, r in enumerate(rows)},
        {"n_channels": gen.layout.conv_total},
    )
    mapper = DeltaMapper(MapperConfig(layout=gen.layout.to_dict(), clip_dim=clip_dim))
    (root / "mapper").mkdir(parents=True)
    mapper.save(str(root / "mapper" / "mapper.safetensors"))
    overrides = [
        f"root={root}",
        f"bulk_edit.prompts={base / 'prompts.yaml'}",
        "device=cpu",
        "bulk_edit.methods=[deltaedit]",
        "bulk_edit.decoder=[generator]",
        "relevance.mode=covariance",
        "bulk_edit.threshold=normalized",
        "bulk_edit.tau=0.2",
        "ingest.image_size=64",
        "ingest.resize=fit",
        "bulk_edit.condition=text",  # no training embeddings here to retrieve from
        "bulk_edit.mask=text",
    ]
    return root, overrides, photos


@pytest.fixture(scope="module")
def editor(tiny_run):
    from flows.editor import Editor

    _, overrides, _ = tiny_run
    return Editor.from_config(CONFIG, overrides)


def _pixels(image: Image.Image | None) -> np.ndarray:
    assert image is not None
    return np.asarray(image.convert("RGB"))


# --- the same edit as the bulk-edit stage -------------------------------------------------------


def _bulk_edit_stages(cfg, photos: Path) -> StageStore:
    """The pipeline's stages over the catalog with their builders, as the preprocess and
    bulk-edit flows run them (ingest, invert, embed, then the edit stage), in this process."""
    from infra.runtime.shards import plan_shards
    from infra.runtime.stage import execute_shard
    from infra.runtime.upstream import plan_downstream
    from infra.storage.catalog import list_catalog
    from tasks.edit.plan import edit_builder, edit_variants
    from tasks.edit.processor import plan_edits
    from tasks.embed import EmbedBuilder
    from tasks.ingest import IngestBuilder
    from tasks.invert import InvertBuilder

    root = Location(cfg.root)
    images, codes = StageStore(root, "images"), StageStore(root, "codes")
    ingest = IngestBuilder.from_config(cfg)
    for spec in plan_shards(list_catalog(str(photos)), cfg.ingest.shard_size):
        execute_shard(ingest.build(), spec, images, ingest.fingerprint())
    for builder, out in (
        (InvertBuilder.from_config(cfg), codes),
        (EmbedBuilder.from_config(cfg, "images"), StageStore(root, "clip_images")),
    ):
        processor = builder.build()
        for spec in plan_downstream(images):
            execute_shard(processor, spec, out, builder.fingerprint())
    variants = edit_variants(cfg, "test")
    builder = edit_builder(cfg, "test", variants)
    processor, edits = builder.build(), StageStore(root, "edits")
    for spec in plan_edits(codes, variants, cfg.bulk_edit.methods, cfg.bulk_edit):
        execute_shard(processor, spec, edits, builder.fingerprint())
    return edits


def test_api_edit_equals_the_bulk_edit_stage_pixel_for_pixel(tiny_run, editor):
    _, overrides, photos = tiny_run
    cfg = load_config(CONFIG, overrides)
    store = _bulk_edit_stages(cfg, photos)
    stored = {r.key: r for shard in store.finished() for r in store.records(shard)}
    torch.set_num_threads(1)
    paths = sorted(photos.glob("*.png"))  # the catalog's (sorted) order
    result = editor.edit(paths, ["a red shape", "a shape -> a square"])
    assert len(result.edits) == 6 and not result.failures
    by_target = {"a red shape": "red", "a square": "square"}
    for e in result.edits:
        key = next(
            k
            for k in stored
            if k.startswith(paths[e.image_index].stem + "_")
            and k.endswith(f"__{by_target[e.prompt.split(' -> ')[1]]}__deltaedit")
        )
        record = stored[key]
        flow = np.asarray(Image.open(io.BytesIO(record.image)).convert("RGB"))
        assert np.array_equal(_pixels(e.image), flow), key
        assert e.channels_changed == record.fields["channels_changed"] > 0
        assert e.tau == record.fields["tau"] == 0.2 and e.strength == 1.0
    for r in result.inputs:  # the reconstructions G(s) too
        key = next(
            k for k in stored if k.startswith(paths[r.index].stem + "_") and k.endswith("__recon")
        )
        assert np.array_equal(
            _pixels(r.reconstruction),
            np.asarray(Image.open(io.BytesIO(stored[key].image)).convert("RGB")),
        )
    assert set(result.timings) == {"ingest", "invert", "embed", "edit", "total"}


def test_prompt_forms_are_the_same_edit_and_seeded_calls_repeat(tiny_run, editor):
    _, _, photos = tiny_run
    state = torch.random.get_rng_state()
    first = editor.edit(
        photos / "a.png",
        ["a red shape", ("a shape", "a red shape"), "a shape → a red shape"],
        seed=3,
    )
    again = editor.edit(str(photos / "a.png"), "a shape -> a red shape", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG untouched
    assert all(e.prompt == "a shape -> a red shape" for e in first.edits)
    for e in [*first.edits, *again.edits]:
        assert np.array_equal(_pixels(e.image), _pixels(first.images[0]))
    weaker = editor.edit(photos / "a.png", "a red shape", strength=0.5, tau=0.0).edits[0]
    assert weaker.strength == 0.5 and weaker.tau == 0.0
    assert weaker.channels_changed == editor.models.generator.layout.conv_total  # τ 0: all kept
    assert not np.array_equal(_pixels(weaker.image), _pixels(first.images[0]))


# --- inputs of any size -------------------------------------------------------------------------


def test_inputs_of_any_size_are_fitted_and_say_how(tiny_run, editor):
    _, _, photos = tiny_run
    wide = Image.open(photos / "b.png")
    array = np.asarray(Image.open(photos / "a.png").convert("RGB").resize((30, 50)))
    result = editor.edit(
        [photos / "a.png", wide, photos / "c.png", array, array.astype(np.float32) / 255],
        "a red shape",
    )
    assert not result.failures and "64x64" in result.requirements
    a, b, c, arr, floats = result.inputs
    assert a.done == "64x64: used as it is" and a.content_box == (0, 0, 1, 1)
    assert b.source == "<image 1>" and b.original_size == (120, 72) and b.size == (64, 64)
    assert b.done == (
        "120x72: resized to 64x38 (aspect ratio kept), padded to 64x64 with black "
        "bars (13 px top, 13 px bottom)"
    )
    assert b.content_box == (0, 13 / 64, 1, 51 / 64)
    assert c.original_size == (40, 90) and "28x64" in c.done and "18 px left, 18 px right" in c.done
    assert arr.original_size == floats.original_size == (30, 50) and arr.inversion_psnr > 10
    assert all(e.image.size == (64, 64) for e in result.edits)


def test_crop_and_none_policies_are_described():
    from flows.editor_inputs import what_was_done

    assert what_was_done((120, 72), 64, "center_crop") == (
        "120x72: cropped to its central 72x72 (48 px off the width), resized to 64x64",
        (0.0, 0.0, 1.0, 1.0),
    )
    assert what_was_done((256, 256), 64, "fit")[0] == "256x256: resized to 64x64"
    assert "kept as it is" in what_was_done((120, 72), 64, "none")[0]


def test_faces_are_aligned_first_with_ingest_align(tiny_run, tmp_path):
    """``ingest.align``: the Editor goes through the ingest stage's alignment (one implementation), says
    so, and an input whose face the landmark model cannot place fails alone."""
    from helpers_models import MarkerLandmarks, marker_face, save_torchscript

    from flows.editor import Editor

    _, overrides, _ = tiny_run
    landmarks = save_torchscript(MarkerLandmarks(), tmp_path / "landmarks.pt")
    editor = Editor.from_config(CONFIG, [*overrides, f"ingest.align.landmarks={landmarks}"])
    tilted = marker_face(30.0, size=(240, 180), at=(120.0, 70.0))
    result = editor.edit([tilted, marker_face(markers=False)], "a red shape")
    face, blank = result.inputs
    assert face.ok and face.done == "240x180: face aligned (ingest.align) to 64x64"
    assert face.size == (64, 64) and "face-aligned" in result.requirements
    assert "ingest.align.landmarks" in blank.error and "not finite" in blank.error
    assert [e.ok for e in result.edits] == [True, False]


# --- bad input: a clear error for its own edits, the rest edited ----------------------------------


@pytest.fixture(scope="module")
def mixed(tiny_run, editor, tmp_path_factory):
    """One call with a good image and every kind of bad one, good and bad prompts and methods."""
    _, _, photos = tiny_run
    bad = tmp_path_factory.mktemp("bad")
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    Image.new("RGB", (4, 4)).save(bad / "tiny.png")
    images = [
        photos / "a.png",
        bad / "corrupt.png",
        bad / "missing.png",
        bad / "tiny.png",
        np.zeros((5, 5, 7), np.uint8),
    ]
    prompts = ["a red shape", "", "a shape ->  ", LONG, 42]
    return editor.edit(
        images, prompts, method=["deltaedit", "warp_drive"], decoder=["generator", "oil_paint"]
    )


def _errors(result, **where) -> set[str | None]:
    return {e.error for e in result.edits if all(getattr(e, k) == v for k, v in where.items())}


def test_the_good_edit_goes_on_among_bad_inputs(mixed):
    good = [e for e in mixed.edits if e.ok]
    assert [(e.image_index, e.prompt_index, e.method, e.decoder) for e in good] == [
        (0, 0, "deltaedit", "generator")
    ]
    assert good[0].image.size == (64, 64) and good[0].channels_changed > 0
    assert len(mixed.edits) == 5 * 5 * 2 * 2


def test_unreadable_file(mixed):
    assert mixed.inputs[1].error.startswith("not a decodable image")
    assert _errors(mixed, image_index=1) == {mixed.inputs[1].error}
    assert mixed.inputs[2].error.startswith("cannot read input (FileNotFoundError")
    assert "cannot read input" in mixed.inputs[4].error and "(5, 5, 7)" in mixed.inputs[4].error


def test_image_too_small(mixed):
    assert mixed.inputs[3].error == "image too small: 4x4 (minimum side 8)"


def test_empty_prompt(mixed):
    for p in (1, 2):
        errors = _errors(
            mixed, image_index=0, prompt_index=p, method="deltaedit", decoder="generator"
        )
        assert len(errors) == 1 and errors.pop().startswith("empty prompt")


def test_prompt_too_long_for_the_text_encoder(mixed):
    (error,) = _errors(
        mixed, image_index=0, prompt_index=3, method="deltaedit", decoder="generator"
    )
    assert "tokens" in error and "context is 32" in error


def test_prompt_of_the_wrong_type(mixed):
    (error,) = _errors(mixed, image_index=0, prompt_index=4)
    assert error.startswith("a prompt must be 'source -> target'") and "42" in error


def test_unknown_method_and_decoder(mixed):
    assert _errors(mixed, image_index=0, prompt_index=0, method="warp_drive") == {
        "unknown method 'warp_drive': one of deltaedit, straightforward, styleclip_gd"
    }
    assert _errors(
        mixed, image_index=0, prompt_index=0, method="deltaedit", decoder="oil_paint"
    ) == {"unknown decoder 'oil_paint': one of generator, diffusion, diffusion_masked"}


def test_a_method_not_loaded_and_a_target_without_source(tiny_run, editor):
    _, _, photos = tiny_run
    result = editor.edit(photos / "a.png", "a red shape", method="straightforward")
    assert "was not loaded" in result.edits[0].error
    saved, editor.neutral_source = editor.neutral_source, None
    try:
        result = editor.edit(photos / "a.png", ["a red shape", "a shape -> a square"])
    finally:
        editor.neutral_source = saved
    assert "has no source text" in result.edits[0].error and result.edits[1].ok
    assert saved == "a shape"  # the prompts file's usual source


def test_missing_mapper_or_relevance_names_the_command(tiny_run, tmp_path):
    from flows.editor import Editor

    root, overrides, _ = tiny_run
    with pytest.raises(ConfigError, match=r"deltaedit run train-mapper.*deltaedit demo"):
        Editor.from_config(CONFIG, [*overrides, f"root={tmp_path}"])
    (tmp_path / "mapper").mkdir()
    (tmp_path / "mapper" / "mapper.safetensors").write_bytes(
        (root / "mapper" / "mapper.safetensors").read_bytes()
    )
    with pytest.raises(ConfigError, match=r"deltaedit run relevance.*deltaedit demo"):
        Editor.from_config(CONFIG, [*overrides, f"root={tmp_path}"])


def test_same_stems_get_told_apart_and_nothing_to_edit_is_fine(tiny_run, editor, tmp_path):
    from flows.editor_results import save_edits

    _, _, photos = tiny_run
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.png").write_bytes((photos / "b.png").read_bytes())
    result = editor.edit(
        [photos / "a.png", tmp_path / "x" / "a.png"], ["a red shape", "a red shape"]
    )
    names = sorted(p.name for p in save_edits(result, tmp_path / "out").values())
    assert names == [
        "a-2__a_red_shape-2__deltaedit.png",
        "a-2__a_red_shape__deltaedit.png",
        "a__a_red_shape-2__deltaedit.png",
        "a__a_red_shape__deltaedit.png",
    ]
    empty = editor.edit([], "a red shape")
    assert empty.edits == [] and save_edits(empty, tmp_path / "empty") == {}
    assert json.loads((tmp_path / "empty" / "edits.json").read_text())["edits"] == []


# --- the command line ---------------------------------------------------------------------------


def test_cli_writes_files_and_prints_where(tiny_run, tmp_path, capsys):
    from app.cli import main

    _, overrides, photos = tiny_run
    out = tmp_path / "out"
    rc = main(
        [
            "edit",
            str(photos / "a.png"),
            *overrides,
            str(photos / "b.png"),
            str(tmp_path / "nope.png"),
            "--prompt",
            "a red shape",
            "-p",
            "a shape -> a square",
            "--out",
            str(out),
            "-c",
            str(CONFIG),
            "--reconstruction",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 1  # one input failed; the others were written
    expected = {
        out / f"{stem}__{target}__deltaedit.png"
        for stem in ("a", "b")
        for target in ("a_red_shape", "a_square")
    }
    assert {p for p in out.glob("*__deltaedit.png")} == expected
    for path in expected:
        assert f"-> {path} (" in captured.out and Image.open(path).size == (64, 64)
    assert (out / "a__recon.png").exists() and "120x72: resized to 64x38" in captured.out
    assert "nope.png: cannot read input" in captured.err
    manifest = json.loads((out / "edits.json").read_text())
    assert len(manifest["edits"]) == 6 and manifest["inputs"][1]["original_size"] == [120, 72]
    assert sum(e["output"] is not None for e in manifest["edits"]) == 4
