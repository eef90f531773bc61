"""Every stage processor feeds its models on the models' device (CPU only, no GPU needed).

The processors are built with their models on PyTorch's ``meta`` device and given the same CPU
inputs (Parquet, tar) as on any other device. Mixing a meta tensor with a CPU tensor in one op
raises the error CUDA raises ("Tensor on device cpu is not on the expected device meta!"), so a
processor that forgets to move an input fails here as it would on a GPU. A correct processor runs
every model on meta and stops only where it copies its results to the host (meta holds no data).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import torch
from helpers_models import TINY_G
from helpers_pipeline import run_directly, tiny_mappers, tiny_zoo
from helpers_store import make_catalog

from infra.config import RunConfig, load_config
from infra.runtime.shards import ShardSpec, plan_shards
from infra.runtime.upstream import plan_downstream
from infra.storage.catalog import list_catalog
from infra.storage.fsio import Location
from infra.storage.records import MemorySink
from infra.storage.store import StageStore
from models.layout import StyleLayout

PROMPTS = "- {id: red, source: a shape, target: a red shape}\n"
METHODS = ["deltaedit", "straightforward", "styleclip_gd"]
MISMATCH = re.compile(r"not on the expected device|same device|Expected all tensors")
HOST_COPY = re.compile(r"meta tensor|meta device|no data")


@dataclasses.dataclass(frozen=True)
class TinyRun:
    """A tiny run's stage builders (made here, not by flows/: no Prefect needed) and shards."""

    cfg: RunConfig
    builders: dict[str, Any]

    def shards(self, stage: str) -> list[ShardSpec]:
        from tasks.edit.processor import plan_edits
        from tasks.prompts import load_prompts, resolve_tau
        from tasks.relevance import channel_items
        from tasks.sample import sample_items

        cfg, root = self.cfg, Location(self.cfg.root)
        if stage == "ingest":
            return plan_shards(list_catalog(cfg.ingest.source), 4)
        if stage == "sample":
            return plan_shards(sample_items(2, cfg.seed), 2)
        if stage == "relevance":
            layout = StyleLayout.for_generator(TINY_G["size"], channels=TINY_G["channels"])
            return plan_shards(channel_items(layout.conv_total), cfg.relevance.block_size)
        if stage == "edit":
            variants = resolve_tau(load_prompts(cfg.bulk_edit.prompts), cfg.bulk_edit.tau)
            return plan_edits(StageStore(root, "codes"), variants, METHODS, cfg.bulk_edit)
        upstream = {"invert": "images", "embed": "images", "metrics": "edits"}[stage]
        return plan_downstream(StageStore(root, upstream))


def _builders(cfg: RunConfig) -> dict[str, Any]:
    """Every stage's builder, as the flows make them (device from the config)."""
    from tasks.edit.builder import EditBuilder
    from tasks.embed import EmbedBuilder
    from tasks.evaluate import MetricsBuilder
    from tasks.ingest import IngestBuilder
    from tasks.invert import InvertBuilder
    from tasks.relevance import RelevanceBuilder
    from tasks.sample import SampleBuilder

    m, r, dev = cfg.models, cfg.relevance, cfg.device
    mappers = (("deltaedit", m.mapper), ("straightforward", cfg.bulk_edit.straightforward_mapper))
    return {
        "ingest": IngestBuilder(cfg.ingest),
        "invert": InvertBuilder(m.encoder, m.generator, cfg.root, batch_size=2, device=dev),
        "embed": EmbedBuilder(m.clip, cfg.root, "images", batch_size=2, device=dev),
        "sample": SampleBuilder(m.generator, batch_size=2, device=dev),
        "relevance": RelevanceBuilder(
            m.generator, m.clip, n_images=r.n_images, n_stat_samples=r.n_stat_samples, device=dev
        ),
        "edit": EditBuilder(
            m.generator,
            m.clip,
            mappers,
            cfg.root,
            cfg.bulk_edit,
            "relevance_exact",
            n_stat_samples=r.n_stat_samples,
            device=dev,
        ),
        "metrics": MetricsBuilder(m.clip, cfg.root, cfg.evaluate, "none", device=dev),
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> TinyRun:
    """A run whose stores (images, codes, CLIP embeddings, samples, Rₛ, edits) were written by the
    real processors on the CPU, in this process."""
    base = tmp_path_factory.mktemp("device")
    make_catalog(base / "catalog", 4)
    (base / "prompts.yaml").write_text(PROMPTS)
    cfg = load_config(
        None,
        [
            f"root={base / 'run'}",
            f"ingest.source={base / 'catalog'}",
            "ingest.image_size=32",
            "device=cpu",
            "relevance.n_images=1",
            "relevance.n_stat_samples=64",
            "relevance.block_size=512",
            f"bulk_edit.prompts={base / 'prompts.yaml'}",
            f"bulk_edit.methods=[{', '.join(METHODS)}]",
            "bulk_edit.templates=none",
            "bulk_edit.tau=0.01",
            *tiny_zoo(base / "zoo"),
            *tiny_mappers(base / "zoo"),
        ],
    )
    run = TinyRun(cfg, _builders(cfg))
    for stage in ("ingest", "invert", "embed", "sample", "relevance", "edit"):
        run_directly(run.builders[stage], run.shards(stage), cfg.root)
    return run


def _on_meta(builder: Any) -> Any:
    """The builder's processor with every model on the meta device."""
    return dataclasses.replace(builder, device="meta").build()


def _stage(run: TinyRun, name: str) -> tuple[Any, ShardSpec]:
    """(builder, one of its shards) of a stage of the tiny run."""
    specs = run.shards(name)
    assert specs, f"the tiny run has no {name} shard"
    return run.builders[name], specs[0]


@pytest.mark.parametrize("stage", ["invert", "embed", "sample", "relevance", "edit", "metrics"])
def test_processor_runs_its_models_on_their_device(tiny_run, stage):
    """On meta, a processor gets as far as its first copy to the host; never a device mismatch."""
    builder, spec = _stage(tiny_run, stage)
    processor, sink = _on_meta(builder), MemorySink()
    with pytest.raises(Exception) as info:
        processor(spec, sink)
        # a stage that records a failed batch instead of raising (embed): its first failure's reason
        failures = [r.error for r in sink.by_key().values() if r.error]
        raise RuntimeError(failures[0] if failures else "the processor ran to the end on meta")
    message = str(info.value)
    assert not MISMATCH.search(message), f"{stage} mixes devices: {message}"
    assert HOST_COPY.search(message), f"{stage} stopped for another reason: {message}"


def test_every_edit_method_and_the_render_stay_on_the_models_device(tiny_run):
    """The bulk-edit path end to end up to the PNG encoder: codes and embeddings read from Parquet,
    Δt from CLIP, each method's Δŝ, the relevance mask, σ, then G(ŝ) — all on the models' device."""
    from tasks.edit.processor import _groups

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
    store = StageStore(Location(tiny_run.cfg.root), "edits")
    rows = [r for s in store.finished() for r in store.manifest(s).to_pylist()]
    assert {r["method"] for r in rows} >= set(METHODS)
    assert rows and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_edits_match_the_cpu_edits(tiny_run):
    """The edit processor on CUDA writes the CPU's records: same keys, statuses and counts, pixels
    within a grey level on average (float32 without TF32; PNG rounding may flip a level)."""
    from helpers_models import exact_float32

    from infra.storage.readers import decode_image

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
        # a channel with |Rₛ·Δt| ≈ τ may flip between devices
        assert abs(changed[0] - changed[1]) <= max(1, changed[0] // 100), key
        diff = (decode_image(rec.image) - decode_image(cuda[key].image)).abs().mean() * 127.5
        assert diff < 1.0, (key, float(diff))
