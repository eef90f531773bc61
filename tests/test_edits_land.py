"""Editing quality must not regress: on the committed toy zoo, a small run trained here by the real
stage processors (ingest, invert, embed, sample, relevance) and the real mapper training loop must
make DeltaEdit edits that land — each judged by the attribute oracle exactly as the evaluate stage
judges them — well above the rate at which the unedited image already shows the target.

The run is small (48 catalog images, 1024 generator samples, 2000 mapper steps; otherwise the toy config,
so the mapper's condition is the retrieved image-pair direction, checked against Δt itself),
so the bars sit below what `make demo` reaches; they fail when an edit stops landing, as colour,
background and position edits did before the toy generator carried them in its conv channels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_pipeline import run_directly

from flows.edit_analysis import analyze_edits
from flows.relevance import relevance_shards
from infra.config import load_config
from infra.runtime.shards import plan_shards
from infra.runtime.upstream import plan_downstream
from infra.storage.catalog import list_catalog
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from models.toy.catalog import render_catalog
from tasks.embed import EmbedBuilder
from tasks.ingest import IngestBuilder
from tasks.invert import InvertBuilder
from tasks.layout import mapper_dir
from tasks.relevance import RelevanceBuilder
from tasks.sample import SampleBuilder, sample_items
from tasks.train.mapper import fit
from tasks.train.mapper_data import build_row_cache

REPO = Path(__file__).resolve().parents[1]
PROMPTS = """
- {id: red, source: a shape, target: a red shape}
- {id: yellow, source: a shape, target: a yellow shape}
- {id: circle, source: a shape, target: a circle}
- {id: large, source: a shape, target: a large shape}
- {id: black-bg, source: a shape, target: a shape on a black background}
- {id: left, source: a shape, target: a shape on the left}
- {id: medium, source: a shape, target: a medium shape}
"""
MARGIN = 0.4  # edit accuracy above the unedited rate
MIN_PRESERVATION = 0.85


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> dict:
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("edits_land")
    render_catalog(str(base / "catalog"), 48, seed=5)
    (base / "prompts.yaml").write_text(PROMPTS)
    root = str(base / "run")
    cfg = load_config(
        REPO / "configs" / "toy.yaml",
        [
            f"root={root}",
            f"ingest.source={base / 'catalog'}",
            "device=cpu",
            *(
                f"{k}={REPO / v}"
                for k, v in (
                    ("models.generator.checkpoint", "zoo/toy/generator.safetensors"),
                    ("models.encoder.checkpoint", "zoo/toy/encoder.safetensors"),
                    ("models.clip.checkpoint", "zoo/toy/clip.safetensors"),
                    ("evaluate.oracle", "zoo/toy/oracle.safetensors"),
                )
            ),
            "relevance.block_size=720",
            "train_mapper.steps=2000",
            "train_mapper.val_every=1000",
            "train_mapper.checkpoint_every=2000",
            f"bulk_edit.prompts={base / 'prompts.yaml'}",
            "bulk_edit.decoder=[generator]",  # DeltaEdit-G's edits (D's: test_edit_analysis.py)
        ],
    )
    stores = Location(root)
    run_directly(IngestBuilder(cfg.ingest), plan_shards(list_catalog(cfg.ingest.source), 48), root)
    run_directly(
        InvertBuilder.from_config(cfg), plan_downstream(StageStore(stores, "images")), root
    )
    run_directly(
        EmbedBuilder.from_config(cfg, "images"), plan_downstream(StageStore(stores, "images")), root
    )
    run_directly(
        SampleBuilder.from_config(cfg), plan_shards(sample_items(1024, cfg.seed), 512), root
    )
    run_directly(
        EmbedBuilder.from_config(cfg, "samples"),
        plan_downstream(StageStore(stores, "samples")),
        root,
    )
    run_directly(RelevanceBuilder.from_config(cfg), relevance_shards(cfg), root)
    cache = build_row_cache(stores, base / "cache", val_fraction=cfg.train_mapper.val_fraction)
    fit(cfg.train_mapper, cfg.seed, cache, stores.child(mapper_dir("delta")), log=lambda _: None)

    def variant(**bulk_edit) -> object:
        return cfg.model_copy(update={"bulk_edit": cfg.bulk_edit.model_copy(update=bulk_edit)})

    return {
        "retrieved": analyze_edits(cfg, "test", n_images=48, n_samples=0, counterfactuals="none"),
        "text_mask": analyze_edits(
            variant(mask="text"), "test", n_images=48, n_samples=0, counterfactuals="none"
        ),
        "text": analyze_edits(
            variant(condition="text", mask="text"), "test", n_images=48, n_samples=32
        ),
    }


def _accuracy(result: dict) -> dict[str, float]:
    return {r["variant"]: r["tau_run"]["edit_accuracy"] for r in result["prompts"]}


def test_the_retrieved_condition_lands_what_the_text_condition_misses(analysis):
    """Δt itself (the paper's condition) leaves "a red shape" near the unedited rate on the toy CLIP
    (measured 0.33; text 'red' also points away from yellow, docs/text-condition.md); the mean of the
    image-pair directions it points along lands it (0.90), and no prompt gets worse."""
    retrieved, text = _accuracy(analysis["retrieved"]), _accuracy(analysis["text"])
    gains = {k: retrieved[k] - text[k] for k in text}
    assert gains["red"] >= 0.3, gains
    assert sum(gains.values()) / len(gains) >= 0.1, gains
    assert min(gains.values()) >= -0.05, gains


def test_the_image_mask_lands_what_the_text_mask_drops(analysis):
    """Rₛ·Δt keeps one set of channels for every image; "a medium shape" needs the small ↔ large axis,
    nearly orthogonal to its Δt (docs/relevance.md, "Per-image mask"). Adding per image the channels its
    retrieved direction needs lands it (measured here: medium +0.50, circle +0.17, the others within 3 of
    48 images) and costs no prompt its preservation."""
    image = {r["variant"]: r["tau_run"] for r in analysis["retrieved"]["prompts"]}
    text = {r["variant"]: r["tau_run"] for r in analysis["text_mask"]["prompts"]}
    gains = {k: image[k]["edit_accuracy"] - text[k]["edit_accuracy"] for k in text}
    kept = {k: image[k]["preservation"] - text[k]["preservation"] for k in text}
    assert gains["medium"] >= 0.3 and gains["circle"] >= 0.1, gains
    assert min(gains.values()) >= -0.1, gains  # 48 images: one image is 0.02
    assert min(kept.values()) >= -0.03, kept


def test_the_analysis_says_colour_edits_are_lost_between_text_and_image(analysis):
    """Given each counterfactual's own image direction the mapper lands colour edits better than given
    Δt (measured here: red 0.72 against 0.47, yellow 0.84 against 0.63), and lands size, background and
    position: `analyze edits` must tell the two apart (its analysis_condition table)."""
    rows = {c["variant"]: c for c in analysis["text"]["condition"]}
    gaps = [rows[v]["image_direction"] - rows[v]["condition"] for v in ("red", "yellow")]
    assert min(gaps) >= 0.1 and sum(gaps) / 2 >= 0.15, rows
    assert all(rows[v]["image_direction"] >= 0.9 for v in ("large", "black-bg", "left")), rows
    assert all(-1 < r["cos_dt_di"] < 0.9 for r in rows.values()), rows


def test_deltaedit_edits_land_on_colour_shape_size_background_and_position(analysis):
    rows = {r["variant"]: r for r in analysis["retrieved"]["prompts"]}
    landed = {}
    for name, row in rows.items():
        run = row["tau_run"]
        landed[name] = run["edit_accuracy"] - row["unedited"]
        assert run["preservation"] >= MIN_PRESERVATION, (name, run)
    attributes = {next(iter(rows[n]["expected"])) for n, gain in landed.items() if gain >= MARGIN}
    assert len(attributes) >= 3, landed
    assert {"shape_color", "position"} <= attributes, landed  # the two the old generator lost
