"""Pool scaling: the same shards through a Ray pool of 1 actor and of 2 actors (1 CPU each)."""
from __future__ import annotations

import time

import ray

from infra.config import RayConfig
from infra.fsio import Location
from infra.ray_pool import ActorPool
from infra.store import StageStore
from infra.upstream import plan_downstream
from models.zoo import ModelSpec
from tasks.embed import EmbedBuilder
from tasks.invert import InvertBuilder


def _builder(kind: str, ckpt: str, root: str, batch_size: int):
    if kind == "embed":
        return EmbedBuilder(ModelSpec(name="open_clip", checkpoint=ckpt), root, "images",
                            batch_size=batch_size, device="cpu", cpus=1)
    return InvertBuilder(ModelSpec(name="e4e", checkpoint=ckpt), None, root, batch_size=batch_size,
                         device="cpu", cpus=1)


def actor_scaling(kind: str, ckpt: str, root: str, batch_size: int, repeat: int = 2) -> float:
    """Time(1 actor) / time(2 actors) for every shard of ``root``'s images store, best of ``repeat``.

    Each pool first loads its models and processes every shard once untimed: an actor's first shard
    also pays its one-time costs (pyarrow's lazy pandas import, the first forward's allocations),
    which a real run pays once per actor, not per shard.
    """
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    specs = plan_downstream(StageStore(Location(root), "images"))
    times = {}
    for n in (1, 2):
        builder = _builder(kind, ckpt, root, batch_size)
        out = f"{root}-out{n}"
        with ActorPool(out, {}, RayConfig(actors=n, cpus_per_actor=1), actors=n) as pool:
            pool.load(builder)
            runs = []
            for _ in range(repeat + 1):                                  # the first run warms up
                StageStore(Location(out), builder.stage).overwrite()
                start = time.perf_counter()
                reports = list(pool.map(specs))
                runs.append(time.perf_counter() - start)
                assert all(r.outcome == "ran" for r in reports)
            times[n] = min(runs[1:])
    return times[1] / times[2]
