"""Evaluate flow: `deltaedit run evaluate --config FILE` after bulk-edit.

    edits + images ──metrics (per edit, on the actor pool)──► metrics
    metrics ──tables, FID/KID per prompt, grids, plots──► <root>/<evaluate.report_dir>/index.html

What is measured is what bulk-edit recorded in the edits store (``tasks.edit_plan.read_plan``): its
shards, variants, methods and decoders; the prompts file is not read again.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import flow_config, worker_pool
from infra.config import ConfigError, RunConfig
from infra.runtime.orchestrate import StageSummary, run_stage
from infra.runtime.shards import select
from infra.runtime.upstream import plan_downstream
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from tasks.analysis import edits as EA
from tasks.edit.plan import EditPlan, input_stages, read_plan
from tasks.evaluate import MetricsBuilder
from tasks.reporting import evaluation as ER


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    redo_failed: bool = False,
    overwrite: bool = False,
    shards: list[str] | None = None,
) -> dict[str, Any]:
    """Measure every edit (finished metric shards are skipped), then write the report."""
    cfg = flow_config(config_path, overrides)
    where = config_path or "<defaults>"
    stages = input_stages(cfg)
    edits = StageStore(Location(cfg.root, cfg.storage_options), stages.edits)
    plan = read_plan(edits)
    planned = plan_downstream(edits, plan.shards)
    specs = select(planned, shards)
    if not specs:
        raise ConfigError(
            f"{where}: none of the {len(plan.shards)} edits shards bulk-edit planned is finished "
            f"under {edits.loc.uri}; run `deltaedit run bulk-edit` first"
        )
    builder = metrics_builder(cfg, where)
    with worker_pool(cfg) as pool:
        summary = run_stage(
            builder,
            specs,
            cfg,
            redo_failed=redo_failed,
            overwrite=overwrite,
            pool=pool,
            plan=planned,
        )
    print(summary.line())
    uri = write_report(cfg, plan, summary, [s.shard_id for s in specs])
    print(f"report: {uri}")
    return {summary.stage: summary.to_dict(), "report": {"uri": uri}}


def metrics_builder(cfg: RunConfig, where: str) -> MetricsBuilder:
    ev = cfg.evaluate
    if cfg.models.clip is None:
        raise ConfigError(
            f"{where}: evaluate needs models.clip (CLIP direction, and FID features by default)"
        )
    if ev.features == "inception" and not ev.inception_weights:
        raise ConfigError(
            f"{where}: evaluate.features=inception needs evaluate.inception_weights (torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth: nothing is downloaded); or use features: clip"
        )
    return MetricsBuilder.from_config(cfg, input_stages(cfg))


@task(name="report", cache_policy=NO_CACHE)
def write_report(cfg: RunConfig, plan: EditPlan, metrics: StageSummary, shards: list[str]) -> str:
    root, stages = Location(cfg.root, cfg.storage_options), input_stages(cfg)
    rows, feats, feats_in = ER.load_metrics(StageStore(root, stages.metrics), shards)
    tabs = ER.tables(rows, feats, feats_in)
    analysis = EA.report_tables(root)  # `deltaedit analyze edits`, when it has been run
    tabs.update(analysis)
    grid = ER.grids(
        rows,
        StageStore(root, stages.edits),
        StageStore(root, stages.images),
        cfg.evaluate.grid_images,
    )
    summary = _summary(cfg, plan, StageStore(root, stages.edits), shards, metrics)
    notes = _notes(cfg, plan) + ([EA.REPORT_NOTE] if analysis else [])
    ev = cfg.evaluate
    identity = ev.identity_format if ev.identity_model else None
    comparable = ER.tab1_columns(ev.feature_extractor, identity)
    return ER.write(root.child(ev.report_dir), tabs, grid, summary, notes, comparable)


def _summary(
    cfg: RunConfig, plan: EditPlan, edits: StageStore, shards: list[str], metrics: StageSummary
) -> dict[str, str]:
    markers = [m for m in map(edits.marker, shards) if m]
    seen, ok, failed = (sum(m["counts"][k] for m in markers) for k in ("seen", "ok", "failed"))
    seconds = sum(m["timings"]["seconds"] for m in markers)
    ev = cfg.evaluate
    return {
        "run": cfg.root,
        "edits": f"{seen} seen = {ok} ok + {failed} failed",
        "edit time": f"{seconds:.1f} s in shards ({seen / seconds:.1f} edits/s per actor)"
        if seconds
        else "-",
        "methods": ", ".join(plan.methods),
        "decoders": ", ".join(plan.decoders),
        "tau": ", ".join(str(t) for t in sorted({v.tau for v in plan.variants})),
        "StyleCLIP-GD": f"alpha {cfg.bulk_edit.gd_alpha}, beta {cfg.bulk_edit.gd_beta}",
        "FID/KID features": ev.feature_extractor,
        "identity": f"{ev.identity_format} ({ev.identity_model})" if ev.identity_model else "-",
        "metrics": metrics.line(),
    }


def _notes(cfg: RunConfig, plan: EditPlan) -> list[str]:
    ev = cfg.evaluate
    notes = [
        ER.tab1_note(ev.feature_extractor, ev.identity_format if ev.identity_model else None),
        "vs recon: against the reconstruction by the same decoder (G(s), or DDIM encode → decode under "
        "s for +diffusion), so the inversion's errors are not charged to the edit; vs input: against the "
        "input photo (resized to the edit's size), inversion and edit together. Preservation and edit "
        "accuracy are measured vs recon too; the reconstruction table shows the inversion's errors.",
    ]
    if "diffusion_masked" in plan.decoders:
        notes.append(
            "psnr_outside_mask: PSNR against the diffusion reconstruction outside the edit mask of the "
            "mask-guided decode, for that decode and for the plain diffusion decode of the same edit."
        )
    if not ev.oracle:
        notes.append(
            "edit accuracy / preservation: no attribute oracle configured (evaluate.oracle)."
        )
    if not ev.lpips_weights:
        notes.append("LPIPS: not computed (set evaluate.lpips_weights to a local backbone file).")
    if not ev.identity_model:
        notes.append(
            "identity similarity: not computed (set evaluate.identity_model to e4e's "
            "model_ir_se50.pth, ArcFace IR-SE-50)."
        )
    if ev.feature_extractor == "clip":
        notes.append(
            "FID/KID are computed on the run's CLIP image features, not Inception: compare them "
            "only within this report."
        )
    return notes
