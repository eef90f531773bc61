"""Prefect glue: one API for the driver and every Ray worker, and the per-shard task that drives Ray.

Per-shard results are persisted under the stage's own folder (``<root>/<stage>/_prefect``), so the
cross-run cache (INPUTS + TASK_SOURCE) lives and dies with the outputs it describes: deleting or
overwriting a stage also forgets its cache, and a cache hit can never claim a shard that is gone.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
from typing import Any

import ray
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem

from infra.config import PrefectConfig
from infra.runtime.shards import ShardSpec
from infra.storage.fsio import Location

log = logging.getLogger(__name__)


def ensure_prefect_api() -> str | None:
    """Return PREFECT_API_URL, starting one temporary local API server first if none is configured.

    Without this, the driver would use Prefect's in-process ephemeral API and each Ray worker that
    touches Prefect would start its own. Call it before ``init_ray`` so workers inherit the URL.
    """
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(
        timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
    )
    atexit.register(server.stop)
    os.environ["PREFECT_API_URL"] = server.api_url
    log.info("started a local Prefect API at %s", server.api_url)
    return server.api_url


def result_storage(stage_location: Location) -> WritableFileSystem:
    """Where a stage's per-shard task results (and so its cache records) are persisted."""
    base = stage_location.child("_prefect")
    if base.is_local:
        block: WritableFileSystem = LocalFileSystem(basepath=os.path.abspath(base.path))
    else:
        block = RemoteFileSystem(basepath=base.uri, settings=base.storage_options)
    # Prefect wants result storage saved server-side; one block per location, named by its hash.
    name = "deltaedit-results-" + hashlib.sha1(base.uri.encode()).hexdigest()[:12]
    block.save(name, overwrite=True)
    return block


@task(name="shard", persist_result=True, cache_policy=(INPUTS - "pool") + TASK_SOURCE)
def shard_task(
    pool: Any, stage: str, root: str, spec: ShardSpec, code_fingerprint: str, redo_failed: bool
) -> dict[str, Any]:
    """Run one shard on the stage's actor pool and wait for its report.

    ``stage``, ``root`` and ``code_fingerprint`` are part of the inputs so the cache key changes with
    them; the pool is excluded from the key.
    """
    return ray.get(pool.submit(spec, redo_failed))


def configured_shard_task(cfg: PrefectConfig, stage_location: Location, refresh: bool):
    """``shard_task`` with the run's retries, result storage and caching choices."""
    options: dict[str, Any] = {
        "retries": cfg.retries,
        "retry_delay_seconds": cfg.retry_delay_seconds,
        "result_storage": result_storage(stage_location),
        "refresh_cache": refresh,
        "task_run_name": "{stage}-{spec.shard_id}",
    }
    if not cfg.cache:
        from prefect.cache_policies import NO_CACHE

        options["cache_policy"] = NO_CACHE
    return shard_task.with_options(**options)
