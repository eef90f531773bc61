"""Preprocessing flow: ingest a catalog, invert it with e4e, sample the generator, CLIP-embed every image.

    catalog ──ingest──► images ──invert──► codes
                          └─────embed───► clip_images
    generator ──sample──► samples (images + codes) ──embed──► clip_samples
"""
from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import flow_config, worker_pool
from infra.storage.catalog import list_catalog
from infra.config import ConfigError, RunConfig
from infra.storage.fsio import Location
from infra.runtime.orchestrate import StageSummary, run_stage
from infra.runtime.shards import plan_shards, select
from infra.storage.store import StageStore
from infra.runtime.upstream import plan_downstream
from tasks.embed import EmbedBuilder
from tasks.ingest import IngestBuilder
from tasks.invert import InvertBuilder
from tasks.sample import SampleBuilder, sample_items


@flow(name="preprocess", log_prints=True)
def preprocess_flow(config_path: str | None = None, overrides: list[str] | None = None,
                    redo_failed: bool = False, overwrite: bool = False,
                    shards: list[str] | None = None) -> dict[str, Any]:
    """Run every preprocessing stage the config asks for; finished shards are skipped."""
    cfg = flow_config(config_path, overrides)
    _require_models(cfg, config_path)
    with worker_pool(cfg) as pool:
        summaries = _run_stages(cfg, shards, {"redo_failed": redo_failed, "overwrite": overwrite,
                                              "pool": pool})
    for s in summaries:
        print(s.line())
    return {s.stage: s.to_dict() for s in summaries}


def _run_stages(cfg: RunConfig, shards: list[str] | None, opts: dict[str, Any]) -> list[StageSummary]:
    summaries: list[StageSummary] = []
    if cfg.ingest.source:
        summaries += catalog_stages(cfg, cfg.ingest.source, shards, opts)
    if cfg.sample.n:
        sample = sample_builder(cfg)
        specs = select(plan_shards(sample_items(cfg.sample.n, cfg.seed), cfg.sample.shard_size), shards)
        summaries.append(run_stage(sample, specs, cfg, **opts))
        summaries.append(_downstream(embed_builder(cfg, "samples"), "samples", cfg, shards, opts))
    return summaries


def catalog_stages(cfg: RunConfig, source: str, shards: list[str] | None, opts: dict[str, Any],
                   images: str = "images", codes: str = "codes") -> list[StageSummary]:
    """Ingest ``source`` into ``images``, invert it into ``codes`` and CLIP-embed it into ``clip_<images>``."""
    items = list_catalog(source, cfg.storage_options)
    ingest = run_stage(IngestBuilder(cfg.ingest, cfg.storage_options, stage=images),
                       select(plan_shards(items, cfg.ingest.shard_size), shards), cfg, **opts)
    return [ingest, _downstream(invert_builder(cfg, images, codes), images, cfg, shards, opts),
            _downstream(embed_builder(cfg, images), images, cfg, shards, opts)]


def _downstream(builder: Any, upstream: str, cfg: RunConfig, shards: list[str] | None,
                opts: dict[str, Any]) -> StageSummary:
    store = StageStore(Location(cfg.root, cfg.storage_options), upstream)
    return run_stage(builder, plan_downstream(store, shards), cfg, **opts)


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


def sample_builder(cfg: RunConfig) -> SampleBuilder:
    s = cfg.sample
    return SampleBuilder(cfg.models.generator, cfg.storage_options, s.batch_size, s.truncation_psi,
                         s.image_format, cfg.device, cfg.ray.cpus_per_actor)


def invert_builder(cfg: RunConfig, images: str = "images", codes: str = "codes") -> InvertBuilder:
    return InvertBuilder(cfg.models.encoder, cfg.models.generator, cfg.root, cfg.storage_options,
                         cfg.invert.batch_size, cfg.invert.keep_wplus, cfg.device, cfg.ray.cpus_per_actor,
                         upstream_stage=images, stage=codes)


def embed_builder(cfg: RunConfig, upstream: str) -> EmbedBuilder:
    return EmbedBuilder(cfg.models.clip, cfg.root, upstream, cfg.storage_options, cfg.embed.batch_size,
                        cfg.device, cfg.ray.cpus_per_actor)
