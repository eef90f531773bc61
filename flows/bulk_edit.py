"""Bulk edit flow: `deltaedit run bulk-edit --config FILE bulk_edit.prompts=prompts.yaml`.

    codes + clip_images (the run's, or a new catalog's: ingest → invert → embed first)
        × prompt variants (tasks/prompts.py) × methods (deltaedit | straightforward | styleclip_gd)
        ──edit (Δt → Δŝ → Rₛ threshold τ → strength → decoder)──► edits (WebDataset + Parquet manifest)

Decoders (``bulk_edit.decoder``): the generator G(ŝ) (DeltaEdit-G) and/or the diffusion decoder, which
DDIM-encodes the photo under s and decodes under ŝ (DeltaEdit-D; ``diffusion_masked``: mask-guided).
Needs the mapper(s) of train-mapper, for the threshold and StyleCLIP-GD the relevance matrix, and for
DeltaEdit-D the model of train-diffusion (or ``models.diffusion``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from prefect import flow

from flows.common import flow_config, worker_pool
from flows.preprocess import catalog_stages
from flows.train_diffusion import OUT_DIR as DIFFUSION_DIR
from flows.train_mapper import mapper_dir
from infra.config import ConfigError, RunConfig
from infra.runtime.orchestrate import run_stage
from infra.runtime.shards import ShardSpec, select
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from models.zoo import ModelSpec
from tasks.edit import plan_edits
from tasks.edit_builder import EditBuilder
from tasks.edit_memory import memory_shards
from tasks.mapper_data import POOLS
from tasks.prompts import EditVariant, load_prompts
from tasks.relevance import load_relevance
from tasks.train_diffusion import FINAL as DIFFUSION_FILE

CATALOG = "catalog_"          # stage prefix of a bulk_edit.catalog's images, codes, edits and metrics
MAPPER_FILE = "mapper.safetensors"


@flow(name="bulk-edit", log_prints=True)
def bulk_edit_flow(config_path: str | None = None, overrides: list[str] | None = None,
                   redo_failed: bool = False, overwrite: bool = False,
                   shards: list[str] | None = None) -> dict[str, Any]:
    """Edit every image with every prompt and method; finished image groups are skipped."""
    cfg = flow_config(config_path, overrides)
    where = config_path or "<defaults>"
    variants = edit_variants(cfg, where)
    builder = edit_builder(cfg, where, variants)
    opts = {"redo_failed": redo_failed, "overwrite": overwrite}
    with worker_pool(cfg) as pool:
        summaries = []
        stages = input_stages(cfg)
        if cfg.bulk_edit.catalog:
            summaries += catalog_stages(cfg, cfg.bulk_edit.catalog, None, {**opts, "pool": pool},
                                        stages.images, stages.codes)
        specs = select(planned_edits(cfg, variants), shards)
        print(f"bulk-edit: {len(variants)} prompt variants × {len(cfg.bulk_edit.methods)} methods × decoders "
              f"{cfg.bulk_edit.decoder}, {len(specs)} shards")
        summaries.append(run_stage(builder, specs, cfg, pool=pool, **opts))
    for s in summaries:
        print(s.line())
    return {s.stage: s.to_dict() for s in summaries}


def edit_builder(cfg: RunConfig, where: str, variants: Sequence[EditVariant] = ()) -> EditBuilder:
    """The edit stage for this config; missing models, mappers or Rₛ are reported before any work.

    Rₛ is loaded when the run's τ, or any variant's own τ, is positive, or StyleCLIP-GD runs.
    """
    be = cfg.bulk_edit
    missing = [f"models.{m}" for m in ("generator", "clip") if getattr(cfg.models, m) is None]
    if missing:
        raise ConfigError(f"{where}: bulk-edit needs {', '.join(missing)}")
    mappers = tuple((m, _mapper_spec(cfg, m, where)) for m in be.methods if m != "styleclip_gd")
    relevance = f"relevance_{cfg.relevance.mode}"
    needs_relevance = be.tau > 0 or any((v.tau or 0) > 0 for v in variants) or "styleclip_gd" in be.methods
    if needs_relevance:
        _require_relevance(cfg, relevance, where)
    stages = input_stages(cfg)
    diffusion = _diffusion_spec(cfg, where) if any(d != "generator" for d in be.decoder) else None
    memory = memory_stages(cfg, where) if be.condition == "retrieved" and "deltaedit" in be.methods else ()
    return EditBuilder(cfg.models.generator, cfg.models.clip, mappers, cfg.root, be,
                       relevance if needs_relevance else None, diffusion=diffusion, memory_stages=memory,
                       n_stat_samples=cfg.relevance.n_stat_samples, seed=cfg.seed,
                       storage_options=cfg.storage_options, device=cfg.device, cpus=cfg.ray.cpus_per_actor,
                       codes_stage=stages.codes, clip_stage=stages.clip, images_stage=stages.images,
                       stage=stages.edits)


class Stages(NamedTuple):
    images: str
    codes: str
    clip: str
    edits: str
    metrics: str


def input_stages(cfg: RunConfig) -> Stages:
    """The stages of this config's edits: a bulk_edit.catalog's own (prefixed), else the run's."""
    p = CATALOG if cfg.bulk_edit.catalog else ""
    return Stages(f"{p}images", f"{p}codes", f"clip_{p}images", f"{p}edits", f"{p}metrics")


def edit_variants(cfg: RunConfig, where: str) -> list[EditVariant]:
    if not cfg.bulk_edit.prompts:
        raise ConfigError(f"{where}: bulk-edit needs bulk_edit.prompts (a YAML or CSV prompts file)")
    return load_prompts(cfg.bulk_edit.prompts, cfg.storage_options)


def planned_edits(cfg: RunConfig, variants: list[EditVariant]) -> list[ShardSpec]:
    """The edits shards of this config (prompts × methods × the ok codes); evaluate reads only these."""
    codes = StageStore(Location(cfg.root, cfg.storage_options), input_stages(cfg).codes)
    return plan_edits(codes, variants, cfg.bulk_edit.methods, cfg.bulk_edit)


def _mapper_spec(cfg: RunConfig, method: str, where: str) -> ModelSpec:
    """The configured mapper, else the one train-mapper wrote into this run."""
    if method == "deltaedit" and cfg.models.mapper is not None:
        return cfg.models.mapper
    if method == "straightforward" and cfg.bulk_edit.straightforward_mapper is not None:
        return cfg.bulk_edit.straightforward_mapper
    model = "delta" if method == "deltaedit" else "straightforward"
    folder = Location(cfg.root, cfg.storage_options).child(mapper_dir(model))
    if not folder.exists(MAPPER_FILE):
        setting = "models.mapper" if model == "delta" else "bulk_edit.straightforward_mapper"
        raise ConfigError(f"{where}: method '{method}' needs a trained mapper: {folder.url(MAPPER_FILE)} does "
                          f"not exist (run `deltaedit run train-mapper train_mapper.model={model}` to "
                          f"finish training, or set {setting})")
    name = "delta_mapper" if model == "delta" else "straightforward_mapper"
    return ModelSpec(name=name, checkpoint=folder.url(MAPPER_FILE))


def memory_stages(cfg: RunConfig, where: str) -> tuple[str, ...]:
    """The CLIP image-embedding stages of the mapper's training pools: the memory of condition=retrieved."""
    stages = tuple(POOLS[pool][1] for pool in cfg.train_mapper.pools)
    if not memory_shards(Location(cfg.root, cfg.storage_options), stages):
        raise ConfigError(f"{where}: bulk_edit.condition=retrieved searches the CLIP image embeddings the mapper "
                          f"was trained on ({', '.join(stages)} under {cfg.root}); none is finished: run "
                          "`deltaedit run preprocess` first, or set bulk_edit.condition=text "
                          "bulk_edit.mask=text")
    return stages


def _diffusion_spec(cfg: RunConfig, where: str) -> ModelSpec:
    """The configured diffusion decoder, else the one train-diffusion wrote into this run."""
    if cfg.models.diffusion is not None:
        return cfg.models.diffusion
    folder = Location(cfg.root, cfg.storage_options).child(DIFFUSION_DIR)
    if not folder.exists(DIFFUSION_FILE):
        raise ConfigError(f"{where}: bulk_edit.decoder {cfg.bulk_edit.decoder} needs a diffusion decoder: "
                          f"{folder.url(DIFFUSION_FILE)} does not exist (run `deltaedit run train-diffusion`, "
                          "or set models.diffusion)")
    return ModelSpec(name="style_diffusion", checkpoint=folder.url(DIFFUSION_FILE))


def _require_relevance(cfg: RunConfig, stage: str, where: str) -> None:
    try:
        load_relevance(cfg.root, stage, cfg.storage_options)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{where}: bulk-edit with tau > 0 or styleclip_gd needs the relevance matrix "
                          f"({exc}); run `deltaedit run relevance` first, or set bulk_edit.tau=0") from None
