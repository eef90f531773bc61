"""Ingest flow: a catalog (folder, glob, s3:// prefix) → deterministic image shards with manifests."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import flow_config, worker_pool
from infra.config import ConfigError
from infra.runtime.orchestrate import run_stage
from infra.runtime.shards import plan_shards, select
from infra.storage.catalog import list_catalog
from tasks.ingest import IngestBuilder
from tasks.layout import IMAGES


@flow(name="ingest", log_prints=True)
def ingest_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    redo_failed: bool = False,
    overwrite: bool = False,
    shards: list[str] | None = None,
) -> dict[str, Any]:
    """Decode, validate, normalise and shard every image of ``ingest.source`` into the images stage."""
    cfg = flow_config(config_path, overrides)
    if not cfg.ingest.source:
        raise ConfigError(
            f"{config_path or '<defaults>'}: field 'ingest.source' is required for ingest"
        )
    specs = select(
        plan_shards(list_catalog(cfg.ingest.source, cfg.storage_options), cfg.ingest.shard_size),
        shards,
    )
    with worker_pool(cfg) as pool:
        summary = run_stage(
            IngestBuilder.from_config(cfg),
            specs,
            cfg,
            redo_failed=redo_failed,
            overwrite=overwrite,
            pool=pool,
        )
    print(summary.line())
    return {IMAGES: summary.to_dict()}
