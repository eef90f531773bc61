"""Run one stage over many shards: skip finished shards, drive the rest through per-shard Prefect tasks
on a Ray actor pool, show progress, and sum up (seen + reused = ok + failed, per shard outcome).

Counts come from the done-markers of every shard of the run (skipped ones too): ``seen`` samples went
through the processor when their shard was written, ``reused`` were copied unchanged from the shard's
previous outputs; ``processed`` counts the samples this call ran (what a rerun cost)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect.futures import as_completed
from prefect.utilities.annotations import quote
from tqdm.auto import tqdm

from infra.config import RunConfig
from infra.runtime.prefect_runtime import configured_shard_task
from infra.runtime.ray_pool import ActorPool, init_ray
from infra.runtime.shards import ShardSpec
from infra.runtime.stage import StageBuilder
from infra.storage.fsio import Location
from infra.storage.store import StageStore

log = logging.getLogger(__name__)


@dataclass
class StageSummary:
    stage: str
    shards: int = 0
    ran: int = 0
    redone: int = 0
    skipped: int = 0
    failed_shards: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    seen: int = 0
    ok: int = 0
    failed: int = 0
    reused: int = 0
    processed: int = 0
    seconds: float = 0.0

    @property
    def samples_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_s": round(self.samples_per_s, 3)}

    def line(self) -> str:
        return (
            f"{self.stage}: {self.shards} shards (ran {self.ran}, redone {self.redone}, skipped "
            f"{self.skipped}, failed {len(self.failed_shards)}); samples seen {self.seen}"
            + (f" + reused {self.reused}" if self.reused else "")
            + f" = ok {self.ok} + failed {self.failed}; processed now {self.processed}, "
            f"{self.samples_per_s:.1f} samples/s"
        )


def run_stage(
    builder: StageBuilder,
    shards: Sequence[ShardSpec],
    cfg: RunConfig,
    *,
    redo_failed: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    pool: ActorPool | None = None,
    plan: Sequence[ShardSpec] | None = None,
) -> StageSummary:
    """Process every shard of ``shards`` that is not finished (or has failed samples, with redo_failed).

    ``pool``: actors to reuse (a flow running several stages passes one); else one is made here.
    ``plan``: the stage's whole plan (``shards`` may be a selection of it), recorded as the stage's
    current shards; finished shards it does not list are stale (``StageStore.stale``). None: nothing
    is recorded.
    """
    start = time.perf_counter()
    store = StageStore(Location(cfg.root, cfg.storage_options), builder.stage)
    if overwrite:
        store.overwrite()
    store.loc.clean_stale_temporaries()
    code_fp = builder.fingerprint()
    if plan is not None:
        store.set_current(plan, code_fp)
    todo = [s for s in shards if redo_failed or not store.is_done(s, code_fp)]
    summary = StageSummary(builder.stage, shards=len(shards), skipped=len(shards) - len(todo))
    if todo:
        with contextlib.ExitStack() as stack:
            if pool is None:
                init_ray(cfg.ray)
                pool = stack.enter_context(ActorPool(cfg.root, cfg.storage_options, cfg.ray))
            _run_todo(
                builder,
                todo,
                cfg,
                store,
                code_fp,
                redo_failed,
                overwrite,
                summary,
                progress,
                pool.load(builder),
            )
    _add_counts(summary, store, shards)
    summary.seconds = round(time.perf_counter() - start, 3)
    log.info(summary.line())
    return summary


def _run_todo(
    builder: StageBuilder,
    todo: list[ShardSpec],
    cfg: RunConfig,
    store: StageStore,
    code_fp: str,
    redo_failed: bool,
    overwrite: bool,
    summary: StageSummary,
    progress: bool,
    pool: ActorPool,
) -> None:
    task = configured_shard_task(cfg.prefect, store.loc, refresh=overwrite or redo_failed)
    args = (builder.stage, cfg.root)
    # quote(): Prefect would otherwise walk every item of every spec (twice per task run, for lineage and
    # to resolve futures), which took most of the driver's CPU on a big bulk edit; a spec holds no futures.
    futures = {task.submit(pool, *args, quote(spec), code_fp, redo_failed): spec for spec in todo}
    with tqdm(total=len(todo), desc=builder.stage, unit="shard", disable=not progress) as bar:
        for fut in as_completed(futures):
            spec = futures[fut]
            try:
                report = fut.result()
                if not store.is_done(spec, code_fp):  # a cached report for outputs that are gone
                    log.warning(
                        "%s shard %s: cached result but no outputs; running it again",
                        builder.stage,
                        spec.shard_id,
                    )
                    report = task.with_options(refresh_cache=True)(
                        pool, *args, quote(spec), code_fp, redo_failed
                    )
            except Exception as exc:  # the shard failed after its retries; the others go on
                summary.failed_shards.append(spec.shard_id)
                summary.errors[spec.shard_id] = f"{type(exc).__name__}: {exc}"
                log.error("%s shard %s failed: %s", builder.stage, spec.shard_id, exc)
            else:
                _count_outcome(summary, report)
                _log_shard(builder.stage, spec.shard_id, report)
            bar.update(1)


def _log_shard(stage: str, shard_id: str, report: dict[str, Any]) -> None:
    rate = report["counts"]["seen"] / report["seconds"] if report["seconds"] else 0
    log.info(
        "%s shard %s %s: %s in %.2fs (%.1f samples/s)",
        stage,
        shard_id,
        report["outcome"],
        report["counts"],
        report["seconds"],
        rate,
    )


def _count_outcome(summary: StageSummary, report: dict[str, Any]) -> None:
    outcome = report["outcome"]
    summary.processed += report.get("processed", 0)
    if outcome == "ran":
        summary.ran += 1
    elif outcome == "redone":
        summary.redone += 1
    else:
        summary.skipped += 1


def _add_counts(summary: StageSummary, store: StageStore, shards: Sequence[ShardSpec]) -> None:
    """Sample counts over every finished shard of this run, from the done-markers."""
    for spec in shards:
        marker = store.marker(spec.shard_id)
        if marker:
            for k in ("seen", "ok", "failed", "reused"):
                setattr(summary, k, getattr(summary, k) + marker["counts"].get(k, 0))
