"""Ray runtime: start or attach to a cluster, and pools of actors that each hold one stage processor.

Actors ask for a *fraction* of a CPU (``ray.cpus_per_actor``) so that on a 2-core machine two
actors plus the readers and the driver still fit. GPUs: ``ray.gpus_per_actor`` (``auto``: the
cluster's GPUs shared by the actors, a fraction of one GPU each when there are more actors than
GPUs, 0 without GPUs). A pool the cluster cannot hold fails at once, saying what it asked and what
the cluster has; an actor that a busy cluster does not place within ``ray.ready_timeout_s`` fails
the pool too (Ray itself would wait forever). Attached to a cluster (``ray.address``), the driver's
code (flows, infra, models, tasks) travels to every node in the job's runtime_env; the nodes need
the same Python environment, and the data and model files as URIs or shared paths.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ray

from infra.config import RayConfig
from infra.runtime.shards import ShardSpec
from infra.runtime.stage import ShardReport, StageBuilder, execute_shard, open_store

# Variables every Ray worker must see (the shared Prefect API, offline settings).
FORWARDED_ENV = (
    "PREFECT_API_URL",
    "PREFECT_HOME",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "RAY_AUTH_MODE",
    "HF_HUB_OFFLINE",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "OMP_NUM_THREADS",
)
PROJECT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "infra", "models", "tasks")  # what a worker imports of this project
SHIP_EXCLUDES = ["__pycache__", "*.pyc"]


class PoolPlacementError(RuntimeError):
    """An actor pool that the cluster cannot hold (or did not place in time)."""


def init_ray(cfg: RayConfig) -> dict[str, Any]:
    """Attach to ``cfg.address`` or start a local cluster; workers inherit FORWARDED_ENV. Idempotent."""
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "runtime_env": runtime_env(cfg),
            "log_to_driver": True,
            "configure_logging": False,
        }
        if cfg.address:
            ray.init(address=cfg.address, **kwargs)
        else:
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, **kwargs)
    return ray.cluster_resources()


def runtime_env(cfg: RayConfig) -> dict[str, Any]:
    """The job's runtime_env: FORWARDED_ENV, and the project's packages when ``ship_code`` (default:
    when attaching to an address). Packages only, not a working_dir: workers keep their own current
    directory, so relative paths mean on every node what they mean without shipping; .venv, runs/,
    .git and the zoo's weights stay behind (models and data travel as URIs or shared paths)."""
    env: dict[str, Any] = {"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    ship = cfg.address is not None if cfg.ship_code is None else cfg.ship_code
    if ship:
        env["py_modules"] = [str(PROJECT / name) for name in PACKAGES]
        env["excludes"] = SHIP_EXCLUDES
    return env


def gpus_per_actor(
    cfg: RayConfig, cluster_gpus: float | None = None, actors: int | None = None
) -> float:
    """GPUs each actor asks for: the configured number, or for ``auto`` the cluster's whole GPUs
    shared by the actors — 1 when there are enough, else the largest fraction 1/k that packs every
    actor (k per GPU; 0 on a cluster without GPUs or with ``use_gpu_if_available: false``)."""
    if cfg.gpus_per_actor != "auto":
        return float(cfg.gpus_per_actor)
    if cluster_gpus is None:
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = math.floor(cluster_gpus)
    if not cfg.use_gpu_if_available or gpus < 1:
        return 0.0
    share = 1 / math.ceil((actors or cfg.actors) / gpus)
    return math.floor(share * 1e4) / 1e4  # Ray counts in 1e-4; rounding down keeps k per GPU


def actor_bundle(cfg: RayConfig, gpus: float) -> dict[str, float]:
    """The resources one actor asks for (zero amounts left out)."""
    bundle = {"CPU": cfg.cpus_per_actor, "GPU": gpus, **cfg.resources_per_actor}
    return {name: amount for name, amount in bundle.items() if amount > 0}


def actors_that_fit(bundle: Mapping[str, float], node: Mapping[str, float]) -> int:
    """How many actors of ``bundle`` one node's resources hold (a GPU fraction is from one GPU)."""
    counts = []
    for name, need in bundle.items():
        have = node.get(name, 0.0)
        if name == "GPU" and need < 1:
            counts.append(math.floor(have) * math.floor(1 / need + 1e-9))
        else:
            counts.append(math.floor(have / need + 1e-9))
    return min(counts, default=1 << 30)


def placement_problem(
    actors: int, bundle: Mapping[str, float], nodes: list[Mapping[str, float]]
) -> str | None:
    """Why ``actors`` actors of ``bundle`` can never be placed on ``nodes`` (their total
    resources), or None when they fit."""
    fit = sum(actors_that_fit(bundle, node) for node in nodes)
    if fit >= actors:
        return None
    total = {name: amount * actors for name, amount in bundle.items()}
    has = "; ".join(_resources(node, bundle) for node in nodes) or "no nodes"
    return (
        f"the actor pool cannot be placed: it asks for {actors} actors × "
        f"{_resources(bundle)} ({_resources(total)} in all), and the cluster's {len(nodes)} "
        f"node(s) ({has}) hold at most {fit} of them. Lower ray.actors, ray.cpus_per_actor or "
        "ray.gpus_per_actor (auto shares the cluster's GPUs), or add nodes."
    )


def _resources(amounts: Mapping[str, float], only: Iterable[str] | None = None) -> str:
    names = ["CPU", "GPU", *sorted(set(only or amounts) - {"CPU", "GPU"})]
    return ", ".join(f"{name} {amounts.get(name, 0):g}" for name in names)


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of every live node."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


@ray.remote(max_restarts=1, max_task_retries=0)
class ShardActor:
    """A worker process that hosts one stage processor at a time; ``load`` builds it (models load
    there, once), ``run`` processes a shard. Reusing actors across stages skips process start-up."""

    def __init__(self, root_uri: str, storage_options: dict[str, Any]):
        self.root_uri, self.storage_options = root_uri, storage_options
        self.builder: StageBuilder | None = None

    def node(self) -> str:
        """The Ray node this actor runs on (answering means it was placed and started)."""
        return ray.get_runtime_context().get_node_id()

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

    def __init__(
        self,
        root_uri: str,
        storage_options: dict[str, Any],
        cfg: RayConfig,
        actors: int | None = None,
    ):
        n = actors or cfg.actors
        self.bundle = actor_bundle(cfg, gpus_per_actor(cfg, actors=n))
        problem = placement_problem(n, self.bundle, cluster_nodes())
        if problem:
            raise PoolPlacementError(problem)
        opts = {
            "num_cpus": cfg.cpus_per_actor,
            "num_gpus": self.bundle.get("GPU", 0),
            "resources": dict(cfg.resources_per_actor),
        }
        self.actors = [
            ShardActor.options(**opts).remote(root_uri, storage_options) for _ in range(n)
        ]
        self.ready_timeout_s = cfg.ready_timeout_s
        self.nodes: list[str] = []  # each actor's node, once placed
        self._next = 0

    def wait_placed(self) -> list[str]:
        """Every actor's node; PoolPlacementError if some are not placed in ``ready_timeout_s``."""
        if not self.nodes:
            refs = [a.node.remote() for a in self.actors]
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.ready_timeout_s)
            if pending:
                raise PoolPlacementError(self._not_placed(len(pending)))
            self.nodes = ray.get(refs)
        return self.nodes

    def _not_placed(self, pending: int) -> str:
        free = _resources(ray.available_resources(), self.bundle)
        total = _resources(ray.cluster_resources(), self.bundle)
        return (
            f"{pending} of {len(self.actors)} actors ({_resources(self.bundle)} each) were not "
            f"placed within ray.ready_timeout_s={self.ready_timeout_s:g} s; the cluster has "
            f"{free} free of {total} (other work holds the rest)"
        )

    def load(self, builder: StageBuilder) -> "ActorPool":
        self.wait_placed()
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
