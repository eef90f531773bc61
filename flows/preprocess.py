"""Preprocessing flow: ingest a catalog, invert it with e4e, sample the generator, CLIP-embed every image.

catalog ──ingest──► images ──invert──► codes
                      └─────embed───► clip_images
generator ──sample──► samples (images + codes) ──embed──► clip_samples
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import flow_config, worker_pool
from flows.stages import catalog_stages, downstream
from infra.config import ConfigError, RunConfig
from infra.runtime.orchestrate import StageSummary, run_stage
from infra.runtime.shards import plan_shards, select
from tasks.embed import EmbedBuilder
from tasks.ingest import load_aligner
from tasks.layout import SAMPLES
from tasks.sample import SampleBuilder, sample_items


@flow(name="preprocess", log_prints=True)
def preprocess_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    redo_failed: bool = False,
    overwrite: bool = False,
    shards: list[str] | None = None,
) -> dict[str, Any]:
    """Run every preprocessing stage the config asks for; finished shards are skipped."""
    cfg = flow_config(config_path, overrides)
    _require_models(cfg, config_path)
    with worker_pool(cfg) as pool:
        summaries = _run_stages(
            cfg, shards, {"redo_failed": redo_failed, "overwrite": overwrite, "pool": pool}
        )
    for s in summaries:
        print(s.line())
    return {s.stage: s.to_dict() for s in summaries}


def _run_stages(
    cfg: RunConfig, shards: list[str] | None, opts: dict[str, Any]
) -> list[StageSummary]:
    summaries: list[StageSummary] = []
    if cfg.ingest.source:
        summaries += catalog_stages(cfg, cfg.ingest.source, shards, opts)
    if cfg.sample.n:
        plan = plan_shards(sample_items(cfg.sample.n, cfg.seed), cfg.sample.shard_size)
        summaries.append(
            run_stage(SampleBuilder.from_config(cfg), select(plan, shards), cfg, plan=plan, **opts)
        )
        summaries.append(
            downstream(EmbedBuilder.from_config(cfg, SAMPLES), SAMPLES, cfg, shards, opts)
        )
    return summaries


def _require_models(cfg: RunConfig, where: str | None) -> None:
    missing = []
    if cfg.ingest.source and cfg.models.encoder is None:
        missing.append("models.encoder (to invert the catalog)")
    if (cfg.ingest.source or cfg.sample.n) and cfg.models.clip is None:
        missing.append("models.clip (to embed images)")
    if cfg.sample.n and cfg.models.generator is None:
        missing.append("models.generator (to sample)")
    if missing:
        raise ConfigError(f"{where or '<defaults>'}: preprocess needs " + ", ".join(missing))
    if cfg.ingest.source:
        load_aligner(cfg.ingest, cfg.storage_options)  # ingest.align's model, before Ray starts
