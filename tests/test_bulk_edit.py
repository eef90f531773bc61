"""Bulk edit: the prompts file, the edit directions, and the flow (Prefect + Ray) on a tiny prepared run —
counts, bad prompts, sweeps, a new catalog, missing inputs, and a real kill followed by a resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers_models import TINY_G
from helpers_pipeline import kill_after_first_shard, store_snapshot, tiny_zoo, write_config
from helpers_store import make_catalog

from infra.config import ConfigError
from infra.storage.fsio import Location
from infra.storage.readers import iter_image_samples
from infra.storage.store import StageStore
from models import edit_directions as ed
from models.layout import StyleLayout
from tasks.prompts import PromptFileError, expand, load_prompts

N_IMAGES = 8
ORACLE = Path(__file__).resolve().parents[1] / "zoo" / "toy" / "oracle.safetensors"
LAYOUT = StyleLayout.for_generator(TINY_G["size"], channels=TINY_G["channels"])
PROMPTS = """
- {id: red, source: a shape, target: a red shape}
- {id: big, source: a shape, target: a large shape, strengths: [0, 1, 2]}
- {id: both, combine: [red, big]}
- {id: mix, interpolate: [red, big], omegas: [0, 0.5, 1]}
- {id: empty, source: a shape, target: "  "}
- {id: long, source: a shape, target: "%s"}
- {id: accents, source: forme, target: "forme rouge ✓"}
""" % ("very " * 40 + "red shape")
METHODS = ["deltaedit", "straightforward", "styleclip_gd"]
VARIANTS = 1 + 3 + 1 + 3 + 1 + 1 + 1


def _overrides(root: Path, zoo: list[str], prompts: Path) -> list[str]:
    return [
        f"root={root}",
        f"ingest.source={root.parent / 'catalog'}",
        "ingest.shard_size=4",
        "ingest.image_size=32",
        "sample.n=0",
        "train_mapper.pools=[codes]",
        "ray.actors=2",
        "prefect.retries=0",
        "device=cpu",
        "relevance.n_images=1",
        "relevance.n_stat_samples=128",
        "relevance.block_size=128",
        "train_mapper.steps=4",
        "train_mapper.batch_size=4",
        "train_mapper.val_fraction=0.2",
        "train_mapper.val_every=2",
        "train_mapper.checkpoint_every=2",
        "train_mapper.val_pairs=8",
        f"bulk_edit.prompts={prompts}",
        f"bulk_edit.methods=[{', '.join(METHODS)}]",
        "bulk_edit.images_per_shard=3",
        "bulk_edit.tau=0.01",
        "bulk_edit.templates=none",
        *zoo,
    ]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, prefect_harness, ray_cluster) -> tuple[Path, list[str]]:
    """A run with codes, CLIP embeddings, Rₛ and both mappers, made by the real flows."""
    from flows.preprocess import preprocess_flow
    from flows.relevance import relevance_flow
    from flows.train_mapper import train_mapper_flow

    base = tmp_path_factory.mktemp("bulk")
    make_catalog(base / "catalog", N_IMAGES)
    (base / "prompts.yaml").write_text(PROMPTS)
    overrides = _overrides(base / "run", tiny_zoo(base / "zoo"), base / "prompts.yaml")
    preprocess_flow(None, overrides)
    relevance_flow(None, overrides)
    train_mapper_flow(None, overrides)
    train_mapper_flow(None, overrides + ["train_mapper.model=straightforward"])
    return base / "run", overrides


def _manifest(root: Path) -> list[dict]:
    store = StageStore(Location(str(root)), "edits")
    return pa.concat_tables([store.manifest(s) for s in sorted(store.finished())]).to_pylist()


def _images(root: Path) -> dict[str, bytes]:
    return {
        s["__key__"]: s["png"] for s in iter_image_samples(StageStore(Location(str(root)), "edits"))
    }


# --- the prompts file --------------------------------------------------------------------------------------


def test_prompts_expand_sweeps_combinations_and_interpolations(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PROMPTS)
    variants = load_prompts(str(path))
    assert len(variants) == VARIANTS
    by_id = {(v.prompt_id, v.suffix): v for v in variants}
    assert [by_id["big", f"s{k}"].strength for k in range(3)] == [0, 1, 2]
    assert by_id["both", ""].terms == (
        ("a shape", "a red shape", 1.0),
        ("a shape", "a large shape", 1.0),
    )
    half = by_id["mix", "w1"]
    assert half.omega == 0.5 and [t[2] for t in half.terms] == [0.5, 0.5]
    csv = tmp_path / "p.csv"
    csv.write_text("id,source,target,tau\nsmile,face,face with smile,0.05\n,face,old face,\n")
    rows = load_prompts(str(csv))
    assert [(v.prompt_id, v.tau) for v in rows] == [("smile", 0.05), ("p001", None)]


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"id": "a", "source": "x"}], "no target"),
        ([{"id": "a", "combine": ["b", "c"]}], "refers to 'b'"),
        ([{"id": "a", "source": "x", "target": "y", "tau": "high"}], "tau must be a number"),
        (
            [{"id": "a", "source": "x", "target": "y"}, {"id": "a", "source": "x", "target": "z"}],
            "appears twice",
        ),
        (["just text"], "not a mapping"),
    ],
)
def test_malformed_prompt_files_name_the_problem(entries, message):
    with pytest.raises(PromptFileError, match=message):
        expand(entries, "prompts.yaml")


def test_csv_without_target_column_is_rejected(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("source,text\nface,smile\n")
    with pytest.raises(PromptFileError, match="'source' and 'target'"):
        load_prompts(str(path))


def test_each_variant_is_planned_with_its_own_tau_else_the_runs():
    from tasks.prompts import resolve_tau

    variants = expand(
        [
            {"id": "a", "source": "x", "target": "y", "tau": 0.3},
            {"id": "b", "source": "x", "target": "z", "strengths": [1, 2]},
        ],
        "p.yaml",
    )
    assert [v.tau for v in resolve_tau(variants, 0.0)] == [0.3, 0.0, 0.0]
    assert [v.tau for v in resolve_tau(variants, 0.1)] == [0.3, 0.1, 0.1]


# --- the run layout --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("catalog", [False, True])
def test_builders_made_from_the_config_read_the_stages_the_layout_declares(catalog, tmp_path):
    from infra.config import load_config
    from tasks.edit.plan import edit_builder, input_stages
    from tasks.embed import EmbedBuilder
    from tasks.evaluate import MetricsBuilder
    from tasks.invert import InvertBuilder

    config = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    cfg = load_config(
        config,
        [
            f"root={tmp_path}",
            "bulk_edit.tau=0",
            "bulk_edit.methods=[deltaedit]",
            "bulk_edit.condition=text",
            "bulk_edit.mask=text",
            "models.mapper.name=delta_mapper",
        ]
        + (["bulk_edit.catalog=photos"] if catalog else []),
    )
    stages = input_stages(cfg)
    assert stages.edits == ("catalog_edits" if catalog else "edits")
    invert, embed = (
        InvertBuilder.from_config(cfg, stages.images, stages.codes),
        EmbedBuilder.from_config(cfg, stages.images),
    )
    edit, metrics = edit_builder(cfg, "toy.yaml"), MetricsBuilder.from_config(cfg, stages)
    assert {
        invert.stage: (invert.upstream_stage,),
        embed.stage: (embed.upstream_stage,),
        edit.stage: (edit.codes_stage, edit.clip_stage, edit.images_stage),
        metrics.stage: (metrics.images_stage, metrics.edits_stage),
    } == stages.reads()


def test_evaluate_without_a_recorded_plan_says_to_run_bulk_edit(tmp_path):
    from tasks.edit.plan import read_plan

    with pytest.raises(ConfigError, match="bulk-edit"):
        read_plan(StageStore(Location(str(tmp_path)), "edits"))


# --- edit directions -----------------------------------------------------------------------------------------


def test_relevance_threshold_and_global_direction_follow_their_definitions():
    relevance = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    dt = torch.tensor([0.1, 0.02])
    assert ed.relevance_mask(relevance, dt, 0.05).tolist() == [True, False, True]
    assert ed.relevance_mask(relevance, dt, 0.0).all()
    assert ed.relevance_mask(relevance, dt, 0.5, "normalized").tolist() == [
        True,
        False,
        True,
    ]  # 0.98, 0.2, 0.75
    assert ed.relevance_mask(relevance, dt * 100, 0.5, "normalized").tolist() == [True, False, True]
    # relative: r = 0.1, 0.02, 0.076 → within 0.5 / 0.9 of the largest
    assert ed.relevance_mask(relevance, dt, 0.5, "relative").tolist() == [True, False, True]
    assert ed.relevance_mask(relevance, dt * 1e-3, 0.9, "relative").tolist() == [True, False, False]
    with pytest.raises(ValueError, match="threshold rule"):
        ed.relevance_mask(relevance, dt, 0.5, "cosine")
    sigma = torch.tensor([2.0, 3.0, 4.0])
    step = ed.global_direction(relevance, dt, sigma, beta=0.3)
    r = relevance @ (dt / dt.norm())  # 0.98, 0.196, 0.78
    assert step[1] == 0  # |r| < β
    assert torch.allclose(step[[0, 2]], (r / r.abs().max() * sigma)[[0, 2]])


def test_retrieved_direction_averages_the_memory_steps_that_delta_t_points_along_best():
    memory = torch.nn.functional.normalize(
        torch.tensor(
            [
                [1.0, 0.0, 0.0],  # the image itself: never picked
                [0.8, 0.6, 0.0],  # a step along +y: what Δt asks for
                [0.6, 0.8, 0.0],  # also along +y, less aligned with Δt
                [0.8, 0.0, 0.6],  # along +z
                [0.0, -1.0, 0.0],  # away from +y
            ]
        ),
        dim=1,
    )
    image, dt = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0.1, 1.0, 0.3])
    unit = torch.nn.functional.normalize
    one = ed.retrieved_direction(memory, image, dt, k=1)[0]
    assert torch.allclose(
        one, unit(memory[1] - memory[0], dim=0), atol=1e-6
    )  # cos 0.87 beats 0.81, 0.24
    two = ed.retrieved_direction(memory, image, dt, k=2)[0]
    expected = (unit(memory[1] - memory[0], dim=0) + unit(memory[2] - memory[0], dim=0)) / 2
    assert torch.allclose(two, expected, atol=1e-6)
    batch = ed.retrieved_direction(memory, torch.stack([image[0], memory[4]]), dt, k=1)
    assert batch.shape == (2, 3) and not torch.allclose(batch[0], batch[1])  # per image
    with pytest.raises(ValueError, match="retrieve_k"):
        ed.retrieved_direction(memory, image, dt, k=6)


def test_the_image_mask_keeps_the_channels_a_value_between_others_needs():
    """Size on axis 0, "medium-ness" on axis 3, colour on axis 1. Δt for medium points along axis 3 only,
    so the Δt mask drops the size channel; small and large images reach medium along ∓ axis 0, and the
    image mask keeps the size channel for them (not the colour one their retrieved pairs also change)."""
    unit = torch.nn.functional.normalize
    memory = unit(
        torch.tensor(
            [
                [-1.0, -0.1, 1.0, 0.0],
                [-1.0, 0.1, 1.0, 0.0],  # small, two colours
                [0.0, 0.0, 1.0, 0.8],  # medium
                [1.0, -0.1, 1.0, 0.0],
                [1.0, 0.1, 1.0, 0.0],
            ]
        ),
        dim=1,
    )  # large
    dt = torch.tensor([0.0, 0.0, 0.0, 1.0])
    relevance = torch.eye(4)  # channel c moves the image along axis c
    assert ed.relevance_mask(relevance, dt, 0.3, "normalized").tolist() == [
        False,
        False,
        False,
        True,
    ]
    subspace = ed.prompt_subspace(memory, dt, k=1, rank=2)
    assert subspace.shape == (2, 4)
    assert torch.allclose(subspace @ subspace.T, torch.eye(2), atol=1e-5)
    small, large = memory[0], memory[4]
    directions = ed.retrieved_direction(memory, torch.stack([small, large]), dt, k=1)
    mask = ed.image_mask(relevance, directions, subspace, 0.3)
    assert mask[:, 0].all() and not mask[:, 1].any(), mask  # size kept, colour not
    assert not ed.image_mask(relevance, torch.tensor([[0.0, 1.0, 0.0, 0.0]]), subspace, 0.3).any()


def test_an_image_mask_without_retrieval_is_a_config_error():
    from infra.config import BulkEditConfig

    with pytest.raises(ValueError, match="condition: retrieved"):
        BulkEditConfig(mask="text+image")
    assert BulkEditConfig(mask="text+image", condition="retrieved").image_mask_rank == 2


# --- the flow --------------------------------------------------------------------------------------------------


def test_bulk_edit_writes_every_edit_and_bad_prompts_fail_alone(prepared):
    from flows.bulk_edit import bulk_edit_flow

    root, overrides = prepared
    summary = bulk_edit_flow(None, overrides)["edits"]
    per_image = 1 + VARIANTS * len(METHODS)
    assert summary["seen"] == N_IMAGES * per_image == summary["ok"] + summary["failed"]
    rows = _manifest(root)
    failed = {(r["prompt_id"], r["error"]) for r in rows if r["status"] == "failed"}
    assert {p for p, _ in failed} == {"empty", "long"}
    assert all("empty prompt" in e for p, e in failed if p == "empty")
    assert all(
        "context is 16" in e and "bulk_edit.long_prompts=truncate" in e
        for p, e in failed
        if p == "long"
    )
    assert summary["failed"] == N_IMAGES * 2 * len(METHODS)
    images = _images(root)
    assert len(images) == summary["ok"]
    key = rows[0]["image_key"]
    recon = images[f"{key}__recon"]
    assert images[f"{key}__big__s0__deltaedit"] == recon  # strength 0 = the reconstruction
    assert all(images[f"{key}__big__s2__{m}"] != recon for m in METHODS)
    accents = [r for r in rows if r["prompt_id"] == "accents"]
    assert accents and all(
        r["status"] == "ok" for r in accents
    )  # non-ASCII text is encoded as bytes
    edits = [
        r for r in rows if r["method"] == "deltaedit" and r["strength"] > 0 and r["status"] == "ok"
    ]
    assert all(0 < r["channels_changed"] <= LAYOUT.conv_total for r in edits)

    again = bulk_edit_flow(None, overrides)["edits"]
    assert again["ran"] == 0 and again["skipped"] == again["shards"]


@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_bulk_edit_ingests_and_inverts_a_new_catalog(prepared, tmp_path):
    from flows.bulk_edit import bulk_edit_flow

    root, overrides = prepared
    make_catalog(tmp_path / "new", 3, size=40)
    before = store_snapshot(root / "edits")
    result = bulk_edit_flow(
        None, overrides + [f"bulk_edit.catalog={tmp_path / 'new'}", "bulk_edit.methods=[deltaedit]"]
    )
    stages = ("catalog_images", "catalog_codes", "clip_catalog_images", "catalog_edits")
    assert [result[s]["ok"] for s in stages[:3]] == [3, 3, 3]
    assert result["catalog_edits"]["seen"] == 3 * (1 + VARIANTS)
    assert store_snapshot(root / "edits") == before  # the run's own edits are untouched


def test_missing_mapper_is_reported_before_any_work(prepared, tmp_path):
    from infra.config import load_config
    from tasks.edit.plan import edit_builder

    root, overrides = prepared
    cfg = load_config(None, overrides + [f"root={tmp_path / 'empty'}", "bulk_edit.tau=0"])
    with pytest.raises(ConfigError, match="train-mapper"):
        edit_builder(cfg, "test.yaml")


def test_retrieved_condition_searches_the_mappers_training_embeddings(prepared, tmp_path):
    from infra.config import load_config
    from tasks.edit.plan import edit_builder
    from tasks.prompts import EditVariant

    root, overrides = prepared
    variant = EditVariant("red", (("a shape", "a red shape", 1.0),), tau=0.01)
    cfg = load_config(
        None,
        overrides
        + [
            "bulk_edit.methods=[deltaedit]",
            "bulk_edit.condition=retrieved",
            "bulk_edit.retrieve_k=2",
        ],
    )
    builder = edit_builder(cfg, "test.yaml", [variant])
    assert builder.memory_stages == ("clip_images",)  # train_mapper.pools=[codes]
    processor = builder.build()
    assert processor.models.memory.shape[0] == N_IMAGES
    assert torch.allclose(processor.models.memory.norm(dim=1), torch.ones(N_IMAGES))
    text = edit_builder(
        load_config(None, overrides + ["bulk_edit.methods=[deltaedit]"]), "test.yaml"
    ).build()
    rows = list(processor._inputs(next(iter(_edit_specs(cfg)))).values())[:3]
    retrieved, _ = processor._edit("deltaedit", variant, rows)
    plain, _ = text._edit("deltaedit", variant, rows)
    assert retrieved.shape == plain.shape and not torch.allclose(retrieved, plain)
    assert (
        builder.fingerprint()
        != edit_builder(
            cfg.model_copy(
                update={"bulk_edit": cfg.bulk_edit.model_copy(update={"retrieve_k": 3})}
            ),
            "test.yaml",
        ).fingerprint()
    )
    with pytest.raises(ConfigError, match="condition=retrieved"):
        edit_builder(
            load_config(
                None, overrides + ["bulk_edit.condition=retrieved", "train_mapper.pools=[samples]"]
            ),
            "test.yaml",
        )


def test_retrieval_memory_leaves_out_the_catalogs_eval_part(prepared):
    """The images bulk-edit edits and evaluate measures (the split's eval part) are not in the memory the
    mapper's condition is retrieved from, as they are not in the mapper's training rows."""
    from infra.config import load_config
    from tasks.edit.memory import load_memory
    from tasks.edit.plan import edit_builder
    from tasks.split import in_eval

    root, overrides = prepared
    keys = [
        k
        for sid in sorted(StageStore(Location(str(root)), "clip_images").finished())
        for k in pq.read_table(root / "clip_images" / f"{sid}.parquet", columns=["key"])
        .column("key")
        .to_pylist()
    ]
    train = [k for k in keys if not in_eval(k, 0.5)]
    assert 2 < len(train) < len(keys)  # the split cuts this catalog
    retrieved = ["bulk_edit.methods=[deltaedit]", "bulk_edit.condition=retrieved"]
    split = load_config(None, overrides + retrieved + ["split.eval_fraction=0.5"])
    builder = edit_builder(split, "test.yaml")
    assert builder.eval_fraction == 0.5
    memory = load_memory(Location(str(root)), builder.memory_stages, 2, 1000, 0, 0.5)
    everything = load_memory(Location(str(root)), builder.memory_stages, 2, 1000, 0)
    assert (len(memory), len(everything)) == (len(train), len(keys))
    whole = edit_builder(load_config(None, overrides + retrieved), "test.yaml")
    assert builder.fingerprint() != whole.fingerprint()


def _edit_specs(cfg):
    from tasks.edit.plan import planned_edits

    return planned_edits(cfg, [])


def test_a_prompts_own_tau_needs_the_relevance_matrix_when_the_runs_tau_is_zero(prepared, tmp_path):
    from infra.config import load_config
    from tasks.edit.plan import edit_builder
    from tasks.prompts import EditVariant, resolve_tau

    root, overrides = prepared
    cfg = load_config(
        None,
        overrides + ["bulk_edit.tau=0", "bulk_edit.methods=[deltaedit]", "relevance.mode=fast"],
    )  # no such Rₛ in the prepared run
    terms = (("a shape", "a red shape", 1.0),)
    assert (
        edit_builder(
            cfg, "test.yaml", resolve_tau([EditVariant("red", terms)], 0.0)
        ).relevance_stage
        is None
    )
    with pytest.raises(ConfigError, match="relevance"):
        edit_builder(cfg, "test.yaml", [EditVariant("red", terms, tau=0.2)])


def test_a_prompts_own_tau_is_planned_applied_and_recorded_when_the_runs_tau_is_zero(
    prepared, tmp_path
):
    """τ is resolved once, when the edits are planned: the items carry it, Rₛ is loaded for it, the mask
    keeps fewer channels at it, and the manifest records it."""
    from infra.config import load_config
    from infra.storage.records import MemorySink
    from tasks.edit.plan import edit_builder, edit_variants, planned_edits

    root, overrides = prepared
    prompts = tmp_path / "tau.yaml"
    prompts.write_text(
        "- {id: plain, source: a shape, target: a red shape}\n"
        "- {id: own, source: a shape, target: a red shape, tau: 0.5}\n"
    )
    cfg = load_config(
        None,
        overrides
        + ["bulk_edit.tau=0", "bulk_edit.methods=[deltaedit]", f"bulk_edit.prompts={prompts}"],
    )
    variants = edit_variants(cfg, "test.yaml")
    assert [(v.prompt_id, v.tau) for v in variants] == [("plain", 0.0), ("own", 0.5)]
    spec = planned_edits(cfg, variants)[0]
    planned = {
        i.meta["variant"]["prompt_id"]: i.meta["variant"]["tau"]
        for i in spec.items
        if "variant" in i.meta
    }
    assert planned == {"plain": 0.0, "own": 0.5}
    builder = edit_builder(cfg, "test.yaml", variants)
    assert builder.relevance_stage == "relevance_exact"
    sink = MemorySink()
    builder.build()(spec, sink)
    rows = [r.fields for r in sink.records if r.fields["prompt_id"]]
    assert {(r["prompt_id"], r["tau"]) for r in rows} == {("plain", 0.0), ("own", 0.5)}
    changed = {
        p: sum(r["channels_changed"] for r in rows if r["prompt_id"] == p) for p in ("plain", "own")
    }
    assert changed["own"] < changed["plain"]


def _copies(
    root: Path, overrides: list[str], tmp_path: Path, names: tuple[str, ...]
) -> dict[str, Path]:
    """Copies of the prepared run without its edits, one config file each (one image per edits shard)."""
    configs = {}
    for name in names:
        shutil.copytree(
            root,
            tmp_path / name,
            ignore=shutil.ignore_patterns("edits", "metrics", "_prefect", "*catalog_*", "report"),
        )
        run = [o for o in overrides if not o.startswith("root=")] + [
            f"root={tmp_path / name}",
            "bulk_edit.images_per_shard=1",
        ]
        configs[name] = write_config(tmp_path / f"{name}.yaml", run)
    return configs


def _same_edits(tmp_path: Path, a: str, b: str) -> None:
    first, second = (store_snapshot(tmp_path / n / "edits") for n in (a, b))
    assert (
        first.keys() == second.keys() and len(first) == 3 * N_IMAGES
    )  # tar, manifest, marker per shard
    assert [k for k in first if first[k] != second[k]] == []


def test_interrupted_bulk_edit_resumes_to_the_same_store(prepared, tmp_path):
    """CI's small version of the kill test below: a run stopped after two shards, then resumed."""
    from flows.bulk_edit import bulk_edit_flow

    configs = _copies(*prepared, tmp_path, ("partial", "clean"))
    first = bulk_edit_flow(str(configs["partial"]), shards=["00000-000", "00001-001"])["edits"]
    assert first["ran"] == 2
    resumed = bulk_edit_flow(str(configs["partial"]))["edits"]
    assert (resumed["skipped"], resumed["ran"]) == (2, N_IMAGES - 2)
    bulk_edit_flow(str(configs["clean"]))
    _same_edits(tmp_path, "partial", "clean")


@pytest.mark.slow
def test_compiled_generator_makes_the_same_edits(prepared, tmp_path):
    """``bulk_edit.compile``: torch.compile'd decoding, padded batches, same items, records and pixels
    (~40 s, most of it compiling in a fresh actor; CI runs the compile path in tests/test_stylegan2.py)."""
    from flows.bulk_edit import bulk_edit_flow
    from infra.storage.readers import decode_image

    configs = _copies(*prepared, tmp_path, ("eager", "compiled"))
    shards = ["00000-000", "00001-001"]  # two images; one actor, so one compile
    bulk_edit_flow(str(configs["eager"]), shards=shards)
    compiled = bulk_edit_flow(
        str(configs["compiled"]), ["bulk_edit.compile=true", "ray.actors=1"], shards=shards
    )["edits"]
    assert (
        compiled["ran"] == len(shards) and compiled["seen"] == compiled["ok"] + compiled["failed"]
    )
    eager, fast = (pd.DataFrame(_manifest(tmp_path / n)) for n in ("eager", "compiled"))
    assert len(eager) > N_IMAGES and eager.equals(
        fast
    )  # same items, statuses, errors and fields (NaN = NaN)
    images = {n: _images(tmp_path / n) for n in ("eager", "compiled")}
    assert images["eager"].keys() == images["compiled"].keys() and len(images["eager"]) > N_IMAGES
    worst = max(
        (decode_image(images["eager"][k]) - decode_image(images["compiled"][k])).abs().max().item()
        for k in images["eager"]
    )
    assert worst <= 2 / 127.5  # ≤ 1 level of 255: float rounding only


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_bulk_edit_resumes_to_the_same_store(prepared, tmp_path):
    from flows.bulk_edit import bulk_edit_flow

    configs = _copies(*prepared, tmp_path, ("killed", "clean"))
    edits = tmp_path / "killed" / "edits"
    kill_after_first_shard(
        ["run", "bulk-edit", "--config", str(configs["killed"])], tmp_path, edits
    )
    done = len(list(edits.glob("*.done.json")))
    assert 0 < done < N_IMAGES

    resumed = bulk_edit_flow(str(configs["killed"]))["edits"]
    assert resumed["skipped"] >= done and resumed["ran"] + resumed["skipped"] == N_IMAGES
    bulk_edit_flow(str(configs["clean"]))
    _same_edits(tmp_path, "killed", "clean")


def test_evaluate_measures_every_edit_and_writes_the_report(prepared):
    from flows.bulk_edit import bulk_edit_flow
    from flows.evaluate import evaluate_flow
    from models.metrics import PSNR_CAP
    from tasks.reporting.evaluation import load_metrics

    root, overrides = prepared
    overrides = overrides + [f"evaluate.oracle={ORACLE}", "evaluate.grid_images=3"]
    edits = bulk_edit_flow(None, overrides)["edits"]
    result = evaluate_flow(None, overrides)
    assert result["metrics"]["seen"] == edits["ok"] == result["metrics"]["ok"]
    rows, feats, feats_in = load_metrics(StageStore(Location(str(root)), "metrics"))
    assert len(rows) == len(feats) == len(feats_in) == edits["ok"]
    unchanged = rows[(rows["variant"] == "big__s0") & (rows["method"] == "deltaedit")]
    assert (unchanged["psnr"] == PSNR_CAP).all() and (unchanged["clip_direction"] == 0).all()
    assert (unchanged["preservation"] == 1).all()
    assert (unchanged["edit_accuracy"] == unchanged["unedited_accuracy"]).all()
    recon = rows[rows["method"] == "reconstruction"]
    assert len(recon) == N_IMAGES and recon["psnr"].between(0, 60).all()  # G(E(x)) against x
    assert rows.loc[rows["method"] != "reconstruction", "clip_direction"].abs().gt(0).any()

    report = root / "report"
    html = (report / "index.html").read_text()
    assert (
        all(m in html for m in METHODS)
        and "forme rouge ✓" in html
        and "data:image/png;base64" in html
    )
    assert {p.name for p in report.glob("grid_*.png")} == {f"grid_{m}.png" for m in METHODS}
    import pandas as pd

    assert sorted(pd.read_parquet(report / "by_method.parquet")["method"]) == sorted(METHODS)
    assert evaluate_flow(None, overrides)["metrics"]["ran"] == 0
    # evaluate measures what bulk-edit recorded in the edits store, whatever the prompts file says now
    changed = root.parent / "changed.yaml"
    changed.write_text("- {id: other, source: a shape, target: a blue shape}\n")
    for prompts in (changed, root.parent / "removed.yaml"):
        again = evaluate_flow(None, overrides + [f"bulk_edit.prompts={prompts}"])["metrics"]
        assert (again["ran"], again["seen"], again["shards"]) == (
            0,
            result["metrics"]["seen"],
            result["metrics"]["shards"],
        )


def test_the_evaluate_report_reads_in_a_real_browser(prepared, tmp_path):
    """The report of a real run on tiny models as a person sees it, in headless Chromium at 1440 and
    1024 px: what a reader asks first (headline, then the grids, then per prompt), every image
    decoded, nothing wider than the window; screenshots under tmp_path."""
    from helpers_browser import check_report

    from flows.bulk_edit import bulk_edit_flow
    from flows.evaluate import evaluate_flow

    root, overrides = prepared
    overrides = overrides + [f"evaluate.oracle={ORACLE}", "evaluate.grid_images=3"]
    bulk_edit_flow(None, overrides)  # nothing to do after the test above: its shards are finished
    evaluate_flow(None, overrides)
    html = (root / "report" / "index.html").read_text()
    order = ["Did the edits land?", "<h2>Which method is best", "<h2>What the edits look like"]
    order += ["<h3>edit accuracy per prompt", "<h2>All numbers", "<details>", "<h2>Notes"]
    assert [html.index(s) for s in order] == sorted(html.index(s) for s in order)
    assert "unedited level" in html and html.count('<td class="best"') >= 3
    seen = check_report(root / "report" / "index.html", tmp_path)
    for page in seen.values():  # input and reconstruction of 3 images per method, then the edits
        assert len(page["images"]) > 2 * 3 * len(METHODS) and page["svgs"] == 2
    assert (tmp_path / "report_1440.png").exists() and (tmp_path / "report_1024_full.png").exists()


@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_diffusion_decoders_edit_next_to_the_generator_and_are_evaluated(prepared, tmp_path):
    """train-diffusion on the run's stores → bulk-edit with G, DeltaEdit-D and its mask-guided decode →
    evaluate: counts add up, every diffusion edit has its reconstruction, the report puts D next to G."""
    import pandas as pd

    from flows.bulk_edit import bulk_edit_flow
    from flows.evaluate import evaluate_flow
    from flows.train_diffusion import train_diffusion_flow
    from infra.config import load_config
    from tasks.edit.plan import edit_builder

    _copies(*prepared, tmp_path, ("d",))
    run = tmp_path / "d"
    base = [o for o in prepared[1] if not o.startswith("root=")] + [f"root={run}"]
    with pytest.raises(ConfigError, match="train-diffusion"):
        edit_builder(load_config(None, base + ["bulk_edit.decoder=diffusion"]), "test.yaml")
    tiny = {
        "steps": 4,
        "batch_size": 2,
        "pools": "[codes]",
        "val_fraction": 0.2,
        "val_every": 4,
        "lr": 0.01,
        "checkpoint_every": 4,
        "threads": 1,
        "model.base_channels": 8,
        "model.channel_mult": "[1,2]",
        "model.num_res_blocks": 1,
        "model.norm_groups": 4,
        "model.timesteps": 100,
        "model.render_condition": "true",  # the toy config's decoder: G(s) in, v out
        "model.prediction": "v",
    }
    train_diffusion_flow(None, base + [f"train_diffusion.{k}={v}" for k, v in tiny.items()])
    overrides = base + [
        "bulk_edit.decoder=[generator, diffusion, diffusion_masked]",
        "bulk_edit.diffusion.methods=[deltaedit]",
        "bulk_edit.diffusion.max_images=1",
        "bulk_edit.diffusion.steps=3",
        "bulk_edit.diffusion.refine=1",
        "bulk_edit.diffusion.edit_region=generator",  # the toy config's (the photo: the ffhq chain)
        f"evaluate.oracle={ORACLE}",
        "evaluate.grid_images=2",
    ]
    edits = bulk_edit_flow(None, overrides)["edits"]
    shards = -(-N_IMAGES // 2 // 3) * 2  # 2 codes shards of 4 images, 3 images per edits shard
    assert edits["seen"] == N_IMAGES * (1 + VARIANTS * 3) + shards * (1 + 2 * VARIANTS)
    assert edits["ok"] + edits["failed"] == edits["seen"]
    rows = _manifest(run)
    diffusion = [r for r in rows if r["decoder"] != "generator"]
    assert {r["decoder"] for r in diffusion} == {"diffusion", "diffusion_masked"}
    failed = {r["prompt_id"] for r in diffusion if r["status"] != "ok"}
    assert failed == {"empty", "long"}  # bad prompts fail for every decoder, nothing else
    images = _images(run)
    for r in (r for r in diffusion if r["status"] == "ok"):
        assert f"{r['image_key']}__recon__diffusion" in images and r["key"] in images
        if r["method"] == "deltaedit":  # scored against the masked twin's mask
            assert 0 <= r["mask_fraction"] <= 1 and r["psnr_outside_mask"] == r["psnr_outside_mask"]

    evaluate_flow(None, overrides)
    report = run / "report"
    by_method = pd.read_parquet(report / "by_method.parquet")
    assert {"deltaedit+diffusion", "deltaedit+diffusion_masked", "deltaedit"} <= set(
        by_method["method"]
    )
    assert by_method.set_index("method")["psnr_outside_mask"].notna().sum() == 2
    recon = pd.read_parquet(report / "reconstruction.parquet").set_index("decoder")
    assert list(recon.index) == ["diffusion", "generator"] and recon.loc["diffusion", "n"] == shards
    assert (report / "grid_deltaedit_diffusion_masked.png").exists()
    from tasks.reporting.evaluation import grids, load_metrics

    metrics, _, _ = load_metrics(StageStore(Location(str(run)), "metrics"))
    grid = grids(
        metrics,
        StageStore(Location(str(run)), "edits"),
        StageStore(Location(str(run)), "images"),
        N_IMAGES,
    )["deltaedit+diffusion"]
    assert len(grid.rows) == shards  # only the images it decoded, each with its
    assert all(
        cells[0].image and cells[1].image for _, cells in grid.rows
    )  # input and DDIM reconstruction
