"""Incremental runs (#25): new inputs cost only their own work, unchanged items' outputs are copied into
rewritten shards byte for byte, and outputs of removed inputs are stale (never read, listed, pruned)."""

from __future__ import annotations

import pytest
from helpers_pipeline import tiny_zoo
from helpers_store import FlakyProcessor, items, png_bytes

from flows.stages import catalog_plan
from infra.config import load_config
from infra.runtime.shards import Item, ShardSpec, plan_shards
from infra.runtime.stage import execute_shard, open_store
from infra.runtime.upstream import plan_downstream
from tasks.embed import EmbedBuilder
from tasks.ingest import IngestBuilder
from tasks.invert import InvertBuilder
from tasks.layout import CODES, IMAGES, clip_stage


@pytest.fixture(scope="module")
def zoo_overrides(tmp_path_factory) -> list[str]:
    return tiny_zoo(tmp_path_factory.mktemp("zoo"))


def _catalog(folder, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        (folder / f"{name}.png").write_bytes(png_bytes(n, 24))


def _run(builder, plan, root: str) -> int:
    """What run_stage does for one stage, in this process: record the plan, run every shard; returns
    the samples processed."""
    store = open_store(root, {}, builder.stage)
    code_fp = builder.fingerprint()
    store.set_current(plan, code_fp)
    proc = builder.build()
    return sum(execute_shard(proc, spec, store, code_fp).processed for spec in plan)


def _preprocess(cfg, source: str) -> dict[str, int]:
    """ingest → invert, embed (the catalog stages of preprocess) run here; samples processed per stage."""
    root = cfg.root
    ingest = _run(IngestBuilder.from_config(cfg), catalog_plan(cfg, source, IMAGES, False), root)
    images = open_store(root, {}, IMAGES)
    return {
        IMAGES: ingest,
        CODES: _run(InvertBuilder.from_config(cfg), plan_downstream(images), root),
        clip_stage(IMAGES): _run(
            EmbedBuilder.from_config(cfg, IMAGES), plan_downstream(images), root
        ),
    }


def _keys(root: str, stage: str) -> list[str]:
    store = open_store(root, {}, stage)
    return [k for s in store.finished() for k in store.manifest(s).column("key").to_pylist()]


def test_new_files_cost_only_their_own_work_and_removed_ones_go_stale(tmp_path, zoo_overrides):
    """200 files, then 20 more (every 11th name in sorted order), then 10 % removed."""
    catalog = tmp_path / "catalog"
    old = [f"img_{i:03d}" for i in range(200)]
    _catalog(catalog, old)
    cfg = load_config(
        None,
        [
            f"root={tmp_path / 'run'}",
            "ingest.shard_size=16",
            "ingest.image_size=32",
            "device=cpu",
            *zoo_overrides,
        ],
    )
    first = _preprocess(cfg, str(catalog))
    assert first == {IMAGES: 200, CODES: 200, clip_stage(IMAGES): 200}
    before = {n: (catalog / f"{n}.png").read_bytes() for n in old}
    images_store = open_store(cfg.root, {}, IMAGES)
    tar_before = {s: images_store.loc.read_bytes(f"{s}.tar") for s in images_store.finished()}

    new = [f"img_{i:03d}a" for i in range(0, 200, 10)]  # each sorts right after an old name
    for n, name in enumerate(new):
        (catalog / f"{name}.png").write_bytes(png_bytes(1000 + n, 24))
    second = _preprocess(cfg, str(catalog))
    total = len(old) + len(new)
    print("\n10 % new files, samples re-processed per stage:")
    for stage, processed in second.items():
        print(f"  {stage:12s} {processed:4d} / {total} = {processed / total:.1%}")
        assert processed <= 0.15 * total
    assert second == {IMAGES: 20, CODES: 20, clip_stage(IMAGES): 20}
    assert all(images_store.loc.read_bytes(f"{s}.tar") == b for s, b in tar_before.items())
    for stage in second:
        assert len(_keys(cfg.root, stage)) == total
    assert before == {n: (catalog / f"{n}.png").read_bytes() for n in old}

    removed = old[::10]
    for name in removed:
        (catalog / f"{name}.png").unlink()
    third = _preprocess(cfg, str(catalog))
    print(f"10 % removed, samples re-processed per stage: {third}")
    assert third == {IMAGES: 0, CODES: 0, clip_stage(IMAGES): 0}  # rewritten shards copy the rest
    gone = {k for k in _keys(cfg.root, IMAGES) if k.startswith(tuple(f"{n}_" for n in removed))}
    assert not gone
    for stage in third:
        assert len(_keys(cfg.root, stage)) == total - len(removed)


def test_a_rewritten_shard_reuses_unchanged_items_byte_for_byte(tmp_path):
    class Reusing(FlakyProcessor):
        reuse_items = True

    store = open_store(str(tmp_path / "run"), {}, "images")
    spec = plan_shards(items(6), 6)[0]
    proc = Reusing(fail={"k002"})
    execute_shard(proc, spec, store, "c")
    proc.fail.clear()
    grown = ShardSpec(spec.shard_id, (*spec.items[1:], Item("k010", "mem://10")))
    proc.calls.clear()
    report = execute_shard(proc, grown, store, "c")
    assert proc.calls == [["k010"]]  # k000 gone, k002 failed before and stays failed (no redo)
    assert report.processed == 1
    assert report.counts == {"seen": 1, "ok": 5, "failed": 1, "reused": 5}
    clean = open_store(str(tmp_path / "clean"), {}, "images")
    execute_shard(Reusing(fail={"k002"}), grown, clean, "c")
    assert store.loc.read_bytes("00000.tar") == clean.loc.read_bytes("00000.tar")
    assert store.manifest("00000").equals(clean.manifest("00000"))
    assert store.vectors("00000").equals(clean.vectors("00000"))
    # redo_failed on a changed shard reruns the failed one too, reusing the rest
    again = ShardSpec(spec.shard_id, grown.items[:-1])
    report = execute_shard(proc, again, store, "c", redo_failed=True)
    assert proc.calls[-1] == ["k002"] and report.counts["reused"] == 4
    # another code fingerprint reuses nothing
    assert execute_shard(proc, grown, store, "d").processed == len(grown.items)


def test_new_keys_keep_old_shards_and_a_crashed_plan_is_planned_again():
    first = plan_shards(items(10), 4)
    assert [len(s.items) for s in first] == [4, 4, 2]
    previous = {i.key: s.shard_id for s in first for i in s.items}
    grown = items(10) + [Item(f"k{i:03d}b", "x") for i in range(9)]
    plan = plan_shards(grown, 4, previous)
    assert [s.fingerprint for s in plan[:3]] == [s.fingerprint for s in first]
    assert [(s.shard_id, len(s.items)) for s in plan[3:]] == [
        ("00003", 4),
        ("00004", 4),
        ("00005", 1),
    ]
    # a crash after 00004 finished (not 00003): the rerun plans the same shards
    done = {**previous, **{i.key: "00004" for i in plan[4].items}}
    assert plan_shards(grown, 4, done) == plan
    # a key whose shard is gone from the catalog: that shard shrinks, the others keep their inputs
    shrunk = [i for i in grown if i.key != "k005"]
    again = plan_shards(shrunk, 4, {i.key: s.shard_id for s in plan for i in s.items})
    assert [s.shard_id for s in again] == [s.shard_id for s in plan]
    assert [s.fingerprint == t.fingerprint for s, t in zip(again, plan)] == [
        True,
        False,
        True,
        True,
        True,
        True,
    ]


PROMPTS = [f"- {{id: p{n}, source: a shape, target: a shape {n}}}" for n in range(12)]


def _edit(cfg_overrides: list[str], prompts: list[str], path) -> tuple[int, dict[str, bytes]]:
    """bulk-edit's edit stage run here: (edits processed, key → PNG bytes of the current shards)."""
    from tasks.edit.plan import edit_builder, edit_variants, planned_edits

    path.write_text("\n".join(prompts) + "\n")
    cfg = load_config(None, [*cfg_overrides, f"bulk_edit.prompts={path}"])
    variants = edit_variants(cfg, "test")
    builder = edit_builder(cfg, "test", variants)
    processed = _run(builder, planned_edits(cfg, variants, builder), cfg.root)
    edits = open_store(cfg.root, {}, "edits")
    images = {}
    for shard in edits.finished():
        for record in edits.records(shard):
            images[record.key] = record.image
    return processed, images


def test_a_new_prompt_or_method_computes_only_its_own_edits(tmp_path, zoo_overrides):
    from helpers_pipeline import tiny_mappers

    catalog = tmp_path / "catalog"
    names = [f"img_{i:02d}" for i in range(20)]
    _catalog(catalog, names)
    base = [
        f"root={tmp_path / 'run'}",
        "ingest.shard_size=8",
        "ingest.image_size=32",
        "device=cpu",
        "bulk_edit.tau=0",
        "bulk_edit.templates=none",
        "bulk_edit.images_per_shard=4",
        *zoo_overrides,
        *tiny_mappers(tmp_path),
    ]
    cfg = load_config(None, base)
    _preprocess(cfg, str(catalog))
    prompts = tmp_path / "prompts.yaml"
    one = [*base, "bulk_edit.methods=[deltaedit]"]
    processed, first = _edit(one, PROMPTS[:11], prompts)
    assert processed == len(first) == 20 * (1 + 11)

    processed, second = _edit(one, PROMPTS, prompts)
    print(f"\none prompt added to 11: {processed} of {len(second)} edits computed")
    assert processed == 20 and len(second) == 20 * (1 + 12)
    assert {k: second[k] for k in first} == first  # every other edit byte-identical
    assert all("__p11__" in k for k in set(second) - set(first))

    two = [*base, "bulk_edit.methods=[deltaedit, straightforward]"]
    processed, third = _edit(two, PROMPTS, prompts)
    print(f"a method added: {processed} of {len(third)} edits computed")
    assert processed == 20 * 12 and {k: third[k] for k in second} == second

    removed = names[::10]
    for name in removed:
        (catalog / f"{name}.png").unlink()
    _preprocess(cfg, str(catalog))
    processed, fourth = _edit(two, PROMPTS, prompts)
    print(f"10 % of the files removed: {processed} edits computed")
    assert processed == 0
    assert not {k for k in fourth if k.startswith(tuple(f"{n}_" for n in removed))}
    assert len(fourth) == 18 * (1 + 2 * 12)
    assert {k: third[k] for k in fourth} == fourth


@pytest.mark.usefixtures("prefect_harness", "ray_cluster")
def test_the_ingest_flow_plans_new_files_apart_and_store_prune_deletes_stale_shards(
    tmp_path, capsys
):
    from app.cli import main
    from flows.ingest import ingest_flow
    from infra.storage.readers import iter_image_samples

    catalog = tmp_path / "catalog"
    _catalog(catalog, [f"img_{i:02d}" for i in range(12)])
    root = tmp_path / "run"
    overrides = [
        f"ingest.source={catalog}",
        f"root={root}",
        "ingest.shard_size=4",
        "ingest.image_size=16",
        "ray.actors=1",
        "prefect.retries=0",
    ]
    first = ingest_flow(None, overrides)["images"]
    assert (first["shards"], first["processed"], first["reused"]) == (3, 12, 0)
    (catalog / "img_00a.png").write_bytes(png_bytes(100, 24))
    (catalog / "img_05a.png").write_bytes(png_bytes(101, 24))
    second = ingest_flow(None, overrides)["images"]
    assert (second["shards"], second["ran"], second["processed"]) == (4, 1, 2)

    for n in (0, 1, 2, 3, 5):  # all of shard 00000 and one file of 00001
        (catalog / f"img_{n:02d}.png").unlink()
    third = ingest_flow(None, overrides)["images"]
    assert (third["shards"], third["ran"], third["processed"]) == (3, 1, 0)
    assert (third["seen"], third["reused"], third["ok"]) == (6, 3, 9)
    store = open_store(str(root), {}, IMAGES)
    assert store.stale() == ["00000"] and "00000" not in store.finished()
    assert len({s["__key__"] for s in iter_image_samples(store)}) == 9

    capsys.readouterr()
    assert main(["store", "ls", str(root)]) == 0
    assert "stale: 1 shards, 4 ok samples (00000)" in capsys.readouterr().out
    assert main(["store", "prune", str(root), "--dry-run"]) == 0
    assert "would delete 1 stale shards (00000)" in capsys.readouterr().out
    assert store.loc.exists("00000.tar")
    assert main(["store", "prune", str(root)]) == 0
    assert not [n for n in store.loc.listdir() if n.startswith("00000")]
    assert store.stale() == [] and len(store.finished()) == 3
    assert ingest_flow(None, overrides)["images"]["ran"] == 0
