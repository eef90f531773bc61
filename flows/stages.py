"""Stage runs that several flows share (not a flow itself): a catalog's ingest → invert → embed, used by
preprocess for the run's catalog and by bulk-edit for a ``bulk_edit.catalog``."""

from __future__ import annotations

from typing import Any

from infra.config import RunConfig
from infra.runtime.orchestrate import StageSummary, run_stage
from infra.runtime.shards import plan_shards, select
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
    ``stages.clip``."""
    items = list_catalog(source, cfg.storage_options)
    ingest = run_stage(
        IngestBuilder.from_config(cfg, stages.images),
        select(plan_shards(items, cfg.ingest.shard_size), shards),
        cfg,
        **opts,
    )
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
    """Run ``builder`` over the finished shards of ``upstream`` (or those of them in ``shards``)."""
    store = StageStore(Location(cfg.root, cfg.storage_options), upstream)
    return run_stage(builder, plan_downstream(store, shards), cfg, **opts)
