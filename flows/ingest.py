"""Ingest flow: a catalog (folder, glob, s3:// prefix) → deterministic image shards with manifests."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import flow_config, worker_pool
from flows.stages import catalog_plan
from infra.config import ConfigError
from infra.runtime.orchestrate import run_stage
from infra.runtime.shards import select
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
    builder = IngestBuilder.from_config(cfg)  # checks ingest.align's landmark model first
    plan = catalog_plan(cfg, cfg.ingest.source, IMAGES, overwrite)
    with worker_pool(cfg) as pool:
        summary = run_stage(
            builder,
            select(plan, shards),
            cfg,
            redo_failed=redo_failed,
            overwrite=overwrite,
            pool=pool,
            plan=plan,
        )
    print(summary.line())
    return {IMAGES: summary.to_dict()}
