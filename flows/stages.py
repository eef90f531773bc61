"""Stage runs that several flows share (not a flow itself): a catalog's ingest → invert → embed, used by
preprocess for the run's catalog and by bulk-edit for a ``bulk_edit.catalog``."""

from __future__ import annotations

from typing import Any

from infra.config import RunConfig
from infra.runtime.orchestrate import StageSummary, run_stage
from infra.runtime.shards import ShardSpec, plan_shards, select
from infra.runtime.stage import StageBuilder
from infra.runtime.upstream import plan_downstream
from infra.storage.catalog import list_catalog
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from tasks.embed import EmbedBuilder
from tasks.ingest import IngestBuilder
from tasks.invert import InvertBuilder
from tasks.layout import Stages


def catalog_stages(
    cfg: RunConfig,
    source: str,
    shards: list[str] | None,
    opts: dict[str, Any],
    stages: Stages = Stages.of(),
) -> list[StageSummary]:
    """Ingest ``source`` into ``stages.images``, invert it into ``stages.codes`` and CLIP-embed it into
    ``stages.clip``. Files already ingested keep their shard; new ones go to new shards
    (``catalog_plan``), so a grown catalog costs only its new files in every stage."""
    builder = IngestBuilder.from_config(cfg, stages.images)  # checks ingest.align's model first
    plan = catalog_plan(cfg, source, stages.images, opts.get("overwrite", False))
    ingest = run_stage(builder, select(plan, shards), cfg, plan=plan, **opts)
    return [
        ingest,
        downstream(
            InvertBuilder.from_config(cfg, stages.images, stages.codes),
            stages.images,
            cfg,
            shards,
            opts,
        ),
        downstream(EmbedBuilder.from_config(cfg, stages.images), stages.images, cfg, shards, opts),
    ]


def downstream(
    builder: StageBuilder,
    upstream: str,
    cfg: RunConfig,
    shards: list[str] | None,
    opts: dict[str, Any],
) -> StageSummary:
    """Run ``builder`` over the current finished shards of ``upstream`` (or those of them in
    ``shards``)."""
    store = StageStore(Location(cfg.root, cfg.storage_options), upstream)
    plan = plan_downstream(store)
    wanted = set(shards or [])
    specs = [s for s in plan if s.shard_id in wanted] if shards else plan
    return run_stage(builder, specs, cfg, plan=plan, **opts)


def catalog_plan(cfg: RunConfig, source: str, stage: str, overwrite: bool) -> list[ShardSpec]:
    """The ingest shards of a catalog: each file already in a finished shard of ``stage`` stays there,
    new files are cut into new shards (``plan_shards(previous=...)``); ``overwrite``: from scratch."""
    store = StageStore(Location(cfg.root, cfg.storage_options), stage)
    previous = None if overwrite else store.assignment()
    return plan_shards(list_catalog(source, cfg.storage_options), cfg.ingest.shard_size, previous)
