"""Relevance flow: Rₛ (conv channels × CLIP dim) for the run's generator and CLIP, by blocks of channels.

    generator + CLIP ──relevance──► relevance_<mode> (one `direction` vector per channel)

Each block of ``relevance.block_size`` channels is a shard with a done-marker, run on the Ray actor pool
through per-shard Prefect tasks, so a crashed run resumes block by block. ``load_relevance`` assembles
the matrix; ``compare_relevance`` (``deltaedit relevance compare``) checks the fast mode against exact;
``import_relevance`` (``deltaedit relevance import fs3.npy``) writes a published matrix as the blocks of
``relevance_imported`` instead of computing one.
"""

from __future__ import annotations

from typing import Any

import torch
from prefect import flow

from flows.common import flow_config, worker_pool
from infra.config import ConfigError, RunConfig
from infra.runtime.orchestrate import run_stage
from infra.runtime.shards import ShardSpec, plan_shards, select
from infra.runtime.stage import execute_shard
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from models import zoo
from models.device import pick_device
from models.errors import CheckpointError
from models.relevance import compare_rows, freeze, style_statistics, subset_channels
from tasks.relevance import RelevanceBuilder, channel_items


@flow(name="relevance", log_prints=True)
def relevance_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    redo_failed: bool = False,
    overwrite: bool = False,
    shards: list[str] | None = None,
) -> dict[str, Any]:
    """Compute the missing blocks of Rₛ (``relevance.mode``); finished blocks are skipped."""
    cfg = flow_config(config_path, overrides)
    _require_models(cfg, config_path)
    if cfg.relevance.mode == "imported" and not cfg.relevance.source:
        raise ConfigError(
            f"{config_path or '<defaults>'}: relevance.mode imported needs relevance.source "
            "(StyleCLIP's fs3.npy); or run `deltaedit relevance import FILE`"
        )
    builder = RelevanceBuilder.from_config(cfg)
    specs = select(relevance_shards(cfg), shards)
    with worker_pool(cfg) as pool:
        summary = run_stage(
            builder, specs, cfg, redo_failed=redo_failed, overwrite=overwrite, pool=pool
        )
    print(summary.line())
    return {summary.stage: summary.to_dict()}


def relevance_shards(cfg: RunConfig) -> list[ShardSpec]:
    """Blocks of channels of the generator's conv layout (its checkpoint is read on the driver)."""
    gen = zoo.build(cfg.models.generator, device="cpu", storage_options=cfg.storage_options)
    return plan_shards(channel_items(gen.layout.conv_total), cfg.relevance.block_size)


def import_relevance(
    cfg: RunConfig, source: str | None = None, where: str | None = None
) -> dict[str, Any]:
    """A published Rₛ (StyleCLIP's fs3.npy: one row per conv-style channel in layer order) as this run's
    ``relevance_imported`` blocks, so bulk-edit with ``relevance.mode: imported`` reads it instead of a
    computed matrix. ``source`` (default: ``relevance.source``) is checked against the run's generator
    layout and CLIP dimension, and its rows normalised as StyleCLIP's GetFs does (models/relevance.py).

    Runs in this process (reading a file needs no actor pool) through the stage's own shard writer: the
    blocks, done-markers and fingerprint (the file's sha256, G and CLIP) are those ``deltaedit run
    relevance`` writes with ``relevance.mode: imported``, so importing the same file again skips every
    block and another file replaces them.
    """
    where = where or "<defaults>"
    source = source or cfg.relevance.source
    if not source:
        raise ConfigError(
            f"{where}: relevance import needs a file: `deltaedit relevance import fs3.npy` "
            "or relevance.source"
        )
    _require_models(cfg, where)
    r = cfg.relevance.model_copy(update={"mode": "imported", "source": source})
    cfg = cfg.model_copy(update={"relevance": r})
    builder = RelevanceBuilder.from_config(cfg)
    try:
        processor = builder.build()
    except CheckpointError as exc:
        raise ConfigError(f"{where}: relevance import: {exc}") from None
    store = StageStore(Location(cfg.root, cfg.storage_options), builder.stage)
    n = processor.generator.layout.conv_total
    fingerprint, outcomes = builder.fingerprint(), {"ran": 0, "skipped": 0}
    for spec in plan_shards(channel_items(n), r.block_size):
        report = execute_shard(processor, spec, store, fingerprint)
        outcomes["ran" if report.outcome == "ran" else "skipped"] += 1
    return {
        "stage": builder.stage,
        "uri": store.loc.uri,
        "source": source,
        "rows": n,
        "embed_dim": processor.clip.embed_dim,
        **outcomes,
    }


def compare_relevance(
    cfg: RunConfig,
    channels: int | None = None,
    top_k: int | None = None,
    prompts: list[str] | None = None,
) -> dict[str, Any]:
    """Exact vs fast on ``channels`` channels (seeded, across all layers), in this process: mean row
    cosine, top-k overlap of |Rₛ·Δt| per "source -> target" prompt, and the estimated speed ratio."""
    _require_models(cfg, None)
    r, device = cfg.relevance, pick_device(cfg.device)
    gen = zoo.build(cfg.models.generator, device=device, storage_options=cfg.storage_options)
    clip = zoo.build(cfg.models.clip, device=device, storage_options=cfg.storage_options)
    freeze(gen, clip.model)
    stats = style_statistics(gen, r.n_stat_samples, r.n_images, cfg.seed)
    subset = subset_channels(gen.layout.conv_total, channels or r.compare_channels, cfg.seed)
    deltas = {p: _delta(clip, p) for p in (prompts or r.compare_prompts)}
    return compare_rows(
        gen,
        clip,
        stats,
        subset,
        r.sigma_scale,
        (r.batch_size, r.jacobian_batch),
        deltas,
        top_k or r.compare_top_k,
        r.fast_rank,
    )


def format_comparison(result: dict[str, Any]) -> str:
    rank = f", rank {result['rank']}" if result["rank"] else ""
    lines = [
        f"relevance exact vs fast{rank} on {result['channels']} of {result['n_channels']} channels:",
        f"  mean row cosine {result['mean_row_cosine']:.4f} (min {result['min_row_cosine']:.4f}); "
        f"noise floor: exact on one half of the images vs the other {result['exact_split_half_cosine']:.4f}",
        f"  speed ratio {result['speed_ratio']:.1f}x (exact, all channels est. "
        f"{result['seconds_exact_all_est']:.1f}s; fast {result['seconds_fast_all']:.1f}s)",
    ]
    for prompt, overlap in result["top_k_overlap"].items():
        lines.append(f"  top-{result['top_k']} overlap {overlap:.2f}  {prompt}")
    return "\n".join(lines)


def _delta(clip: Any, prompt: str) -> torch.Tensor:
    """Δt of a "source -> target" prompt (unnormalised, as the relevance threshold uses it)."""
    if "->" not in prompt:
        raise ConfigError(f"prompt {prompt!r}: expected 'source -> target'")
    source, target = (p.strip() for p in prompt.split("->", 1))
    return clip.delta_text(source, target)


def _require_models(cfg: RunConfig, where: str | None) -> None:
    missing = [name for name in ("generator", "clip") if getattr(cfg.models, name) is None]
    if missing:
        raise ConfigError(
            f"{where or '<defaults>'}: relevance needs " + ", ".join(f"models.{m}" for m in missing)
        )
