"""Bulk edit flow: `deltaedit run bulk-edit --config FILE bulk_edit.prompts=prompts.yaml`.

    codes + clip_images (the run's, or a new catalog's: ingest → invert → embed first)
        × prompt variants (tasks/prompts.py) × methods (deltaedit | straightforward | styleclip_gd)
        ──edit (Δt → Δŝ → Rₛ threshold τ → strength → decoder)──► edits (WebDataset + Parquet manifest)

Decoders (``bulk_edit.decoder``): the generator G(ŝ) (DeltaEdit-G) and/or the diffusion decoder, which
DDIM-encodes the photo under s and decodes under ŝ (DeltaEdit-D; ``diffusion_masked``: mask-guided).
Needs the mapper(s) of train-mapper, for the threshold and StyleCLIP-GD the relevance matrix, and for
DeltaEdit-D the model of train-diffusion (or ``models.diffusion``). The plan (shards, variants with
their τ, methods, decoders) is recorded in the edits store for evaluate (``tasks.edit.plan``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import flow_config, worker_pool
from flows.stages import catalog_stages
from infra.runtime.orchestrate import run_stage
from infra.runtime.shards import select
from tasks.edit.plan import edit_builder, edit_variants, input_stages, planned_edits, write_plan


@flow(name="bulk-edit", log_prints=True)
def bulk_edit_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    redo_failed: bool = False,
    overwrite: bool = False,
    shards: list[str] | None = None,
) -> dict[str, Any]:
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
            summaries += catalog_stages(
                cfg, cfg.bulk_edit.catalog, None, {**opts, "pool": pool}, stages
            )
        planned = planned_edits(cfg, variants, builder)
        specs = select(planned, shards)
        print(
            f"bulk-edit: {len(variants)} prompt variants × {len(cfg.bulk_edit.methods)} methods × decoders "
            f"{cfg.bulk_edit.decoder}, {len(specs)} shards"
        )
        summaries.append(run_stage(builder, specs, cfg, pool=pool, plan=planned, **opts))
    write_plan(cfg, planned, variants)  # after the run: overwrite empties the store first
    for s in summaries:
        print(s.line())
    return {s.stage: s.to_dict() for s in summaries}
