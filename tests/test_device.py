"""Every stage processor feeds its models on the models' device (CPU only, no GPU needed).

The processors are built with their models on PyTorch's ``meta`` device and given the same CPU inputs
(Parquet, tar) as on any other device. Mixing a meta tensor with a CPU tensor in one op raises the
error CUDA raises ("Tensor on device cpu is not on the expected device meta!"), so a processor that
forgets to move an input fails here as it would on a GPU. A correct processor runs every model on meta
and stops only where it copies its results back to the host (a meta tensor holds no data).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers_pipeline import run_directly, tiny_mappers, tiny_zoo
from helpers_store import make_catalog
from infra.catalog import list_catalog
from infra.config import RunConfig, load_config
from infra.fsio import Location
from infra.records import MemorySink
from infra.shards import ShardSpec, plan_shards
from infra.store import StageStore
from infra.upstream import plan_downstream

PROMPTS = "- {id: red, source: a shape, target: a red shape}\n"
METHODS = ["deltaedit", "straightforward", "styleclip_gd"]
MISMATCH = re.compile(r"not on the expected device|same device|Expected all tensors")
HOST_COPY = re.compile(r"meta tensor|meta device|no data")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> RunConfig:
    """A run whose stores (images, codes, CLIP embeddings, samples, Rₛ, edits) were written by the real
    processors on the CPU, in this process."""
    from flows.bulk_edit import edit_builder, planned_edits, edit_variants
    from flows.preprocess import _embed_builder, _invert_builder, _sample_builder
    from flows.relevance import relevance_builder, relevance_shards
    from tasks.ingest import IngestBuilder
    from tasks.sample import sample_items

    base = tmp_path_factory.mktemp("device")
    make_catalog(base / "catalog", 4)
    (base / "prompts.yaml").write_text(PROMPTS)
    root = str(base / "run")
    cfg = load_config(None, [
        f"root={root}", f"ingest.source={base / 'catalog'}", "ingest.shard_size=4", "ingest.image_size=32",
        "sample.n=2", "sample.batch_size=2", "device=cpu", "relevance.n_images=1",
        "relevance.n_stat_samples=64", "relevance.block_size=512", f"bulk_edit.prompts={base / 'prompts.yaml'}",
        f"bulk_edit.methods=[{', '.join(METHODS)}]", "bulk_edit.templates=none", "bulk_edit.tau=0.01",
        *tiny_zoo(base / "zoo"), *tiny_mappers(base / "zoo")])
    images = Location(root)
    run_directly(IngestBuilder(cfg.ingest), plan_shards(list_catalog(cfg.ingest.source), 4), root)
    for builder in (_invert_builder(cfg), _embed_builder(cfg, "images")):
        run_directly(builder, plan_downstream(StageStore(images, "images")), root)
    run_directly(_sample_builder(cfg), plan_shards(sample_items(2, cfg.seed), 2), root)
    run_directly(relevance_builder(cfg), relevance_shards(cfg), root)
    run_directly(edit_builder(cfg, "test"), planned_edits(cfg, edit_variants(cfg, "test")), root)
    return cfg


def _on_meta(builder: Any) -> Any:
    """The builder's processor with every model on the meta device."""
    return dataclasses.replace(builder, device="meta").build()


def _first(specs: list[ShardSpec]) -> ShardSpec:
    assert specs, "the tiny run has no shard for this stage"
    return specs[0]


def _stage(cfg: RunConfig, name: str) -> tuple[Any, ShardSpec]:
    """(builder, one of its shards) of a stage of the tiny run."""
    from flows.bulk_edit import edit_builder, edit_variants, planned_edits
    from flows.evaluate import metrics_builder
    from flows.preprocess import _embed_builder, _invert_builder, _sample_builder
    from flows.relevance import relevance_builder, relevance_shards
    from tasks.sample import sample_items

    images = plan_downstream(StageStore(Location(cfg.root), "images"))
    stages = {
        "invert": lambda: (_invert_builder(cfg), images),
        "embed": lambda: (_embed_builder(cfg, "images"), images),
        "sample": lambda: (_sample_builder(cfg), plan_shards(sample_items(2, cfg.seed), 2)),
        "relevance": lambda: (relevance_builder(cfg), relevance_shards(cfg)),
        "edit": lambda: (edit_builder(cfg, "test"), planned_edits(cfg, edit_variants(cfg, "test"))),
        "metrics": lambda: (metrics_builder(cfg, "test"),
                            plan_downstream(StageStore(Location(cfg.root), "edits"))),
    }
    builder, specs = stages[name]()
    return builder, _first(specs)


@pytest.mark.parametrize("stage", ["invert", "embed", "sample", "relevance", "edit", "metrics"])
def test_processor_runs_its_models_on_their_device(tiny_run, stage):
    """On meta, a processor gets as far as its first copy to the host; never a device mismatch."""
    builder, spec = _stage(tiny_run, stage)
    processor, sink = _on_meta(builder), MemorySink()
    with pytest.raises(Exception) as info:
        processor(spec, sink)
        # a stage that records a failed batch instead of raising (embed): its first failure's reason
        failures = [r.error for r in sink.by_key().values() if r.error]
        raise RuntimeError(failures[0] if failures else "the processor ran to the end on meta tensors")
    message = str(info.value)
    assert not MISMATCH.search(message), f"{stage} mixes devices: {message}"
    assert HOST_COPY.search(message), f"{stage} stopped for another reason: {message}"


def test_every_edit_method_and_the_render_stay_on_the_models_device(tiny_run):
    """The bulk-edit path end to end up to the PNG encoder: codes and embeddings read from Parquet,
    Δt from CLIP, each method's Δŝ, the relevance mask, σ, then G(ŝ) — all on the models' device."""
    from tasks.edit import _groups

    builder, spec = _stage(tiny_run, "edit")
    processor = _on_meta(builder)
    inputs = processor._inputs(spec)
    methods = set()
    for (method, variant), items in _groups(spec).items():
        rows = [inputs[i.meta["image"]] for i in items]
        conv, _ = processor._edit(method, variant, rows)
        rgb = torch.stack([r[1] for r in rows]).to(conv.device)
        image = processor.models.render(conv, rgb)
        assert conv.device.type == image.device.type == "meta", method
        methods.add(method)
    assert methods >= set(METHODS)


def test_cpu_edits_are_written(tiny_run):
    """The same run on the CPU: every edit of every method was rendered (the fixture ran it)."""
    store = StageStore(Location(tiny_run.root), "edits")
    rows = [r for s in store.finished() for r in store.manifest(s).to_pylist()]
    assert {r["method"] for r in rows} >= set(METHODS)
    assert rows and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_edits_match_the_cpu_edits(tiny_run):
    """The edit processor on CUDA writes the CPU's records: same keys, statuses and counts, pixels within
    a grey level on average (float32 without TF32; PNG rounding may flip a level)."""
    from helpers_models import exact_float32
    from infra.readers import decode_image

    builder, spec = _stage(tiny_run, "edit")
    records = {}
    for device in ("cpu", "cuda"):
        sink = MemorySink()
        with exact_float32():
            dataclasses.replace(builder, device=device).build()(spec, sink)
        records[device] = sink.by_key()
    cpu, cuda = records["cpu"], records["cuda"]
    assert list(cpu) == list(cuda)
    for key, rec in cpu.items():
        assert (rec.status, rec.error) == (cuda[key].status, cuda[key].error), key
        changed = rec.fields["channels_changed"], cuda[key].fields["channels_changed"]
        assert abs(changed[0] - changed[1]) <= max(1, changed[0] // 100), key   # |Rₛ·Δt| ≈ τ may flip
        diff = (decode_image(rec.image) - decode_image(cuda[key].image)).abs().mean() * 127.5
        assert diff < 1.0, (key, float(diff))
