"""Ray runtime: start or attach to a cluster, and pools of actors that each hold one stage processor.

Actors ask for a *fraction* of a CPU (``ray.cpus_per_actor``) so that on a 2-core machine two actors
plus the readers and the driver still fit; on GPU nodes each actor asks for ``gpus_per_actor``.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import ray

from infra.config import RayConfig
from infra.shards import ShardSpec
from infra.stage import ShardReport, StageBuilder, execute_shard, open_store

# Variables every Ray worker must see (the shared Prefect API, offline settings).
FORWARDED_ENV = ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED",
                 "RAY_AUTH_MODE", "HF_HUB_OFFLINE", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "OMP_NUM_THREADS")


def init_ray(cfg: RayConfig) -> dict[str, Any]:
    """Attach to ``cfg.address`` or start a local cluster; workers inherit FORWARDED_ENV. Idempotent."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True,
                                  "configure_logging": False}
        if cfg.address:
            ray.init(address=cfg.address, **kwargs)
        else:
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, **kwargs)
    return ray.cluster_resources()


def gpus_per_actor(cfg: RayConfig) -> float:
    """The configured GPUs per actor, or 1 when GPUs exist and ``use_gpu_if_available`` (0 otherwise)."""
    if cfg.gpus_per_actor:
        return cfg.gpus_per_actor
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    return 1.0 if (cfg.use_gpu_if_available and has_gpu) else 0.0


@ray.remote(max_restarts=1, max_task_retries=0)
class ShardActor:
    """A worker process that hosts one stage processor at a time; ``load`` builds it (models load
    there, once), ``run`` processes a shard. Reusing actors across stages skips process start-up."""

    def __init__(self, root_uri: str, storage_options: dict[str, Any]):
        self.root_uri, self.storage_options = root_uri, storage_options
        self.builder: StageBuilder | None = None

    def load(self, builder: StageBuilder) -> None:
        if builder != self.builder:
            self.processor = builder.build()
            self.store = open_store(self.root_uri, self.storage_options, builder.stage)
            self.code_fp = builder.fingerprint()
            self.builder = builder

    def run(self, spec: ShardSpec, redo_failed: bool = False) -> dict[str, Any]:
        if self.builder is None:
            raise RuntimeError("ShardActor has no stage loaded (restarted?); call load() first")
        return execute_shard(self.processor, spec, self.store, self.code_fp, redo_failed).to_dict()


class ActorPool:
    """N ShardActors for one run root. ``load(builder)`` readies a stage on every actor; ``submit``
    returns an ObjectRef, ``map`` yields reports as shards finish."""

    def __init__(self, root_uri: str, storage_options: dict[str, Any], cfg: RayConfig,
                 actors: int | None = None):
        n = actors or cfg.actors
        opts = {"num_cpus": cfg.cpus_per_actor, "num_gpus": gpus_per_actor(cfg)}
        self.actors = [ShardActor.options(**opts).remote(root_uri, storage_options) for _ in range(n)]
        self._next = 0

    def load(self, builder: StageBuilder) -> "ActorPool":
        ray.get([a.load.remote(builder) for a in self.actors])
        return self

    def submit(self, spec: ShardSpec, redo_failed: bool = False) -> ray.ObjectRef:
        """Round-robin; Ray queues calls on a busy actor."""
        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        return actor.run.remote(spec, redo_failed)

    def map(self, specs: Iterable[ShardSpec], redo_failed: bool = False) -> Iterator[ShardReport]:
        pool = ray.util.ActorPool(self.actors)
        for result in pool.map_unordered(lambda a, s: a.run.remote(s, redo_failed), list(specs)):
            yield ShardReport(**result)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "ActorPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
